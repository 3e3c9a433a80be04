"""Splice kernels: apply per-request interventions to one hooked activation.

``splice`` dispatches per call:
- ``compact`` (torch, default): works on the host-compacted rows of intervening tokens only;
  unsteered tokens and padding cost nothing. Uses data-dependent shapes, so it is for eager
  execution inside an opaque custom op (CPU).
- ``reference``: fixed shapes over every token row (graph-capture safe); the specification.

``SAE_STEERING_KERNEL=reference`` forces the reference path (a kill switch for debugging).
"""

from __future__ import annotations

import logging
import os

import torch

from sae_runtime.kernels.compact import splice_compact
from sae_runtime.kernels.reference import splice_reference
from sae_runtime.saes.base import SAE

log = logging.getLogger(__name__)
_logged: set[str] = set()


def backend_for(device: torch.device) -> str:
    """The kernel backend used for tensors on ``device``."""
    forced = os.environ.get("SAE_STEERING_KERNEL", "").strip().lower()
    choice = forced if forced in ("reference", "compact") else "compact"
    if choice not in _logged:
        _logged.add(choice)
        log.info("SAE splice kernel: %s (device %s)", choice, device.type)
    return choice


__all__ = ["SAE", "backend_for", "splice_compact", "splice_reference"]
