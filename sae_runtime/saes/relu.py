"""Standard (ReLU) SAE: ``f = relu(pre)`` (SAELens ``standard``, Llama Scope ``relu``)."""

from __future__ import annotations

import torch

from sae_runtime.saes.base import SAE, register


class ReLUArchitecture:
    name = "standard"
    needs_full_preactivation = False
    needs_k = False
    extra_tensors: tuple[str, ...] = ()

    def activate(self, sae: SAE, pre: torch.Tensor, xin: torch.Tensor | None = None):
        return torch.relu(pre)

    def activate_columns(self, sae, pre_cols, cols, pre_full, xin=None):
        return torch.relu(pre_cols)


register(ReLUArchitecture())
