"""The step planner: one scheduled batch -> every hook's tables, in one pass. No vLLM here.

A model-runner adapter (``sae_runtime/vllm/runner_v1.py`` for vLLM's V1 runner) describes
the step in the project's own terms and calls ``plan_step``:

- ``compile_request(payload, prompt_len)`` turns a request's decoded payload, once per
  request, into a ``RequestPlan``: per hook its edit rows (``edits.EDIT_DTYPE``, request
  order, one per window of each edit's position selector, ``sae_runtime.spec.selectors``) and
  its reads (with windows too);
- a ``StepDescription`` lists the scheduled requests: request id, token rows
  ``[start, end)`` of the flattened batch, the position of the first row, and the plan
  (``ScheduledRequest`` s, or the same as columns: ``StepColumns``); plus the token each
  row consumes, which only token-id selectors read;
- ``plan_step`` fills each hook's tables for all requests at once (``_HookBatch``: the
  requests' rows concatenated once while the same plans are scheduled;
  ``HookTables.add_edit_batch`` / ``add_read_batch``), uploads them, and returns the read
  segments; ``collect_reads`` turns the forward's read outputs into
  ``payloads.ReadRecord`` s for the side channel.

Nothing here raises on request data: the server admitted only requests whose needs fit
the tables (``sae_runtime.spec.budget.check_request``), and the tables hold any step of
such requests (``budget.TableSizes``).

Row ``start + j`` of a request is at position ``pos0 + j``: chunked prefill (``pos0 > 0``
with prompt rows still to come), decode (one row at ``pos0 >= prompt_len``), rows that
straddle the prompt end, and recomputation after preemption (positions that were computed
before, computed again) are all the same case. A request's rows at a hook are the ones
whose positions fall in the hull of its edit windows there, so rows no edit can cover do no
work (a generation-only request's prompt rows, above all).

Token-id selectors ("every position whose token is in this set") are resolved here, per
step, on the host: ``token_match`` compares the tokens the request's rows consume with each
edit's token ids (``_plan_edits`` does it for all requests at once), and
``HookTables.add_edit_batch`` writes the result into the hook's ``tok_match`` table,
which every kernel applies beside the window mask. So a request takes exactly one edit
slot per hook in every step, whatever its selectors, and a step can never need more slots
than it has requests (``sae_runtime.spec.budget``).

Reads are computed over the hull of a read's windows in the step; the server keeps the
positions the selector picks (``reads.Read.covers``), so multi-window reads cost one read
slot per request, like single-window ones.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sae_runtime.spec.payloads import EditPayload, RequestPayload
from sae_runtime.spec.selectors import Selector
from sae_runtime.step.act_reads import ActPlan
from sae_runtime.step.edits import NO_CONDITION, NO_LATCH, POS_INF, Cond, edit_rows
from sae_runtime.step.records import ReadRecord
from sae_runtime.step.tables import HookTables, LatchLoad, row_spans


@dataclass(frozen=True)
class ReadPlan:
    index: int  # the read's index in the request's payload (its records are keyed by it)
    hook_id: int
    top_k: int
    watch: tuple[int, ...]
    pos_lo: int  # hull of ``windows``: the rows the worker reads (the server keeps the selected)
    pos_hi: int
    windows: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class TokenRule:
    """The token-id condition of one edit row (``RequestPlan.token_rules``)."""

    token_ids: np.ndarray  # int64, the selector's set
    exclude: bool

    def match(self, tokens: np.ndarray) -> np.ndarray:
        hit = np.isin(tokens, self.token_ids)
        return ~hit if self.exclude else hit


@dataclass(frozen=True)
class RequestPlan:
    """One request's payload compiled for the planner (built once per request).

    ``edits[h]``: the request's edit rows at hook ``h`` (``edits.EDIT_DTYPE``), one per
    window of each edit's selector, in request order. A latched row's ``latch`` is the
    index of its edit's state in ``latch_state[h]`` (the first position the condition held
    inside the edit's selector, ``POS_INF`` until then; the planner loads it into each
    step's tables and reads it back).
    A hook in ``token_rules`` has edits with token ids (``by_token`` rows):
    ``token_rules[h][i]`` is row i's condition (None = none).
    """

    rid: str  # the server's request id (reads are routed by it)
    prompt_len: int
    edits: dict[int, np.ndarray] = field(default_factory=dict)  # hook id -> EDIT_DTYPE rows
    hulls: dict[int, tuple[int, int]] = field(default_factory=dict)  # hook id -> [lo, hi)
    reads: tuple[ReadPlan, ...] = ()
    pooled: bool = False
    token_rules: dict[int, tuple[TokenRule | None, ...]] = field(default_factory=dict)
    latch_state: dict[int, np.ndarray] = field(default_factory=dict)  # hook id -> int64
    # [latched rows] (mutable: the planner writes each step's latch states back)
    inline: dict[int, np.ndarray] = field(default_factory=dict)  # hook id -> the request's
    # inline vector at that bank (float32 [d]); its edit rows name the bank's inline row
    acts: tuple[ActPlan, ...] = ()  # raw activation reads (``act_reads.plan_acts``)

    @property
    def empty(self) -> bool:
        return not self.edits and not self.reads and not self.acts

    @property
    def needs_tokens(self) -> bool:
        return bool(self.token_rules)


EMPTY_PLAN = RequestPlan("", 0)


def _rule(sel: Selector) -> TokenRule | None:
    if not sel.token_ids:
        return None
    return TokenRule(np.asarray(sorted(sel.token_ids), dtype=np.int64), sel.exclude_token_ids)


def _edit_table(items: list[EditPayload], prompt_len: int
                ) -> tuple[np.ndarray, int, tuple[TokenRule | None, ...]]:
    """One hook's edits as edit rows, built by column name (one row per window); how many
    latch states they keep: one per latched edit, shared by its windows' rows (their
    ``latch``: 0, 1, ... in request order), so a latch set in one window holds in all; and
    each row's token condition."""
    cols: dict[str, list] = {c: [] for c in ("feature", "mode", "value", "pos_lo", "pos_hi",
                                            "cond_feature", "cond_op", "cond_threshold",
                                            "latch", "by_token")}
    n_latch = 0
    rules: list[TokenRule | None] = []
    for ed in items:
        w = ed.when
        wins = ed.positions.windows(prompt_len)
        rules += [_rule(ed.positions)] * len(wins)
        latch = n_latch if w is not None and w.latch and wins else NO_LATCH
        n_latch += int(latch != NO_LATCH)
        for lo, hi in wins:
            cols["feature"].append(ed.feature)
            cols["mode"].append(ed.mode)
            cols["value"].append(ed.value)
            cols["pos_lo"].append(lo)
            cols["pos_hi"].append(hi)
            cols["cond_feature"].append(NO_CONDITION if w is None else w.feature)
            cols["cond_op"].append(Cond.NONE if w is None else w.op)
            cols["cond_threshold"].append(0.0 if w is None else w.threshold)
            cols["latch"].append(latch)
            cols["by_token"].append(int(ed.positions.by_token))
    return edit_rows(len(cols["feature"]), **cols), n_latch, tuple(rules)


