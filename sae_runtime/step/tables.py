"""Per-step intervention and read tables of one hooked SAE, and the hook's computation.

No vLLM in here: the step planner (``sae_runtime/step/planner.py``) fills these tables from the
scheduled batch before each forward, and the custom op calls ``HookTables.apply`` inside it.

Every table is allocated once, at its largest size, so its address never changes. The
sizes come from one place, ``sae_runtime.spec.budget.TableSizes`` (the engine's
``max_num_seqs`` and ``max_num_batched_tokens``, ``--max-interventions`` and
``--max-watch``), which the server's admission check uses too: any step of admitted
requests fits, so the ``assert``s below state invariants, not limits a request can hit.
The edit layout (``sae_runtime.step.edits``):

- ``tok_slot [max_tokens]``: token row -> edit slot, -1 = the row has no edit here. One slot
  per scheduled request that edits at this hook, whatever its selectors;
- ``tok_pos [max_tokens]``: the absolute position of each row that has a slot (the per-token
  position table the kernels mask windows with);
- ``tok_match [max_tokens, edit_width]`` (int8): for a row of a request with token-id
  selectors, whether the row's token matches edit k of its slot (read only where the edit
  row's ``by_token`` is set, so other rows need no clearing);
- ``slot_start / slot_len [edit_slots]``: the contiguous run of edit rows slot s owns,
  ``[slot_start[s], slot_start[s] + slot_len[s])``, ``slot_len <= edit_width``;
- ``edit_<column> [edit_rows]``: the edit rows, one column per field of the edit record
  (``sae_runtime.step.edits.COLUMNS``); an edit applies at a row of its slot iff
  ``pos_lo <= tok_pos < pos_hi``, its token matches (``by_token``) and its condition, if
  any, holds (``edits``);
- ``latch_pos [edit_rows + 1]``: the step's latch states, at most one per edit row: the
  planner loads each latched edit's state from its request (``add_edits``), the op lowers
  it in place, and ``clear`` (after the forward) hands it back to the request;
- ``rows [max_tokens]``: the rows with a slot, compacted (the CPU path's index);
- ``read_rows / read_slot / read_pool [read_rows]``, ``rslot_watch [read_slots,
  watch_width]``: rows that read, their read slot and pool slot (the sink
  ``pool_slots`` for a read that does not pool), each read slot's watch list (a request may
  read one SAE twice: its own read and its guardrails' hidden read);
- ``pool_sum / pool_max [pool_slots + 1, d_sae]`` (float32, device only): the pooled
  reads' sums and maxima (``Encode``), one row per pooled read of the step plus the sink;
- ``stash [max_tokens, d_in]`` (transcoders only): the MLP input of this step, copied by
  ``stash_input`` (the ``sae_stash`` op before the MLP) for ``apply`` (after it).

The host fills the tables through numpy views. On CPU the kernels read those same tensors.
On another device (``staged``) the host tables live in pinned memory and ``upload`` copies
the prefix this step used into device mirrors with non-blocking copies; the device mirrors
never move, so kernels captured in a CUDA graph keep reading the current step's tables. The
host waits for the previous upload before it writes the host tables again (``clear``).

``apply`` picks the path:

- CPU (``compact`` backend): only the host-compacted edit rows do work; a step without
  edits or reads returns a copy of ``h`` at once;
- CUDA, eager: the fixed-shape fused splice (``kernels.splice_fixed``) over the step's rows,
  skipped when the host knows no row edits; reads on the host-counted reading rows;
- CUDA, while a graph is being captured: always the fixed-shape splice, never a host-count
  shortcut (a capture freezes Python decisions into every replay). Reads have a
  data-dependent row count, so they need the op to run outside captured graphs (the engine
  lists it in vLLM's ``splitting_ops``); a capture with reads pending raises.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sae_runtime import ops
from sae_runtime.kernels import backend_for, read_topk, row_edits, splice_compact, splice_fixed
from sae_runtime.saes.base import SAE
from sae_runtime.spec.budget import TableSizes, pool_chunk_rows
from sae_runtime.step.edits import (
    COLUMN_FILL,
    COLUMN_TORCH_DTYPES,
    EDIT_COLUMNS,
    POS_INF,
    Cond,
    EditTables,
)
from sae_runtime.step.tp_reads import ReadSplit


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


@dataclass(frozen=True)
class LatchLoad:
    """The latch states a batch of requests loads into one step (``add_edit_batch``).

    ``row_state [rows]``: for each edit row of the batch, the index of its state in
    ``values`` (-1: not latched); ``values [S]``: the states; state ``j`` lives at
    ``owners[owner[j]][local[j]]`` (a request's ``RequestPlan.latch_state`` array), where
    the step's final value is written back after the forward.
    """

    row_state: np.ndarray  # [rows] int64
    values: np.ndarray  # [S] int64
    owners: list[np.ndarray]
    owner: np.ndarray  # [S] int64
    local: np.ndarray  # [S] int64


def row_spans(a: np.ndarray, lens: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of spans ``[a[i], a[i] + lens[i])`` concatenated, and each one's span index."""
    if total == len(a) and bool((lens == 1).all()):  # one row each (a decode step)
        return a.astype(np.int64, copy=False), np.arange(len(a))
    which = np.repeat(np.arange(len(a)), lens)
    return np.arange(total) + np.repeat(a - (np.cumsum(lens) - lens), lens), which


class HookTables:
    """Preallocated per-step tables of one hooked SAE (see the module docstring)."""

    read_split: ReadSplit | None = None
    """Set once by the worker under tensor parallelism (``sae_runtime.step.tp_reads``): this
    rank's slice of the SAE's features; ``_read`` then computes that slice and merges the
    ranks' candidates. None: the read is computed whole."""

    def __init__(self, sae: SAE, max_tokens: int, max_slots: int, max_feats: int,
                 max_watch: int = 0, *, staged: bool | None = None,
                 act_dtype: torch.dtype | None = None, inline_row: int | None = None) -> None:
        """The engine's budgets: ``max_tokens`` = ``max_num_batched_tokens``, ``max_slots`` =
        ``max_num_seqs``, ``max_feats`` = ``--max-interventions``, ``max_watch`` =
        ``--max-watch``; every table's size follows from them (``self.sizes``,
        ``budget.TableSizes``). ``act_dtype``: the model's activation dtype (a transcoder's
        stashed MLP input keeps it); ``inline_row``: a vector bank taking inline vectors,
        whose decoder rows from ``inline_row`` on are one scratch row per edit slot
        (``write_inline``)."""
        dev = sae.W_enc.device
        self.sae = sae
        self.sizes = z = TableSizes.of(max_num_seqs=max_slots, max_num_batched_tokens=max_tokens,
                                       max_interventions=max_feats, max_watch=max_watch)
        self.max_slots = z.edit_slots
        self.max_feats = z.edit_width
        self.staged = dev.type != "cpu" if staged is None else staged
        shapes = {
            "tok_slot": ((z.max_tokens,), torch.int64, -1),
            "tok_pos": ((z.max_tokens,), torch.int64, 0),
            "tok_match": ((z.max_tokens, z.edit_width), torch.int8, 0),
            "rows": ((z.max_tokens,), torch.int64, 0),
            "slot_start": ((z.edit_slots,), torch.int64, 0),
            "slot_len": ((z.edit_slots,), torch.int64, 0),
            **{f"edit_{c}": ((z.edit_rows,), COLUMN_TORCH_DTYPES[c], COLUMN_FILL.get(c, 0))
               for c in EDIT_COLUMNS},
            # the step's latch states, one per edit row, and the sink (stays POS_INF)
            "latch_pos": ((z.edit_rows + 1,), torch.int64, POS_INF),
            "read_rows": ((z.read_rows,), torch.int64, 0),
            "read_slot": ((z.read_rows,), torch.int64, 0),
            "read_pool": ((z.read_rows,), torch.int64, z.pool_slots),
            "rslot_watch": ((z.read_slots, z.watch_width), torch.int64, 0),
        }
        pin = dev.type == "cuda"
        self.host = {n: torch.full(s, f, dtype=dt, pin_memory=pin) for n, (s, dt, f) in shapes.items()}
        self._np = {n: t.numpy() for n, t in self.host.items()}
        if self.staged:
            self.dev = {n: torch.full(s, f, dtype=dt, device=dev) for n, (s, dt, f) in shapes.items()}
        else:
            self.dev = self.host
        for n, t in self.dev.items():  # the kernels read the device tables
            setattr(self, n, t)
        # The step's latch states come back to the host after the forward (``clear``).
        self._latch_back = (torch.empty(z.edit_rows, dtype=torch.int64, pin_memory=pin)
                            if self.staged else self.host["latch_pos"])
        self._latch_owners: list[tuple] = []  # (owners, owner, local, entry, loaded) per
        # batch of latched rows this step (``add_edit_batch``)
        self._latch_pending: list[tuple] = []
        self._latch_done: torch.cuda.Event | None = None
        self.edits = EditTables.build(
            self.dev["tok_slot"], self.dev["tok_pos"], self.dev["slot_start"],
            self.dev["slot_len"], {c: self.dev[f"edit_{c}"] for c in EDIT_COLUMNS}, z.edit_width,
            self.dev["latch_pos"], self.dev["tok_match"])
        # Pooled reads (Encode): sums and maxima of d_sae latents per pooled read, at fixed
        # addresses allocated here, so the engine's memory profile counts them.
        self.pool_sum = torch.zeros(z.pool_slots + 1, sae.cfg.d_sae, dtype=torch.float32,
                                    device=dev)
        self.pool_max = torch.full_like(self.pool_sum, -float("inf"))
        self.pool_chunk = pool_chunk_rows(sae.cfg.d_sae)
        # A transcoder encodes the MLP input but edits the MLP output: ``stash_input`` copies
        # the input here (a fixed address, so a captured graph replays it) before the MLP.
        self.stash = (torch.zeros(z.max_tokens, sae.cfg.d_in, dtype=act_dtype or sae.W_enc.dtype,
                                  device=dev) if sae.cfg.transcoder else None)
        self.inline_row = -1 if inline_row is None else inline_row
        if inline_row is not None and sae.cfg.d_sae < inline_row + z.edit_slots:
            raise ValueError(f"a bank with inline row {inline_row} needs {z.edit_slots} scratch "
                             f"rows; it has {sae.cfg.d_sae - inline_row}")
        self._kept: tuple | None = None  # (key, widest slot, conditional rows, latch
        # layout) of the edit rows the step's first batch left (``add_edit_batch``)
        self.plan_batch: tuple | None = None  # the planner's rows of the scheduled requests
        # (``planner._HookBatch``), reused while the same requests are scheduled
        self.n_rows = 0
        self.n_slots = 0
        self.n_edits = 0
        self.n_cond = 0  # conditional edit rows this step
        self.edit_k = 0  # the most edit rows one slot has this step
        self.n_read = 0
        self.n_rslots = 0
        self.n_pool = 0  # pooled reads this step
        self.read_k = 0  # largest top_k asked this step
        self.read_w = 0  # longest watch list this step
        self.read_out: tuple | None = None  # (topk values, topk indices, watch values, pools)
        self._dirty_until = 0  # host tok_slot[:_dirty_until] may be != -1
        self._dev_dirty = 0  # device tok_slot[:_dev_dirty] may be != -1
        self._match_until = 0  # tok_match[:_match_until] written this step
        self._upload_done: torch.cuda.Event | None = None

    @property
    def read_pooled(self) -> bool:
        """Some read this step pools (the host-side count is the same on every TP rank)."""
        return self.n_pool > 0

    # ------------------------------------------------------------------ host side

    def clear(self) -> None:
        """Forget this step's edits and reads (after the forward); its latch states go back
        to their requests (``settle_latches``)."""
        self._wait_upload()
        self.settle_latches()  # (a no-op unless no plan ran since the last forward)
        if self._latch_owners:
            if self.staged:  # device -> pinned host, read by settle_latches before the next plan
                n = self.n_edits
                self._latch_back[:n].copy_(self.dev["latch_pos"][:n], non_blocking=True)
                if self.latch_pos.is_cuda:
                    self._latch_done = torch.cuda.Event()
                    self._latch_done.record()
            self._latch_pending, self._latch_owners = self._latch_owners, []
            if not self.staged:
                self.settle_latches()
        if self._dirty_until:
            self._np["tok_slot"][: self._dirty_until] = -1
        self.n_rows = self.n_slots = self.n_edits = self.n_cond = self._dirty_until = 0
        self.edit_k = 0
        self.n_read = self.n_rslots = self.n_pool = self.read_k = self.read_w = 0
        self._match_until = 0
        self.read_out = None

    def settle_latches(self) -> None:
        """Hand the last step's latch states back to their requests (the planner calls it
        before it plans a step; on CPU ``clear`` already did)."""
        if not self._latch_pending:
            return
        if self._latch_done is not None:
            self._latch_done.synchronize()
            self._latch_done = None
        back = self._latch_back.numpy()
        for owners, owner, local, entry, loaded in self._latch_pending:
            now = back[entry]
            # a state only changes where a condition held this step: hand back those
            for i in np.flatnonzero(now != loaded).tolist():
                owners[owner[i]][local[i]] = now[i]
        self._latch_pending = []

    def add_read_rows(self, a: int, b: int, top_k: int, watch: tuple[int, ...],
                      pooled: bool) -> tuple[int, int]:
        """Token rows [a, b) are read; returns the offset of the first one in the read output
        and the read's pool slot (-1: not pooled). One read of ``add_read_batch``."""
        w = np.asarray(watch, dtype=np.int64)[None, :]
        offs, pools = self.add_read_batch(np.array([a]), np.array([b]), np.array([top_k]),
                                          w, np.array([w.shape[1]]), np.array([pooled]))
        return int(offs[0]), int(pools[0])

    def add_read_batch(self, a: np.ndarray, b: np.ndarray, top_k: np.ndarray,
                       watch: np.ndarray, n_watch: np.ndarray,
                       pooled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reads ``i = 0..n-1``, in order, each of token rows ``[a[i], b[i])`` (``b > a``), one
        read slot each; ``watch [n, >= max(n_watch)]`` their watch lists (row i's first
        ``n_watch[i]`` entries), ``pooled [n]`` bool. Returns each read's offset of its first
        row in the read output and its pool slot (-1: not pooled)."""
        z = self.sizes
        s, r, n = self.n_rslots, self.n_read, len(a)
        lens = b - a
        total = int(lens.sum())
        w = int(n_watch.max())
        # Invariants (budget): a request reads an SAE at most READS_PER_SAE times, pooled
        # at most POOLED_READS_PER_SAE, over its own rows; watch lists fit watch_width.
        assert s + n <= z.read_slots and r + total <= z.read_rows and w <= z.watch_width
        t = self._np
        if w:
            t["rslot_watch"][s : s + n, :w] = watch[:, :w]
        offs = r + np.cumsum(lens) - lens
        pools = np.where(pooled, self.n_pool + np.cumsum(pooled) - 1, -1)
        n_pool = self.n_pool + int(np.count_nonzero(pooled))
        assert n_pool <= z.pool_slots
        rows, which = row_spans(a, lens, total)
        t["read_rows"][r : r + total] = rows
        t["read_slot"][r : r + total] = s + which
        t["read_pool"][r : r + total] = np.where(pools < 0, z.pool_slots, pools)[which]
        self.n_read, self.n_rslots, self.n_pool = r + total, s + n, n_pool
        self.read_k = max(self.read_k, int(top_k.max()))
        self.read_w = max(self.read_w, w)
        return offs, pools

    def add_edits(self, a: int, b: int, pos0: int, edits: np.ndarray, *,
                  match: np.ndarray | None = None,
                  latch_state: np.ndarray | None = None) -> int:
        """Token rows [a, b), at positions pos0.., apply ``edits`` (``edits.EDIT_DTYPE`` rows,
        each masked by its window) in a fresh slot; returns the slot.

        ``match [b - a, len(edits)]``: whether each row's token matches each edit's token
        ids (read where ``by_token`` is set). ``latch_state``: the request's latch states at
        this hook (``RequestPlan.latch_state``), indexed by the rows' ``latch``; they are
        loaded into the step's latch table and handed back after the forward. One request
        of ``add_edit_batch``.
        """
        n = len(edits)
        tok_match = None
        if match is not None:
            tok_match = (np.repeat(np.arange(a, b), n), np.tile(np.arange(n), b - a),
                         np.asarray(match).reshape(-1))
        latch = None
        if latch_state is not None:
            latch = LatchLoad(edits["latch"], latch_state, [latch_state],
                              np.zeros(len(latch_state), dtype=np.int64),
                              np.arange(len(latch_state)))
        return self.add_edit_batch(np.array([a]), np.array([b]), np.array([pos0]), edits,
                                   np.array([n]), match=tok_match, latch=latch)

    def add_edit_batch(self, a: np.ndarray, b: np.ndarray, pos0: np.ndarray,
                       edits: np.ndarray, counts: np.ndarray, *,
                       match: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                       latch: LatchLoad | None = None, key: object | None = None) -> int:
        """Requests ``i = 0..n-1``, in order, each in a fresh slot: token rows ``[a[i], b[i])``
        (``b > a``) at positions ``pos0[i]..`` apply the request's ``counts[i]`` edit rows,
        the next ones of ``edits`` (``edits.EDIT_DTYPE``, the requests' rows concatenated,
        each masked by its window). Returns the first request's slot (the others follow).

        ``match = (rows, k, value)``: ``tok_match[rows, k] = value`` (whether token row
        ``rows`` matches edit k of its slot; read where ``by_token`` is set). ``latch``:
        the requests' latch states (``LatchLoad``), loaded into the step's latch table and
        handed back to their requests after the forward.

        ``key``: an object that stands for ``edits``, ``counts`` and ``latch.row_state`` (the
        planner's ``_HookBatch`` when every one of its requests is in the step). When the
        step's first batch had the same key in the previous step too, its edit rows, slot
        ranges and latch layout are still in the tables (``clear`` keeps them) and are not
        written again; positions, token rows, matches and latch states always are.
        """
        s, e, n = self.n_slots, self.n_edits, len(a)
        n_edits = len(edits)
        t = self._np
        first = s == 0 and e == 0
        kept = self._kept if first and key is not None else None
        if kept is not None and kept[0] is key:
            _, k_max, n_cond, layout = kept
        else:
            k_max = int(counts.max())
            # Invariants (budget): one slot per scheduled request; a request's rows at one
            # SAE fit edit_width (the server's admission check counts every window).
            assert s + n <= self.sizes.edit_slots and k_max <= self.sizes.edit_width
            for c in EDIT_COLUMNS:
                t[f"edit_{c}"][e : e + n_edits] = edits[c]
            t["slot_start"][s : s + n] = e + np.cumsum(counts) - counts
            t["slot_len"][s : s + n] = counts
            n_cond = int(np.count_nonzero(edits["cond_op"] != Cond.NONE))
            layout = None
            if latch is not None:
                latched = np.flatnonzero(latch.row_state >= 0)
                # each state sits at the row index of the first of its rows (the windows
                # of one latched edit share it)
                state, first_row, which = np.unique(latch.row_state[latched],
                                                    return_index=True, return_inverse=True)
                t["edit_latch"][e + latched] = e + latched[first_row][which]
                layout = (state, latched[first_row])
        if first:
            self._kept = None if key is None else (key, k_max, n_cond, layout)
        if layout is not None and len(layout[0]):
            state, entry = layout[0], e + layout[1]
            loaded = latch.values[state]
            t["latch_pos"][entry] = loaded
            self._latch_owners.append((latch.owners, latch.owner[state], latch.local[state],
                                       entry, loaded))
        if match is not None:
            rows, k, value = match
            if len(rows):
                t["tok_match"][rows, k] = value
                self._match_until = max(self._match_until, int(rows.max()) + 1)
        lens = b - a
        total = int(lens.sum())
        rows, which = row_spans(a, lens, total)
        t["tok_slot"][rows] = s + which
        t["tok_pos"][rows] = rows + (pos0 - a)[which]
        r = self.n_rows
        t["rows"][r : r + total] = rows
        self.n_rows, self.n_slots, self.n_edits = r + total, s + n, e + n_edits
        self.edit_k = max(self.edit_k, k_max)
        self.n_cond += n_cond
        self._dirty_until = max(self._dirty_until, int(b.max()))
        return s

    def placed(self, width: int, rows: np.ndarray | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``kernels.reference.placed_edits`` of token rows ``rows`` (default: this step's
        compacted rows, ``rows``), from the host tables with numpy (a few microseconds where
        torch's small ops take tens; the CPU path's kernels read the same tables)."""
        t = self._np
        r = t["rows"][: self.n_rows] if rows is None else rows
        slot = t["tok_slot"][r]
        s = np.maximum(slot, 0)
        k = np.arange(width)
        live = (slot >= 0)[:, None] & (k[None, :] < t["slot_len"][s][:, None])
        e = np.where(live, t["slot_start"][s][:, None] + k[None, :], 0)
        p = t["tok_pos"][r][:, None]
        live &= (t["edit_pos_lo"][e] <= p) & (p < t["edit_pos_hi"][e])
        live &= (t["edit_by_token"][e] == 0) | (t["tok_match"][r, :width] != 0)
        return torch.from_numpy(e), torch.from_numpy(live), torch.from_numpy(p)

    def write_inline(self, slot: int, vector: np.ndarray) -> int:
        """Copy a request's inline vector into ``slot``'s scratch decoder row; returns the
        row. The forward that reads it runs before the next step writes again."""
        # Invariants: the server sends inline vectors only to banks that take them, of the
        # model's width (``server.core.validate.inline_vector_edits``); one slot per request.
        assert self.inline_row >= 0 and slot < self.sizes.edit_slots
        assert vector.shape == (self.sae.cfg.d_in,)
        row = self.inline_row + slot
        self.sae.W_dec[row].copy_(torch.from_numpy(np.array(vector, dtype=np.float32)))
        return row

    def upload(self) -> None:
        """Copy the prefixes this step filled to the device mirrors (no-op unless staged).

        ``tok_slot`` is copied up to the furthest row either this step or the previous one
        marked, so rows the previous step edited read -1 again on the device.
        """
        if not self.staged:
            return
        n_tok = max(self._dirty_until, self._dev_dirty)
        spans = {"tok_slot": n_tok, "tok_pos": self._dirty_until, "tok_match": self._match_until,
                 "rows": self.n_rows,
                 "slot_start": self.n_slots, "slot_len": self.n_slots,
                 **{f"edit_{c}": self.n_edits for c in EDIT_COLUMNS},
                 "latch_pos": self.n_edits if self._latch_owners else 0,
                 "read_rows": self.n_read, "read_slot": self.n_read, "read_pool": self.n_read,
                 "rslot_watch": self.n_rslots}
        for name, n in spans.items():
            if n:
                self.dev[name][:n].copy_(self.host[name][:n], non_blocking=True)
        self._dev_dirty = self._dirty_until
        if self.tok_slot.is_cuda:
            self._upload_done = torch.cuda.Event()
            self._upload_done.record()

    def _wait_upload(self) -> None:
        # A non-blocking copy reads pinned host memory when the stream gets to it: the host
        # must not rewrite the tables before then.
        if self._upload_done is not None:
            self._upload_done.synchronize()
            self._upload_done = None

    # ------------------------------------------------------------------ inside the forward

    def _skips_edits(self, t: torch.Tensor, backend: str | None = None) -> bool:
        """True when this step's edits may be skipped: no edit rows, a backend that skips
        (the reference computes every row), and not in a capture (it would freeze the skip).
        ``backend``: ``backend_for(t.device)`` where the caller has it."""
        if self.n_rows:
            return False
        return (backend or backend_for(t.device)) != "reference" and not _capturing(t)

    def stash_input(self, x: torch.Tensor) -> torch.Tensor:
        """A transcoder's MLP input ``x [T, d_in]``: kept for ``apply`` (which runs on the MLP
        output) when this step uses it; returns a copy of ``x`` (an op may not alias it)."""
        assert self.stash is not None, "stash_input on an SAE that is not a transcoder"
        if not (self._skips_edits(x) and self.n_read == 0):
            self.stash[: x.shape[0]].copy_(x)
        return x.clone()

    def apply(self, h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """``h`` plus this step's edits; the SAE encodes ``h + residual`` (or ``h``), or, for a
        transcoder, the MLP input ``stash_input`` kept this step (``h`` is the MLP output)."""
        backend = backend_for(h.device)
        capturing = _capturing(h)
        if capturing and self.n_read:
            raise RuntimeError(
                "SAE reads cannot run inside a captured CUDA graph: list "
                "sae_steer::sae_hook in vLLM's splitting_ops (the engine does on CUDA)")
        # The host's row counts may skip work, except in a capture (it would freeze the skip).
        n = self.n_rows
        skip = self._skips_edits(h, backend)
        if skip and self.n_read == 0:
            return h.clone()
        if self.stash is not None:  # the activation the SAE encodes
            resid = self.stash[: h.shape[0]]
        else:
            resid = h if residual is None else h + residual
        if self.n_read:
            self._read(resid)
        if skip:
            return h.clone()
        if backend == "compact" and not capturing:
            k = max(self.edit_k, 1)
            return splice_compact(h, resid, self.sae, self.rows[:n], self.edits,
                                  conditions=self.n_cond > 0, width=k,
                                  placed=None if self.staged else self.placed(k))
        # A capture freezes the choice: a captured graph always evaluates conditions.
        return splice_fixed(h, resid, self.sae, self.edits, conditions=capturing or self.n_cond > 0)

    def _read(self, resid: torch.Tensor) -> None:
        """Latents of the reading rows, edited as their request edits them (ops.read_latents).

        Top-k values and watch lists come from ``kernels.read_topk`` (a column-tiled encode
        with a running top-k on CPU, the Triton tiled kernel on CUDA), so no ``[n, d_sae]``
        buffer exists. A step with a pooled read, which needs every latent of its rows,
        computes dense latents ``pool_chunk`` rows at a time (``budget.pool_chunk_rows``:
        about ``POOL_CHUNK_BYTES``) and folds each chunk into the preallocated sums and
        maxima (``pool_sum`` / ``pool_max``, by each row's pool slot; rows that do not pool
        fold into the sink row), so no ``[n, d_sae]`` buffer exists either.

        Under TP with a ``read_split`` every rank of the group reads (the planner plans the
        reads on all of them, so all enter the all-gather or none): each computes its slice
        of the features and the ranks' candidates are merged (``tp_reads``). A step with a
        pooled read is computed whole by rank 0 alone (the one that publishes), its other
        ranks skip it (the host-side ``read_pooled`` is the same on every rank).
        """
        split = self.read_split
        if split is not None and self.read_pooled and split.rank != 0:
            return
        n = self.n_read
        rows = self.read_rows[:n]
        # [n, K] each reading row's edits at this SAE (windows applied; none: Mode.NONE)
        x = resid[rows].to(self.sae.W_enc.dtype)
        cond = (lambda cols: ops.feature_activations(self.sae, x, cols)) if self.n_cond else None
        k = max(self.edit_k, 1)
        placed = None if self.staged else self.placed(k, self._np["read_rows"][:n])
        feat, mode, val = row_edits(self.edits, rows, cond, k, placed)
        watch_idx = self.rslot_watch[self.read_slot[:n], : self.read_w]
        k = self.read_k
        if not self.read_pooled:
            read = split if split is not None else functools.partial(read_topk, self.sae)
            vals, idx, watch = read(x, feat, mode, val, k, watch_idx)
            self.read_out = (vals, idx, watch, None)
            return
        self._pooled_read(n, k, watch_idx, x.dtype, lambda c: ops.read_latents(
            self.sae, x[c], feat[c], mode[c], val[c]))

    def _pooled_read(self, n: int, k: int, watch_idx: torch.Tensor, dtype: torch.dtype,
                     latents: Callable[[slice], torch.Tensor]) -> None:
        """A step with a pooled read: ``latents(c)`` gives the dense, edited latents ``[len(c),
        width]`` of reading rows ``c`` (a slice of ``0..n``), asked for ``pool_chunk`` rows at a
        time; each chunk gives its rows' top ``k`` and watched values (``watch_idx [n, w]``;
        both kept in ``dtype``) and folds into ``pool_sum`` / ``pool_max`` by each row's pool
        slot (rows that do not pool fold into the sink row, the last). Sets ``read_out``.
        Shared by the per-site tables and ``CLTHookTables`` (whose width is every slot's
        features, flat)."""
        dev = watch_idx.device
        vals = torch.empty(n, k, dtype=dtype, device=dev)
        idx = torch.empty(n, k, dtype=torch.int64, device=dev)
        watch = torch.empty(n, watch_idx.shape[1], dtype=dtype, device=dev)
        psum, pmax = self.pool_sum, self.pool_max
        for r in (slice(0, self.n_pool), slice(-1, None)):  # this step's pools and the sink
            psum[r].zero_()
            pmax[r].fill_(-float("inf"))
        pool = self.read_pool[:n]
        for c0 in range(0, n, self.pool_chunk):
            c = slice(c0, min(n, c0 + self.pool_chunk))
            acts = latents(c)  # [chunk, width]
            if k:
                vals[c], idx[c] = acts.topk(k, dim=1)
            watch[c] = acts.gather(1, watch_idx[c])
            a32 = acts.to(torch.float32)
            psum.index_add_(0, pool[c], a32)
            pmax.scatter_reduce_(0, pool[c, None].expand_as(a32), a32, "amax")
        self.read_out = (vals, idx, watch, (psum[: self.n_pool], pmax[: self.n_pool]))

    def read_out_host(self) -> tuple | None:
        """This step's reads on the host (one device-to-host copy per tensor): ``(values
        [n, k], indices [n, k], watched [n, w], pools)``, ``pools`` = ``(sums, maxima)
        [n_pool, d_sae]`` of the step's pooled reads (by pool slot), or None."""
        if self.read_out is None:
            return None
        vals, idx, watch, pools = self.read_out
        return (vals.cpu(), idx.cpu(), watch.cpu(),
                None if pools is None else tuple(p.cpu() for p in pools))
