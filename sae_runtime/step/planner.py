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
edit's token ids, and ``HookTables.add_edits`` writes the result into the hook's
``tok_match`` table, which every kernel applies beside the window mask. So a request takes
exactly one edit slot per hook in every step, whatever its selectors, and a step can
never need more slots than it has requests (``sae_runtime.spec.budget``).

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
from sae_runtime.step.edits import NO_CONDITION, NO_LATCH, POS_INF, Cond, edit_rows
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
    if payload is None or (not payload.edits and not payload.reads):
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
    return RequestPlan(payload.rid, prompt_len, edits, hulls, tuple(reads), payload.pooled,
                       token_rules, latch_state, inline)


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
    pool: int = -1  # the read's pool slot at its hook this step (-1: not pooled)

    @property
    def pooled(self) -> bool:
        return self.pool >= 0


def _clip(start: int, end: int, pos0: int, lo: int, hi: int) -> tuple[int, int]:
    """Rows of ``[start, end)`` (row ``start`` at ``pos0``) whose positions are in [lo, hi)."""
    a = start + min(max(lo - pos0, 0), end - start)
    b = start + min(max(hi - pos0, 0), end - start)
    return a, max(a, b)


def token_match(rules: Sequence[TokenRule | None], tokens: np.ndarray) -> np.ndarray:
    """``[len(tokens), len(rules)]`` int8: whether each step row's token is selected by each
    edit row's token condition (1 where a row has none: its ``by_token`` is 0 anyway)."""
    out = np.ones((len(tokens), len(rules)), dtype=np.int8)
    for i, rule in enumerate(rules):
        if rule is not None:
            out[:, i] = rule.match(tokens)
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
    """
    for hook in hooks:
        if hook is not None:
            hook.settle_latches()  # the previous step's latch states, back in their plans
    segments: list[ReadSegment] = []
    for sr in step.requests:
        plan = sr.plan
        if plan.empty or sr.end <= sr.start:
            continue
        for hook_id, rows in plan.edits.items():
            hook = hooks[hook_id]
            a, b = _clip(sr.start, sr.end, sr.pos0, *plan.hulls[hook_id])
            if hook is None or b <= a:
                continue
            match = None
            if hook_id in plan.token_rules:
                # the adapter passes the step's tokens whenever a plan needs them
                assert step.token_ids is not None
                match = token_match(plan.token_rules[hook_id], step.token_ids[a:b])
            _add_edits(hook, a, b, sr.pos0 + a - sr.start, rows, match,
                       plan.latch_state.get(hook_id), plan.inline.get(hook_id))
        for rp in plan.reads:
            hook = hooks[rp.hook_id]
            if read_hooks is not None and rp.hook_id not in read_hooks:
                continue
            a, b = _clip(sr.start, sr.end, sr.pos0, rp.pos_lo, rp.pos_hi)
            if hook is not None and b > a:
                off, pool = hook.add_read_rows(a, b, rp.top_k, rp.watch, plan.pooled)
                segments.append(ReadSegment(plan.rid, rp.index, rp.hook_id, rp.top_k,
                                            len(rp.watch), off,
                                            b - a, sr.pos0 + a - sr.start, pool))
    for hook in hooks:
        if hook is not None:
            hook.upload()
    return segments


def _add_edits(hook: HookTables, a: int, b: int, pos0: int, rows: np.ndarray,
               match: np.ndarray | None, latch_state: np.ndarray | None,
               vector: np.ndarray | None) -> None:
    """``hook.add_edits``; with an inline vector, first copied into the scratch row of the
    slot the rows get, and the rows that name the bank's inline row pointed there."""
    if vector is not None:
        s = hook.n_slots  # the slot add_edits hands out next
        rows = rows.copy()
        rows["feature"][rows["feature"] == hook.inline_row] = hook.write_inline(s, vector)
    hook.add_edits(a, b, pos0, rows, match=match, latch_state=latch_state)


def collect_reads(hooks: Sequence[HookTables | None], segments: Sequence[ReadSegment]) -> list[ReadRecord]:
    """This step's reads (after the forward) as side-channel records, one per segment."""
    records: list[ReadRecord] = []
    host = {i: hook.read_out_host() for i in {s.hook_id for s in segments}
            if (hook := hooks[i]) is not None}
    for seg in segments:
        out = host.get(seg.hook_id)
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
            idx=idx[sl, :k].to(torch.int32).numpy().tobytes(),
            val=vals[sl, :k].to(torch.float32).numpy().tobytes(),
            w=w, wv=watch[sl, :w].to(torch.float32).numpy().tobytes(), psum=psum, pmax=pmax))
    return records
