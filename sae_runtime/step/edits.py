"""The edit record: one fixed-width row per edit a request makes at one hook.

Every intervention ends up as one row of ``EDIT_DTYPE`` per window of its position selector
(built by the planner, ``sae_runtime.step.planner``, from the request's payload) and, per
step, as one row of the hook's edit tables (``sae_runtime.step.tables.HookTables``), which
the kernels read through ``EditTables``. The columns are declared once, in ``COLUMNS``:

    feature         int64    SAE feature index
    mode            int32    ops.Mode (NONE = a padding entry, contributes nothing)
    value           float32  clamp target / scale factor / added strength (0 for ABLATE)
    pos_lo, pos_hi  int64    absolute token positions [pos_lo, pos_hi) the edit applies to
    cond_feature    int64    feature of the same SAE the condition reads (-1: none)
    cond_op         int32    Cond.NONE (unconditional) / Cond.GT / Cond.LT
    cond_threshold  float32  the edit applies where f_c(x) > (GT) or < (LT) this
    latch           int64    -1, or which latch state this row keeps (below)
    by_token        int32    1: the edit also needs the row's token to match its selector's
                             token ids (``EditTables.tok_match``)

Windows are half-open and absolute: an intervention's position selector
(``sae_runtime.spec.selectors``) becomes one row per window when its prompt length is known
(``ALL`` = ``[0, POS_INF)``, ``GENERATION_ONLY`` = ``[prompt_len, POS_INF)``; ``POS_INF``
stands for "no end"). A selector with token ids adds a per-step condition: the planner
writes, for each token row of the step and each edit of the row's slot, whether the token
the row consumes matches (``tok_match``), so one request takes one slot whatever its
tokens.

Conditional edits (``cond_op != NONE``): at a row inside its window, the edit applies only
where the condition holds: ``f_c(x) > t`` (GT) or ``f_c(x) < t`` (LT), with ``f_c`` the
activation of feature ``cond_feature`` of the same SAE, encoded from the same incoming
activation ``x`` as the edit itself (before the request's edits there). A latched edit
(``latch >= 0``) also applies at every position at or after the first one where its
condition held. That first position is the latch's state, ``POS_INF`` until the condition
holds; the rows of one latched edit (one per window of its selector) share it, so it
holds in every window once it held in one. A request keeps its latch states on the host
(``planner.RequestPlan.latch_state``, and its compiled rows' ``latch`` is the index
there); for a step the planner copies them into ``EditTables.latch_pos`` (a table row's
``latch`` is the index of the first of the step's rows sharing its state), the op lowers
them in place on the device without a host sync, and after the forward the planner reads
them back. So a step has at most one latch state per edit row and none can run out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sae_runtime.ops import Cond  # noqa: F401 - the cond_op column's values (defined beside Mode)
from sae_runtime.positions import POS_INF  # ``pos_hi`` of an edit without an end

NO_CONDITION = -1
NO_LATCH = -1




@dataclass(frozen=True)
class Column:
    """One column of the edit record: its name, numpy type and empty value."""

    name: str
    dtype: type
    fill: int | float = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.from_numpy(np.zeros(0, self.dtype)).dtype


COLUMNS: tuple[Column, ...] = (
    Column("feature", np.int64),
    Column("mode", np.int32),
    Column("value", np.float32),
    Column("pos_lo", np.int64),
    Column("pos_hi", np.int64),
    Column("cond_feature", np.int64, NO_CONDITION),
    Column("cond_op", np.int32),
    Column("cond_threshold", np.float32),
    Column("latch", np.int64, NO_LATCH),
    Column("by_token", np.int32),
)
"""The edit record (module docstring), declared once: ``EDIT_DTYPE``, the hook's edit
tables (one tensor per column) and the kernels' ``EditTables`` all follow it."""

EDIT_DTYPE = np.dtype([(c.name, c.dtype) for c in COLUMNS])
EDIT_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS)
COLUMN_TORCH_DTYPES = {c.name: c.torch_dtype for c in COLUMNS}
COLUMN_FILL = {c.name: c.fill for c in COLUMNS if c.fill != 0}
"""Columns whose empty value is not 0."""


def edit_rows(n: int, **columns) -> np.ndarray:
    """``n`` edit rows, the ``columns`` given by name (arrays of ``n`` values, or one value
    for all), every other column empty (mode NONE, unconditional, empty window)."""
    unknown = columns.keys() - set(EDIT_COLUMNS)
    if unknown:
        raise KeyError(f"not columns of the edit record: {sorted(unknown)}")
    rows = np.zeros(n, dtype=EDIT_DTYPE)
    for c, v in COLUMN_FILL.items():
        rows[c] = v
    for c, v in columns.items():
        rows[c] = v
    return rows


@dataclass(frozen=True)
class EditTables:
    """One hook's per-step edit tables as the kernels read them (fixed addresses).

    Layout: token row ``t`` belongs to edit slot ``tok_slot[t]`` (one slot per scheduled
    request that edits at this hook; -1 = none, padding rows included) and sits at absolute
    position ``tok_pos[t]``. Slot ``s`` owns the contiguous edit rows
    ``[slot_start[s], slot_start[s] + slot_len[s])``, with ``slot_len[s] <= width``. Edit
    ``e = slot_start[s] + k`` applies at row ``t`` iff it is one of the row's slot's edits,
    ``pos_lo[e] <= tok_pos[t] < pos_hi[e]``, ``by_token[e] == 0 or tok_match[t, k] != 0``
    and, for a conditional edit, its condition holds at the row (or its latch is set at or
    before the row's position; module doc). ``latch_pos [n + 1]`` holds the step's latch
    states (the last entry is a sink that stays ``POS_INF``).
    """

    tok_slot: torch.Tensor  # [max_tokens] int64
    tok_pos: torch.Tensor  # [max_tokens] int64
    tok_match: torch.Tensor  # [max_tokens, width] int8: row t's token matches edit k of its slot
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
    by_token: torch.Tensor  # [max_edits] int32
    latch_pos: torch.Tensor  # [n_latch + 1] int64
    width: int  # K: the most edit rows one slot may own

    @staticmethod
    def build(tok_slot: torch.Tensor, tok_pos: torch.Tensor, slot_start: torch.Tensor,
              slot_len: torch.Tensor, edits: dict[str, torch.Tensor], width: int,
              latch_pos: torch.Tensor | None = None,
              tok_match: torch.Tensor | None = None) -> EditTables:
        """``edits``: one tensor per column; an absent column is empty (unconditional, no
        latch, no token condition); without ``latch_pos`` there is only the sink (no
        latches), without ``tok_match`` no row's token matches."""
        dev, n = tok_slot.device, len(edits["feature"])
        if latch_pos is None:
            latch_pos = torch.full((1,), POS_INF, dtype=torch.int64, device=dev)
        if tok_match is None:
            tok_match = torch.zeros(tok_slot.shape[0], width, dtype=torch.int8, device=dev)
        cols = {c: edits[c] if c in edits else
                torch.full((n,), COLUMN_FILL.get(c, 0), dtype=COLUMN_TORCH_DTYPES[c], device=dev)
                for c in EDIT_COLUMNS}
        return EditTables(tok_slot, tok_pos, tok_match, slot_start, slot_len, **cols,
                          latch_pos=latch_pos, width=width)
