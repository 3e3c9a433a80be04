"""Standard (ReLU) SAE: ``f = relu(W_enc^T x' + b_enc)``."""

from __future__ import annotations

import torch

from sae_runtime.registry import register
from sae_runtime.saes.base import SAE


class ReLUArchitecture:
    name = "standard"
    needs_full_preactivation = False

    def activate(self, sae: SAE, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def activate_columns(self, sae, pre_cols, cols, pre_full):
        return torch.relu(pre_cols)


register(ReLUArchitecture())
