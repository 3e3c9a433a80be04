"""The Model Runner V2 adapter on V2's own batch objects, against the V1 adapter and an oracle.

vLLM's ``vllm/v1/worker/gpu/`` (Model Runner V2, the CUDA default) is byte-identical in the
CPU build installed here, so these tests build V2's real objects on CPU: ``RequestState``,
``NewRequestData`` / ``CachedRequestData`` / ``SchedulerOutput``, the batch order from
``GPUModelRunner.gather_batch_req_state`` (called unbound; it sorts decodes first) and the
``InputBatch`` dataclass, with its host fields filled as ``prepare_inputs`` fills them and
its device ``input_ids`` / ``positions`` by a numpy re-statement of V2's two Triton input
kernels (Triton has no CPU backend here). Only ``vllm.v1.worker.gpu.*`` is imported, never
``vllm.v1.worker.cpu.shm`` (which patches torch process-wide).

One logical schedule (``SCHEDULE``) is replayed through both adapters: V1's (a stand-in
runner as ``runner_v1.describe_step`` reads it, requests in the order the schedule lists
them, a preempted request kept) and V2's (real objects: V2's order, a preempted request
dropped and re-added with its prompt plus generated tokens as prefill). Per step, for every
(request, position), the planned tables must hold the same edit entries in both; applying
them to the same activations must give, in both, the output of a dense oracle written
here from the payloads alone (selectors, conditions, a latch across steps); and the reads
must be the same.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from sae_runtime import ops
from sae_runtime.spec.interventions import Scope
from sae_runtime.spec.payloads import (
    EXTRA_ARGS_KEY,
    ActPayload,
    CondPayload,
    EditPayload,
    ReadPayload,
    RequestPayload,
    encode_request,
)
from sae_runtime.spec.reads import ReadScope
from sae_runtime.spec.selectors import Selector
from sae_runtime.step.edits import Cond
from sae_runtime.step.planner import collect_reads, plan_step
from sae_runtime.step.tables import HookTables
from tests.sae_runtime._factories import random_sae

vllm = pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402  (after the importorskip)
from vllm.v1.core.sched.output import (  # noqa: E402
    CachedRequestData,
    NewRequestData,
    SchedulerOutput,
)
from vllm.v1.worker.gpu import buffer_utils as gpu_buffer_utils  # noqa: E402
from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers  # noqa: E402
from vllm.v1.worker.gpu.model_runner import GPUModelRunner  # noqa: E402
from vllm.v1.worker.gpu.states import RequestState  # noqa: E402

from sae_runtime.vllm.runner_v1 import RequestPlans, describe_step  # noqa: E402
from sae_runtime.vllm.runner_v2 import DeviceTokens, RunnerV2  # noqa: E402

D_IN, D_SAE = 32, 64
MAX_TOKENS, MAX_REQS, MAX_FEATS, MAX_LEN = 48, 8, 4, 64
C, A, S = int(ops.Mode.CLAMP), int(ops.Mode.ADD), int(ops.Mode.SCALE)
ALL, GEN = Scope.ALL.selector, Scope.GENERATION_ONLY.selector

# Payloads over two hooks (0: jumprelu, 1: topk).
PAYLOADS = {
    # unconditional edits (every position / generated ones) and a latched condition
    "a": RequestPayload(rid="a", edits=(
        EditPayload(0, 3, C, 2.5, ALL), EditPayload(0, 9, A, -1.0, GEN),
        # latched LT: it holds where feature 7 is off, so it fires early, and the latch keeps
        # the edit on where feature 7 fires later
        EditPayload(1, 5, S, 3.0, ALL, CondPayload(7, int(Cond.LT), 0.05, latch=True)))),
    # reads its prompt (chunked prefill)
    "b": RequestPayload(rid="b", reads=(ReadPayload(0, 4, (3, 9), ReadScope.PROMPT.selector),)),
    # token-id selector: prompt token 103 and generated token 201 (preempted, resumed)
    "c": RequestPayload(rid="c", edits=(
        EditPayload(0, 11, A, 1.5, Selector(token_ids=(103, 201))),
        EditPayload(1, 2, C, 0.5, GEN))),
    # generation-only edit and a generation read at hook 1
    "d": RequestPayload(rid="d", edits=(EditPayload(1, 13, C, 4.0, GEN),),
                        reads=(ReadPayload(1, 3, (13,), ReadScope.GENERATION.selector),)),
    "e": None,  # plain
    # a raw activation read of its generated positions (site 0), and an edit
    "f": RequestPayload(rid="f", edits=(EditPayload(0, 3, A, 1.0, ALL),),
                        acts=(ActPayload(0, GEN),)),
}
PROMPTS = {"a": [10, 11, 12, 13, 14], "b": list(range(100, 110)), "c": [100, 101, 102, 103],
           "d": list(range(50, 58)), "e": [7, 8, 9], "f": [60, 61, 62, 63]}
SAMPLE_BASE = {"a": 210, "b": 220, "c": 200, "d": 230, "e": 240, "f": 250}  # k-th sampled token: base + k

# Per step: (scheduled tokens per request, in the V1 batch order; requests finished before
# the step; requests preempted before the step).
SCHEDULE = [
    ({"a": 5, "d": 4, "e": 3}, (), ()),  # prefills (d: first chunk)
    ({"b": 6, "a": 1, "d": 4, "e": 1, "c": 4}, (), ()),  # new + chunk + decodes, mixed
    ({"b": 4, "a": 1, "c": 1, "d": 1, "e": 1}, (), ()),  # b's last chunk among decodes
    ({"a": 1, "b": 1, "c": 1, "d": 1, "e": 1}, (), ()),  # uniform decode (c consumes 201)
    ({"d": 1, "a": 1, "b": 1}, ("e",), ("c",)),  # e finished, c preempted
    ({"c": 7, "a": 1, "d": 1}, (), ()),  # c resumed: prompt + 3 generated recomputed
    ({"a": 1, "c": 1, "d": 1, "b": 1}, (), ()),  # c decodes again (a device-only token)
]


def sp(rid: str) -> SamplingParams:
    p = PAYLOADS[rid]
    return SamplingParams(max_tokens=32,
                          extra_args={EXTRA_ARGS_KEY: encode_request(p)} if p else None)


class Logical:
    """The schedule's ground truth: each request's tokens and computed count."""

    def __init__(self) -> None:
        self.tokens = {r: list(p) for r, p in PROMPTS.items()}
        self.computed = dict.fromkeys(PROMPTS, 0)
        self.started: set[str] = set()

    def before_step(self, sched: dict[str, int], preempted) -> None:
        for r in preempted:  # recomputed from position 0 when it resumes
            self.computed[r] = 0

    def after_step(self, sched: dict[str, int]) -> None:
        self.started |= set(sched)
        for r, n in sched.items():
            self.computed[r] += n
            if self.computed[r] == len(self.tokens[r]):  # the last known token: sample
                k = len(self.tokens[r]) - len(PROMPTS[r])
                self.tokens[r].append(SAMPLE_BASE[r] + k)


# ------------------------------------------------------------------ V1: the stand-in runner


class V1Sim:
    """What ``runner_v1.describe_step`` reads of a V1 runner, for one step of ``Logical``:
    the schedule's order, preempted requests still held."""

    def __init__(self) -> None:
        self.requests: dict[str, types.SimpleNamespace] = {}

    def runner(self, world: Logical, sched: dict[str, int], finished) -> types.SimpleNamespace:
        for r in finished:
            self.requests.pop(r, None)
        for r in sched:
            self.requests.setdefault(r, types.SimpleNamespace(
                sampling_params=sp(r), num_prompt_tokens=len(PROMPTS[r])))
        ids = list(sched)
        qsl = np.concatenate([[0], np.cumsum([sched[r] for r in ids])]).astype(np.int32)
        tokens = np.concatenate([world.tokens[r][world.computed[r]:world.computed[r] + sched[r]]
                                 for r in ids]).astype(np.int32)
        return types.SimpleNamespace(
            requests=self.requests,
            input_batch=types.SimpleNamespace(
                req_ids=ids, num_reqs=len(ids),
                num_computed_tokens_cpu=np.array([world.computed[r] for r in ids])),
            query_start_loc=types.SimpleNamespace(np=qsl),
            input_ids=types.SimpleNamespace(np=tokens), device=torch.device("cpu"))