def compile_request(payload: RequestPayload | None, prompt_len: int) -> RequestPlan:
    """``payload`` (None: a plain request) as edit rows per hook and windowed reads."""
    if payload is None or (not payload.edits and not payload.reads and not payload.acts):
        return EMPTY_PLAN
    by_hook: dict[int, list[EditPayload]] = {}
    for ed in payload.edits:
        by_hook.setdefault(ed.sae, []).append(ed)
    edits, hulls, token_rules, latch_state, inline = {}, {}, {}, {}, {}
    for hook_id, items in by_hook.items():
        table, n_latch, rules = _edit_table(items, prompt_len)
        if not len(table):  # every selector here resolved to no position
            continue
        edits[hook_id] = table
        hulls[hook_id] = (int(table["pos_lo"].min()), int(table["pos_hi"].max()))
        if n_latch:
            latch_state[hook_id] = np.full(n_latch, POS_INF, dtype=np.int64)
        if table["by_token"].any():
            token_rules[hook_id] = rules
        for ed in items:
            if ed.vector is not None:  # one inline vector per bank and request (the server)
                inline[hook_id] = np.frombuffer(ed.vector, dtype="<f4")
    reads = []
    for j, r in enumerate(payload.reads):
        wins = r.positions.windows(prompt_len)
        if wins:
            reads.append(ReadPlan(j, r.sae, r.top_k, tuple(r.watch), wins[0][0], wins[-1][1],
                                  wins))
    acts = []
    for j, a in enumerate(payload.acts):
        wins = a.positions.windows(prompt_len)
        if wins:
            acts.append(ActPlan(j, a.site, wins[0][0], wins[-1][1]))
    return RequestPlan(payload.rid, prompt_len, edits, hulls, tuple(reads), payload.pooled,
                       token_rules, latch_state, inline, tuple(acts))


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's part of a step: token rows ``[start, end)`` at positions ``pos0..``."""

    req_id: str  # the engine's request id
    start: int
    end: int
    pos0: int
    plan: RequestPlan  # the decoded payload, compiled with the request's prompt length

    @property
    def prompt_len(self) -> int:
        return self.plan.prompt_len


