"""Property-based step fuzzing of the planner and the tables, at the table limits.

Hypothesis draws requests the door admits (``budget.check_request``), each a random mix of
position windows, token-id selectors, conditional and latched edits, own reads, guardrail
reads, pooled reads, named vectors and an inline vector on one layer's bank, and runs them
through random steps the way vLLM schedules them: up to ``max_num_seqs`` requests and
``max_num_batched_tokens`` rows a step, chunked prefill, decode, preemption (a request's
positions computed again from 0), plain requests and padding rows between them.

Every step ``plan_step`` must not raise (the tables hold any step of admitted requests:
``sae_runtime.spec.budget``), each hook's output must equal a per-token oracle written
here from the payload alone (``Selector.covers`` decides each position, the conditions are
checked on the dense ``ops.encode`` of the row, a latch is the first selected position
where its edit's condition held, the edit is ``(edited - act) * W_dec[i]``, a vector ``strength * v``), and
each read record must equal the oracle's read of the rows (``ops.read_latents`` with the
oracle's edits: top-k values, watched values, pooled sums and maxima).
"""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sae_runtime import kernels, ops
from sae_runtime.errors import InvalidRequestError
from sae_runtime.loading.vectors import Bank, bank_sae
from sae_runtime.saes.base import SAEConfig
from sae_runtime.spec import budget
from sae_runtime.spec.guardrails import Guardrail, GuardSpec
from sae_runtime.spec.interventions import Condition, Intervention, SteeringSpec
from sae_runtime.spec.payloads import RequestPayload
from sae_runtime.spec.reads import Read, ReadSpec
from sae_runtime.spec.selectors import POS_INF, Frame, Range, Selector
from sae_runtime.step.edits import Cond
from sae_runtime.step.planner import (
    ScheduledRequest,
    StepDescription,
    collect_reads,
    compile_request,
    plan_step,
)
from sae_runtime.step.tables import HookTables
from tests.sae_runtime._factories import random_sae

D_IN, D_SAE, VOCAB = 12, 40, 5
MAX_TOKENS, MAX_SEQS, WIDTH, MAX_WATCH = 24, 4, 3, 2  # the engine's budgets, small
SAE_IDS = ("jr", "tk", "vectors@L1")  # hook ids 0, 1 (SAEs) and 2 (a vector bank)
NAMED = np.random.default_rng(7).standard_normal((2, D_IN)).astype(np.float32)
BANK = Bank(1, ("a", "b"), NAMED, inline=True)
SAES = {"jr": SAEConfig("jumprelu", D_IN, D_SAE, "blocks.1.hook_resid_post", 1, "resid_post"),
        "tk": SAEConfig("topk", D_IN, D_SAE, "blocks.1.hook_resid_post", 1, "resid_post", k=6),
        BANK.id: BANK.config()}
INDEX = {sid: i for i, sid in enumerate(SAE_IDS)}
CAPS = SimpleNamespace(max_interventions=WIDTH, max_watch=MAX_WATCH, max_guardrails=8)
MODES = [ops.Mode.CLAMP, ops.Mode.ABLATE, ops.Mode.SCALE, ops.Mode.ADD]
FLOATS = st.floats(-3, 3, width=32)  # values and thresholds travel as float32 (the proto's)


def _hooks(staged: bool) -> list[HookTables]:
    saes = [random_sae("jumprelu", D_IN, D_SAE, seed=1), random_sae("topk", D_IN, D_SAE, seed=2)]
    hooks = [HookTables(s, MAX_TOKENS, MAX_SEQS, WIDTH, MAX_WATCH, staged=staged) for s in saes]
    scratch = budget.TableSizes.of(max_num_seqs=MAX_SEQS, max_num_batched_tokens=MAX_TOKENS,
                                   max_interventions=WIDTH, max_watch=MAX_WATCH).edit_slots
    hooks.append(HookTables(bank_sae(BANK, scratch), MAX_TOKENS, MAX_SEQS, WIDTH, MAX_WATCH,
                            staged=staged, inline_row=BANK.inline_row))
    return hooks


HOOKS = {staged: _hooks(staged) for staged in (False, True)}  # built once (weights fixed)


# --------------------------------------------------------------------------- strategies


def _valid(sel: Selector) -> bool:
    try:
        sel.validate("p", VOCAB)
    except InvalidRequestError:
        return False
    return True


