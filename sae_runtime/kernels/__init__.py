"""SAE kernels: one interface per operation, a backend chosen per call.

Operations and their backends (``reference.py`` is the specification of each):

- splice (apply a step's interventions to one hooked activation):
  - ``compact`` (torch, the CPU path): only the host-compacted rows of intervening tokens do
    work; data-dependent shapes, so it runs eagerly inside the opaque custom op;
  - ``triton`` (CUDA): the fused delta splice of ``triton_splice.py``, fixed shapes;
  - ``reference``: fixed shapes over every token row; the specification.
- read (top-k and watched latents of the reading rows, edits applied):
  ``compact`` = ``topk_read.read_tiled`` (column tiles, running top-k), ``triton`` =
  ``triton_topk_read.read_triton``, ``reference`` = dense ``ops.read_latents``.
- sparse decode (codes ``values, indices [N, k]`` -> ``[N, d_in]``; ``decode_sparse`` maps
  it back through the SAE's output normalisation): ``compact`` =
  ``decode.sparse_decode`` (embedding-bag), ``triton`` = ``triton_decode``, ``reference`` =
  a dense gather-sum.

``backend_for`` picks ``triton`` for CUDA tensors when Triton imports, ``compact``
otherwise. ``SAE_STEERING_KERNEL`` is the kill switch: ``reference`` forces the reference
everywhere, ``compact`` (or ``torch``) forbids Triton. Each choice is logged once. The
Triton modules are imported only when a CUDA call needs them.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

from sae_runtime import ops
from sae_runtime.kernels.compact import splice_compact
from sae_runtime.kernels.decode import sparse_decode as sparse_decode_torch
from sae_runtime.kernels.reference import (
    read_reference,
    row_edits,
    sparse_decode_reference,
    splice_reference,
)
from sae_runtime.kernels.topk_read import read_tiled
from sae_runtime.saes.base import SAE
from sae_runtime.step.edits import EditTables

log = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()

ENV = "SAE_STEERING_KERNEL"


@functools.cache
def triton_available() -> bool:
    """Whether Triton is installed and a CUDA device is present (checked once)."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def backend_for(device: torch.device) -> str:
    """The kernel backend for tensors on ``device``: ``reference``, ``compact`` or ``triton``."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced == "reference":
        choice = "reference"
    elif forced in ("compact", "torch") or device.type != "cuda" or not triton_available():
        choice = "compact"
    else:
        choice = "triton"
    if (choice, device.type) not in _logged:
        _logged.add((choice, device.type))
        log.info("SAE kernel backend: %s (device %s)", choice, device.type)
    return choice


def splice_fixed(h: torch.Tensor, resid: torch.Tensor, sae: SAE,
                 tables: EditTables, conditions: bool = True) -> torch.Tensor:
    """The fixed-shape (graph-capture safe) splice: Triton on CUDA, else the reference.
    ``conditions``: the step may hold conditional edits (the reference always checks)."""
    if backend_for(h.device) == "triton":
        from sae_runtime.kernels.triton_splice import splice_triton

        return splice_triton(h, resid, sae, tables, conditions)
    return splice_reference(h, resid, sae, tables)


def read_topk(sae: SAE, x: torch.Tensor, feat: torch.Tensor, mode: torch.Tensor,
              value: torch.Tensor, top_k: int,
              watch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values [R, top_k], indices [R, top_k], watched [R, W])`` of the reading rows ``x``
    with their edits applied (``reference.read_reference``)."""
    backend = backend_for(x.device)
    if backend == "triton":
        from sae_runtime.kernels.triton_topk_read import read_triton

        return read_triton(sae, x, feat, mode, value, top_k, watch)
    if backend == "compact":
        return read_tiled(sae, x, feat, mode, value, top_k, watch)
    return read_reference(sae, x, feat, mode, value, top_k, watch)


def decode_sparse(sae: SAE, values: torch.Tensor, indices: torch.Tensor,
                  x: torch.Tensor | None = None) -> torch.Tensor:
    """``ops.decode`` of sparse codes ``values, indices [N, k]`` (an embedding-bag, no dense
    code).

    Equals ``ops.decode(sae, acts, x)`` where ``acts`` is zero except ``acts[n, indices[n,
    j]] += values[n, j]``; padding entries carry value 0. This is the decode for
    TopK-family codes and full reconstructions: ``N * k`` decoder rows are read instead of
    ``d_sae``.
    """
    return ops.from_decoder_space(sae, sparse_decode(values, indices, sae.W_dec) + sae.b_dec, x)


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``[N, d_in]`` = ``sum_j values[n, j] * W_dec[indices[n, j]]`` (no bias)."""
    backend = backend_for(W_dec.device)
    if backend == "triton":
        from sae_runtime.kernels.triton_decode import sparse_decode_triton

        return sparse_decode_triton(values, indices, W_dec)
    if backend == "compact":
        return sparse_decode_torch(values, indices, W_dec)
    return sparse_decode_reference(values, indices, W_dec)


__all__ = [
    "SAE", "EditTables", "backend_for", "read_reference", "read_tiled", "read_topk",
    "decode_sparse", "row_edits", "sparse_decode",
    "sparse_decode_reference", "sparse_decode_torch", "splice_compact", "splice_fixed",
    "splice_reference", "triton_available",
]