@dataclass(frozen=True)
class StepColumns:
    """A step's scheduled requests as columns, in step order (what ``plan_step`` reads):
    request ``i`` computes token rows ``[start[i], end[i])`` at positions ``pos0[i]..``."""

    req_ids: Sequence[str]
    plans: Sequence[RequestPlan]
    start: np.ndarray  # int64 [n]
    end: np.ndarray  # int64 [n]
    pos0: np.ndarray  # int64 [n]

    @staticmethod
    def of(requests: Sequence[ScheduledRequest]) -> StepColumns:
        def col(name: str) -> np.ndarray:
            return np.fromiter((getattr(r, name) for r in requests), dtype=np.int64,
                               count=len(requests))
        return StepColumns([r.req_id for r in requests], [r.plan for r in requests],
                           col("start"), col("end"), col("pos0"))

    def __len__(self) -> int:
        return len(self.plans)


class _ScheduledRows(Sequence):
    """``StepColumns`` seen as ``ScheduledRequest`` s (built on access)."""

    def __init__(self, cols: StepColumns) -> None:
        self._cols = cols

    def __len__(self) -> int:
        return len(self._cols)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        c = self._cols
        return ScheduledRequest(c.req_ids[i], int(c.start[i]), int(c.end[i]), int(c.pos0[i]),
                                c.plans[i])


@dataclass(frozen=True)
class StepDescription:
    requests: Sequence[ScheduledRequest]
    token_ids: np.ndarray | None = None  # [rows] the token each row consumes (host memory);
    # needed only by requests with token-id selectors (``RequestPlan.needs_tokens``)
    columns: StepColumns | None = None  # the same requests as columns (None: built from
    # ``requests`` when planned)

    @staticmethod
    def of_columns(columns: StepColumns, token_ids: np.ndarray | None = None) -> StepDescription:
        """A step described by its columns (a model-runner adapter's fast path)."""
        return StepDescription(_ScheduledRows(columns), token_ids, columns)

    def cols(self) -> StepColumns:
        return self.columns if self.columns is not None else StepColumns.of(self.requests)


@dataclass(frozen=True)
class ReadSegment:
    """Consecutive read rows of one request at one hook in this step."""

    rid: str
    index: int  # the read's index in the request's payload
    hook_id: int
    top_k: int
    n_watch: int
    offset: int  # first row in the hook's read output
    n: int
    pos0: int  # position of the first row
    pool: int = -1  # the read's pool slot at its hook this step (-1: not pooled)

    @property
    def pooled(self) -> bool:
        return self.pool >= 0


def token_match(rules: Sequence[TokenRule | None], tokens: np.ndarray) -> np.ndarray:
    """``[len(tokens), len(rules)]`` int8: whether each step row's token is selected by each
    edit row's token condition (1 where a row has none: its ``by_token`` is 0 anyway). The
    definition ``plan_step`` computes for every request at once (``_plan_edits``)."""
    out = np.ones((len(tokens), len(rules)), dtype=np.int8)
    for i, rule in enumerate(rules):
        if rule is not None:
            out[:, i] = rule.match(tokens)
    return out


_KEY_ROW = 2**34  # token-match keys: edit row * _KEY_ROW + token + _KEY_TOK (token ids
_KEY_TOK = 2**33  # are >= -1 and below the vocabulary size: ``selectors.Selector.validate``)


