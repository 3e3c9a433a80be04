"""Reference splice: the specification every faster path must match.

Semantics, for every token row t of ``h [T, d]`` (padding rows included):

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
