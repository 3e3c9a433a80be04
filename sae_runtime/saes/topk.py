"""TopK SAE (SAELens ``topk``): keep the k largest pre-activations, then ReLU them.

Membership of one feature depends on every pre-activation of the token, so even a
single-feature edit must compute the full ``[tokens, d_sae]`` pre-activation of the
tokens it touches (cost: tokens x d_in x d_sae multiply-adds).
A feature tied with the k-th largest value counts as a member.
"""

from __future__ import annotations

import torch

from sae_runtime.registry import register
from sae_runtime.saes.base import SAE


class TopKArchitecture:
    name = "topk"
    needs_full_preactivation = True

    def activate(self, sae: SAE, pre: torch.Tensor) -> torch.Tensor:
        k = _k(sae)
        values, indices = pre.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def activate_columns(self, sae, pre_cols, cols, pre_full):
        assert pre_full is not None, "TopK needs the full pre-activation"
        kth = pre_full.topk(_k(sae), dim=-1, sorted=True).values[..., -1:]  # [..., 1]
        return torch.relu(pre_cols) * (pre_cols >= kth)


def _k(sae: SAE) -> int:
    assert sae.cfg.k is not None, "TopK SAE without k"
    return sae.cfg.k


register(TopKArchitecture())
