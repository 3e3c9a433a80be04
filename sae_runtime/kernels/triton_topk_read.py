"""Tiled encode + activation + top-k for reads in Triton (the CUDA path).

Semantics (``reference.read_reference``, restricted to element-wise activation rules):

    xin = ops.sae_input(sae, x)                       # torch, [R, d_in] reading rows only
    for each block of BR rows, tile [lo, lo + BT) of d_sae:        # one program each
        pre  = xin[rows] @ W_enc[:, lo:lo+BT] + b_enc[lo:lo+BT]    # fp32 accumulate,
        acts = rule(pre)                                           # rounded to the SAE dtype
        cand[rows, tile] = top-C of acts (values, feature ids)     # C = pow2 >= top_k + K
    # torch, fixed shapes: merge the per-tile candidates, apply the row's edits
    values, indices, watched = topk_read._finish(top-C of cand, ...)

    rule: standard  relu(pre)
          jumprelu  relu(pre) * (pre * rank_scale > threshold)
          gated     relu((pre - b_enc) * exp(r_mag) + b_mag) * (pre > 0)

The unedited activations at the edited and watched features come from the gathered
encoder columns (``ops.feature_activations``). The largest buffer is the candidate table
``[R, n_tiles, C]``; ``[R, d_sae]`` never exists. Inside a program the top-C of a
``[BR, BT]`` tile is one ``tl.topk`` over int64 keys that pack a value's order-preserving
bits (high word) and its column (low word). Architectures whose membership needs the whole
row (TopK family, top-AFA) use ``topk_read.read_tiled`` instead (torch, same interface).
Shapes come from the arguments; nothing reads back to the host (graph-capture safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sae_runtime import ops, registry
from sae_runtime.kernels import topk_read
from sae_runtime.saes.base import SAE

ACT_RULES = {"standard": 0, "jumprelu": 1, "gated": 2}
"""Architectures the kernels compute in-kernel, and their rule id."""


@triton.jit
def _act_rule(pre, cols, cmask, b_ptr, thr_ptr, rs_ptr, bmag_ptr, rmag_ptr,
              ACT: tl.constexpr, HAS_RS: tl.constexpr):
    """The activation of pre-activations ``pre`` of features ``cols`` (fp32)."""
    if ACT == 0:
        act = tl.maximum(pre, 0.0)
    elif ACT == 1:
        thr = tl.load(thr_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        score = pre
        if HAS_RS:
            score = pre * tl.load(rs_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
        act = tl.where(score > thr, tl.maximum(pre, 0.0), 0.0)
    else:
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        bm = tl.load(bmag_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        rm = tl.load(rmag_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        mag = (pre - b) * tl.exp(rm) + bm
        act = tl.where(pre > 0.0, tl.maximum(mag, 0.0), 0.0)
    return act


@triton.jit
def _tile_topk_kernel(
    x_ptr, w_ptr, b_ptr, thr_ptr, rs_ptr, bmag_ptr, rmag_ptr, cv_ptr, ci_ptr,
    R, D, S,
    stride_x, stride_wd, stride_ws,
    ACT: tl.constexpr, HAS_RS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BR: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_t = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    rows = pid_r * BR + tl.arange(0, BR)
    rmask = rows < R
    cols = pid_t * BT + tl.arange(0, BT)
    cmask = cols < S
    acc = tl.zeros((BR, BT), dtype=tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        dmask = d < D
        x = tl.load(x_ptr + rows[:, None] * stride_x + d[None, :],  # xin is contiguous
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        w = tl.load(w_ptr + d[:, None] * stride_wd + cols[None, :] * stride_ws,
                    mask=dmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:  # Triton's interpreter (CPU tensors) miscomputes bf16 dots
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    dt = w_ptr.dtype.element_ty
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0)
    # Round like the torch path: the matmul result, then the bias add, in the SAE dtype.
    pre = (acc.to(dt).to(tl.float32) + b[None, :].to(tl.float32)).to(dt).to(tl.float32)
    act = _act_rule(pre, cols[None, :], cmask[None, :], b_ptr, thr_ptr, rs_ptr, bmag_ptr,
                    rmag_ptr, ACT, HAS_RS)
    act = act.to(dt).to(tl.float32)
    act = tl.where(cmask[None, :], act, float("-inf"))
    # Order-preserving int32 image of the float, column in the low word: one topk.
    bits = act.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    local = tl.arange(0, BT)
    packed = (key.to(tl.int64) << 32) | local[None, :].to(tl.int64)
    top = tl.topk(packed, C)  # [BR, C]
    col = pid_t * BT + (top & 0xFFFFFFFF).to(tl.int32)
    k32 = (top >> 32).to(tl.int32)
    val = (k32 ^ ((k32 >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    c = tl.arange(0, C)
    off = rows[:, None] * (n_tiles * C) + pid_t * C + c[None, :]
    tl.store(cv_ptr + off, val, mask=rmask[:, None])
    tl.store(ci_ptr + off, tl.minimum(col, S - 1).to(tl.int64), mask=rmask[:, None])


def read_triton(
    sae: SAE,
    x: torch.Tensor,  # [R, d_in] rows that read, in the SAE's dtype
    feat: torch.Tensor,  # [R, K] int64
    mode: torch.Tensor,  # [R, K] int
    value: torch.Tensor,  # [R, K] float
    top_k: int,
    watch: torch.Tensor,  # [R, W] int64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values [R, top_k], indices [R, top_k], watched [R, W])``, as ``read_reference``."""
    name = sae.cfg.architecture
    if name not in ACT_RULES or registry.get(name).needs_full_preactivation:
        return topk_read.read_tiled(sae, x, feat, mode, value, top_k, watch)
    R, D = x.shape
    S = sae.cfg.d_sae
    K = feat.shape[1]
    need_act = ops.feature_activations(sae, x, torch.cat([feat, watch], dim=1))  # [R, K + W]
    if top_k == 0 or R == 0:
        empty = need_act.new_zeros(R, top_k), feat.new_zeros(R, top_k)
        vals, idx, watched = topk_read._finish(*empty, need_act, feat, mode, value, watch, top_k)
        return vals, idx, watched
    xin = ops.sae_input(sae, x).contiguous()
    C = triton.next_power_of_2(min(S, top_k + K))
    BT = max(128, C)
    BR, BD = 16, 32
    n_tiles = triton.cdiv(S, BT)
    cand_v = torch.empty(R, n_tiles * C, dtype=torch.float32, device=x.device)
    cand_i = torch.empty(R, n_tiles * C, dtype=torch.int64, device=x.device)
    W = sae.W_enc
    dummy = sae.b_enc
    _tile_topk_kernel[(triton.cdiv(R, BR), n_tiles)](
        xin, W, sae.b_enc,
        sae.threshold if sae.threshold is not None else dummy,
        sae.rank_scale if sae.rank_scale is not None else dummy,
        sae.b_mag if sae.b_mag is not None else dummy,
        sae.r_mag if sae.r_mag is not None else dummy,
        cand_v, cand_i, R, D, S, xin.stride(0), W.stride(0), W.stride(1),
        ACT=ACT_RULES[name], HAS_RS=sae.rank_scale is not None,
        PRECISION="ieee" if W.dtype == torch.float32 else None,  # fp32: no TF32 rounding
        UPCAST=x.device.type != "cuda",
        BR=BR, BT=BT, BD=BD, C=C,
    )
    top_v, pos = cand_v.topk(min(C, top_k + K), dim=1)
    return topk_read._finish(top_v.to(W.dtype), cand_i.gather(1, pos), need_act, feat, mode,
                             value, watch, top_k)