def _clip_cols(start: np.ndarray, end: np.ndarray, pos0: np.ndarray, lo: np.ndarray,
               hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[a, b)``: the rows of each ``[start, end)`` (row ``start`` at ``pos0``) whose
    positions are in ``[lo, hi)`` (``a == b``: none)."""
    n = np.maximum(end - start, 0)
    a = start + np.minimum(np.maximum(lo - pos0, 0), n)
    b = start + np.minimum(np.maximum(hi - pos0, 0), n)
    return a, np.maximum(a, b)


class _HookBatch:
    """The edit rows and reads of a step's requests at one hook, concatenated once and
    reused while the same requests are scheduled (decode steps: only positions advance).

    ``members``: the step indices of the requests that edit here; their rows ``rows``
    (request order, ``counts`` each, ``row_member`` the member of each), their hulls
    ``lo / hi``; latch states as ``LatchLoad`` columns; token conditions as sorted keys
    (``_KEY_ROW``); inline vectors; and the reads here (``rd_*``, in the order the
    requests list them).
    """

    def __init__(self, plans: Sequence[RequestPlan], hook_id: int) -> None:
        members = [j for j, p in enumerate(plans) if hook_id in p.edits]
        tables = [plans[j].edits[hook_id] for j in members]
        self.members = np.array(members, dtype=np.int64)
        self.counts = np.array([len(t) for t in tables], dtype=np.int64)
        self.rows = np.concatenate(tables) if tables else None
        self.row_member = np.repeat(np.arange(len(members)), self.counts)
        self.row_start = np.cumsum(self.counts) - self.counts
        self.lo = np.array([plans[j].hulls[hook_id][0] for j in members], dtype=np.int64)
        self.hi = np.array([plans[j].hulls[hook_id][1] for j in members], dtype=np.int64)
        # latch states: member i's states are numbered from base[i] on
        owners = [plans[j].latch_state.get(hook_id) for j in members]
        self.latch_owners = [o for o in owners if o is not None]
        if self.latch_owners:
            sizes = np.array([0 if o is None else len(o) for o in owners], dtype=np.int64)
            base = np.cumsum(sizes) - sizes
            latch = self.rows["latch"]
            self.row_state = np.where(latch >= 0, base[self.row_member] + latch, -1)
            own = np.array([len(o) for o in self.latch_owners], dtype=np.int64)
            self.owner = np.repeat(np.arange(len(own)), own)
            self.local = np.arange(int(own.sum())) - np.repeat(np.cumsum(own) - own, own)
        # token conditions: one key per (edit row, token id) of each row's rule
        self.tok_member = np.array([hook_id in plans[j].token_rules for j in members], dtype=bool)
        self.has_tokens = bool(self.tok_member.any())
        if self.has_tokens:
            rules = [r for j in members for r in
                     plans[j].token_rules.get(hook_id, (None,) * len(plans[j].edits[hook_id]))]
            self.has_rule = np.array([r is not None for r in rules], dtype=bool)
            self.exclude = np.array([r is not None and r.exclude for r in rules], dtype=bool)
            keys = [e * _KEY_ROW + r.token_ids + _KEY_TOK for e, r in enumerate(rules)
                    if r is not None]
            self.keys = np.sort(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
        self.inline = [(i, plans[j].inline[hook_id]) for i, j in enumerate(members)
                       if hook_id in plans[j].inline]
        # reads
        reads = [(j, q, rp) for j, p in enumerate(plans) for q, rp in enumerate(p.reads)
                 if rp.hook_id == hook_id]
        self.reads = reads
        if reads:
            self.rd_member = np.array([j for j, _, _ in reads], dtype=np.int64)
            self.rd_lo = np.array([rp.pos_lo for *_, rp in reads], dtype=np.int64)
            self.rd_hi = np.array([rp.pos_hi for *_, rp in reads], dtype=np.int64)
            self.rd_top_k = np.array([rp.top_k for *_, rp in reads], dtype=np.int64)
            self.rd_n_watch = np.array([len(rp.watch) for *_, rp in reads], dtype=np.int64)
            self.rd_watch = np.zeros((len(reads), max(1, int(self.rd_n_watch.max()))), np.int64)
            for i, (*_, rp) in enumerate(reads):
                self.rd_watch[i, : len(rp.watch)] = rp.watch
            self.rd_pooled = np.array([plans[j].pooled for j, _, _ in reads], dtype=bool)


def _hook_batches(hooks: Sequence[HookTables | None],
                  plans: Sequence[RequestPlan]) -> list[_HookBatch | None]:
    """Each hook's ``_HookBatch`` of ``plans``, kept on the hook while the same plans (the
    same objects, in the same order) are scheduled."""
    key = tuple(map(id, plans))
    out: list[_HookBatch | None] = []
    for hook_id, hook in enumerate(hooks):
        if hook is None:
            out.append(None)
            continue
        cached = hook.plan_batch
        if cached is None or cached[0] != key:
            # the plans ride along, so no id in the key is reused while it is cached
            cached = hook.plan_batch = (key, plans, _HookBatch(plans, hook_id))
        out.append(cached[2])
    return out


def plan_step(hooks: Sequence[HookTables | None], step: StepDescription,
              read_hooks: Collection[int] | None = None) -> list[ReadSegment]:
    """Fill every hook's tables for ``step`` and upload them; returns the read segments.

    ``hooks[i]`` is hook id i, None where another pipeline stage holds that SAE (its edits
    and reads are planned there). ``read_hooks``: the hook ids that compute reads on this
    rank (None = all); a tensor-parallel rank that publishes no reads skips them. The
    hooks' tables must be clear (``HookTables.clear`` after the previous forward).

    Each scheduled request takes one edit slot at each hook it edits in this step and one
    read slot per read there (``sae_runtime.spec.budget``), so the tables hold the step.
    The requests' rows are filled with array operations over all of them at once
    (``_HookBatch``, ``HookTables.add_edit_batch`` / ``add_read_batch``): no Python runs
    per request, except for the read segments returned and inline vectors.
    """
    for hook in hooks:
        if hook is not None:
            hook.settle_latches()  # the previous step's latch states, back in their plans
    segments: list[ReadSegment] = []
    if step.requests:
        cols = step.cols()
        order: list[tuple[int, int]] = []
        n_read_hooks = 0
        for hook_id, hb in enumerate(_hook_batches(hooks, cols.plans)):
            hook = hooks[hook_id]
            if hb is None or hook is None:
                continue
            if len(hb.members):
                _plan_edits(hook, hb, cols, step.token_ids)
            if hb.reads and (read_hooks is None or hook_id in read_hooks):
                n = len(segments)
                _plan_reads(hook, hook_id, hb, cols, segments, order)
                n_read_hooks += len(segments) > n
        if n_read_hooks > 1:  # request order, each request's reads in its order
            segments = [seg for _, seg in sorted(zip(order, segments, strict=True),
                                                 key=lambda x: x[0])]
    for hook in hooks:
        if hook is not None:
            hook.upload()
    return segments


def _plan_edits(hook: HookTables, hb: _HookBatch, cols: StepColumns,
                tokens: np.ndarray | None) -> None:
    """The step's edit rows at one hook, every request at once (``add_edit_batch``)."""
    m = hb.members
    start, pos0 = cols.start[m], cols.pos0[m]
    a, b = _clip_cols(start, cols.end[m], pos0, hb.lo, hb.hi)
    act = b > a
    n_act = int(np.count_nonzero(act))
    if n_act == 0:
        return
    rows, counts, row_start, keep = hb.rows, hb.counts, hb.row_start, None
    if n_act < len(m):
        keep = act[hb.row_member]
        rows, counts = rows[keep], counts[act]
        row_start = np.cumsum(counts) - counts
    if hb.inline:
        rows = rows.copy()
        rank = np.cumsum(act) - 1  # each member's place among the active ones
        for i, vector in hb.inline:
            if act[i]:
                # the scratch row of the slot the request gets, and its rows that name it
                r0 = int(row_start[rank[i]])
                f = rows["feature"][r0 : r0 + int(counts[rank[i]])]
                f[f == hook.inline_row] = hook.write_inline(hook.n_slots + int(rank[i]), vector)
    latch = None
    if hb.latch_owners:
        row_state = hb.row_state if keep is None else hb.row_state[keep]
        latch = LatchLoad(row_state, np.concatenate(hb.latch_owners), hb.latch_owners,
                          hb.owner, hb.local)
    match = None
    tm = act & hb.tok_member if hb.has_tokens else None
    if tm is not None and tm.any():
        # the adapter passes the step's tokens whenever a plan needs them
        assert tokens is not None
        idx = np.flatnonzero(tm)
        lens, n = b[idx] - a[idx], hb.counts[idx]
        trow, which = row_spans(a[idx], lens, int(lens.sum()))  # (request, token row) pairs
        reps = n[which]
        mrow = np.repeat(trow, reps)
        k = np.arange(int(reps.sum())) - np.repeat(np.cumsum(reps) - reps, reps)
        erow = np.repeat(hb.row_start[idx][which], reps) + k  # the edit row (batch order)
        q = erow * _KEY_ROW + tokens[mrow].astype(np.int64) + _KEY_TOK
        at = np.minimum(np.searchsorted(hb.keys, q), max(len(hb.keys) - 1, 0))
        hit = (hb.keys[at] == q) if len(hb.keys) else np.zeros(len(q), dtype=bool)
        value = np.where(hb.has_rule[erow], hit ^ hb.exclude[erow], True).astype(np.int8)
        match = (mrow, k, value)
    p = pos0 + a - start
    if keep is None:  # every request edits here: the batch's rows as they are
        hook.add_edit_batch(a, b, p, rows, counts, match=match, latch=latch,
                            key=None if hb.inline else hb)
    else:
        hook.add_edit_batch(a[act], b[act], p[act], rows, counts, match=match, latch=latch)


