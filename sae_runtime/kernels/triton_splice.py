"""Fused delta splice in Triton (the CUDA path).

Semantics (``reference.splice_reference``), one program per token row t of ``h [T, d]``:

    s, p = tok_slot[t], tok_pos[t]
    if s < 0: out[t] = h[t]                          # padding / unsteered: loads masked off
    else:
        xin = encoder input of resid[t]              # torch: ops.encoder_input, all T rows
        for k in range(K):                           # one [BLOCK_K] vector of edit rows
            e = slot_start[s] + k                    # masked off: k >= slot_len[s], or
            live = pos_lo[e] <= p < pos_hi[e]        #   p outside the edit's window, or
            live &= not by_token[e] or tok_match[t, k]  # the row's token not selected
            i, m, v = feature[e], mode[e], value[e]
            pre  = xin . W_enc[:, i] + b_enc[i]      # element-wise rules: touched columns only
                 | pre_full[t, i]                    # TopK family: gathered (see below)
            a    = rule(pre)                         # see the rules below
            coef = edited(m, v, a) - a               # 0 for Mode.NONE
        out[t] = h[t] + c(t) * sum_k coef[k] * W_dec[i_k]

    rule: standard, jumprelu, gated    triton_topk_read.ACT_RULES (element-wise)
          topk      relu(pre) * (score >= kth[t])       score = pre (* rank_scale[i] if set)
          abstopk   pre * (|pre| >= kth[t])              (negative activations kept)
          groupmax  relu(pre) * (relu(pre) >= gmax[t, i // (d_sae / k)])

with ``c(t)`` the SAE's output scale (``ops.encoder_input``; 1 without normalisation) and
accumulation in fp32. For the element-wise rules the encode, the edit and the decode of a
token run in one program; no ``[T, d_sae]`` or ``[T, K, d_in]`` buffer exists.

The TopK family (``topk``, ``abstopk``, ``groupmax``) needs the whole pre-activation row
for membership, so torch first computes the dense ``pre_full = xin @ W_enc + b_enc`` of
all T rows in the SAE dtype (the expression ``ops.intervention_delta`` evaluates) and
from it the per-row threshold: ``kth [T]``, the k-th largest ranking score (``pre_full``,
times ``rank_scale`` when set) for topk, the k-th largest ``|pre_full|`` for abstopk, or
``gmax [T, k]``, the per-group max of ``relu(pre_full)``, for groupmax. A feature tied with
the threshold is a member, as in ``saes/topk.py``, ``abstopk.py``, ``groupmax.py``. The
kernel then *gathers* the touched columns' pre-activations from ``pre_full`` instead of
recomputing their dots: a separately summed dot can round to the other side of the
threshold and flip membership, whereas the gathered value is bit for bit the one the
threshold was taken from and the one the reference gathers. The topk ranking score is
rounded to the dtype of ``pre_full * rank_scale`` as torch rounds it (``_round_like``), so
membership equals the reference's exactly in every dtype; what remains approximate in
bf16/fp16 is only the reference's rounding of each edit and of the decode to the SAE dtype
(the kernel accumulates in fp32). Cost for the TopK family: a dense encode of all T rows,
``O(T * d_in * d_sae)`` and a ``[T, d_sae]`` buffer, plus a ``topk`` (or a group max) per
row, the same as the reference's; the kernel itself is ``O(T * K * d_in)``. top-AFA (whose
threshold comes from a sort and cumulative sums of the row) is not fused: it runs
``splice_reference`` (also fixed-shape).

Shapes come from the tables, nothing reads back to the host and there is no
data-dependent Python control flow, so the launch (and the torch threshold computation) is
safe to capture in a CUDA graph. Padding rows (``tok_slot < 0``) come out as ``h``, bit for
bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sae_runtime import ops
from sae_runtime.kernels.reference import row_edits, splice_reference
from sae_runtime.kernels.triton_topk_read import ACT_RULES, _act_rule
from sae_runtime.saes.base import SAE
from sae_runtime.step.edits import EditTables

THRESHOLD_RULES = {"topk": 3, "abstopk": 4, "groupmax": 5}
"""TopK-family architectures the splice fuses with a per-row threshold, and their rule id."""

SPLICE_RULES = {**ACT_RULES, **THRESHOLD_RULES}
"""Every architecture the splice kernel computes; the others run ``splice_reference``."""

_CLAMP = tl.constexpr(int(ops.Mode.CLAMP))
_ABLATE = tl.constexpr(int(ops.Mode.ABLATE))
_SCALE = tl.constexpr(int(ops.Mode.SCALE))
_ADD = tl.constexpr(int(ops.Mode.ADD))
_NONE = tl.constexpr(int(ops.Mode.NONE))


@triton.jit
def _round_like(x, DT: tl.constexpr):
    """fp32 ``x`` rounded to ``DT`` (round to nearest even, as torch) and widened back.

    bf16 rounds by bit arithmetic: Triton's interpreter truncates a bf16 cast.
    """
    if DT == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    elif DT == tl.float16:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _threshold_rule(pre, feat, live, t, kth_ptr, stride_kth, rs_ptr, group,
                    ACT: tl.constexpr, HAS_RS: tl.constexpr):
    """TopK-family activation of pre-activations ``pre`` (fp32, exact values of
    ``pre_full``) of features ``feat`` at row ``t``, given the row's threshold(s)."""
    if ACT == 5:  # groupmax: the max of relu(pre) over the feature's group
        gmax = tl.load(kth_ptr + t * stride_kth + feat // group, mask=live,
                       other=0.0).to(tl.float32)
        a = tl.maximum(pre, 0.0)
        act = tl.where(a >= gmax, a, 0.0)
    else:
        kth = tl.load(kth_ptr + t * stride_kth + feat * 0, mask=live, other=0.0).to(tl.float32)
        if ACT == 3:  # topk
            score = pre
            if HAS_RS:  # the product torch forms, in the dtype it forms it in (kth's)
                rs = tl.load(rs_ptr + feat, mask=live, other=1.0).to(tl.float32)
                score = _round_like(pre * rs, kth_ptr.dtype.element_ty)
            act = tl.where(score >= kth, tl.maximum(pre, 0.0), 0.0)
        else:  # abstopk: signed values, membership by magnitude
            act = tl.where(tl.abs(pre) >= kth, pre, 0.0)
    return act


