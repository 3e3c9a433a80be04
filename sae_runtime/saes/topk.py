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

COUNT_COLUMNS = 2
"""Up to this many columns per row, membership is decided by counting the features that rank
above each column (``rows x columns x d_sae`` comparisons) instead of a top-k of every
feature: on the AVX2 EPYC, [64, 1024] with k = 16, one thread: 72 us for one column, 132
for two, 230 for the top-k."""


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
        rank, rank_cols = pre_full, pre_cols
        if sae.rank_scale is not None:
            rank, rank_cols = pre_full * sae.rank_scale, pre_cols * sae.rank_scale[cols]
        if pre_cols.dim() == 2 and pre_cols.shape[1] <= COUNT_COLUMNS:
            # member iff fewer than k features rank strictly above it: the same test as
            # ``>= the k-th largest`` (ties included), without a top-k of every feature
            above = (rank[:, None, :] > rank_cols[:, :, None]).sum(-1, dtype=torch.int32)
            return torch.relu(pre_cols) * (above < _k(sae))
        kth = rank.topk(_k(sae), dim=-1, sorted=True).values[..., -1:]  # [..., 1]
        return torch.relu(pre_cols) * (rank_cols >= kth)


def _k(sae: SAE) -> int:
    assert sae.cfg.k is not None, f"{sae.cfg.architecture} SAE without k"
    return sae.cfg.k


register(TopKArchitecture())
