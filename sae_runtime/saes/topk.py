"""TopK SAE (SAELens ``topk``, sparsify ``topk``, Llama Scope ``topk``): keep the k largest
pre-activations of the token, then ReLU them.

Membership of one feature depends on every pre-activation of the token, so even a
single-feature edit must compute the full ``[tokens, d_sae]`` pre-activation of the
tokens it touches (cost: tokens x d_in x d_sae multiply-adds).
A feature tied with the k-th largest value counts as a member.
Ranking uses ``pre * SAE.rank_scale`` when that is set (Llama Scope's
``sparsity_include_decoder_norm``); the values are ``relu(pre)`` either way.
"""

from __future__ import annotations

import torch

from sae_runtime.saes.base import SAE, register


class TopKArchitecture:
    name = "topk"
    needs_full_preactivation = True
    needs_k = True
    extra_tensors: tuple[str, ...] = ()

    def activate(self, sae: SAE, pre: torch.Tensor, xin: torch.Tensor | None = None):
        k = _k(sae)
        if sae.rank_scale is None:
            values, indices = pre.topk(k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, indices, values.relu())
        indices = (pre * sae.rank_scale).topk(k, dim=-1, sorted=False).indices
        return torch.zeros_like(pre).scatter_(-1, indices, pre.gather(-1, indices).relu())

    def activate_columns(self, sae, pre_cols, cols, pre_full, xin=None):
        assert pre_full is not None, "TopK needs the full pre-activation"
        if sae.rank_scale is None:
            kth = pre_full.topk(_k(sae), dim=-1, sorted=True).values[..., -1:]  # [..., 1]
            return torch.relu(pre_cols) * (pre_cols >= kth)
        kth = (pre_full * sae.rank_scale).topk(_k(sae), dim=-1, sorted=True).values[..., -1:]
        return torch.relu(pre_cols) * (pre_cols * sae.rank_scale[cols] >= kth)


def _k(sae: SAE) -> int:
    assert sae.cfg.k is not None, f"{sae.cfg.architecture} SAE without k"
    return sae.cfg.k


register(TopKArchitecture())