_range = st.one_of(
    st.builds(lambda a, n: Range(Frame.ABSOLUTE, a, a + n), st.integers(0, 20), st.integers(1, 8)),
    st.builds(lambda a, e: Range(Frame.PROMPT, a, e), st.integers(-6, 6), st.none() | st.integers(-3, 10)),
    st.builds(lambda a, n: Range(Frame.GENERATION, a, None if n is None else a + n),
              st.integers(0, 4), st.none() | st.integers(1, 5)),
)
_tokens = st.lists(st.integers(0, VOCAB - 1), max_size=2, unique=True).map(tuple)
selectors = st.builds(Selector, st.lists(_range, max_size=3).map(tuple), st.booleans(), _tokens,
                      st.booleans()).filter(_valid)
range_selectors = selectors.map(lambda s: Selector(s.ranges, s.exclude_ranges)).filter(_valid)


@st.composite
def requests(draw, rid: str):
    """A request the door admits, its token sequence and its prompt length."""
    prompt_len = draw(st.integers(1, 14))
    seq = draw(st.lists(st.integers(0, VOCAB - 1), min_size=prompt_len + 1, max_size=prompt_len + 6))
    ivs: list[Intervention] = []
    for sae in ("jr", "tk"):
        for f in draw(st.lists(st.integers(0, D_SAE - 1), max_size=WIDTH, unique=True)):
            cond = None
            if draw(st.booleans()):
                cond = Condition(sae, draw(st.integers(0, D_SAE - 1)),
                                 draw(st.sampled_from([Cond.GT, Cond.LT])),
                                 draw(st.floats(0, 1, width=32)))
            ivs.append(Intervention(sae, f, draw(st.sampled_from(MODES)), draw(FLOATS),
                                    positions=draw(selectors), when=cond,
                                    latch=cond is not None and draw(st.booleans())))
    for row in draw(st.lists(st.sampled_from([0, 1]), max_size=2, unique=True)):
        ivs.append(Intervention(BANK.id, row, ops.Mode.ADD, draw(FLOATS),
                                positions=draw(selectors)))
    if draw(st.booleans()):
        vec = np.asarray(draw(st.lists(st.floats(-2, 2, width=32), min_size=D_IN, max_size=D_IN)),
                         dtype="<f4")
        ivs.append(Intervention(BANK.id, BANK.inline_row, ops.Mode.ADD, draw(FLOATS),
                                positions=draw(selectors), vector=vec.tobytes()))
    # Drop edits from the end of an SAE's list until its rows fit (the door refuses more).
    while True:
        rows = budget.needs(SteeringSpec(tuple(ivs)), ReadSpec(), GuardSpec(), SAES).edit_rows
        over = [s for s, n in rows.items() if n > WIDTH]
        if not over:
            break
        ivs.pop(max(j for j, iv in enumerate(ivs) if iv.sae == over[0]))
    reads = tuple(Read(s, draw(st.integers(0, 3)),
                       tuple(draw(st.lists(st.integers(0, D_SAE - 1), max_size=MAX_WATCH,
                                           unique=True))), positions=draw(selectors))
                  for s in draw(st.lists(st.sampled_from(["jr", "tk"]), unique=True)))
    reads = tuple(r for r in reads if r.top_k or r.watch)
    pooled = bool(reads) and draw(st.integers(0, 4)) == 0  # an Encode-like request
    guards = GuardSpec() if pooled else GuardSpec(tuple(
        Guardrail(Condition(s, draw(st.integers(0, D_SAE - 1)), Cond.GT, 0.5),
                  draw(range_selectors))
        for s in draw(st.lists(st.sampled_from(["jr", "tk"]), max_size=3))))
    spec, rspec = SteeringSpec(tuple(ivs)), ReadSpec(reads, pooled=pooled)
    budget.check_request(spec, rspec, guards, SAES, CAPS)  # admitted, or the test is wrong
    all_reads = rspec.reads + guards.reads()  # the guard reads ride after the own ones
    payload = RequestPayload(rid, spec.to_payload(INDEX),
                             ReadSpec(all_reads).to_payload(INDEX), pooled)
    return payload, spec, all_reads, seq, prompt_len


# --------------------------------------------------------------------------- the oracle