# ------------------------------------------------------------------ V2: vLLM's own objects


def request_state(monkeypatch) -> RequestState:
    """``RequestState`` on a CPU-only torch: its UVA buffers pin memory, which this torch
    refuses, so vLLM's CPU ``UvaBuffer`` stands in during the constructor only."""
    from vllm.v1.worker.cpu import buffer_utils as cpu_buffer_utils

    with monkeypatch.context() as m:
        m.setattr(gpu_buffer_utils, "UvaBuffer", cpu_buffer_utils.UvaBuffer)
        return RequestState(max_num_reqs=MAX_REQS, max_model_len=MAX_LEN,
                            max_num_batched_tokens=MAX_TOKENS, num_speculative_steps=0,
                            vocab_size=512, device=torch.device("cpu"))


class V2Sim:
    """V2's ``execute_model`` up to ``prepare_inputs``, host side verbatim
    (``finish_requests``, the ``req_states`` part of ``add_requests`` and
    ``update_requests``, ``gather_batch_req_state``), with the adapter's ``add`` where the
    worker's ``add_requests`` wrapper calls it."""

    def __init__(self, adapter: RunnerV2, monkeypatch) -> None:
        self.adapter = adapter
        self.rs = request_state(monkeypatch)
        self.bufs = InputBuffers(max_num_reqs=MAX_REQS, max_num_tokens=MAX_TOKENS,
                                 device=torch.device("cpu"))
        self.runner_like = types.SimpleNamespace(
            req_states=self.rs, decode_query_len=1, use_pp=False, adaptive_verification=None,
            pcp_manager=None)
        self.prefill: dict[str, list[int]] = {}  # what V2 holds as all_token_ids[:prefill]
        self.last_sampled: dict[str, int] = {}  # req_states.last_sampled_tokens

    def step(self, world: Logical, sched: dict[str, int], finished, preempted) -> InputBatch:
        so = SchedulerOutput.make_empty()
        so.finished_req_ids = set(finished)
        so.preempted_req_ids = set(preempted)
        gone = set(finished) | set(preempted)
        new, cached = [], []
        for r in sched:
            if r in self.rs.req_id_to_index and r not in gone:
                cached.append(r)
                continue
            # New, or resumed after preemption: V2's scheduler sends it as a new request
            # with prefill_token_ids = prompt + generated so far (scheduler.py).
            new.append(NewRequestData(
                req_id=r, prompt_token_ids=PROMPTS[r], mm_features=[], sampling_params=sp(r),
                pooling_params=None, block_ids=([],), num_computed_tokens=world.computed[r],
                lora_request=None, prefill_token_ids=list(world.tokens[r])))
        so.scheduled_new_reqs = new
        so.scheduled_cached_reqs = CachedRequestData(
            req_ids=cached, resumed_req_ids=set(), new_token_ids=[[] for _ in cached],
            all_token_ids={}, new_block_ids=[None] * len(cached),
            num_computed_tokens=[world.computed[r] for r in cached],
            num_output_tokens=[len(world.tokens[r]) - len(PROMPTS[r]) for r in cached])
        so.num_scheduled_tokens = dict(sched)
        so.total_num_scheduled_tokens = sum(sched.values())
        # finish_requests: finished and preempted requests leave req_states
        for r in sorted(so.finished_req_ids | so.preempted_req_ids):
            self.rs.remove_request(r)
            self.prefill.pop(r, None)
        # add_requests (req_states part), then the worker's wrapper
        for nrd in new:
            self.rs.remove_request(nrd.req_id)
            self.rs.add_request(req_id=nrd.req_id, prompt_len=nrd.prompt_len,
                                all_token_ids=nrd.prefill_token_ids,
                                num_computed_tokens=nrd.num_computed_tokens,
                                max_tokens=nrd.sampling_params.max_tokens)
            self.prefill[nrd.req_id] = list(nrd.prefill_token_ids)
        self.adapter.add(so)
        # update_requests (host part)
        for r, n in zip(cached, so.scheduled_cached_reqs.num_computed_tokens, strict=True):
            self.rs.num_computed_tokens_np[self.rs.req_id_to_index[r]] = n
        np.minimum(self.rs.num_computed_tokens_np, self.rs.prefill_len.np,
                   out=self.rs.num_computed_prefill_tokens)
        # the runner class's method as the worker patched it (a pass-through without _STATE)
        brs, self.uniform = GPUModelRunner.gather_batch_req_state(self.runner_like, so, False)
        self.brs, self.so = brs, so
        return self._input_batch(brs)

    def _input_batch(self, brs) -> InputBatch:
        """``prepare_inputs``' host fields verbatim (no drafts, no padding); ``input_ids`` and
        ``positions`` as its kernels write them: prefill tokens below ``prefill_len``, else
        the request's last sampled token, at ``num_computed + j``."""
        rs, bufs = self.rs, self.bufs
        n_reqs = len(brs.req_ids)
        qsl_full = np.empty(MAX_REQS + 1, dtype=np.int32)
        qsl_full[0] = 0
        np.cumsum(brs.num_scheduled_tokens, out=qsl_full[1:n_reqs + 1])
        qsl_full[n_reqs + 1:] = brs.num_tokens
        qsl = qsl_full[:n_reqs + 1]
        bufs.query_start_loc.copy_(torch.from_numpy(qsl_full))
        computed = rs.num_computed_tokens_np[brs.idx_mapping_np]
        for i, r in enumerate(brs.req_ids):
            a, b = int(qsl[i]), int(qsl[i + 1])
            pos = np.arange(computed[i], computed[i] + b - a)
            plen = int(rs.prefill_len.np[brs.idx_mapping_np[i]])
            bufs.positions[a:b] = torch.from_numpy(pos)
            bufs.input_ids[a:b] = torch.tensor(
                [self.prefill[r][p] if p < plen else self.last_sampled[r] for p in pos],
                dtype=torch.int32)
        n = brs.num_tokens
        idx = torch.from_numpy(brs.idx_mapping_np.astype(np.int64))
        return InputBatch(
            req_ids=brs.req_ids, num_reqs=n_reqs, num_reqs_after_padding=n_reqs,
            idx_mapping=idx, idx_mapping_np=brs.idx_mapping_np, expanded_idx_mapping=idx,
            expanded_local_pos=torch.zeros(n_reqs, dtype=torch.int32),
            num_scheduled_tokens=brs.num_scheduled_tokens, num_tokens=n,
            num_tokens_after_padding=n, num_draft_tokens=0, num_draft_tokens_per_req=None,
            query_start_loc=bufs.query_start_loc[:n_reqs + 1], query_start_loc_np=qsl,
            seq_lens=bufs.seq_lens[:n_reqs],
            seq_lens_cpu_upper_bound=torch.from_numpy(computed + brs.num_scheduled_tokens),
            dcp_local_seq_lens=None, num_computed_tokens_np=computed,
            prefill_len_np=brs.prefill_len_np,
            num_computed_prefill_tokens_np=brs.num_computed_prefill_tokens_np,
            is_prefilling_np=brs.is_prefilling_np, has_prefill=brs.has_prefill,
            decode_graph_eligible=brs.decode_graph_eligible, max_seq_len_np=brs.max_seq_len_np,
            input_ids=bufs.input_ids[:n], positions=bufs.positions[:n],
            is_padding=bufs.is_padding[:n],
            logits_indices=torch.from_numpy(qsl[1:].astype(np.int64) - 1),
            cu_num_logits=torch.arange(n_reqs + 1, dtype=torch.int32),
            cu_num_logits_np=np.arange(n_reqs + 1, dtype=np.int32),
            has_structured_output_reqs=False, prompt_lens=None)

    def after_step(self, world: Logical, sched: dict[str, int]) -> None:
        for r in sched:  # post_update: the token each request sampled this step
            if world.computed[r] == len(world.tokens[r]) - 1:
                self.last_sampled[r] = world.tokens[r][-1]


