"""Fused delta splice in Triton (the CUDA path).

Semantics (``reference.splice_reference``), one program per token row t of ``h [T, d]``:

    s = tok_slot[t]
    if s < 0: out[t] = h[t]                          # padding / unsteered: loads masked off
    else:
        xin = encoder input of resid[t]              # torch: ops.encoder_input, all T rows
        for k in range(K):                           # one [BLOCK_K] vector of edits
            i, m, v = slot_feat[s, k], slot_mode[s, k], slot_val[s, k]
            pre  = xin . W_enc[:, i] + b_enc[i]      # only the touched encoder columns
            a    = rule(pre)                         # see triton_topk_read.ACT_RULES
            coef = edited(m, v, a) - a               # 0 for Mode.NONE
        out[t] = h[t] + c(t) * sum_k coef[k] * W_dec[i_k]

with ``c(t)`` the SAE's output scale (``ops.output_scale``; 1 without normalisation) and
accumulation in fp32. The encode, the edit and the decode of a token run in one program; no
``[T, d_sae]`` or ``[T, K, d_in]`` buffer exists. Shapes come from the tables, nothing
reads back to the host, so the launch is safe to capture in a CUDA graph. Architectures
whose activation needs the whole pre-activation row (TopK family, top-AFA) are not fused:
they run ``splice_reference`` (also fixed-shape).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sae_runtime import ops, registry
from sae_runtime.kernels.reference import splice_reference
from sae_runtime.kernels.triton_topk_read import ACT_RULES, _act_rule
from sae_runtime.saes.base import SAE


@triton.jit
def _splice_kernel(
    h_ptr, xin_ptr, scale_ptr, out_ptr, tok_slot_ptr, feat_ptr, mode_ptr, val_ptr,
    we_ptr, wd_ptr, b_ptr, thr_ptr, rs_ptr, bmag_ptr, rmag_ptr,
    D, K,
    stride_h, stride_x, stride_o, stride_f, stride_m, stride_v,
    stride_we0, stride_we1, stride_wd0, stride_wd1,
    ACT: tl.constexpr, HAS_RS: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    s = tl.load(tok_slot_ptr + t)
    active = s >= 0
    sc = tl.maximum(s, 0)
    kk = tl.arange(0, BLOCK_K)
    kmask = (kk < K) & ((kk * 0 + s) >= 0)  # a vector mask (the interpreter wants one)
    feat = tl.load(feat_ptr + sc * stride_f + kk, mask=kmask, other=0)
    mode = tl.load(mode_ptr + sc * stride_m + kk, mask=kmask, other=0)
    val = tl.load(val_ptr + sc * stride_v + kk, mask=kmask, other=0.0).to(tl.float32)
    live = kmask & (mode != 0)
    dt = we_ptr.dtype.element_ty
    dot = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        x = tl.load(xin_ptr + t * stride_x + d, mask=dmask & ((d * 0 + s) >= 0),
                    other=0.0).to(tl.float32)
        w = tl.load(we_ptr + d[None, :] * stride_we0 + feat[:, None] * stride_we1,
                    mask=live[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        dot += tl.sum(w * x[None, :], axis=1)
    b = tl.load(b_ptr + feat, mask=live, other=0.0)
    pre = (dot.to(dt).to(tl.float32) + b.to(tl.float32)).to(dt).to(tl.float32)
    act = _act_rule(pre, feat, live, b_ptr, thr_ptr, rs_ptr, bmag_ptr, rmag_ptr, ACT, HAS_RS)
    act = act.to(dt).to(tl.float32)
    new = tl.where(mode == 1, val, act)
    new = tl.where(mode == 2, 0.0, new)
    new = tl.where(mode == 3, act * val, new)
    new = tl.where(mode == 4, act + val, new)
    coef = tl.where(live, new - act, 0.0)
    c = 1.0
    if HAS_SCALE:
        c = tl.load(scale_ptr + t).to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        hv = tl.load(h_ptr + t * stride_h + d, mask=dmask, other=0.0)
        wd = tl.load(wd_ptr + feat[:, None] * stride_wd0 + d[None, :] * stride_wd1,
                     mask=live[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        delta = tl.sum(coef[:, None] * wd, axis=0) * c
        o = tl.where(active, (hv.to(tl.float32) + delta).to(hv.dtype), hv)
        tl.store(out_ptr + t * stride_o + d, o, mask=dmask)


def splice_triton(
    h: torch.Tensor,  # [T, d]
    resid: torch.Tensor,  # [T, d]
    sae: SAE,
    tok_slot: torch.Tensor,  # [>=T] int64, -1 = none
    slot_feat: torch.Tensor,  # [S, K] int64
    slot_mode: torch.Tensor,  # [S, K] int
    slot_val: torch.Tensor,  # [S, K] float
) -> torch.Tensor:
    """``h`` plus each token's edits; same contract as ``splice_reference``."""
    name = sae.cfg.architecture
    if name not in ACT_RULES or registry.get(name).needs_full_preactivation:
        return splice_reference(h, resid, sae, tok_slot, slot_feat, slot_mode, slot_val)
    T, D = h.shape
    h = h.contiguous()
    out = torch.empty_like(h)
    if T == 0:
        return out
    xin, scale = ops.encoder_input(sae, resid.to(sae.W_enc.dtype))
    xin = xin.contiguous()
    scale_t = xin if scale is None else scale.expand(T, 1).contiguous()
    K = slot_feat.shape[1]
    dummy = sae.b_enc
    _splice_kernel[(T,)](
        h, xin, scale_t, out, tok_slot, slot_feat, slot_mode, slot_val,
        sae.W_enc, sae.W_dec, sae.b_enc,
        sae.threshold if sae.threshold is not None else dummy,
        sae.rank_scale if sae.rank_scale is not None else dummy,
        sae.b_mag if sae.b_mag is not None else dummy,
        sae.r_mag if sae.r_mag is not None else dummy,
        D, K,
        h.stride(0), xin.stride(0), out.stride(0), slot_feat.stride(0), slot_mode.stride(0),
        slot_val.stride(0), *sae.W_enc.stride(), *sae.W_dec.stride(),
        ACT=ACT_RULES[name], HAS_RS=sae.rank_scale is not None, HAS_SCALE=scale is not None,
        BLOCK_K=triton.next_power_of_2(max(K, 1)), BLOCK_D=min(128, triton.next_power_of_2(D)),
    )
    return out
