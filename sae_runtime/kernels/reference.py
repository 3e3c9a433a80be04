"""Reference kernels: the specification every faster path must match.

- ``row_edits``: the edits that apply at given token rows, from a hook's edit tables
  (``placed_edits``: its part before conditions, which a CPU host may compute beforehand);
- ``splice_reference``: apply a step's interventions (below);
- ``read_reference``: top-k and watched latents of reading rows, edits applied;
- ``sparse_decode_reference``: sparse codes to decoder-space vectors.

The tables (``sae_runtime.step.edits.EditTables``): token row t has slot ``tok_slot[t]`` (-1 =
none) and position ``tok_pos[t]``; slot s owns edit rows ``slot_start[s] .. + slot_len[s]``.
Splice semantics, for every token row t of ``h [T, d]`` (padding rows included):

    s, p = tok_slot[t], tok_pos[t]       # s = -1: no intervention at this token
    out[t] = h[t]
    if s >= 0:
        x = resid[t]                     # the true residual-stream value at the hook
        for k in 0 .. slot_len[s] - 1:
            e = slot_start[s] + k
            if not pos_lo[e] <= p < pos_hi[e]: continue      # outside the edit's window
            if by_token[e] and not tok_match[t, k]: continue # the row's token is not selected
            if cond_op[e] != NONE:                           # a conditional edit
                ok = f_c(x) > thr[e] (GT) or < thr[e] (LT), c = cond_feature[e]
                if latch[e] >= 0:
                    if ok: latch_pos[latch[e]] = min(latch_pos[latch[e]], p)  # persistent
                    ok = ok or p >= latch_pos[latch[e]]
                if not ok: continue
            i, m, v = feature[e], mode[e], value[e]
            a = f_i(x)                   # the SAE's activation of feature i
            out[t] += (edited(m, v, a) - a) * W_dec[i] * c(x)

``c(x)`` is 1 unless the SAE normalises its input (``ops.encoder_input``'s scale): the edit
is made in the SAE's feature space and mapped back to the stream's space. Conditions are
evaluated on the same ``x`` (``row_edits`` with ``cond_act``), and the latch update is the
only write the splice makes besides its output: an in-place ``amin`` on the device.
All shapes are fixed by the tables (each slot is read as ``width`` entries, the ones past
``slot_len`` masked), nothing reads back to the host, so the computation is safe to capture
in a CUDA graph. Cost is O(T * K * d_in) plus, for TopK SAEs, O(T * d_in * d_sae).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sae_runtime import ops
from sae_runtime.saes.base import SAE
from sae_runtime.step.edits import POS_INF, Cond, EditTables

CondActivations = Callable[[torch.Tensor], torch.Tensor]
"""``cols [R, K] -> activations [R, K]`` of the same R rows the edits are taken for."""


def row_edits(
    tables: EditTables,
    rows: torch.Tensor,  # [R] int64 token rows (indices into tok_slot / tok_pos / tok_match)
    cond_act: CondActivations | None = None,
    width: int | None = None,
    placed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(feature, mode, value) [R, K]``: each row's slot's edits, ``K = width`` or
    ``tables.width``. A host that knows no slot of the step is longer than ``width``
    (``HookTables.edit_k``) passes it: the entries it drops are past every slot's length.

    An entry past the slot's length, outside the edit's position window, of a row whose
    token its token-id selector does not pick (``by_token`` and not ``tok_match``), or of
    a row without a slot has mode ``Mode.NONE`` (it contributes nothing). So has a
    conditional entry whose condition does not hold at the row (and whose latch is not set
    at or before it); ``cond_act`` gives the activations the conditions compare (the
    caller's rows, encoded as the SAE encodes them). Without ``cond_act`` every conditional
    entry is off: the host passes it whenever a step holds one (``HookTables.n_cond``).
    Latches are lowered in place (``EditTables.latch_pos``). Fixed shapes, no host reads:
    every kernel and the reads take a row's edits from here.

    ``placed = (e, live, p)``: ``placed_edits`` of these rows, computed beforehand (the CPU
    host does it with numpy: ``HookTables.placed``).
    """
    e, live, p = placed_edits(tables, rows, width) if placed is None else placed
    op = tables.cond_op[e]
    if cond_act is None:
        live = live & (op == int(Cond.NONE))
    else:
        live = live & ((op == int(Cond.NONE)) | condition_on(tables, e, op, live, p, cond_act))
    mode = tables.mode[e]
    mode = torch.where(live, mode, torch.full_like(mode, int(ops.Mode.NONE)))
    return tables.feature[e], mode, tables.value[e]


def placed_edits(tables: EditTables, rows: torch.Tensor, width: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(e, live, p)``: for rows ``rows [R]``, the edit row of each of their slot's entries
    ``e [R, K]`` (0 past the slot's length), whether it is live before conditions ``[R, K]``
    (inside the slot, the window holds the row's position, the token matches) and each
    row's position ``p [R, 1]``. ``width``: as in ``row_edits``."""
    slot, pos = tables.tok_slot[rows], tables.tok_pos[rows]
    width = tables.width if width is None else width
    k = torch.arange(width, device=slot.device)  # [K]
    has = slot >= 0
    s = slot.clamp(min=0)
    live = has[:, None] & (k[None, :] < tables.slot_len[s][:, None])  # [R, K]
    e = torch.where(live, tables.slot_start[s][:, None] + k[None, :], 0)  # [R, K] edit rows
    p = pos[:, None]
    live = live & (tables.pos_lo[e] <= p) & (p < tables.pos_hi[e])
    live = live & ((tables.by_token[e] == 0) | (tables.tok_match[rows, :width] != 0))
    return e, live, p


def condition_on(tables: EditTables, e: torch.Tensor, op: torch.Tensor, live: torch.Tensor,
                 p: torch.Tensor, cond_act: CondActivations) -> torch.Tensor:
    """``[R, K]``: where conditional entry ``e`` (inside its window: ``live``) is on at
    position ``p``: its condition holds there, or its latch was set at or before ``p``.
    Lowers the latches of entries whose condition holds (persistent, in place)."""
    a = cond_act(tables.cond_feature[e].clamp(min=0)).to(torch.float32)
    thr = tables.cond_threshold[e]
    ok = torch.where(op == int(Cond.GT), a > thr, a < thr) & live & (op != int(Cond.NONE))
    lid = tables.latch[e]
    latched = lid >= 0
    sink = tables.latch_pos.numel() - 1  # stays POS_INF: every other entry scatters POS_INF
    hit = ok & latched
    tables.latch_pos.scatter_reduce_(
        0, torch.where(hit, lid, sink).flatten(),
        torch.where(hit, p.expand_as(lid), POS_INF).flatten(), reduce="amin")
    return ok | (latched & live & (p >= tables.latch_pos[lid.clamp(min=0)]))


def splice_reference(
    h: torch.Tensor,  # [T, d] hidden state the edit is added to
    resid: torch.Tensor,  # [T, d] activation the SAE encodes
    sae: SAE,
    tables: EditTables,
) -> torch.Tensor:
    T = h.shape[0]
    x = resid.to(sae.W_enc.dtype)
    feat, mode, val = row_edits(tables, torch.arange(T, device=h.device),
                                lambda cols: ops.feature_activations(sae, x, cols))  # [T, K]
    delta = ops.intervention_delta(sae, x, feat, mode, val)
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