def _plan_reads(hook: HookTables, hook_id: int, hb: _HookBatch, cols: StepColumns,
                segments: list[ReadSegment], order: list[tuple[int, int]]) -> None:
    """The step's read rows at one hook, every read at once (``add_read_batch``); appends
    one segment per read (and its place in request order to ``order``)."""
    j = hb.rd_member
    start = cols.start[j]
    a, b = _clip_cols(start, cols.end[j], cols.pos0[j], hb.rd_lo, hb.rd_hi)
    idx = np.flatnonzero(b > a)
    if not len(idx):
        return
    offs, pools = hook.add_read_batch(a[idx], b[idx], hb.rd_top_k[idx], hb.rd_watch[idx],
                                      hb.rd_n_watch[idx], hb.rd_pooled[idx])
    plans = cols.plans
    for i, off, n, p, pool in zip(idx.tolist(), offs.tolist(), (b - a)[idx].tolist(),
                                  (cols.pos0[j] + a - start)[idx].tolist(), pools.tolist(),
                                  strict=True):
        jj, q, rp = hb.reads[i]
        segments.append(ReadSegment(plans[jj].rid, rp.index, hook_id, rp.top_k, len(rp.watch),
                                    off, n, p, pool))
        order.append((jj, q))


def collect_reads(hooks: Sequence[HookTables | None], segments: Sequence[ReadSegment]) -> list[ReadRecord]:
    """This step's reads (after the forward) as side-channel records, one per segment."""
    records: list[ReadRecord] = []
    host = {i: hook.read_out_host() for i in {s.hook_id for s in segments}
            if (hook := hooks[i]) is not None}
    # each hook's outputs in the records' dtypes once, then sliced per segment
    arrays = {i: (vals.to(torch.float32).numpy(), idx.to(torch.int32).numpy(),
                  watch.to(torch.float32).numpy(), pools)
              for i, out in host.items() if out is not None
              for vals, idx, watch, pools in (out,)}
    for seg in segments:
        out = arrays.get(seg.hook_id)
        if out is None:  # the hooked layer did not run (cannot happen in a full forward)
            continue
        vals, idx, watch, pools = out
        sl = slice(seg.offset, seg.offset + seg.n)
        k, w = seg.top_k, seg.n_watch
        psum = pmax = None
        if seg.pooled and pools is not None:
            psum, pmax = (p[seg.pool].numpy().tobytes() for p in pools)
        records.append(ReadRecord(
            rid=seg.rid, read=seg.index, sae=seg.hook_id, pos0=seg.pos0, n=seg.n, k=k,
            idx=idx[sl, :k].tobytes(), val=vals[sl, :k].tobytes(),
            w=w, wv=watch[sl, :w].tobytes(), psum=psum, pmax=pmax))
    return records