class Oracle:
    """One request's per-token truth, from its spec alone (no planner, no tables)."""

    def __init__(self, spec: SteeringSpec, reads, seq: list[int], prompt_len: int) -> None:
        self.spec, self.reads, self.seq, self.n = spec, reads, seq, prompt_len
        # intervention index -> first position its condition held (inside its selector)
        self.latch: dict[int, int] = {}

    def edits_at(self, hook: int, pos: list[int], acts: torch.Tensor) -> list[list[tuple]]:
        """Per position (in step order): the (feature, mode, value, vector) edits that apply
        at ``hook``. ``acts [len(pos), d_sae]``: the dense encode of those rows. Lowers
        the latches: a latched edit is on at a selected p when its condition holds at p or
        held at a selected position <= p (before this step, or in this step's rows)."""
        out: list[list[tuple]] = [[] for _ in pos]
        for j, iv in enumerate(self.spec.interventions):
            if INDEX[iv.sae] != hook:
                continue
            live = [iv.selector.covers(p, self.n, self.seq[p]) for p in pos]
            ok = list(live)
            if iv.when is not None:
                a = acts[:, iv.when.feature]
                ok = [lv and bool(iv.when.holds(float(a[r]))) for r, lv in enumerate(live)]
                if iv.latch:
                    first = min([self.latch.get(j, POS_INF)]
                                + [p for p, o in zip(pos, ok, strict=True) if o])
                    self.latch[j] = first
                    ok = [lv and (o or p >= first) for p, lv, o in zip(pos, live, ok, strict=True)]
            for r, on in enumerate(ok):
                if on:
                    out[r].append((iv.feature, int(iv.mode), iv.value, iv.vector))
        return out


def _delta(sae, hook: int, items: list[tuple], act: torch.Tensor) -> torch.Tensor:
    d = torch.zeros(D_IN)
    for f, m, v, vec in items:
        if vec is not None:  # an inline vector: strength * v (the bank's encoder is zero)
            d += v * torch.from_numpy(np.frombuffer(vec, dtype="<f4").copy())
            continue
        a = act[f]
        new = ops.edited_values(torch.tensor(m), torch.tensor(v, dtype=torch.float32), a)
        d += (new - a) * sae.W_dec[f]
    return d


def _dense(sae, x: torch.Tensor, items_per_row: list[list[tuple]]) -> torch.Tensor:
    """``ops.read_latents`` of rows ``x`` with each row's oracle edits (no inline vectors:
    banks are not read)."""
    K = max([len(i) for i in items_per_row] + [1])
    feat = torch.zeros(len(x), K, dtype=torch.int64)
    mode = torch.zeros(len(x), K, dtype=torch.int32)
    val = torch.zeros(len(x), K)
    for r, items in enumerate(items_per_row):
        for k, (f, m, v, _) in enumerate(items):
            feat[r, k], mode[r, k], val[r, k] = f, m, v
    return ops.read_latents(sae, x, feat, mode, val)


