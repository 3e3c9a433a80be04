"""The step planner: one scheduled batch -> every hook's tables, in one pass. No vLLM here.

A model-runner adapter (``sae_runtime/vllm/runner_v1.py`` for vLLM's V1 runner) describes
the step in the project's own terms and calls ``plan_step``:

- ``compile_request(payload, prompt_len)`` turns a request's decoded payload, once per
  request, into a ``RequestPlan``: per hook its edit rows (``edits.EDIT_DTYPE``, request
  order, scopes resolved to absolute position windows) and its reads (with windows too);
- a ``StepDescription`` lists the scheduled requests: request id, token rows
  ``[start, end)`` of the flattened batch, the position of the first row, and the plan;
- ``plan_step`` fills each hook's tables (``HookTables.add_edits`` /
  ``add_read_rows``), uploads them, and returns the read segments; ``collect_reads``
  turns the forward's read outputs into ``payloads.ReadRecord`` s for the side channel.

Row ``start + j`` of a request is at position ``pos0 + j``: chunked prefill (``pos0 > 0``
with prompt rows still to come), decode (one row at ``pos0 >= prompt_len``), rows that
straddle the prompt end, and recomputation after preemption (positions that were computed
before, computed again) are all the same case. A request's rows at a hook are the ones
whose positions fall in the hull of its edit windows there, so rows no edit can cover do no
work (a generation-only request's prompt rows, above all).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sae_runtime.edits import POS_INF, edit_rows
from sae_runtime.interventions import Scope
from sae_runtime.payloads import ReadRecord, RequestPayload
from sae_runtime.reads import ReadScope
from sae_runtime.tables import HookTables


def scope_window(scope: int, prompt_len: int) -> tuple[int, int]:
    """The absolute positions ``[lo, hi)`` an edit's scope covers."""
    if scope == Scope.GENERATION_ONLY:
        return prompt_len, POS_INF
    return 0, POS_INF


def read_window(scope: int, prompt_len: int) -> tuple[int, int]:
    """The absolute positions ``[lo, hi)`` a read's scope covers."""
    if scope == ReadScope.PROMPT:
        return 0, prompt_len
    if scope == ReadScope.GENERATION:
        return prompt_len, POS_INF
    return 0, POS_INF


@dataclass(frozen=True)
class ReadPlan:
    hook_id: int
    top_k: int
    watch: tuple[int, ...]
    pos_lo: int
    pos_hi: int


@dataclass(frozen=True)
class RequestPlan:
    """One request's payload compiled for the planner (built once per request)."""

    rid: str  # the server's request id (reads are routed by it)
    prompt_len: int
    edits: dict[int, np.ndarray] = field(default_factory=dict)  # hook id -> EDIT_DTYPE rows
    hulls: dict[int, tuple[int, int]] = field(default_factory=dict)  # hook id -> [lo, hi)
    reads: tuple[ReadPlan, ...] = ()
    pooled: bool = False

    @property
    def empty(self) -> bool:
        return not self.edits and not self.reads


EMPTY_PLAN = RequestPlan("", 0)


def compile_request(payload: RequestPayload | None, prompt_len: int) -> RequestPlan:
    """``payload`` (None: a plain request) as edit rows per hook and windowed reads."""
    if payload is None or (not payload.edits and not payload.reads):
        return EMPTY_PLAN
    by_hook: dict[int, list] = {}
    for ed in payload.edits:
        by_hook.setdefault(ed.sae, []).append(ed)
    edits, hulls = {}, {}
    for hook_id, items in by_hook.items():
        rows = edit_rows(len(items))
        rows["feature"] = [ed.feature for ed in items]
        rows["mode"] = [ed.mode for ed in items]
        rows["value"] = [ed.value for ed in items]
        windows = [scope_window(ed.scope, prompt_len) for ed in items]
        rows["pos_lo"] = [lo for lo, _ in windows]
        rows["pos_hi"] = [hi for _, hi in windows]
        edits[hook_id] = rows
        hulls[hook_id] = (int(rows["pos_lo"].min()), int(rows["pos_hi"].max()))
    reads = tuple(ReadPlan(r.sae, r.top_k, tuple(r.watch), *read_window(r.scope, prompt_len))
                  for r in payload.reads)
    return RequestPlan(payload.rid, prompt_len, edits, hulls, reads, payload.pooled)


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


@dataclass(frozen=True)
class ReadSegment:
    """Consecutive read rows of one request at one hook in this step."""

    rid: str
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


def plan_step(hooks: Sequence[HookTables | None], step: StepDescription,
              read_hooks: Collection[int] | None = None) -> list[ReadSegment]:
    """Fill every hook's tables for ``step`` and upload them; returns the read segments.

    ``hooks[i]`` is hook id i, None where another pipeline stage holds that SAE (its edits
    and reads are planned there). ``read_hooks``: the hook ids that compute reads on this
    rank (None = all); a tensor-parallel rank that publishes no reads skips them. The
    hooks' tables must be clear (``HookTables.clear`` after the previous forward).
    """
    segments: list[ReadSegment] = []
    for sr in step.requests:
        plan = sr.plan
        if plan.empty or sr.end <= sr.start:
            continue
        for hook_id, rows in plan.edits.items():
            hook = hooks[hook_id]
            a, b = _clip(sr.start, sr.end, sr.pos0, *plan.hulls[hook_id])
            if hook is not None and b > a:
                hook.add_edits(a, b, sr.pos0 + a - sr.start, rows)
        for rp in plan.reads:
            hook = hooks[rp.hook_id]
            if read_hooks is not None and rp.hook_id not in read_hooks:
                continue
            a, b = _clip(sr.start, sr.end, sr.pos0, rp.pos_lo, rp.pos_hi)
            if hook is not None and b > a:
                off = hook.add_read_rows(a, b, rp.top_k, rp.watch, plan.pooled)
                segments.append(ReadSegment(plan.rid, rp.hook_id, rp.top_k, len(rp.watch), off,
                                            b - a, sr.pos0 + a - sr.start, plan.pooled))
    for hook in hooks:
        if hook is not None:
            hook.upload()
    return segments


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
            rid=seg.rid, sae=seg.hook_id, pos0=seg.pos0, n=seg.n, k=k,
            idx=idx[sl, :k].to(torch.int32).numpy().tobytes(),
            val=vals[sl, :k].to(torch.float32).numpy().tobytes(),
            w=w, wv=watch[sl, :w].to(torch.float32).numpy().tobytes(), psum=psum, pmax=pmax))
    return records
