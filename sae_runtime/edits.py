"""The edit record: one fixed-width row per edit a request makes at one hook.

Every intervention ends up as exactly one row of ``EDIT_DTYPE`` (built by the planner,
``sae_runtime.planner``, from the request's payload) and, per step, as one row of the
hook's edit tables (``sae_runtime.tables.HookTables``), which the kernels read through
``EditTables``:

    feature         int64    SAE feature index
    mode            int32    ops.Mode (NONE = a padding entry, contributes nothing)
    value           float32  clamp target / scale factor / added strength (0 for ABLATE)
    pos_lo, pos_hi  int64    absolute token positions [pos_lo, pos_hi) the edit applies to
    cond_feature    int64    -1 = unconditional (reserved: see below)
    cond_threshold  float32  reserved with cond_feature

Windows are half-open and absolute: an intervention's position selector
(``sae_runtime.selectors``) becomes one row per window when its prompt length is known
(``ALL`` = ``[0, POS_INF)``, ``GENERATION_ONLY`` = ``[prompt_len, POS_INF)``; ``POS_INF``
stands for "no end"). A selector with token ids is resolved per step instead: the planner
emits rows whose windows are the runs of matching positions in the step.

The condition columns are carried through every table but no kernel reads them yet (every
row today has ``cond_feature == -1``); the next issue's conditional edits will.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sae_runtime.selectors import POS_INF  # noqa: F401  (``pos_hi`` of an edit without an end)

NO_CONDITION = -1

EDIT_DTYPE = np.dtype([
    ("feature", np.int64),
    ("mode", np.int32),
    ("value", np.float32),
    ("pos_lo", np.int64),
    ("pos_hi", np.int64),
    ("cond_feature", np.int64),
    ("cond_threshold", np.float32),
])
"""One edit row (the record above); the columns of the hook's edit tables, in order."""

EDIT_COLUMNS: tuple[str, ...] = EDIT_DTYPE.names  # type: ignore[assignment]
COLUMN_TORCH_DTYPES = {"feature": torch.int64, "mode": torch.int32, "value": torch.float32,
                       "pos_lo": torch.int64, "pos_hi": torch.int64,
                       "cond_feature": torch.int64, "cond_threshold": torch.float32}


def edit_rows(n: int) -> np.ndarray:
    """``n`` empty edit rows (mode NONE, unconditional, empty window)."""
    rows = np.zeros(n, dtype=EDIT_DTYPE)
    rows["cond_feature"] = NO_CONDITION
    return rows


@dataclass(frozen=True)
class EditTables:
    """One hook's per-step edit tables as the kernels read them (fixed addresses).

    Layout: token row ``t`` belongs to edit slot ``tok_slot[t]`` (one slot per scheduled
    request that edits at this hook; -1 = none, padding rows included) and sits at absolute
    position ``tok_pos[t]``. Slot ``s`` owns the contiguous edit rows
    ``[slot_start[s], slot_start[s] + slot_len[s])``, with ``slot_len[s] <= width``. Edit
    ``e`` applies at row ``t`` iff it is one of the row's slot's edits and
    ``pos_lo[e] <= tok_pos[t] < pos_hi[e]``.
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
    cond_feature: torch.Tensor  # [max_edits] int64 (reserved)
    cond_threshold: torch.Tensor  # [max_edits] float32 (reserved)
    width: int  # K: the most edit rows one slot may own

    @staticmethod
    def build(tok_slot: torch.Tensor, tok_pos: torch.Tensor, slot_start: torch.Tensor,
              slot_len: torch.Tensor, edits: dict[str, torch.Tensor], width: int) -> EditTables:
        return EditTables(tok_slot, tok_pos, slot_start, slot_len,
                          *(edits[c] for c in EDIT_COLUMNS), width=width)