# ------------------------------------------------------------------ the comparison


def _hooks() -> list[HookTables]:
    return [HookTables(random_sae(arch, D_IN, D_SAE, seed=i), MAX_TOKENS, MAX_REQS, MAX_FEATS,
                       max_watch=2)
            for i, arch in enumerate(("jumprelu", "topk"))]


def _rows(req_ids, qsl, pos0) -> dict[int, tuple[str, int]]:
    """Batch row -> (request, position)."""
    return {t: (r, int(pos0[i]) + t - int(qsl[i]))
            for i, r in enumerate(req_ids) for t in range(int(qsl[i]), int(qsl[i + 1]))}


def _entries(hook: HookTables, T: int, rows) -> dict[tuple[str, int], list]:
    """Per (request, position): the edit entries of its slot whose window holds it."""
    out = {}
    for t in range(T):
        s = int(hook.tok_slot[t])
        if s < 0:
            continue
        req, pos = rows[t]
        assert int(hook.tok_pos[t]) == pos, "the tables' position of a row"
        lo = int(hook.slot_start[s])
        got = []
        for e in range(lo, lo + int(hook.slot_len[s])):
            if int(hook.edits.pos_lo[e]) <= pos < int(hook.edits.pos_hi[e]):
                got.append((int(hook.edits.feature[e]), int(hook.edits.mode[e]),
                            round(float(hook.edits.value[e]), 5),
                            int(hook.edits.cond_feature[e]), int(hook.edits.cond_op[e]),
                            bool(int(hook.edits.latch[e]) >= 0)))
        if got:
            out[(req, pos)] = got
    return out


