"""The step planner: one scheduled batch -> every hook's tables, in one pass. No vLLM here.

A model-runner adapter (``sae_runtime/vllm/runner_v1.py`` for vLLM's V1 runner) describes
the step in the project's own terms and calls ``plan_step``:

- ``compile_request(payload, prompt_len)`` turns a request's decoded payload, once per
  request, into a ``RequestPlan``: per hook its edit rows (``edits.EDIT_DTYPE``, request
  order, one per window of each edit's position selector, ``sae_runtime.spec.selectors``) and
  its reads (with windows too);
- a ``StepDescription`` lists the scheduled requests: request id, token rows
  ``[start, end)`` of the flattened batch, the position of the first row, and the plan;
  plus the token each row consumes, which only token-id selectors read;
- ``plan_step`` fills each hook's tables (``HookTables.add_edits`` /
  ``add_read_rows``), uploads them, and returns the read segments; ``collect_reads``
  turns the forward's read outputs into ``payloads.ReadRecord`` s for the side channel.

Row ``start + j`` of a request is at position ``pos0 + j``: chunked prefill (``pos0 > 0``
with prompt rows still to come), decode (one row at ``pos0 >= prompt_len``), rows that
straddle the prompt end, and recomputation after preemption (positions that were computed
before, computed again) are all the same case. A request's rows at a hook are the ones
whose positions fall in the hull of its edit windows there, so rows no edit can cover do no
work (a generation-only request's prompt rows, above all).

Token-id selectors ("every position whose token is in this set") are resolved here, per
step, on the host: ``token_pieces`` turns the step's matching positions into edit rows
whose windows are exactly the runs of matching positions, so the op and the kernels stay
as they are (fixed shapes, window masks, no host sync). A request's rows at such a hook
may need several slots in one step (one slot holds ``max_feats`` edit rows).

Reads are computed over the hull of a read's windows in the step; the server keeps the
positions the selector picks (``reads.Read.covers``), so multi-window reads cost one read
slot per request, like single-window ones.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sae_runtime.spec.payloads import RequestPayload
from sae_runtime.spec.selectors import Selector
from sae_runtime.step.edits import NO_CONDITION, Cond, edit_rows
from sae_runtime.step.records import ReadRecord
from sae_runtime.step.tables import HookTables


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

    ``edits[h]``: the request's edit rows at hook ``h``, one per window of each edit's
    selector, in request order. Latched rows (``latched[h]``) hold latch ids of the hook's
    tables from the request's first scheduled step until ``release_latches``. A hook in ``token_rules`` has edits with token ids: its
    rows are resolved per step (``token_rules[h][i]`` is row i's condition, None = none).
    """

    rid: str  # the server's request id (reads are routed by it)
    prompt_len: int
    edits: dict[int, np.ndarray] = field(default_factory=dict)  # hook id -> EDIT_DTYPE rows
    hulls: dict[int, tuple[int, int]] = field(default_factory=dict)  # hook id -> [lo, hi)
    reads: tuple[ReadPlan, ...] = ()
    pooled: bool = False
    token_rules: dict[int, tuple[TokenRule | None, ...]] = field(default_factory=dict)
    latched: dict[int, np.ndarray] = field(default_factory=dict)  # hook id -> latched row indices
    latches: dict[int, np.ndarray] = field(default_factory=dict)  # hook id -> latch ids (mutable:
    # filled when the request is first scheduled, given back by ``release_latches``)
    inline: dict[int, np.ndarray] = field(default_factory=dict)  # hook id -> the request's
    # inline vector at that bank (float32 [d]); its edit rows name the bank's inline row

    @property
    def empty(self) -> bool:
        return not self.edits and not self.reads

    @property
    def needs_tokens(self) -> bool:
        return bool(self.token_rules)


EMPTY_PLAN = RequestPlan("", 0)


def _rule(sel: Selector) -> TokenRule | None:
    if not sel.token_ids:
        return None
    return TokenRule(np.asarray(sorted(sel.token_ids), dtype=np.int64), sel.exclude_token_ids)


