"""Per-step intervention and read tables of one hooked SAE, and the hook's computation.

No vLLM in here: the step planner (``sae_runtime/step/planner.py``) fills these tables from the
scheduled batch before each forward, and the custom op calls ``HookTables.apply`` inside it.

Every table is allocated once, at its largest size (the engine's token and sequence
budgets), so its address never changes. The edit layout (``sae_runtime.step.edits``):

- ``tok_slot [max_tokens]``: token row -> edit slot, -1 = the row has no edit here. One slot
  per scheduled request that edits at this hook, whatever its scopes;
- ``tok_pos [max_tokens]``: the absolute position of each row that has a slot (the per-token
  position table the kernels mask windows with);
- ``slot_start / slot_len [max_slots]``: the contiguous run of edit rows slot s owns,
  ``[slot_start[s], slot_start[s] + slot_len[s])``, ``slot_len <= max_feats``;
- ``edit_<column> [max_slots * max_feats]``: the edit rows, one column per field of the edit
  record (``sae_runtime.step.edits.EDIT_DTYPE``); an edit applies at a row of its slot iff
  ``pos_lo <= tok_pos < pos_hi`` and its condition, if any, holds (``edits``);
- ``latch_pos [max_latches + 1]``: persistent (never cleared by a step): the first position
  where each latched edit's condition held, ``POS_INF`` until then. ``alloc_latches`` /
  ``free_latches`` hand ids out per request (the planner);
- ``rows / row_slot [max_tokens]``: the rows with a slot, compacted (the CPU path's index);
- ``read_rows / read_slot [2 * max_tokens]``, ``rslot_watch [2 * max_slots, max_watch]``:
  rows that read, their read slot, each read slot's watch list (a request may read one SAE
  twice: its own read and its guardrails' hidden read);
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

import numpy as np
import torch

from sae_runtime import ops
from sae_runtime.kernels import backend_for, read_topk, row_edits, splice_compact, splice_fixed
from sae_runtime.saes.base import SAE
from sae_runtime.step.edits import (
    COLUMN_FILL,
    COLUMN_TORCH_DTYPES,
    EDIT_COLUMNS,
    POS_INF,
    Cond,
    EditTables,
)
from sae_runtime.step.tp_reads import ReadSplit

READS_PER_REQUEST = 2
"""Read slots one request may use at one SAE per step: its own read and its guard read."""

LATCH_HEADROOM = 4
"""Latches per hook, as a multiple of the edit rows one step holds (requests held by the
runner may outnumber those scheduled in one step)."""


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class HookTables:
    """Preallocated per-step tables of one hooked SAE (see the module docstring)."""

    read_split: ReadSplit | None = None
    """Set once by the worker under tensor parallelism (``sae_runtime.step.tp_reads``): this
    rank's slice of the SAE's features; ``_read`` then computes that slice and merges the
    ranks' candidates. None: the read is computed whole."""

    def __init__(self, sae: SAE, max_tokens: int, max_slots: int, max_feats: int,
                 max_watch: int = 0, *, staged: bool | None = None,
                 max_latches: int | None = None, act_dtype: torch.dtype | None = None,
                 inline_row: int | None = None) -> None:
        """``max_slots``: scheduled requests per step (one edit slot and one read slot
        each); ``max_feats``: edits one request may make at this hook; ``act_dtype``: the
        model's activation dtype (a transcoder's stashed MLP input keeps it);
        ``inline_row``: a vector bank taking inline vectors, whose decoder rows from
        ``inline_row`` on are one scratch row per slot (``write_inline``)."""
        dev = sae.W_enc.device
        self.sae = sae
        self.max_slots = max_slots
        self.max_feats = max_feats
        self.staged = dev.type != "cpu" if staged is None else staged
        max_edits = max_slots * max_feats
        shapes = {
            "tok_slot": ((max_tokens,), torch.int64, -1),
            "tok_pos": ((max_tokens,), torch.int64, 0),
            "rows": ((max_tokens,), torch.int64, 0),
            "row_slot": ((max_tokens,), torch.int64, 0),
            "slot_start": ((max_slots,), torch.int64, 0),
            "slot_len": ((max_slots,), torch.int64, 0),
            **{f"edit_{c}": ((max_edits,), COLUMN_TORCH_DTYPES[c], COLUMN_FILL.get(c, 0))
               for c in EDIT_COLUMNS},
            "read_rows": ((READS_PER_REQUEST * max_tokens,), torch.int64, 0),
            "read_slot": ((READS_PER_REQUEST * max_tokens,), torch.int64, 0),
            "rslot_watch": ((READS_PER_REQUEST * max_slots, max(max_watch, 1)), torch.int64, 0),
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
        # Latches outlive a step, so only the device holds them (the op lowers them).
        self.max_latches = max_latches if max_latches is not None else LATCH_HEADROOM * max_edits
        self.latch_pos = torch.full((self.max_latches + 1,), POS_INF, dtype=torch.int64, device=dev)
        self._free_latches = list(range(self.max_latches - 1, -1, -1))
        self.edits = EditTables.build(
            self.dev["tok_slot"], self.dev["tok_pos"], self.dev["slot_start"],
            self.dev["slot_len"], {c: self.dev[f"edit_{c}"] for c in EDIT_COLUMNS}, max_feats,
            self.latch_pos)
        # A transcoder encodes the MLP input but edits the MLP output: ``stash_input`` copies
        # the input here (a fixed address, so a captured graph replays it) before the MLP.
        self.stash = (torch.zeros(max_tokens, sae.cfg.d_in, dtype=act_dtype or sae.W_enc.dtype,
                                  device=dev) if sae.cfg.transcoder else None)
        self.inline_row = -1 if inline_row is None else inline_row
        if inline_row is not None and sae.cfg.d_sae < inline_row + max_slots:
            raise ValueError(f"a bank with inline row {inline_row} needs {max_slots} scratch "
                             f"rows; it has {sae.cfg.d_sae - inline_row}")
        self.n_rows = 0
        self.n_slots = 0
        self.n_edits = 0
        self.n_cond = 0  # conditional edit rows this step
        self.n_read = 0
        self.n_rslots = 0
        self.read_k = 0  # largest top_k asked this step
        self.read_w = 0  # longest watch list this step
        self.read_pooled = False  # some read this step wants dense latents for pooling
        self.read_out: tuple | None = None  # (topk values, topk indices, watch values, dense)
        self._dirty_until = 0  # host tok_slot[:_dirty_until] may be != -1
        self._dev_dirty = 0  # device tok_slot[:_dev_dirty] may be != -1
        self._upload_done: torch.cuda.Event | None = None

    # ------------------------------------------------------------------ host side

    def clear(self) -> None:
        """Forget this step's edits and reads (after the forward)."""
        self._wait_upload()
        if self._dirty_until:
            self._np["tok_slot"][: self._dirty_until] = -1
        self.n_rows = self.n_slots = self.n_edits = self.n_cond = self._dirty_until = 0
        self.n_read = self.n_rslots = self.read_k = self.read_w = 0
        self.read_pooled = False
        self.read_out = None

    def add_read_rows(self, a: int, b: int, top_k: int, watch: tuple[int, ...], pooled: bool) -> int:
        """Token rows [a, b) are read; returns the offset of the first one in the read output."""
        s = self.n_rslots
        if s >= self.max_slots:  # cannot happen: one read slot per scheduled request at most
            raise RuntimeError("SAE read slot table overflow")
        t = self._np
        t["rslot_watch"][s, : len(watch)] = watch
        r = self.n_read
        t["read_rows"][r : r + b - a] = np.arange(a, b)
        t["read_slot"][r : r + b - a] = s
        self.n_read, self.n_rslots = r + b - a, s + 1
        self.read_k = max(self.read_k, top_k)
        self.read_w = max(self.read_w, len(watch))
        self.read_pooled |= pooled
        return r

    def add_edits(self, a: int, b: int, pos0: int, edits: np.ndarray) -> int:
        """Token rows [a, b), at positions pos0.., apply ``edits`` (``edits.EDIT_DTYPE`` rows,
        each masked by its window) in a fresh slot; returns the slot."""
        s, e, n = self.n_slots, self.n_edits, len(edits)
        if s >= self.max_slots:  # cannot happen: one slot per scheduled request
            raise RuntimeError("SAE slot table overflow")
        if n > self.max_feats:  # cannot happen: the server caps edits per request
            raise RuntimeError(f"{n} edits at one hook; the tables hold {self.max_feats}")
        t = self._np
        for c in EDIT_COLUMNS:
            t[f"edit_{c}"][e : e + n] = edits[c]
        t["slot_start"][s], t["slot_len"][s] = e, n
        t["tok_slot"][a:b] = s
        t["tok_pos"][a:b] = np.arange(pos0, pos0 + b - a)
        r = self.n_rows
        t["rows"][r : r + b - a] = np.arange(a, b)
        t["row_slot"][r : r + b - a] = s
        self.n_rows, self.n_slots, self.n_edits = r + b - a, s + 1, e + n
        self.n_cond += int(np.count_nonzero(edits["cond_op"] != Cond.NONE))
        self._dirty_until = max(self._dirty_until, b)
        return s

    def write_inline(self, slot: int, vector: np.ndarray) -> int:
        """Copy a request's inline vector into ``slot``'s scratch decoder row; returns the
        row. The forward that reads it runs before the next step writes again."""
        if self.inline_row < 0:
            raise RuntimeError("an inline vector at a hook that takes none")
        if slot >= self.max_slots:
            raise RuntimeError("SAE slot table overflow")
        if vector.shape != (self.sae.cfg.d_in,):
            raise RuntimeError(f"inline vector of shape {vector.shape} at a bank of width "
                               f"{self.sae.cfg.d_in}")
        row = self.inline_row + slot
        self.sae.W_dec[row].copy_(torch.from_numpy(np.array(vector, dtype=np.float32)))
        return row

    def alloc_latches(self, n: int) -> np.ndarray:
        """``n`` latch ids, reset to "not yet held" (``POS_INF``); raises when none are left."""
        if n > len(self._free_latches):
            raise RuntimeError(
                f"out of latches: {self.max_latches} are in use by the requests held (each "
                "latched edit row holds one for its request's lifetime)")
        ids = np.array([self._free_latches.pop() for _ in range(n)], dtype=np.int64)
        self.latch_pos[torch.from_numpy(ids).to(self.latch_pos.device)] = POS_INF
        return ids

    def free_latches(self, ids) -> None:
        self._free_latches.extend(int(i) for i in ids)

    def upload(self) -> None:
        """Copy the prefixes this step filled to the device mirrors (no-op unless staged).

        ``tok_slot`` is copied up to the furthest row either this step or the previous one
        marked, so rows the previous step edited read -1 again on the device.
        """
        if not self.staged:
            return
        n_tok = max(self._dirty_until, self._dev_dirty)
        spans = {"tok_slot": n_tok, "tok_pos": self._dirty_until,
                 "rows": self.n_rows, "row_slot": self.n_rows,
                 "slot_start": self.n_slots, "slot_len": self.n_slots,
                 **{f"edit_{c}": self.n_edits for c in EDIT_COLUMNS},
                 "read_rows": self.n_read, "read_slot": self.n_read,
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

    def _skips_edits(self, t: torch.Tensor) -> bool:
        """True when this step's edits may be skipped: no edit rows, a backend that skips
        (the reference computes every row), and not in a capture (it would freeze the skip)."""
        return self.n_rows == 0 and backend_for(t.device) != "reference" and not _capturing(t)

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
        skip = self._skips_edits(h)
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
            return splice_compact(h, resid, self.sae, self.rows[:n], self.row_slot[:n],
                                  self.edits, conditions=self.n_cond > 0)
        # A capture freezes the choice: a captured graph always evaluates conditions.
        return splice_fixed(h, resid, self.sae, self.edits, conditions=capturing or self.n_cond > 0)

    def _read(self, resid: torch.Tensor) -> None:
        """Latents of the reading rows, edited as their request edits them (ops.read_latents).

        Top-k values and watch lists come from ``kernels.read_topk`` (a column-tiled encode
        with a running top-k on CPU, the Triton tiled kernel on CUDA), so no ``[n, d_sae]``
        buffer exists; only a step with a pooled read, which needs every latent, computes the
        dense latents.

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
        feat, mode, val = row_edits(self.edits, self.tok_slot[rows], self.tok_pos[rows], cond)
        watch_idx = self.rslot_watch[self.read_slot[:n], : self.read_w]
        k = self.read_k
        if not self.read_pooled:
            read = split if split is not None else functools.partial(read_topk, self.sae)
            vals, idx, watch = read(x, feat, mode, val, k, watch_idx)
            self.read_out = (vals, idx, watch, None)
            return
        acts = ops.read_latents(self.sae, x, feat, mode, val)  # [n, d_sae]
        vals, idx = acts.topk(k, dim=1) if k else (acts[:, :0], acts[:, :0].long())
        self.read_out = (vals, idx, acts.gather(1, watch_idx), acts)

    def read_out_host(self) -> tuple | None:
        """This step's reads on the host (one device-to-host copy per tensor)."""
        if self.read_out is None:
            return None
        return tuple(None if t is None else t.cpu() for t in self.read_out)