def _selected(e, req: str, pos: int, world: Logical) -> bool:
    """Whether edit ``e``'s position selector picks ``pos`` (the payloads here use ALL,
    GENERATION_ONLY, or token ids over all positions)."""
    if e.positions == GEN:
        return pos >= len(PROMPTS[req])
    if e.positions.token_ids:
        return world.tokens[req][pos] in e.positions.token_ids
    return True


def _oracle(sae, hook_id: int, rows, h, res, world: Logical, latches: dict) -> torch.Tensor:
    """``h`` plus the payloads' edits at ``hook_id``, from the dense SAE math alone: the
    SAE's activations of ``h + res`` (``ops.encode``), each selected edit adds
    ``(edited - act) * W_dec[feature]``; a conditional edit only where its feature's
    activation is above (GT) / below (LT) its threshold, or, latched, at and after the first
    position where it held (``latches["first"]``, kept across steps: the step's holding
    positions count before any of its rows is edited, as the kernels lower latches;
    ``latches["kept_on"]`` counts rows a latch kept on where the condition failed)."""
    first = latches.setdefault("first", {})
    x = h + res
    act = ops.encode(sae, x)
    out = h.clone()
    cmp = {int(Cond.GT): lambda a, t: a > t, int(Cond.LT): lambda a, t: a < t}
    todo = []
    for t, (req, pos) in rows.items():
        p = PAYLOADS[req]
        for i, e in enumerate(p.edits if p else ()):
            if e.sae != hook_id or not _selected(e, req, pos, world):
                continue
            w, on = e.when, True
            if w is not None:
                on = bool(cmp[w.op](float(act[t, w.feature]), w.threshold))
                if on and w.latch:
                    first[(req, i)] = min(first.get((req, i), 2**62), pos)
            todo.append((t, req, pos, i, e, on))
    for t, req, pos, i, e, on in todo:
        if e.when is not None and e.when.latch and not on and pos >= first.get((req, i), 2**62):
            on = True
            latches["kept_on"] = latches.get("kept_on", 0) + 1
        if not on:
            continue
        a = act[t, e.feature]
        new = {C: torch.tensor(e.value), A: a + e.value, S: a * e.value}[e.mode]
        out[t] += (new - a) * sae.W_dec[e.feature]
    return out


