"""``plan_step`` fills a step's tables for all requests at once (``planner._HookBatch``,
``HookTables.add_edit_batch`` / ``add_read_batch``, reused across steps while the same
requests are scheduled); here it must leave exactly the tables a request-by-request fill
leaves: the planner's former loop, written out below over ``HookTables.add_edits`` /
``add_read_rows`` with ``planner.token_match`` and the hull clip per request.

Random requests (unconditional, conditional and latched edits; position ranges, several
windows, token-id selectors; reads with watch lists, some pooled) at two hooks run through
random steps: the same batch again (decode: only positions advance), requests joining and
leaving, reordered, chunked prefill, preemption. After each step both table sets see the
same forward (latches lowered at random positions) and the requests' latch states must come
back equal.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sae_runtime.kernels.reference import placed_edits
from sae_runtime.saes import topk
from sae_runtime.spec.payloads import CondPayload, EditPayload, ReadPayload, RequestPayload
from sae_runtime.spec.selectors import Frame, Range, Selector
from sae_runtime.step.edits import EDIT_COLUMNS, POS_INF, Cond
from sae_runtime.step.planner import (
    ReadSegment,
    ScheduledRequest,
    StepDescription,
    compile_request,
    plan_step,
    token_match,
)
from sae_runtime.step.tables import HookTables
from tests.sae_runtime._factories import random_sae

D_IN, D_SAE, VOCAB = 8, 30, 6
MAX_TOKENS, MAX_SEQS, WIDTH, MAX_WATCH = 40, 6, 6, 3
N_HOOKS = 2


def _selector(g: np.random.Generator) -> Selector:
    kind = g.integers(0, 5)
    toks = tuple(sorted(g.choice(VOCAB, size=int(g.integers(1, 3)), replace=False).tolist()))
    if kind == 0:
        return Selector()
    if kind == 1:
        return Selector((Range(Frame.GENERATION, 0),))
    if kind == 2:  # two windows (or their complement)
        lo = int(g.integers(0, 4))
        return Selector((Range(Frame.ABSOLUTE, lo, lo + 3), Range(Frame.ABSOLUTE, lo + 5, lo + 9)),
                        exclude_ranges=bool(g.random() < 0.3))
    if kind == 3:
        return Selector(token_ids=toks, exclude_token_ids=bool(g.random() < 0.5))
    return Selector((Range(Frame.PROMPT, 1),), token_ids=toks)


def _payload(g: np.random.Generator, rid: str) -> RequestPayload:
    edits = []
    for h in range(N_HOOKS):
        if g.random() < 0.3:
            continue
        for _ in range(int(g.integers(1, 3))):  # at most 2 edits x 3 windows = WIDTH rows
            when = None
            if g.random() < 0.4:
                when = CondPayload(int(g.integers(D_SAE)), int(g.choice([Cond.GT, Cond.LT])),
                                   0.1, latch=bool(g.random() < 0.6))
            edits.append(EditPayload(h, int(g.integers(D_SAE)), int(g.integers(1, 5)),
                                     float(g.normal(0, 2)), _selector(g), when))
    reads = []
    for h in range(N_HOOKS):
        if g.random() < 0.4:
            watch = tuple(g.choice(D_SAE, size=int(g.integers(0, MAX_WATCH + 1)),
                                   replace=False).tolist())
            reads.append(ReadPayload(h, int(g.integers(1, 5)), watch, _selector(g)))
    return RequestPayload(rid=rid, edits=tuple(edits), reads=tuple(reads),
                          pooled=bool(g.random() < 0.3))


def _clip(start, end, pos0, lo, hi):
    a = start + min(max(lo - pos0, 0), end - start)
    b = start + min(max(hi - pos0, 0), end - start)
    return a, max(a, b)


def _plan_one_by_one(hooks, reqs, tokens) -> list[ReadSegment]:
    """The request-by-request fill (the planner's loop before it was batched)."""
    for hook in hooks:
        hook.settle_latches()
    segments = []
    for sr in reqs:
        plan = sr.plan
        if plan.empty or sr.end <= sr.start:
            continue
        for h, rows in plan.edits.items():
            a, b = _clip(sr.start, sr.end, sr.pos0, *plan.hulls[h])
            if b <= a:
                continue
            match = token_match(plan.token_rules[h], tokens[a:b]) if h in plan.token_rules else None
            hooks[h].add_edits(a, b, sr.pos0 + a - sr.start, rows, match=match,
                               latch_state=plan.latch_state.get(h))
        for rp in plan.reads:
            a, b = _clip(sr.start, sr.end, sr.pos0, rp.pos_lo, rp.pos_hi)
            if b > a:
                off, pool = hooks[rp.hook_id].add_read_rows(a, b, rp.top_k, rp.watch, plan.pooled)
                segments.append(ReadSegment(plan.rid, rp.index, rp.hook_id, rp.top_k,
                                            len(rp.watch), off, b - a,
                                            sr.pos0 + a - sr.start, pool))
    for hook in hooks:
        hook.upload()
    return segments


def _assert_same_tables(got: HookTables, want: HookTables, segs: list[ReadSegment],
                        hook_id: int) -> None:
    for name in ("n_rows", "n_slots", "n_edits", "n_cond", "edit_k", "n_read", "n_rslots",
                 "n_pool", "read_k", "read_w"):
        assert getattr(got, name) == getattr(want, name), name
    g, w = got._np, want._np
    np.testing.assert_array_equal(g["tok_slot"], w["tok_slot"])
    rows = w["rows"][: want.n_rows]
    np.testing.assert_array_equal(g["rows"][: got.n_rows], rows)
    np.testing.assert_array_equal(g["tok_pos"][rows], w["tok_pos"][rows])
    for name in ("slot_start", "slot_len"):
        np.testing.assert_array_equal(g[name][: got.n_slots], w[name][: want.n_slots])
    n = want.n_edits
    for c in EDIT_COLUMNS:
        np.testing.assert_array_equal(g[f"edit_{c}"][:n], w[f"edit_{c}"][:n], err_msg=c)
    latched = w["edit_latch"][:n]
    latched = latched[latched >= 0]
    np.testing.assert_array_equal(g["latch_pos"][latched], w["latch_pos"][latched])
    for t in rows:  # the token matches the kernels read: by_token entries of the row's slot
        s = w["tok_slot"][t]
        for k in range(w["slot_len"][s]):
            if w["edit_by_token"][w["slot_start"][s] + k]:
                assert g["tok_match"][t, k] == w["tok_match"][t, k], (t, k)
    r = want.n_read
    for name in ("read_rows", "read_slot", "read_pool"):
        np.testing.assert_array_equal(g[name][:r], w[name][:r], err_msg=name)
    by_slot = {}
    for seg in segs:
        if seg.hook_id == hook_id:
            by_slot[int(w["read_slot"][seg.offset])] = seg.n_watch
    for s, nw in by_slot.items():
        np.testing.assert_array_equal(g["rslot_watch"][s, :nw], w["rslot_watch"][s, :nw])


def _forward(g: np.random.Generator, pair: tuple[HookTables, HookTables]) -> None:
    """The same latch writes in both table sets (the op's in-place ``amin``)."""
    want = pair[1]
    lat = want._np["edit_latch"][: want.n_edits]
    for entry in np.unique(lat[lat >= 0]):
        if g.random() < 0.4:
            p = int(g.integers(0, 30))
            for hook in pair:  # the tables the op reads (the device mirror when staged)
                hook.latch_pos[entry] = min(int(hook.latch_pos[entry]), p)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("staged", [False, True])
def test_batched_planning_fills_the_tables_a_request_by_request_fill_does(seed, staged):
    g = np.random.default_rng(seed)
    sae = random_sae("standard", D_IN, D_SAE, seed=seed)
    twins = [[HookTables(sae, MAX_TOKENS, MAX_SEQS, WIDTH, MAX_WATCH, staged=staged)
              for _ in range(N_HOOKS)] for _ in range(2)]
    payloads = [_payload(g, f"r{i}") for i in range(10)]
    prompts = [int(g.integers(1, 6)) for _ in payloads]
    plans = [[compile_request(p, n) for p, n in zip(payloads, prompts, strict=True)]
             for _ in twins]  # each table set keeps its own plans (they hold latch states)
    pos = [0] * len(payloads)
    batch = list(g.choice(len(payloads), size=4, replace=False))
    for _ in range(14):
        r = g.random()
        if r < 0.2:  # a request leaves, another joins
            out = [i for i in range(len(payloads)) if i not in batch]
            batch[int(g.integers(len(batch)))] = int(g.choice(out))
        elif r < 0.3:
            g.shuffle(batch)
        elif r < 0.35:
            pos[batch[0]] = 0  # preempted: recomputed from position 0
        steps, row = [], int(g.integers(0, 2))  # padding rows before, between, after
        for i in batch[:MAX_SEQS]:
            n = 1 if pos[i] >= prompts[i] else min(prompts[i] - pos[i], int(g.integers(1, 4)))
            if row + n > MAX_TOKENS:
                break
            steps.append((i, row, row + n, pos[i]))
            pos[i] += n
            row += n + int(g.random() < 0.2)
        tokens = g.integers(-1, VOCAB, size=MAX_TOKENS)
        segs = []
        for t, tables in enumerate(twins):
            for hook in tables:
                hook.clear()
            reqs = [ScheduledRequest(f"e{i}", a, b, p0, plans[t][i]) for i, a, b, p0 in steps]
            if t == 0:
                segs.append(plan_step(tables, StepDescription(reqs, tokens)))
            else:
                segs.append(_plan_one_by_one(tables, reqs, tokens))
        assert segs[0] == segs[1]
        for h in range(N_HOOKS):
            _assert_same_tables(twins[0][h], twins[1][h], segs[1], h)
            hook = twins[0][h]
            k = max(hook.edit_k, 1)
            if not staged and hook.n_rows:  # the CPU path's host-side placement
                want = placed_edits(hook.edits, hook.rows[: hook.n_rows], k)
                for x, y in zip(hook.placed(k), want, strict=True):
                    assert torch.equal(x, y)
            if not staged and hook.n_read:  # reading rows, some of them without a slot
                rows = hook.read_rows[: hook.n_read]
                want = placed_edits(hook.edits, rows, k)
                for x, y in zip(hook.placed(k, rows.numpy()), want, strict=True):
                    assert torch.equal(x, y)
            _forward(g, (twins[0][h], twins[1][h]))
    for tables in twins:
        for hook in tables:
            hook.clear()
            hook.settle_latches()
    for a, b in zip(*plans, strict=True):
        assert a.latch_state.keys() == b.latch_state.keys()
        for h in a.latch_state:
            np.testing.assert_array_equal(a.latch_state[h], b.latch_state[h])
    if any(p.latch_state for p in plans[0]):  # some latch was set (so handed back)
        assert any(int(v.min()) < POS_INF for p in plans[0] for v in p.latch_state.values())


@pytest.mark.parametrize("n_cols", [1, 2, 3, 5])
@pytest.mark.parametrize("scaled", [False, True])
def test_topk_columns_count_or_threshold_give_the_same_members(n_cols, scaled):
    """TopK's ``activate_columns`` decides membership by counting the features ranked above
    a column (up to ``COUNT_COLUMNS`` columns) or by the k-th largest value: both must keep
    exactly the features at or above the k-th largest (ties included), here against a
    numpy sort, on integer-valued pre-activations full of ties."""
    g = torch.Generator().manual_seed(n_cols)
    sae = random_sae("topk", D_IN, D_SAE, seed=1)
    if scaled:
        sae = dataclasses.replace(sae, rank_scale=torch.rand(D_SAE, generator=g) + 0.5)
    pre = torch.randint(-3, 4, (50, D_SAE), generator=g).float()
    cols = torch.randint(0, D_SAE, (50, n_cols), generator=g)
    got = topk.TopKArchitecture().activate_columns(sae, pre.gather(1, cols), cols, pre)
    rank = pre if sae.rank_scale is None else pre * sae.rank_scale
    kth = -np.sort(-rank.numpy(), axis=1)[:, sae.cfg.k - 1 : sae.cfg.k]
    member = rank.gather(1, cols).numpy() >= kth
    want = np.where(member, np.maximum(pre.gather(1, cols).numpy(), 0), 0)
    np.testing.assert_array_equal(got.numpy(), want)


def test_describe_step_follows_the_runners_requests_step_to_step():
    """``runner_v1.describe_step`` reuses its previous lookup while the runner schedules the
    same requests: the columns must still follow every change (a request swapped for
    another at the same count, one finishing, a plain one, positions advancing)."""
    from types import SimpleNamespace

    from sae_runtime.spec.payloads import EXTRA_ARGS_KEY, encode_request
    from sae_runtime.vllm.runner_v1 import RequestPlans, describe_step

    g = np.random.default_rng(0)

    def request(i: int, steered: bool):
        extra = {EXTRA_ARGS_KEY: encode_request(_payload(g, f"s{i}"))} if steered else None
        return SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra),
                               num_prompt_tokens=3)

    pool = {f"q{i}": request(i, i % 4 != 0) for i in range(8)}
    plans = RequestPlans()
    schedule = [["q1", "q2", "q3"], ["q1", "q2", "q3"], ["q1", "q5", "q3"], ["q1", "q5", "q3"],
                ["q5", "q3"], ["q4", "q5", "q3"], ["q4", "q5", "q3"], ["q2", "q1"]]
    for step, ids in enumerate(schedule):
        computed = np.array([step + j for j in range(len(ids))], dtype=np.int64)
        runner = SimpleNamespace(
            input_batch=SimpleNamespace(req_ids=list(ids), num_reqs=len(ids),
                                        num_computed_tokens_cpu=computed),
            requests={r: pool[r] for r in ids},
            query_start_loc=SimpleNamespace(np=np.arange(len(ids) + 1, dtype=np.int32)),
            device=torch.device("cpu"), input_ids=SimpleNamespace(np=np.zeros(8, np.int64)))
        cols = describe_step(runner, plans).cols()
        want = [j for j, r in enumerate(ids) if not plans._plans[r].empty]
        assert list(cols.req_ids) == [ids[j] for j in want]
        assert [p.rid for p in cols.plans] == [f"s{ids[j][1:]}" for j in want]
        assert all(p is plans._plans[r] for p, r in zip(cols.plans, cols.req_ids, strict=True))
        np.testing.assert_array_equal(cols.start, want)
        np.testing.assert_array_equal(cols.end, np.array(want) + 1)
        np.testing.assert_array_equal(cols.pos0, computed[want])