def compile_request(payload: RequestPayload | None, prompt_len: int) -> RequestPlan:
    """``payload`` (None: a plain request) as edit rows per hook and windowed reads."""
    if payload is None or (not payload.edits and not payload.reads):
        return EMPTY_PLAN
    by_hook: dict[int, list] = {}
    for ed in payload.edits:
        by_hook.setdefault(ed.sae, []).append(ed)
    edits, hulls, token_rules, latched, inline = {}, {}, {}, {}, {}
    for hook_id, items in by_hook.items():
        rows, rules = [], []
        for ed in items:
            if ed.vector is not None:  # one inline vector per bank and request (the server)
                inline[hook_id] = np.frombuffer(ed.vector, dtype="<f4")
            w = ed.when
            cond = (NO_CONDITION, Cond.NONE, 0.0, False) if w is None else (
                w.feature, w.op, w.threshold, w.latch)
            for lo, hi in ed.positions.windows(prompt_len):
                rows.append((ed.feature, ed.mode, ed.value, lo, hi, *cond))
                rules.append(_rule(ed.positions))
        if not rows:  # every selector here resolved to no position
            continue
        table = edit_rows(len(rows))
        for j, name in enumerate(("feature", "mode", "value", "pos_lo", "pos_hi",
                                  "cond_feature", "cond_op", "cond_threshold")):
            table[name] = [r[j] for r in rows]
        if any(r[8] for r in rows):  # latched rows get their latch ids when first scheduled
            latched[hook_id] = np.array([j for j, r in enumerate(rows) if r[8]], dtype=np.int64)
        edits[hook_id] = table
        hulls[hook_id] = (int(table["pos_lo"].min()), int(table["pos_hi"].max()))
        if any(r is not None for r in rules):
            token_rules[hook_id] = tuple(rules)
    reads = []
    for j, r in enumerate(payload.reads):
        wins = r.positions.windows(prompt_len)
        if wins:
            reads.append(ReadPlan(j, r.sae, r.top_k, tuple(r.watch), wins[0][0], wins[-1][1],
                                  wins))
    return RequestPlan(payload.rid, prompt_len, edits, hulls, tuple(reads), payload.pooled,
                       token_rules, latched, inline={h: v for h, v in inline.items() if h in edits})


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
class StepDescription:
    requests: Sequence[ScheduledRequest]
    token_ids: np.ndarray | None = None  # [rows] the token each row consumes (host memory);
    # needed only by requests with token-id selectors (``RequestPlan.needs_tokens``)


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
    pooled: bool


def _clip(start: int, end: int, pos0: int, lo: int, hi: int) -> tuple[int, int]:
    """Rows of ``[start, end)`` (row ``start`` at ``pos0``) whose positions are in [lo, hi)."""
    a = start + min(max(lo - pos0, 0), end - start)
    b = start + min(max(hi - pos0, 0), end - start)
    return a, max(a, b)


def token_pieces(rows: np.ndarray, rules: Sequence[TokenRule | None], pos: np.ndarray,
                 tokens: np.ndarray, width: int) -> list[tuple[int, int, np.ndarray]]:
    """One request's rows at one hook in one step, with token-id conditions resolved.

    ``rows``: the request's edit rows at the hook (windows resolved), ``rules[i]`` row i's
    token condition; ``pos`` / ``tokens``: position and consumed token of each step row.
    Returns pieces ``(a, b, edit rows)`` over step rows ``[a, b)``: each output edit row is
    one run of consecutive positions where an input row applies (window and token
    condition), so every kernel's window mask gives exactly the selected positions. A
    piece holds at most ``width`` edit rows (one slot of the tables); rows no edit applies
    to get no piece.
    """
    applies = (rows["pos_lo"][None, :] <= pos[:, None]) & (pos[:, None] < rows["pos_hi"][None, :])
    for i, rule in enumerate(rules):  # [n, R]
        if rule is not None:
            applies[:, i] &= rule.match(tokens)
    starts = applies.copy()  # a run of row i starts at step row t
    starts[1:] &= ~applies[:-1]
    cum = np.cumsum(starts.sum(1))  # [n] runs started up to and including row t
    live = np.flatnonzero(applies.any(1))
    pieces = []
    k = 0
    while k < len(live):
        a = int(live[k])
        # edit rows of [a, t] = the runs open at a + the runs starting in (a, t]
        budget = width - int(applies[a].sum()) + int(cum[a])
        t = max(int(np.searchsorted(cum, budget, side="right")) - 1, a)
        k_end = int(np.searchsorted(live, t, side="right"))  # live rows <= t
        b = int(live[k_end - 1]) + 1
        block = applies[a:b]  # [b - a, R]
        run_start = block.copy()
        run_start[1:] &= ~block[:-1]
        run_end = block.copy()
        run_end[:-1] &= ~block[1:]
        # column-major: request order, then position order
        s_i, s_t = np.nonzero(run_start.T)
        _, e_t = np.nonzero(run_end.T)
        piece = rows[s_i]  # a copy (fancy indexing)
        piece["pos_lo"] = pos[a + s_t]
        piece["pos_hi"] = pos[a + e_t] + 1
        pieces.append((a, b, piece))
        k = k_end
    assert all(len(p) <= width for _, _, p in pieces)
    return pieces


