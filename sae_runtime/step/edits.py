"""The edit record: one fixed-width row per edit a request makes at one hook.

Every intervention ends up as exactly one row of ``EDIT_DTYPE`` (built by the planner,
``sae_runtime.step.planner``, from the request's payload) and, per step, as one row of the
hook's edit tables (``sae_runtime.step.tables.HookTables``), which the kernels read through
``EditTables``:

    feature         int64    SAE feature index
    mode            int32    ops.Mode (NONE = a padding entry, contributes nothing)
    value           float32  clamp target / scale factor / added strength (0 for ABLATE)
    pos_lo, pos_hi  int64    absolute token positions [pos_lo, pos_hi) the edit applies to
    cond_feature    int64    feature of the same SAE the condition reads (-1: none)
    cond_op         int32    Cond.NONE (unconditional) / Cond.GT / Cond.LT
    cond_threshold  float32  the edit applies where f_c(x) > (GT) or < (LT) this
    latch           int64    -1, or the id of this edit's latch (``EditTables.latch_pos``)

Windows are half-open and absolute: an intervention's position selector
(``sae_runtime.spec.selectors``) becomes one row per window when its prompt length is known
(``ALL`` = ``[0, POS_INF)``, ``GENERATION_ONLY`` = ``[prompt_len, POS_INF)``; ``POS_INF``
stands for "no end"). A selector with token ids is resolved per step instead: the planner
emits rows whose windows are the runs of matching positions in the step.

Conditional edits (``cond_op != NONE``): at a row inside its window, the edit applies only
where the condition holds: ``f_c(x) > t`` (GT) or ``f_c(x) < t`` (LT), with ``f_c`` the
activation of feature ``cond_feature`` of the same SAE, encoded from the same incoming
activation ``x`` as the edit itself (before the request's edits there). A latched edit
(``latch >= 0``) also applies at every position at or after the first one where its
condition held: ``EditTables.latch_pos[latch]`` keeps that first position across steps
(the op lowers it in place, on the device, without a host sync); the planner allocates a
latch per latched edit row for the request's lifetime and resets it to ``POS_INF``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch

from sae_runtime.positions import POS_INF  # ``pos_hi`` of an edit without an end

NO_CONDITION = -1
NO_LATCH = -1


class Cond(IntEnum):
    """Comparison of a conditional edit; the numbers match ``steering.v1.Comparison``."""

    NONE = 0  # unconditional
    GT = 1
    LT = 2

EDIT_DTYPE = np.dtype([
    ("feature", np.int64),
    ("mode", np.int32),
    ("value", np.float32),
    ("pos_lo", np.int64),
    ("pos_hi", np.int64),
    ("cond_feature", np.int64),
    ("cond_op", np.int32),
    ("cond_threshold", np.float32),
    ("latch", np.int64),
])
"""One edit row (the record above); the columns of the hook's edit tables, in order."""

EDIT_COLUMNS: tuple[str, ...] = EDIT_DTYPE.names  # type: ignore[assignment]
COLUMN_TORCH_DTYPES = {"feature": torch.int64, "mode": torch.int32, "value": torch.float32,
                       "pos_lo": torch.int64, "pos_hi": torch.int64,
                       "cond_feature": torch.int64, "cond_op": torch.int32,
                       "cond_threshold": torch.float32, "latch": torch.int64}
COLUMN_FILL = {"cond_feature": NO_CONDITION, "latch": NO_LATCH}
"""Columns whose empty value is not 0."""


def edit_rows(n: int) -> np.ndarray:
    """``n`` empty edit rows (mode NONE, unconditional, empty window)."""
    rows = np.zeros(n, dtype=EDIT_DTYPE)
    for c, v in COLUMN_FILL.items():
        rows[c] = v
    return rows


@dataclass(frozen=True)
class EditTables:
    """One hook's per-step edit tables as the kernels read them (fixed addresses).

    Layout: token row ``t`` belongs to edit slot ``tok_slot[t]`` (one slot per scheduled
    request that edits at this hook; -1 = none, padding rows included) and sits at absolute
    position ``tok_pos[t]``. Slot ``s`` owns the contiguous edit rows
    ``[slot_start[s], slot_start[s] + slot_len[s])``, with ``slot_len[s] <= width``. Edit
    ``e`` applies at row ``t`` iff it is one of the row's slot's edits and
    ``pos_lo[e] <= tok_pos[t] < pos_hi[e]`` and, for a conditional edit, its condition
    holds at the row (or its latch is set at or before the row's position; module doc).
    ``latch_pos [n_latch + 1]`` is persistent state (the last entry is a sink that stays
    ``POS_INF``).
    """

    tok_slot: torch.Tensor  # [max_tokens] int64
    tok_pos: torch.Tensor  # [max_tokens] int64
    slot_start: torch.Tensor  # [max_slots] int64
    slot_len: torch.Tensor  # [max_slots] int64
    feature: torch.Tensor  # [max_edits] int64
    mode: torch.Tensor  # [max_edits] int32
    value: torch.Tensor  # [max_edits] float32
    pos_lo: torch.Tensor  # [max_edits] int64
    pos_hi: torch.Tensor  # [max_edits] int64
    cond_feature: torch.Tensor  # [max_edits] int64
    cond_op: torch.Tensor  # [max_edits] int32 (Cond)
    cond_threshold: torch.Tensor  # [max_edits] float32
    latch: torch.Tensor  # [max_edits] int64, -1 = not latched
    latch_pos: torch.Tensor  # [n_latch + 1] int64, persistent across steps
    width: int  # K: the most edit rows one slot may own

    @staticmethod
    def build(tok_slot: torch.Tensor, tok_pos: torch.Tensor, slot_start: torch.Tensor,
              slot_len: torch.Tensor, edits: dict[str, torch.Tensor], width: int,
              latch_pos: torch.Tensor | None = None) -> EditTables:
        """``edits``: one tensor per column; an absent column is empty (unconditional, no
        latch); without ``latch_pos`` there is only the sink (no latches)."""
        dev, n = tok_slot.device, len(edits["feature"])
        if latch_pos is None:
            latch_pos = torch.full((1,), POS_INF, dtype=torch.int64, device=dev)
        cols = [edits[c] if c in edits else
                torch.full((n,), COLUMN_FILL.get(c, 0), dtype=COLUMN_TORCH_DTYPES[c], device=dev)
                for c in EDIT_COLUMNS]
        return EditTables(tok_slot, tok_pos, slot_start, slot_len, *cols, latch_pos=latch_pos,
                          width=width)