# --------------------------------------------------------------------------- the fuzz


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Every tensor here is tiny: one thread (on a busy 2-core host two threads made a
    [24, 12] @ [12, 40] matmul 40x slower, waiting for each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextlib.contextmanager
def _backend(name: str):
    old = os.environ.get(kernels.ENV)
    os.environ[kernels.ENV] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(kernels.ENV, None)
        else:
            os.environ[kernels.ENV] = old


@settings(max_examples=40, deadline=None)
@given(data=st.data(), staged=st.booleans(), backend=st.sampled_from(["compact", "reference"]))
def test_random_steps_at_the_limits_never_raise_and_equal_the_oracle(data, staged, backend):
    n_req = data.draw(st.integers(MAX_SEQS, MAX_SEQS + 2), label="requests")
    reqs = [data.draw(requests(f"r{i}"), label=f"request {i}") for i in range(n_req)]
    plans = {i: compile_request(p, n) for i, (p, _, _, _, n) in enumerate(reqs)}
    oracles = {i: Oracle(spec, rd, seq, n) for i, (_, spec, rd, seq, n) in enumerate(reqs)}
    n_tok = {i: n for i, (*_, n) in enumerate(reqs)}  # tokens known: prompt + sampled so far
    done = {i: 0 for i in range(n_req)}  # positions computed
    hooks = HOOKS[staged]
    for hook in hooks:
        hook.clear()
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    with _backend(backend):
        for _ in range(data.draw(st.integers(1, 6), label="steps")):
            live = [i for i in range(n_req) if done[i] < len(reqs[i][3]) - 1]
            if not live:
                break
            for i in live:  # preemption: recompute from position 0
                if done[i] and data.draw(st.integers(0, 7), label="preempt") == 0:
                    done[i] = 0
            order = data.draw(st.permutations(live), label="order")[:MAX_SEQS]
            sched, row = [], 0
            for i in order:
                room = min(n_tok[i] - done[i], MAX_TOKENS - row)
                if room <= 0:
                    continue
                n = data.draw(st.integers(1, room), label="rows") if room > 1 else 1
                sched.append((i, row, row + n, done[i]))
                row += n
            pad = data.draw(st.integers(0, MAX_TOKENS - row), label="padding")
            T = row + pad
            tokens = np.zeros(T, dtype=np.int64)
            for i, a, b, p0 in sched:
                tokens[a:b] = reqs[i][3][p0 : p0 + b - a]
            desc = StepDescription([ScheduledRequest(f"e{i}", a, b, p0, plans[i])
                                    for i, a, b, p0 in sched], tokens)
            segments = plan_step(hooks, desc)  # never raises
            h = torch.randn(T, D_IN, generator=g)
            residual = torch.randn(T, D_IN, generator=g)
            resid = h + residual
            want_reads = {}
            for hook_id, hook in enumerate(hooks):
                acts = ops.encode(hook.sae, resid)  # [T, d_sae] dense reference encode
                want = h.clone()
                per_req = {}
                for i, a, b, p0 in sched:
                    items = oracles[i].edits_at(hook_id, list(range(p0, p0 + b - a)), acts[a:b])
                    per_req[i] = items
                    for r, its in enumerate(items):
                        want[a + r] += _delta(hook.sae, hook_id, its, acts[a + r])
                got = hook.apply(h, residual)
                torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
                edited = {a + r for i, a, b, _ in sched for r in range(b - a) if per_req[i][r]}
                still = [t for t in range(T) if t not in edited]
                torch.testing.assert_close(got[still], h[still], atol=1e-6, rtol=0)
                for i, a, b, p0 in sched:
                    p, spec, rds, seq, n = reqs[i]
                    for j, rd in enumerate(rds):
                        if INDEX[rd.sae] != hook_id:
                            continue
                        wins = rd.selector.windows(n)
                        if not wins:
                            continue
                        lo, hi = wins[0][0], wins[-1][1]
                        rows = [r for r in range(b - a) if lo <= p0 + r < hi]
                        if not rows:
                            continue
                        assert rows == list(range(rows[0], rows[-1] + 1))
                        dense = _dense(hook.sae, resid[a + rows[0] : a + rows[-1] + 1],
                                       per_req[i][rows[0] : rows[-1] + 1])
                        want_reads[(p.rid, j)] = (hook_id, p0 + rows[0], rd, dense, p.pooled)
            records = collect_reads(hooks, segments)
            got_reads = {(r.rid, r.read): r for r in records}
            assert got_reads.keys() == want_reads.keys()
            for key, (hook_id, pos0, rd, dense, pooled) in want_reads.items():
                rec = got_reads[key]
                assert (rec.sae, rec.pos0, rec.n, rec.k, rec.w) == (
                    hook_id, pos0, len(dense), rd.top_k, len(rd.watch))
                val = np.frombuffer(rec.val, dtype=np.float32).reshape(rec.n, rec.k)
                np.testing.assert_allclose(val, dense.topk(rd.top_k, dim=1).values.numpy(),
                                           atol=2e-4)
                wv = np.frombuffer(rec.wv, dtype=np.float32).reshape(rec.n, rec.w)
                np.testing.assert_allclose(wv, dense[:, list(rd.watch)].numpy(), atol=2e-4)
                assert (rec.psum is not None) == pooled
                if pooled:
                    np.testing.assert_allclose(np.frombuffer(rec.psum, dtype=np.float32),
                                               dense.sum(0).numpy(), atol=2e-4)
                    np.testing.assert_allclose(np.frombuffer(rec.pmax, dtype=np.float32),
                                               dense.max(0).values.numpy(), atol=2e-4)
            for hook in hooks:
                hook.clear()
            for i, a, b, p0 in sched:  # the rows computed; the last one samples a token
                done[i] = p0 + b - a
                if done[i] == n_tok[i]:
                    n_tok[i] = min(n_tok[i] + 1, len(reqs[i][3]))