def plan_step(hooks: Sequence[HookTables | None], step: StepDescription,
              read_hooks: Collection[int] | None = None) -> list[ReadSegment]:
    """Fill every hook's tables for ``step`` and upload them; returns the read segments.

    ``hooks[i]`` is hook id i, None where another pipeline stage holds that SAE (its edits
    and reads are planned there). ``read_hooks``: the hook ids that compute reads on this
    rank (None = all); a tensor-parallel rank that publishes no reads skips them. The
    hooks' tables must be clear (``HookTables.clear`` after the previous forward).
    """
    segments: list[ReadSegment] = []
    by_token: list[tuple[ScheduledRequest, int, int, int]] = []
    for sr in step.requests:
        plan = sr.plan
        if plan.empty or sr.end <= sr.start:
            continue
        for hook_id, rows in plan.edits.items():
            hook = hooks[hook_id]
            a, b = _clip(sr.start, sr.end, sr.pos0, *plan.hulls[hook_id])
            if hook is None or b <= a:
                continue
            if hook_id in plan.latched and hook_id not in plan.latches:
                ids = plan.latches[hook_id] = hook.alloc_latches(len(plan.latched[hook_id]))
                rows["latch"][plan.latched[hook_id]] = ids
            if hook_id in plan.token_rules:
                by_token.append((sr, hook_id, a, b))  # after the one-slot requests
            else:
                _add_edits(hook, a, b, sr.pos0 + a - sr.start, rows, plan.inline.get(hook_id))
        for rp in plan.reads:
            hook = hooks[rp.hook_id]
            if read_hooks is not None and rp.hook_id not in read_hooks:
                continue
            a, b = _clip(sr.start, sr.end, sr.pos0, rp.pos_lo, rp.pos_hi)
            if hook is not None and b > a:
                off = hook.add_read_rows(a, b, rp.top_k, rp.watch, plan.pooled)
                segments.append(ReadSegment(plan.rid, rp.index, rp.hook_id, rp.top_k,
                                            len(rp.watch), off,
                                            b - a, sr.pos0 + a - sr.start, plan.pooled))
    # Token-id selectors may need several slots per request; planned last, they can use
    # every slot the others left.
    for sr, hook_id, a, b in by_token:
        hook, plan = hooks[hook_id], sr.plan
        if step.token_ids is None:
            raise RuntimeError("a request selects positions by token id, but the step "
                               "description carries no token ids")
        pos = np.arange(sr.pos0 + a - sr.start, sr.pos0 + b - sr.start, dtype=np.int64)
        for pa, pb, piece in token_pieces(plan.edits[hook_id], plan.token_rules[hook_id], pos,
                                          step.token_ids[a:b], hook.max_feats):
            if hook.n_slots >= hook.max_slots:
                raise RuntimeError(
                    f"request {plan.rid}: its token-id selectors need more edit slots this "
                    f"step than the tables hold ({hook.max_slots})")
            _add_edits(hook, a + pa, a + pb, int(pos[pa]), piece, plan.inline.get(hook_id))
    for hook in hooks:
        if hook is not None:
            hook.upload()
    return segments


def _add_edits(hook: HookTables, a: int, b: int, pos0: int, rows: np.ndarray,
               vector: np.ndarray | None) -> None:
    """``hook.add_edits``; with an inline vector, first copied into the scratch row of the
    slot the rows get, and the rows that name the bank's inline row pointed there."""
    if vector is not None:
        s = hook.n_slots  # the slot add_edits hands out next
        rows = rows.copy()
        rows["feature"][rows["feature"] == hook.inline_row] = hook.write_inline(s, vector)
    hook.add_edits(a, b, pos0, rows)


def release_latches(hooks: Sequence[HookTables | None], plan: RequestPlan) -> None:
    """Give a finished request's latch ids back to their hooks."""
    for hook_id, ids in plan.latches.items():
        hook = hooks[hook_id]
        if hook is not None:
            hook.free_latches(ids)
    plan.latches.clear()


def collect_reads(hooks: Sequence[HookTables | None], segments: Sequence[ReadSegment]) -> list[ReadRecord]:
    """This step's reads (after the forward) as side-channel records, one per segment."""
    records: list[ReadRecord] = []
    host = {i: hook.read_out_host() for i in {s.hook_id for s in segments}
            if (hook := hooks[i]) is not None}
    for seg in segments:
        out = host.get(seg.hook_id)
        if out is None:  # the hooked layer did not run (cannot happen in a full forward)
            continue
        vals, idx, watch, dense = out
        sl = slice(seg.offset, seg.offset + seg.n)
        k, w = seg.top_k, seg.n_watch
        psum = pmax = None
        if seg.pooled and dense is not None:
            d = dense[sl].to(torch.float32)
            psum, pmax = d.sum(0).numpy().tobytes(), d.max(0).values.numpy().tobytes()
        records.append(ReadRecord(
            rid=seg.rid, read=seg.index, sae=seg.hook_id, pos0=seg.pos0, n=seg.n, k=k,
            idx=idx[sl, :k].to(torch.int32).numpy().tobytes(),
            val=vals[sl, :k].to(torch.float32).numpy().tobytes(),
            w=w, wv=watch[sl, :w].to(torch.float32).numpy().tobytes(), psum=psum, pmax=pmax))
    return records