@triton.jit
def _splice_kernel(
    h_ptr, xin_ptr, scale_ptr, out_ptr, tok_slot_ptr, tok_pos_ptr, start_ptr, len_ptr,
    feat_ptr, mode_ptr, val_ptr, lo_ptr, hi_ptr, by_token_ptr, match_ptr,
    we_ptr, wd_ptr, b_ptr, thr_ptr, rs_ptr, bmag_ptr, rmag_ptr, pre_ptr, kth_ptr, on_ptr,
    D, K, group,
    stride_h, stride_x, stride_o, stride_m,
    stride_we0, stride_we1, stride_wd0, stride_wd1, stride_p, stride_kth,
    ACT: tl.constexpr, HAS_RS: tl.constexpr, HAS_SCALE: tl.constexpr, COND: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    s = tl.load(tok_slot_ptr + t)
    active = s >= 0
    sc = tl.maximum(s, 0)
    p = tl.load(tok_pos_ptr + t)
    start = tl.load(start_ptr + sc)
    n = tl.load(len_ptr + sc)
    kk = tl.arange(0, BLOCK_K)
    kmask = (kk < K) & (kk < n) & ((kk * 0 + s) >= 0)  # a vector mask (the interpreter wants one)
    e = start + kk
    lo = tl.load(lo_ptr + e, mask=kmask, other=0)
    hi = tl.load(hi_ptr + e, mask=kmask, other=0)
    kmask = kmask & (lo <= p) & (p < hi)  # the edit's position window
    by_tok = tl.load(by_token_ptr + e, mask=kmask, other=0)
    hit = tl.load(match_ptr + t * stride_m + kk, mask=kmask & (by_tok != 0), other=1)
    kmask = kmask & ((by_tok == 0) | (hit != 0))  # the row's token (token-id selectors)
    feat = tl.load(feat_ptr + e, mask=kmask, other=0)
    mode = tl.load(mode_ptr + e, mask=kmask, other=_NONE)
    val = tl.load(val_ptr + e, mask=kmask, other=0.0).to(tl.float32)
    live = kmask & (mode != _NONE)
    if COND:  # conditions (and latches) decided in torch: on[t, k] = the entry applies
        on = tl.load(on_ptr + t * K + kk, mask=kmask, other=0)
        live = live & (on != 0)
    dt = we_ptr.dtype.element_ty
    if ACT >= 3:  # TopK family: the pre-activations membership was decided on
        row = t.to(tl.int64) * stride_p  # T * d_sae can pass 2**31
        pre = tl.load(pre_ptr + row + feat, mask=live, other=0.0).to(tl.float32)
        act = _threshold_rule(pre, feat, live, t, kth_ptr, stride_kth, rs_ptr, group,
                              ACT, HAS_RS)
    else:
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
        act = _act_rule(pre, feat, live, b_ptr, thr_ptr, rs_ptr, bmag_ptr, rmag_ptr, ACT,
                        HAS_RS)
    act = act.to(dt).to(tl.float32)
    new = tl.where(mode == _CLAMP, val, act)
    new = tl.where(mode == _ABLATE, 0.0, new)
    new = tl.where(mode == _SCALE, act * val, new)
    new = tl.where(mode == _ADD, act + val, new)
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


def _thresholds(sae: SAE, pre_full: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(thresholds, group size)`` of rows ``pre_full [T, d_sae]``: ``kth [T]`` (topk,
    abstopk) or ``gmax [T, k]`` (groupmax), exactly as ``activate_columns`` forms them."""
    name, k = sae.cfg.architecture, sae.cfg.k
    assert k is not None, f"{name} SAE without k"
    if name == "groupmax":
        if sae.cfg.d_sae % k:
            raise ValueError(f"groupmax: d_sae={sae.cfg.d_sae} is not a multiple of k={k}")
        group = sae.cfg.d_sae // k
        return torch.relu(pre_full).unflatten(-1, (k, group)).amax(dim=-1), group
    if name == "abstopk":
        score = pre_full.abs()
    else:
        score = pre_full if sae.rank_scale is None else pre_full * sae.rank_scale
    return score.topk(k, dim=-1, sorted=True).values[:, -1], 1


def splice_triton(
    h: torch.Tensor,  # [T, d]
    resid: torch.Tensor,  # [T, d]
    sae: SAE,
    tables: EditTables,
    conditions: bool = True,
) -> torch.Tensor:
    """``h`` plus each token's edits; same contract as ``splice_reference``.

    ``conditions``: the step may hold conditional edits (always inside a graph capture).
    Their conditions and latches are decided in torch first (``reference.row_edits``,
    fixed shapes: a ``[T, K]`` gathered encode of the condition features) and handed to the
    kernel as an on/off mask; without them the kernel skips that pass.
    """
    name = sae.cfg.architecture
    if name not in SPLICE_RULES:  # top-AFA (or an architecture the kernel does not know)
        return splice_reference(h, resid, sae, tables)
    T, D = h.shape
    h = h.contiguous()
    out = torch.empty_like(h)
    if T == 0:
        return out
    xin, scale = ops.encoder_input(sae, resid.to(sae.W_enc.dtype))
    xin = xin.contiguous()
    scale_t = xin if scale is None else scale.expand(T, 1).contiguous()
    K = tables.width
    dummy = sae.b_enc
    pre_full, kth, group = dummy, dummy, 1
    if name in THRESHOLD_RULES:
        pre_full = xin @ sae.W_enc + sae.b_enc  # [T, d_sae], as ops.intervention_delta
        kth, group = _thresholds(sae, pre_full)
    on = dummy
    if conditions:
        x = resid.to(sae.W_enc.dtype)
        _, mode, _ = row_edits(tables, torch.arange(T, device=h.device),
                               lambda cols: ops.feature_activations(sae, x, cols))
        on = (mode != ops.Mode.NONE).to(torch.int8).contiguous()  # [T, K]
    _splice_kernel[(T,)](
        h, xin, scale_t, out, tables.tok_slot, tables.tok_pos, tables.slot_start,
        tables.slot_len, tables.feature, tables.mode, tables.value, tables.pos_lo,
        tables.pos_hi, tables.by_token, tables.tok_match,
        sae.W_enc, sae.W_dec, sae.b_enc,
        sae.threshold if sae.threshold is not None else dummy,
        sae.rank_scale if sae.rank_scale is not None else dummy,
        sae.b_mag if sae.b_mag is not None else dummy,
        sae.r_mag if sae.r_mag is not None else dummy,
        pre_full, kth, on,
        D, K, group,
        h.stride(0), xin.stride(0), out.stride(0), tables.tok_match.stride(0),
        *sae.W_enc.stride(), *sae.W_dec.stride(),
        pre_full.stride(0), kth.stride(0),
        ACT=SPLICE_RULES[name], HAS_RS=sae.rank_scale is not None, HAS_SCALE=scale is not None,
        COND=conditions,
        BLOCK_K=triton.next_power_of_2(max(K, 1)), BLOCK_D=min(128, triton.next_power_of_2(D)),
    )
    return out
