"""Adapter from vLLM's Model Runner V2 (``vllm/v1/worker/gpu/``, the 0.32 CUDA default) to
the step planner.

V2 has no ``_model_forward`` and no persistent batch; each step's batch is an
``InputBatch`` (``vllm/v1/worker/gpu/input_batch.py``) that ``prepare_inputs`` returns, in
V2's order (``sort_batch_req_ids``: decodes first, then by ascending scheduled-token count).
The worker wraps four methods of V2's ``GPUModelRunner`` (``worker._patch_runner_class_v2``):

- ``add_requests`` (after it): ``RunnerV2.add`` keeps, per new request, what V2 itself
  does not keep: the sampling params (their ``extra_args`` carry the payload), the prompt
  length (``prompt_len``, not ``prefill_len``: a request resumed after preemption comes
  back as a *new* request whose prefill is its prompt plus the tokens generated so far),
  and, for requests that select positions by token id, a host copy of the prefill tokens.
  The plan of a re-added id (a resume, a streaming-input update) is dropped and compiled
  again, its latches given back.
- ``prepare_inputs`` (after it): ``RunnerV2.describe`` turns the ``InputBatch`` into a
  ``planner.StepDescription``: request ``i`` owns rows ``[query_start_loc_np[i],
  query_start_loc_np[i+1])`` at positions ``num_computed_tokens_np[i] + j`` (the device
  computes ``positions`` from the same numbers). This runs before every forward path (a
  FULL graph replay, piecewise graphs, eager), so the tables are filled and uploaded
  before the model runs in all of them.
- ``execute_model`` (around it): publishes the reads after the forward and clears the
  tables, as the V1 wrapper of ``_model_forward`` does.
- ``gather_batch_req_state`` (after it): where V2 computes the step's uniform decode token
  count, the one input by which its dispatch (``CudaGraphManager.dispatch``, through
  ``dispatch_cg_and_sync_dp``) picks a FULL decode graph. A step in which a scheduled
  request reads (``leaves_full_graph``) returns no uniform count, so V2 dispatches it
  like a mixed step: the piecewise graph under ``FULL_AND_PIECEWISE`` (eager under
  ``FULL_DECODE_ONLY``), where the ops are split points and run their Python. Under data
  parallelism the ranks' counts are all-reduced and any disagreement gives none on every
  rank, so all ranks leave together. TP ranks and PP stages decide alike: they hold the
  same plans and the same schedule.

Full graphs (``FULL_AND_PIECEWISE``, vLLM's CUDA default, kept): a decode step that only
edits replays the graph as captured. The captured ops are their fixed-shape bodies
(``tables._capturing``): they read only the tables, preallocated at fixed device
addresses, which ``prepare_inputs``' wrapper fills and uploads on the step's stream before
``run_fullgraph``; rows without an edit (padding, plain requests) are a masked no-op on
the device, conditions and latches are evaluated and written on the device. Reads need
the host (their row counts, ``k`` and watch lists vary per step, and the values go to the
host right after), so their steps leave the full graph.

Token ids (token-id selectors only): a row at a position below the request's
``prefill_len`` consumes a prefill token, known on the host; a row at or past it (a
decode row) consumes the token sampled last step, which exists only on the device
(``InputBatch.input_ids``). Those steps copy ``input_ids`` to pinned host memory and wait
for it (``DeviceTokens``): the host loses its one-step lead on such steps only.

Configurations whose rows the op could not place (``unsupported``): prefill context
parallelism (rows partitioned per rank), micro-batching (DBO / ubatches: the op would see
row slices), speculative decoding (draft rows, some rejected later). The worker reports
them and the server refuses to serve.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from sae_runtime.step.planner import RequestPlan, ScheduledRequest, StepDescription
from sae_runtime.vllm.runner_v1 import DeviceTokens, RequestPlans, TokenReader


@dataclass(frozen=True)
class V2Request:
    """What the adapter keeps of one ``NewRequestData`` (duck-typed like V1's
    ``CachedRequestState`` for ``RequestPlans.get``)."""

    sampling_params: object | None
    num_prompt_tokens: int
    prefill_tokens: np.ndarray | None  # int32 [prefill_len]; only when the plan needs tokens


class RunnerV2:
    """Per-worker V2 adapter state: the requests V2 added, and their compiled plans."""

    def __init__(self, plans: RequestPlans, read_tokens: TokenReader | None = None) -> None:
        self.plans = plans
        self.requests: dict[str, V2Request] = {}
        self.read_tokens = read_tokens or DeviceTokens()

    def add(self, scheduler_output) -> None:
        """After V2's ``add_requests``: remember each new request (see the module doc)."""
        for nrd in scheduler_output.scheduled_new_reqs:
            req_id = nrd.req_id
            self.plans.drop(req_id)  # a resume or an input update: compiled again
            req = V2Request(nrd.sampling_params, int(nrd.prompt_len), None)
            if self.plans.get(req_id, req).needs_tokens:
                # prefill_token_ids may alias the scheduler's live token list: copy it
                tokens = np.array(nrd.prefill_token_ids, dtype=np.int32)
                req = V2Request(req.sampling_params, req.num_prompt_tokens, tokens)
            self.requests[req_id] = req

    def retain(self, live: Collection[str]) -> None:
        """Forget requests V2 no longer holds (finished, aborted or preempted)."""
        self.plans.retain(live)
        for req_id in self.requests.keys() - live:
            del self.requests[req_id]

    def leaves_full_graph(self, batch_req_state, req_states) -> bool:
        """Whether the step V2's ``gather_batch_req_state`` just gathered has a request
        that reads at one of its scheduled positions (``reads_in_rows``): such a step must
        run where the ops run their Python (module doc). ``batch_req_state``: V2's
        ``BatchReqState`` (``req_ids``, ``num_scheduled_tokens``, ``idx_mapping_np``);
        ``req_states``: V2's ``RequestState`` (``num_computed_tokens_np``, updated for
        this step by ``update_requests``, which runs before)."""
        brs = batch_req_state
        computed = req_states.num_computed_tokens_np[brs.idx_mapping_np]
        for req_id, n, c in zip(brs.req_ids, brs.num_scheduled_tokens, computed, strict=True):
            req = self.requests.get(req_id)
            if req is None:
                continue
            plan = self.plans.get(req_id, req)
            if (plan.reads or plan.acts) and reads_in_rows(plan, int(c), int(n)):
                return True
        return False

    def describe(self, input_batch, live: Collection[str]) -> StepDescription:
        """The step ``input_batch`` describes, in the planner's terms. ``live``: the request
        ids V2 holds (``runner.req_states.req_id_to_index``)."""
        self.retain(live)
        ib = input_batch
        qsl = ib.query_start_loc_np
        computed = ib.num_computed_tokens_np
        scheduled: list[ScheduledRequest] = []
        token_reqs: list[tuple[int, ScheduledRequest]] = []
        for i, req_id in enumerate(ib.req_ids[: ib.num_reqs]):
            req = self.requests.get(req_id)
            if req is None:  # not added through add_requests (a warm-up's fake request)
                continue
            plan = self.plans.get(req_id, req)
            if plan.empty:
                continue
            sr = ScheduledRequest(req_id, int(qsl[i]), int(qsl[i + 1]), int(computed[i]), plan)
            scheduled.append(sr)
            if plan.needs_tokens:
                token_reqs.append((i, sr))
        tokens = self._tokens(input_batch, token_reqs) if token_reqs else None
        return StepDescription(scheduled, tokens)

    def _tokens(self, input_batch, token_reqs: list[tuple[int, ScheduledRequest]]) -> np.ndarray:
        """The step's token ids at the rows of requests with token-id selectors (other
        rows -1): prefill rows from the host copy, decode rows from the device."""
        ib = input_batch
        n = int(ib.num_tokens)
        tokens = np.full(n, -1, dtype=np.int64)
        device_rows = []
        for i, sr in token_reqs:
            pre = self.requests[sr.req_id].prefill_tokens
            prefill_len = int(ib.prefill_len_np[i])
            k = max(0, min(sr.end - sr.start, prefill_len - sr.pos0))  # rows < prefill_len
            tokens[sr.start:sr.start + k] = pre[sr.pos0:sr.pos0 + k]
            if sr.start + k < sr.end:
                device_rows.append((sr.start + k, sr.end))
        if device_rows:
            dev = self.read_tokens(ib.input_ids, n)
            for a, b in device_rows:
                tokens[a:b] = dev[a:b]
        return tokens