def _activations(rows, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same hidden state and residual for the same (request, position) in any order."""
    h, res = torch.empty(T, D_IN), torch.empty(T, D_IN)
    for t in range(T):
        req, pos = rows[t]
        g = torch.Generator().manual_seed(1000 * ord(req) + pos)
        h[t], res[t] = torch.randn(D_IN, generator=g), torch.randn(D_IN, generator=g)
    return h, res


def _reads(hooks, segments) -> dict[tuple, tuple]:
    out = {}
    for rec in collect_reads(hooks, segments):
        vals = np.frombuffer(rec.val, np.float32).reshape(rec.n, rec.k)
        watch = np.frombuffer(rec.wv, np.float32).reshape(rec.n, rec.w)
        for j in range(rec.n):
            out[(rec.rid, rec.read, rec.sae, rec.pos0 + j)] = (vals[j].round(4).tolist(),
                                                               watch[j].round(4).tolist())
    return out


def test_v2_adapter_plans_what_v1_plans_for_the_same_schedule(monkeypatch):
    world = Logical()
    v1, v1_hooks, v1_plans = V1Sim(), _hooks(), RequestPlans()
    v2_hooks = _hooks()
    adapter = RunnerV2(RequestPlans())
    v2 = V2Sim(adapter, monkeypatch)
    reordered = token_steps = steered = 0
    latches: dict = {}
    for step, (sched, finished, preempted) in enumerate(SCHEDULE):
        world.before_step(sched, preempted)
        runner = v1.runner(world, sched, finished)
        ib = v2.step(world, sched, finished, preempted)
        T = sum(sched.values())
        assert ib.num_tokens == T
        # V2's order: decodes first, then ascending scheduled-token count
        n_sched = [sched[r] for r in ib.req_ids]
        assert n_sched == sorted(n_sched, key=lambda n: (n != 1, n)), step
        reordered += ib.req_ids != list(sched)
        # positions and token ids V2's kernels produce are the schedule's
        rows2 = _rows(ib.req_ids, ib.query_start_loc_np, ib.num_computed_tokens_np)
        assert [rows2[t][1] for t in range(T)] == ib.positions.tolist()
        assert [world.tokens[r][p] for r, p in rows2.values()] == ib.input_ids.tolist()
        rows1 = _rows(runner.input_batch.req_ids, runner.query_start_loc.np,
                      runner.input_batch.num_computed_tokens_cpu)

        seg1 = plan_step(v1_hooks, describe_step(runner, v1_plans))
        desc2 = adapter.describe(ib, v2.rs.req_id_to_index.keys())
        if desc2.token_ids is not None:
            token_steps += 1
            for sr in desc2.requests:  # every row of a token-selecting request is known
                if sr.plan.needs_tokens:
                    assert desc2.token_ids[sr.start:sr.end].tolist() == \
                        ib.input_ids[sr.start:sr.end].tolist()
        seg2 = plan_step(v2_hooks, desc2)
        for hook_id in range(2):  # the same entries per (request, position)
            assert _entries(v1_hooks[hook_id], T, rows1) == \
                _entries(v2_hooks[hook_id], T, rows2), (step, hook_id)
        # the same activations per (request, position), in each runner's row order: both
        # outputs equal the dense oracle's, conditions and latches included
        h1, r1 = _activations(rows1, T)
        h2, r2 = _activations(rows2, T)
        for hook_id, (k1, k2) in enumerate(zip(v1_hooks, v2_hooks, strict=True)):
            want = _oracle(k2.sae, hook_id, rows2, h2, r2, world, latches)
            o1, o2 = k1.apply(h1, r1), k2.apply(h2, r2)
            by_key1 = {rows1[t]: o1[t] for t in range(T)}
            for t in range(T):
                torch.testing.assert_close(o2[t], want[t], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(by_key1[rows2[t]], want[t], atol=1e-4, rtol=1e-4)
            steered += int(not torch.equal(o2, h2))
        reads1, reads2 = _reads(v1_hooks, seg1), _reads(v2_hooks, seg2)
        assert reads1 == reads2 and bool(reads1) == (step != 0), step
        for hook in v1_hooks + v2_hooks:
            hook.clear()
        world.after_step(sched)
        v2.after_step(world, sched)
    assert reordered >= 3 and token_steps >= 4 and steered >= 10
    assert latches.get("kept_on")  # a's latch kept its edit on where its condition failed
    # finished and preempted requests were forgotten; the rest are held
    assert set(adapter.requests) == {"a", "b", "c", "d"}


def test_resumed_request_is_planned_with_its_prompt_length_not_its_prefill(monkeypatch):
    """After preemption V2 re-adds ``c`` with prefill = prompt (4) + 3 generated tokens:
    its generation-only edit must start at position 4, and its token rule must see the
    generated token 201 at position 5 (a recomputed row, from the host copy)."""
    world = Logical()
    adapter = RunnerV2(RequestPlans())
    v2 = V2Sim(adapter, monkeypatch)
    reads = []
    adapter.read_tokens = lambda ids, n: reads.append(n) or ids[:n].numpy()
    for sched, finished, preempted in SCHEDULE[:6]:
        reads.clear()
        world.before_step(sched, preempted)
        ib = v2.step(world, sched, finished, preempted)
        desc = adapter.describe(ib, v2.rs.req_id_to_index.keys())
        if "c" in sched and sched["c"] == 7:
            (sr,) = [s for s in desc.requests if s.req_id == "c"]
            assert (sr.pos0, sr.end - sr.start, sr.plan.prompt_len) == (0, 7, 4)
            assert ib.prefill_len_np[ib.req_ids.index("c")] == 7
            assert desc.token_ids[sr.start:sr.end].tolist() == [100, 101, 102, 103, 200, 201, 202]
            assert reads == []  # every row of c is a prefill row: no device read
        world.after_step(sched)
        v2.after_step(world, sched)
    reads.clear()
    ib = v2.step(world, SCHEDULE[6][0], (), ())
    adapter.describe(ib, v2.rs.req_id_to_index.keys())
    assert reads == [ib.num_tokens]  # c's decode row: its token exists on the device only


def test_device_tokens_reads_a_cpu_tensor_in_place():
    ids = torch.arange(10, dtype=torch.int32)
    assert DeviceTokens()(ids, 4).tolist() == [0, 1, 2, 3]


def test_the_worker_wraps_v2s_step_methods_in_order():
    """``_patch_runner_class_v2`` on a stand-in with V2's method names: the hooks are
    installed after ``load_model``, requests captured after ``add_requests``, the tables
    filled after ``prepare_inputs`` (before the forward), the reads published and the
    tables cleared after ``execute_model``, even when it raises."""
    from sae_runtime.vllm import worker

    calls = []

    class Runner:
        req_states = "rs"

        def load_model(self):
            calls.append("load")

        def add_requests(self, so):
            calls.append("add")

        def gather_batch_req_state(self, so, dummy_run):
            calls.append("gather")
            return ("brs", so), 1

        def prepare_inputs(self, so, brs, desc, n_loras):
            calls.append("prepare")
            return "ib"

        def execute_model(self, so, fail=False):
            self.add_requests(so)
            calls.append(("uniform", self.gather_batch_req_state(so, False)[1]))
            calls.append(("prepared", self.prepare_inputs(so, None, "desc", 0)))
            if fail:
                raise ValueError("forward failed")
            return "out"

    def route(brs, req_states):
        calls.append(("route", brs, req_states))
        return brs[1] == "reads"

    state = types.SimpleNamespace(
        v2=types.SimpleNamespace(add=lambda so: calls.append(("captured", so)),
                                 leaves_full_graph=route),
        prepare_step_v2=lambda runner, ib, desc: calls.append(("plan", ib, desc)),
        publish_reads=lambda: calls.append("publish"),
        end_step=lambda: calls.append("end"))
    installed = []
    orig_install, orig_state = worker.install, worker._STATE
    worker.install = installed.append
    try:
        worker._patch_runner_class_v2(Runner)
        r = Runner()
        r.load_model()
        assert installed == [r] and calls == ["load"]
        worker._STATE = state
        calls.clear()
        assert r.execute_model("so") == "out"
        assert calls == ["add", ("captured", "so"), "gather", ("route", ("brs", "so"), "rs"),
                         ("uniform", 1), "prepare", ("plan", "ib", "desc"),
                         ("prepared", "ib"), "publish", "end"]
        calls.clear()
        r.execute_model("reads")  # a step with reads: no uniform decode count
        assert ("uniform", None) in calls
        calls.clear()
        with pytest.raises(ValueError):
            r.execute_model("so", fail=True)
        assert calls[-1] == "end" and "publish" not in calls
        assert all(getattr(Runner, m)._sae_wrapper for m in worker.V2_WRAPPED)
    finally:
        worker.install, worker._STATE = orig_install, orig_state


def test_the_real_v2_runner_is_patched_and_reports_itself():
    """Importing the worker patches vLLM's V2 class (the CUDA default) as well as V1's,
    and the report tells them apart (both are named GPUModelRunner)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1

    from sae_runtime.vllm import worker

    def fake(cls):
        r = object.__new__(cls)
        r.device = torch.device("cpu")
        r.vllm_config = types.SimpleNamespace(
            compilation_config=types.SimpleNamespace(cudagraph_mode=None),
            parallel_config=types.SimpleNamespace(prefill_context_parallel_size=1,
                                                  use_ubatching=False),
            speculative_config=None)
        return r

    v2, v1 = worker.runtime_report(fake(GPUModelRunner)), worker.runtime_report(fake(V1))
    assert (v2["runner_kind"], v2["runner_patched"], v2["refusals"]) == ("v2", True, [])
    assert v2["runner"] == "vllm.v1.worker.gpu.model_runner.GPUModelRunner"
    assert (v1["runner_kind"], v1["runner_patched"]) == ("v1", True)
    assert v1["runner"] == "vllm.v1.worker.gpu_model_runner.GPUModelRunner"
    spec = fake(GPUModelRunner)
    spec.vllm_config.speculative_config = object()
    assert "speculative decoding" in worker.runtime_report(spec)["refusals"][0]


def test_a_request_added_again_under_its_id_is_compiled_again():
    """A streaming-input update re-adds a live id: its old plan (and latch state) is
    dropped and the new payload compiled."""
    adapter = RunnerV2(RequestPlans())

    def add(rid, payload_of):
        so = SchedulerOutput.make_empty()
        so.scheduled_new_reqs = [NewRequestData(
            req_id=rid, prompt_token_ids=PROMPTS[payload_of], mm_features=[],
            sampling_params=sp(payload_of), pooling_params=None, block_ids=([],),
            num_computed_tokens=0, lora_request=None, prefill_token_ids=PROMPTS[payload_of])]
        adapter.add(so)

    add("x", "a")
    first = adapter.plans.get("x", adapter.requests["x"])
    assert first.rid == "a" and adapter.requests["x"].prefill_tokens is None
    add("x", "c")
    plan = adapter.plans.get("x", adapter.requests["x"])
    assert plan is not first and plan.rid == "c" and plan.needs_tokens
    assert adapter.requests["x"].prefill_tokens.tolist() == PROMPTS["c"]


def test_v1_on_a_gpu_reads_token_ids_from_the_device():
    """V1 under async scheduling writes a decode row's token on the device only, so on a
    GPU runner the adapter reads ``input_ids.gpu`` back (here a stand-in reader), never the
    stale host copy; on CPU the host copy is the model's own input."""
    host = np.array([7, 7, 7, 7], dtype=np.int32)  # stale: what the host copy holds
    dev = torch.tensor([100, 101, 102, 201], dtype=torch.int32)
    calls = []

    def reader(ids, n):
        calls.append(n)
        return ids[:n].numpy()

    def runner(device):
        return types.SimpleNamespace(
            requests={"c": types.SimpleNamespace(sampling_params=sp("c"), num_prompt_tokens=3)},
            input_batch=types.SimpleNamespace(req_ids=["c"], num_reqs=1,
                                              num_computed_tokens_cpu=np.array([0])),
            query_start_loc=types.SimpleNamespace(np=np.array([0, 4])),
            input_ids=types.SimpleNamespace(np=host, gpu=dev), device=torch.device(device))

    gpu = describe_step(runner("meta"), RequestPlans(), reader)  # any non-CPU device
    assert gpu.token_ids.tolist() == [100, 101, 102, 201] and calls == [4]
    cpu = describe_step(runner("cpu"), RequestPlans(), reader)
    assert cpu.token_ids is host and calls == [4]


# ------------------------------------------------------------------ full CUDA graphs kept (V2)

GRAPH_SIZES = [1, 2, 4, 8, 16, 32]


def graph_manager(monkeypatch, mode: str):
    """V2's own ``CudaGraphManager`` for ``mode``, its candidates built as on a GPU (only
    the pipeline group, the graph pool and the breakable-graph switch stand in), marked
    captured so that ``dispatch`` picks graphs."""
    from vllm.config.compilation import CompilationConfig, CUDAGraphMode
    from vllm.v1.worker.gpu import cudagraph_utils

    monkeypatch.setattr(cudagraph_utils, "get_pp_group",
                        lambda: types.SimpleNamespace(is_first_rank=True, is_last_rank=True))
    monkeypatch.setattr(cudagraph_utils, "current_platform",
                        types.SimpleNamespace(get_global_graph_pool=lambda: None))
    monkeypatch.setattr(cudagraph_utils, "is_breakable_cudagraph_enabled", lambda: False)
    cc = CompilationConfig(cudagraph_mode=mode, cudagraph_capture_sizes=GRAPH_SIZES,
                           max_cudagraph_capture_size=GRAPH_SIZES[-1])
    vc = types.SimpleNamespace(
        scheduler_config=types.SimpleNamespace(max_num_seqs=MAX_REQS), compilation_config=cc,
        parallel_config=types.SimpleNamespace(tensor_parallel_size=1, data_parallel_size=1),
        speculative_config=None, cache_config=types.SimpleNamespace(use_kda_recoverssm=False))
    mgr = cudagraph_utils.CudaGraphManager(vc, torch.device("cpu"), CUDAGraphMode[mode],
                                           decode_query_len=1)
    mgr._graphs_captured = True
    return mgr


def dispatch(mgr, so, brs, uniform):
    """V2's ``execute_model`` from ``gather_batch_req_state`` to the batch descriptor, as
    it calls ``dispatch_cg_and_sync_dp`` (one DP rank, no LoRA, no micro-batching)."""
    from vllm.v1.worker.gpu.dp_utils import dispatch_cg_and_sync_dp

    max_query_len = None if brs.has_prefill else max(so.num_scheduled_tokens.values())
    desc, _ = dispatch_cg_and_sync_dp(mgr, len(so.num_scheduled_tokens), brs.num_tokens,
                                      uniform, 1, 0, max_query_len=max_query_len,
                                      uniform_decode=uniform == 1)
    return desc


# (scheduled tokens per request, the graph V2 runs the step in with the worker's wrapper,
# without it)
ROUTED = [
    ({"a": 5, "b": 10, "d": 8, "e": 3, "f": 4}, "PIECEWISE", "PIECEWISE"),  # prefills
    ({"a": 1, "b": 1, "e": 1}, "FULL", "FULL"),  # decodes that edit (b's prompt read is over)
    ({"a": 1, "b": 1, "d": 1, "e": 1}, "PIECEWISE", "FULL"),  # d reads its generation
    ({"a": 1, "e": 1, "f": 1}, "PIECEWISE", "FULL"),  # f's activation read of its generation
    ({"a": 1, "b": 1, "f": 1, "d": 1, "e": 1}, "PIECEWISE", "FULL"),  # both
    ({"e": 1, "a": 1, "b": 1}, "FULL", "FULL"),  # plain and steered decodes again
]


def test_v2_runs_a_decode_step_with_reads_piecewise_and_an_editing_one_full(monkeypatch):
    """Under vLLM's default FULL_AND_PIECEWISE, V2's own ``gather_batch_req_state`` (as the
    worker wraps it) and its own dispatch over its own graph candidates: a uniform decode
    step in which a request reads (an SAE read or a raw activation read) runs the piecewise
    graph, where the ops run their Python; one that only edits (or is plain) replays the
    FULL graph. Without the wrapper V2 would replay FULL for the steps with reads.

    For the FULL steps, the tables the adapter fills at ``prepare_inputs`` are what the
    captured body (the op's fixed-shape path, ``tables._capturing``) reads: over the
    graph's padded rows it gives the eager path's output on the real rows and leaves the
    padding rows as they are."""
    from sae_runtime.step import tables as tables_mod
    from sae_runtime.vllm import worker

    mgr = graph_manager(monkeypatch, "FULL_AND_PIECEWISE")
    world = Logical()
    adapter = RunnerV2(RequestPlans())
    v2 = V2Sim(adapter, monkeypatch)
    monkeypatch.setattr(worker, "_STATE", types.SimpleNamespace(v2=adapter))
    unwrapped = GPUModelRunner.gather_batch_req_state.__wrapped__
    eager_hooks, graph_hooks = _hooks(), _hooks()
    full_steered = 0
    for step, (sched, want, want_unwrapped) in enumerate(ROUTED):
        world.before_step(sched, ())
        ib = v2.step(world, sched, (), ())
        desc = dispatch(mgr, v2.so, v2.brs, v2.uniform)
        _, bare_uniform = unwrapped(v2.runner_like, v2.so, False)
        bare = dispatch(mgr, v2.so, v2.brs, bare_uniform)
        assert (desc.cg_mode.name, bare.cg_mode.name) == (want, want_unwrapped), step
        step_desc = adapter.describe(ib, v2.rs.req_id_to_index.keys())
        if want == "FULL":
            T, padded = ib.num_tokens, desc.num_tokens
            assert padded > T  # the graph's size: padding rows the body must leave alone
            plan_step(eager_hooks, step_desc)
            plan_step(graph_hooks, step_desc)
            h, res = _activations(_rows(ib.req_ids, ib.query_start_loc_np,
                                        ib.num_computed_tokens_np), T)
            hp = torch.cat([h, torch.randn(padded - T, D_IN)])
            rp = torch.cat([res, torch.randn(padded - T, D_IN)])
            with monkeypatch.context() as m:
                m.setattr(tables_mod, "_capturing", lambda t: True)
                captured = [k.apply(hp, rp) for k in graph_hooks]
            for k, got in zip(eager_hooks, captured, strict=True):
                want_out = k.apply(h, res)
                torch.testing.assert_close(got[:T], want_out, atol=1e-4, rtol=1e-4)
                assert torch.equal(got[T:], hp[T:])
                full_steered += int(not torch.equal(want_out, h))
            for k in eager_hooks + graph_hooks:
                k.clear()
        world.after_step(sched)
        v2.after_step(world, sched)
    assert full_steered >= 2  # the FULL steps did edit


@pytest.mark.parametrize("mode", ["NONE", "PIECEWISE", "FULL_DECODE_ONLY",
                                  "FULL_AND_PIECEWISE", "FULL"])
def test_graph_refusals_per_mode_match_v2s_dispatch(monkeypatch, mode):
    """``compat.graph_refusals`` accepts a mode under V2 exactly when V2's own dispatch
    never gives a step without a uniform decode count (what the wrapper makes of a step
    with reads: a decode or a mixed step) a FULL graph; under V1, which cannot route a
    step, only the modes without full graphs. The SAE ops must be split points wherever
    graphs are piecewise; breakable graphs are refused."""
    from sae_runtime.vllm import compat

    split = list(compat.SPLIT_OPS)
    reads_can_be_full = False
    if mode != "NONE":
        mgr = graph_manager(monkeypatch, mode)
        for n in range(1, GRAPH_SIZES[-1] + 1):
            for max_q in (1, None):  # a decode step with reads, a mixed step
                so = types.SimpleNamespace(num_scheduled_tokens={i: 1 for i in range(n)})
                brs = types.SimpleNamespace(has_prefill=max_q is None, num_tokens=n)
                reads_can_be_full |= compat.is_full_graph(dispatch(mgr, so, brs, None))
    assert (compat.graph_refusals(mode, "v2", split) == []) == (not reads_can_be_full)
    v1 = compat.graph_refusals(mode, "v1", split)
    assert (v1 == []) == (mode in ("NONE", "PIECEWISE")), v1
    piecewise = mode in ("PIECEWISE", "FULL_AND_PIECEWISE")
    missing = compat.graph_refusals(mode, "v2", split[:1])
    assert any(compat.ACT_OP in why for why in missing) == piecewise
    monkeypatch.setenv("VLLM_USE_BREAKABLE_CUDAGRAPH", "1")  # vllm.envs reads it per access
    breakable = compat.graph_refusals(mode, "v2", split)
    assert any("BREAKABLE" in why for why in breakable) == piecewise


@pytest.mark.parametrize("v2", [True, False])
def test_cuda_compilation_config_keeps_vllms_default_mode_under_v2_only(v2):
    """V2: no ``cudagraph_mode`` (vLLM's default, FULL_AND_PIECEWISE at its default
    optimisation level, stays); V1: PIECEWISE. Both: the SAE ops join vLLM's own split
    points (its attention ops), so piecewise graphs run them eagerly."""
    from vllm.config.compilation import CompilationConfig, CompilationMode
    from vllm.config.vllm import OPTIMIZATION_LEVEL_TO_CONFIG, VllmConfig

    from sae_runtime.vllm import compat

    cfg = compat.cuda_compilation_config(v2)
    cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, **cfg)
    cc.set_splitting_ops_for_v1("allgather_reducescatter")
    assert compat.HOOK_OP in cc.splitting_ops and compat.ACT_OP in cc.splitting_ops
    assert "vllm::unified_attention_with_output" in cc.splitting_ops
    if v2:
        assert cc.cudagraph_mode is None
        level = VllmConfig.__dataclass_fields__["optimization_level"].default
        default = OPTIMIZATION_LEVEL_TO_CONFIG[level]["compilation_config"]["cudagraph_mode"]
        assert default.name == "FULL_AND_PIECEWISE"
    else:
        assert cc.cudagraph_mode.name == "PIECEWISE"
    assert compat.graph_refusals("FULL_AND_PIECEWISE" if v2 else "PIECEWISE",
                                 "v2" if v2 else "v1", cc.splitting_ops) == []


