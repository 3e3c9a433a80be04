"""Reference kernels: the specification every faster path must match.

- ``splice_reference``: apply a step's interventions (below);
- ``read_reference``: top-k and watched latents of reading rows, edits applied;
- ``sparse_decode_reference``: sparse codes to decoder-space vectors.

Splice semantics, for every token row t of ``h [T, d]`` (padding rows included):

    s = tok_slot[t]                      # -1: no intervention at this token
    if s < 0: out[t] = h[t]
    else:
        x = resid[t]                     # the true residual-stream value at the hook
        for k in range(K):
            i, m, v = slot_feat[s, k], slot_mode[s, k], slot_val[s, k]
            a = f_i(x)                   # the SAE's activation of feature i
            out[t] += (edited(m, v, a) - a) * W_dec[i] * c(x)

``c(x)`` is 1 unless the SAE normalises its input (``ops.output_scale``): the edit is made
in the SAE's feature space and mapped back to the stream's space.
All shapes are fixed by the tables, nothing reads back to the host, so the computation is
safe to capture in a CUDA graph. Cost is O(T * K * d_in) plus, for TopK SAEs,
O(T * d_in * d_sae).
"""

from __future__ import annotations

import torch

from sae_runtime import ops
from sae_runtime.saes.base import SAE


def splice_reference(
    h: torch.Tensor,  # [T, d] hidden state the edit is added to
    resid: torch.Tensor,  # [T, d] activation the SAE encodes
    sae: SAE,
    tok_slot: torch.Tensor,  # [>=T] int64, -1 = none
    slot_feat: torch.Tensor,  # [S, K] int64
    slot_mode: torch.Tensor,  # [S, K] int (ops.Mode)
    slot_val: torch.Tensor,  # [S, K] float
) -> torch.Tensor:
    T = h.shape[0]
    slot = tok_slot[:T]
    active = slot >= 0
    s = slot.clamp(min=0)
    feat = slot_feat[s]  # [T, K]
    mode = torch.where(active[:, None], slot_mode[s], torch.zeros_like(slot_mode[s]))
    x = resid.to(sae.W_enc.dtype)
    delta = ops.intervention_delta(sae, x, feat, mode, slot_val[s])
    return h + delta.to(h.dtype)


def read_reference(
    sae: SAE,
    x: torch.Tensor,  # [R, d_in] rows that read, in the SAE's dtype
    feat: torch.Tensor,  # [R, K] int64 the row's edits at this SAE
    mode: torch.Tensor,  # [R, K] int (ops.Mode; NONE = no edit)
    value: torch.Tensor,  # [R, K] float
    top_k: int,
    watch: torch.Tensor,  # [R, W] int64 watched features
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reads of rows ``x``: ``(values [R, top_k], indices [R, top_k], watched [R, W])``.

    Semantics (the specification of every read kernel):

        acts = ops.read_latents(sae, x, feat, mode, value)   # dense [R, d_sae], edits applied
        values, indices = acts.topk(top_k, dim=1)           # sorted, largest first
        watched = acts.gather(1, watch)

    Among features of equal value (the zeros of a sparse code, above all) the indices
    ``topk`` returns are unspecified; faster kernels may pick others.
    """
    acts = ops.read_latents(sae, x, feat, mode, value)  # [R, d_sae]
    vals, idx = acts.topk(top_k, dim=1)
    return vals, idx, acts.gather(1, watch)


def sparse_decode_reference(
    values: torch.Tensor,  # [N, k] feature values (0 for padding entries)
    indices: torch.Tensor,  # [N, k] int64 feature ids, each in [0, d_sae)
    W_dec: torch.Tensor,  # [d_sae, d_in]
) -> torch.Tensor:
    """``out[n] = sum_j values[n, j] * W_dec[indices[n, j]]`` -> ``[N, d_in]`` (no bias).

    Duplicate indices in a row add up; a padding entry carries value 0 and any valid index.
    """
    return torch.einsum("nk,nkd->nd", values.to(W_dec.dtype), W_dec[indices])
