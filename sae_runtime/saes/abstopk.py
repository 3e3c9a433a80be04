"""AbsTopK SAE (SAELens ``abstopk``; sparsify/EleutherAI ``signed`` TopK).

Keeps the k pre-activations of largest magnitude with their signs (no ReLU), so a feature
can fire in either direction (Zhu et al. 2025, "AbsTopK: Rethinking Sparse Autoencoders
For Bidirectional Features"). Negative clamp/add values are meaningful here.
A feature whose |pre| ties the k-th largest counts as a member.
"""

from __future__ import annotations

import torch

from sae_runtime.saes.base import SAE, register


class AbsTopKArchitecture:
    name = "abstopk"
    needs_full_preactivation = True
    needs_k = True
    extra_tensors: tuple[str, ...] = ()

    def activate(self, sae: SAE, pre: torch.Tensor, xin: torch.Tensor | None = None):
        indices = pre.abs().topk(_k(sae), dim=-1, sorted=False).indices
        return torch.zeros_like(pre).scatter_(-1, indices, pre.gather(-1, indices))

    def activate_columns(self, sae, pre_cols, cols, pre_full, xin=None):
        assert pre_full is not None, "AbsTopK needs the full pre-activation"
        kth = pre_full.abs().topk(_k(sae), dim=-1, sorted=True).values[..., -1:]  # [..., 1]
        return pre_cols * (pre_cols.abs() >= kth)


def _k(sae: SAE) -> int:
    assert sae.cfg.k is not None, "abstopk SAE without k"
    return sae.cfg.k


register(AbsTopKArchitecture())