def reads_in_rows(plan: RequestPlan, pos0: int, n: int) -> bool:
    """Whether ``plan`` reads (SAE reads or raw activation reads) at one of the positions
    ``[pos0, pos0 + n)``: the rows the planner would give a read segment (its windows'
    hull, as ``planner._plan_reads`` and ``act_reads.plan_acts`` clip them)."""
    hi = pos0 + n
    return any(r.pos_lo < hi and pos0 < r.pos_hi for r in plan.reads) or \
        any(a.pos_lo < hi and pos0 < a.pos_hi for a in plan.acts)


def step_reads(step: StepDescription) -> bool:
    """Whether a described step reads anywhere (so it must not replay a full graph)."""
    return any(reads_in_rows(sr.plan, sr.pos0, sr.end - sr.start) for sr in step.requests)


def unsupported(vllm_config) -> list[str]:
    """Why V2 cannot run SAE hooks with this engine configuration (empty: it can)."""
    why = []
    pc = vllm_config.parallel_config
    if int(getattr(pc, "prefill_context_parallel_size", 1)) > 1:
        why.append("prefill context parallelism (prefill_context_parallel_size > 1) "
                   "partitions a step's rows over ranks")
    if bool(getattr(pc, "use_ubatching", False)):
        why.append("micro-batching (enable_dbo / ubatch_size > 1) runs a step as row slices")
    if vllm_config.speculative_config is not None:
        why.append("speculative decoding adds draft rows that may be rejected")
    return why