def test_a_step_with_reads_in_a_full_graph_is_refused_and_an_editing_one_is_not(monkeypatch):
    """``prepare_inputs``' wrapper: a FULL descriptor for a step that only edits plans the
    tables (the captured body reads them); for a step with reads (drift: the routing was
    bypassed) it raises rather than serve the reads empty."""
    from vllm.config.compilation import CUDAGraphMode
    from vllm.v1.worker.gpu.cudagraph_utils import BatchExecutionDescriptor

    from sae_runtime.vllm import worker

    world = Logical()
    state = worker.SteeringState(_hooks(), publisher=None)
    v2 = V2Sim(state.v2, monkeypatch)
    full = BatchExecutionDescriptor(cg_mode=CUDAGraphMode.FULL, num_tokens=4, num_reqs=4,
                                    uniform_token_count=1)
    runner = types.SimpleNamespace(req_states=v2.rs)
    for sched, want, _ in ROUTED[:3]:
        world.before_step(sched, ())
        ib = v2.step(world, sched, (), ())
        if want == "FULL":
            state.prepare_step_v2(runner, ib, full)
            assert state.hooks[0].n_rows > 0  # planned: a's and b's edits
        elif len(sched) < 5:  # a decode step with reads
            with pytest.raises(RuntimeError, match="FULL CUDA graph"):
                state.prepare_step_v2(runner, ib, full)
        state.end_step()
        world.after_step(sched)
        v2.after_step(world, sched)


