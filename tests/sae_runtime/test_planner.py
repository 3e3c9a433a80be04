"""The step planner on hand-built batches, against a per-token oracle written here.

Each batch is a list of scheduled requests (token rows ``[start, end)`` at positions
``pos0..``, prompt length, payload), as a model-runner adapter would describe a chunked
prefill, a preempted request recomputing prompt and generated positions, and a mixed
prefill + decode step with plain requests and padding rows. The oracle decides per token,
from the payload alone, which edits apply (scope ALL: every position; GENERATION_ONLY:
positions >= prompt length) and which reads cover it (ALL / PROMPT / GENERATION); the
planner's tables must then give exactly those edits (``HookTables.apply`` compared with the
dense SAE math over the oracle's edits) and exactly those read rows and positions.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sae_runtime import ops
from sae_runtime.kernels import read_reference, row_edits
from sae_runtime.spec.interventions import Scope
from sae_runtime.spec.payloads import (
    EXTRA_ARGS_KEY,
    EditPayload,
    ReadPayload,
    RequestPayload,
    encode_request,
)
from sae_runtime.spec.reads import ReadScope
from sae_runtime.step.edits import POS_INF
from sae_runtime.step.planner import (
    ScheduledRequest,
    StepDescription,
    collect_reads,
    compile_request,
    plan_step,
)
from sae_runtime.step.tables import HookTables
from tests.sae_runtime._factories import random_sae

D_IN, D_SAE = 32, 64
MAX_TOKENS, MAX_SEQS, MAX_FEATS = 48, 6, 4
C, A, G = int(ops.Mode.CLAMP), int(ops.Mode.ADD), int(ops.Mode.SCALE)
ALL, GEN = Scope.ALL.selector, Scope.GENERATION_ONLY.selector

# Payloads: two hooks (SAE index 0 and 1).
STEER_BOTH = RequestPayload(rid="both", edits=(
    EditPayload(0, 3, C, 2.5, ALL), EditPayload(0, 9, A, -1.0, GEN), EditPayload(1, 5, G, 3.0, GEN)))
GEN_ONLY = RequestPayload(rid="gen", edits=(EditPayload(0, 11, C, 4.0, GEN),))
READER = RequestPayload(rid="reader", edits=(EditPayload(1, 7, A, 1.5, ALL),), reads=(
    ReadPayload(0, 4, (3, 9), ReadScope.PROMPT.selector),
    ReadPayload(1, 2, (), ReadScope.GENERATION.selector)))
READ_ALL = RequestPayload(rid="all", reads=(ReadPayload(0, 3, (11,), ReadScope.ALL.selector),))
PLAIN = None

# (payload, prompt length, start row, end row, first position) per scheduled request.
BATCHES = {
    # A 10-token prompt in chunks of 4, 4, 2, then its first decode step.
    "chunked_prefill": [
        [(STEER_BOTH, 10, 0, 4, 0), (GEN_ONLY, 10, 4, 8, 0)],
        [(STEER_BOTH, 10, 0, 4, 4), (GEN_ONLY, 10, 4, 8, 4)],
        [(STEER_BOTH, 10, 0, 2, 8), (GEN_ONLY, 10, 2, 4, 8)],
        [(STEER_BOTH, 10, 0, 1, 10), (GEN_ONLY, 10, 1, 2, 10)],
    ],
    # Preempted after 3 generated tokens: prompt (6) and generated positions recomputed in
    # one go (rows straddle the prompt end), then a decode step.
    "preempted": [
        [(STEER_BOTH, 6, 0, 9, 0), (READER, 6, 9, 18, 0)],
        [(STEER_BOTH, 6, 0, 1, 9), (READER, 6, 1, 2, 9)],
    ],
    # Decodes, a prefill chunk, a plain request and a reads-only one; padding rows at the end.
    "mixed": [
        [(STEER_BOTH, 5, 0, 1, 7), (PLAIN, 4, 1, 2, 6), (GEN_ONLY, 8, 2, 8, 2),
         (READER, 3, 8, 9, 3), (READ_ALL, 4, 9, 13, 0), (READER, 12, 13, 20, 5)],
        [(READ_ALL, 4, 0, 1, 4), (GEN_ONLY, 8, 1, 3, 8), (PLAIN, 4, 3, 4, 7)],
    ],
}


def _oracle_edits(payload, prompt_len: int, pos: int, hook: int) -> list[tuple[int, int, float]]:
    if payload is None:
        return []
    return [(e.feature, e.mode, e.value) for e in payload.edits
            if e.sae == hook and (e.positions == ALL or pos >= prompt_len)]


def _oracle_reads(payload, prompt_len: int, pos: int, hook: int):
    if payload is None:
        return None
    for r in payload.reads:
        covers = {ReadScope.ALL.selector: True, ReadScope.PROMPT.selector: pos < prompt_len,
                  ReadScope.GENERATION.selector: pos >= prompt_len}[r.positions]
        if r.sae == hook and covers:
            return r
    return None


def _dense_oracle(sae, h, resid, per_row: dict[int, list]) -> torch.Tensor:
    out = h.clone()
    for t, items in per_row.items():
        act = ops.encode(sae, resid[t : t + 1])[0]
        for i, m, v in items:
            a = act[i]
            new = {ops.Mode.CLAMP: torch.tensor(v), ops.Mode.SCALE: a * v,
                   ops.Mode.ADD: a + v}[ops.Mode(m)]
            out[t] += (new - a) * sae.W_dec[i]
    return out


def _hooks(staged: bool):
    return [HookTables(random_sae(arch, D_IN, D_SAE, seed=i), MAX_TOKENS, MAX_SEQS, MAX_FEATS,
                       max_watch=2, staged=staged)
            for i, arch in enumerate(("jumprelu", "topk"))]


def _step(batch):
    plans = {}
    reqs = []
    for j, (payload, prompt_len, a, b, pos0) in enumerate(batch):
        plan = plans.setdefault(j, compile_request(payload, prompt_len))
        reqs.append(ScheduledRequest(f"req{j}", a, b, pos0, plan))
    return StepDescription(reqs)


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("name", sorted(BATCHES))
def test_planned_tables_apply_exactly_the_oracle_edits(name, staged):
    hooks = _hooks(staged)
    g = torch.Generator().manual_seed(0)
    for batch in BATCHES[name]:
        T = max(b for _, _, _, b, _ in batch) + 2  # two padding rows
        segments = plan_step(hooks, _step(batch))
        h, residual = torch.randn(T, D_IN, generator=g), torch.randn(T, D_IN, generator=g)
        edited_somewhere = False
        for hook_id, hook in enumerate(hooks):
            per_row = {}
            for payload, prompt_len, a, b, pos0 in batch:
                for t in range(a, b):
                    if items := _oracle_edits(payload, prompt_len, pos0 + t - a, hook_id):
                        per_row[t] = items
            # The tables' view of each row (windows applied) lists the oracle's edits...
            feat, mode, val = row_edits(hook.edits, torch.arange(T))
            for t in range(T):
                live = mode[t] != ops.Mode.NONE
                got = [(int(f), int(m), float(v)) for f, m, v in
                       zip(feat[t][live], mode[t][live], val[t][live], strict=True)]
                assert got == per_row.get(t, []), f"{name} hook {hook_id} row {t}"
            # ...and applying them is the dense math over exactly those edits.
            out = hook.apply(h, residual)
            want = _dense_oracle(hook.sae, h, h + residual, per_row)
            torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
            untouched = [t for t in range(T) if t not in per_row]
            assert torch.equal(out[untouched], h[untouched])
            edited_somewhere |= bool(per_row)
        # Reads: one segment per (request, hook) with covered rows, at the oracle's positions.
        want_reads = {(p.rid, hook_id, pos0 + t - a): t
                      for p, prompt_len, a, b, pos0 in batch
                      for hook_id in range(len(hooks)) for t in range(a, b)
                      if _oracle_reads(p, prompt_len, pos0 + t - a, hook_id) is not None}
        got_reads = {}
        for seg in segments:
            rows = hooks[seg.hook_id].read_rows[seg.offset : seg.offset + seg.n].tolist()
            for j, row in enumerate(rows):
                got_reads[(seg.rid, seg.hook_id, seg.pos0 + j)] = row
        assert got_reads == want_reads, name
        for hook in hooks:
            hook.clear()
        assert edited_somewhere


def test_read_records_equal_the_reference_reads_of_the_oracle_rows():
    """``collect_reads`` after ``apply``: per position, the top-k and watched values of the
    row, edited as the request edits it there (read_reference over the oracle's edits)."""
    hooks = _hooks(False)
    batch = BATCHES["preempted"][0]  # READER's prompt rows read SAE 0, generated rows SAE 1
    T = 18
    segments = plan_step(hooks, _step(batch))
    g = torch.Generator().manual_seed(1)
    h, residual = torch.randn(T, D_IN, generator=g), torch.randn(T, D_IN, generator=g)
    resid = h + residual
    for hook in hooks:
        hook.apply(h, residual)
    records = collect_reads(hooks, segments)
    assert sorted((r.rid, r.sae, r.pos0, r.n) for r in records) == [
        ("reader", 0, 0, 6), ("reader", 1, 6, 3)]
    _, prompt_len, a, _, pos0 = batch[1]
    for rec in records:
        hook = hooks[rec.sae]
        rd = next(r for r in READER.reads if r.sae == rec.sae)
        rows = [a + rec.pos0 + j - pos0 for j in range(rec.n)]
        feat = torch.zeros(rec.n, MAX_FEATS, dtype=torch.int64)
        mode = torch.zeros(rec.n, MAX_FEATS, dtype=torch.int32)
        value = torch.zeros(rec.n, MAX_FEATS)
        for r in range(rec.n):
            for j, (i, m, v) in enumerate(_oracle_edits(READER, prompt_len, rec.pos0 + r, rec.sae)):
                feat[r, j], mode[r, j], value[r, j] = i, m, v
        watch = torch.tensor([list(rd.watch)] * rec.n, dtype=torch.int64).reshape(rec.n, len(rd.watch))
        vals, _, watched = read_reference(hook.sae, resid[rows], feat, mode, value, rd.top_k, watch)
        got_val = np.frombuffer(rec.val, dtype=np.float32).reshape(rec.n, rec.k)
        got_w = np.frombuffer(rec.wv, dtype=np.float32).reshape(rec.n, rec.w)
        np.testing.assert_allclose(got_val, vals.numpy(), atol=1e-5)
        np.testing.assert_allclose(got_w, watched.numpy(), atol=1e-5)


def test_compile_request_resolves_scopes_to_windows():
    plan = compile_request(STEER_BOTH, prompt_len=7)
    rows = plan.edits[0]
    assert rows["feature"].tolist() == [3, 9]  # request order, one row per edit
    assert list(zip(rows["pos_lo"].tolist(), rows["pos_hi"].tolist(), strict=True)) == [
        (0, POS_INF), (7, POS_INF)]
    assert rows["cond_feature"].tolist() == [-1, -1]  # unconditional
    assert plan.hulls == {0: (0, POS_INF), 1: (7, POS_INF)}
    assert compile_request(None, 5).empty and compile_request(RequestPayload(rid="x"), 5).empty


def test_v1_adapter_describes_the_runner_and_forgets_finished_requests():
    """The V1 adapter (no vLLM needed for this part) on a fake runner: rows from
    ``query_start_loc``, positions from ``num_computed_tokens_cpu``, payload decoded once
    per request, and dropped once the runner no longer holds the request."""
    from sae_runtime.vllm.runner_v1 import RequestPlans, describe_step

    def req(payload, prompt_len):
        extra = {EXTRA_ARGS_KEY: encode_request(payload)} if payload else None
        return SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra),
                               num_prompt_tokens=prompt_len)

    requests = {"a": req(STEER_BOTH, 10), "b": req(None, 3), "c": req(GEN_ONLY, 4)}
    runner = SimpleNamespace(
        requests=requests,
        input_batch=SimpleNamespace(req_ids=["c", "b", "a", "stale"], num_reqs=3,
                                    num_computed_tokens_cpu=np.array([4, 2, 0, 0])),
        query_start_loc=SimpleNamespace(np=np.array([0, 1, 2, 6, 0])))
    plans = RequestPlans()
    step = describe_step(runner, plans)
    assert [(r.req_id, r.start, r.end, r.pos0, r.plan.rid, r.plan.prompt_len)
            for r in step.requests] == [("c", 0, 1, 4, "gen", 4), ("a", 2, 6, 0, "both", 10)]
    assert len(plans) == 3  # the plain request is remembered too (decoded once)
    cached = step.requests[1].plan
    del requests["b"], requests["c"]  # finished
    runner.input_batch.req_ids, runner.input_batch.num_reqs = ["a"], 1
    runner.input_batch.num_computed_tokens_cpu = np.array([4])
    runner.query_start_loc.np = np.array([0, 3])
    step = describe_step(runner, plans)
    assert len(plans) == 1 and step.requests[0].plan is cached
    assert (step.requests[0].start, step.requests[0].end, step.requests[0].pos0) == (0, 3, 4)


def test_a_rank_that_reads_only_some_hooks_plans_no_reads_elsewhere_and_same_edits():
    """``read_hooks`` (a TP rank that publishes nothing): reads only at the listed hooks,
    while every hook's edits stay exactly those of the full plan."""
    batch = BATCHES["preempted"][0]
    full, part = _hooks(False), _hooks(False)
    seg_full = plan_step(full, _step(batch))
    seg_part = plan_step(part, _step(batch), read_hooks={1})
    assert {s.hook_id for s in seg_full} == {0, 1}
    assert [s for s in seg_full if s.hook_id == 1] == seg_part
    assert part[0].n_read == 0 and part[1].n_read == full[1].n_read
    for a, b in zip(full, part, strict=True):
        assert a.n_rows == b.n_rows
        assert torch.equal(a.tok_slot, b.tok_slot) and torch.equal(a.tok_pos, b.tok_pos)
