"""JumpReLU SAE (SAELens, Gemma Scope): ``f = relu(pre) * (pre > threshold)`` per feature."""

from __future__ import annotations

import torch

from sae_runtime.registry import register
from sae_runtime.saes.base import SAE


class JumpReLUArchitecture:
    name = "jumprelu"
    needs_full_preactivation = False

    def activate(self, sae: SAE, pre: torch.Tensor) -> torch.Tensor:
        assert sae.threshold is not None
        return torch.relu(pre) * (pre > sae.threshold)

    def activate_columns(self, sae, pre_cols, cols, pre_full):
        assert sae.threshold is not None
        return torch.relu(pre_cols) * (pre_cols > sae.threshold[cols])


register(JumpReLUArchitecture())