def test_the_workers_report_full_and_piecewise_served_under_v2_and_refused_under_v1():
    """``runtime_report`` on the real runner classes under vLLM's default mode with our
    split points: no refusal under V2, a refusal naming the fix under V1; the startup line
    and ``GetModelInfo`` carry the mode."""
    from vllm.config.compilation import CompilationConfig, CUDAGraphMode
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1

    from sae_runtime.vllm import compat, engine, worker

    def fake(cls):
        r = object.__new__(cls)
        r.device = torch.device("cpu")
        cc = CompilationConfig(cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE,
                               splitting_ops=["vllm::unified_attention_with_output",
                                              *compat.SPLIT_OPS])
        r.vllm_config = types.SimpleNamespace(
            compilation_config=cc, speculative_config=None,
            parallel_config=types.SimpleNamespace(prefill_context_parallel_size=1,
                                                  use_ubatching=False))
        return r

    v2, v1 = worker.runtime_report(fake(GPUModelRunner)), worker.runtime_report(fake(V1))
    assert (v2["cudagraph_mode"], v2["refusals"]) == ("FULL_AND_PIECEWISE", [])
    assert v1["cudagraph_mode"] == "FULL_AND_PIECEWISE"
    assert len(v1["refusals"]) == 1 and "VLLM_USE_V2_MODEL_RUNNER=0" in v1["refusals"][0]
    info = engine.RuntimeInfo.of([v2, v2])
    assert info.cudagraph_mode == "FULL_AND_PIECEWISE" and info.model_runner == "v2"
    assert "FULL_AND_PIECEWISE (decode steps that only edit replay full graphs" in info.line()
