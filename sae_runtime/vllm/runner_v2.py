"""Adapter from vLLM's Model Runner V2 (``vllm/v1/worker/gpu/``, the 0.32 CUDA default) to
the step planner.

V2 has no ``_model_forward`` and no persistent batch; each step's batch is an
``InputBatch`` (``vllm/v1/worker/gpu/input_batch.py``) that ``prepare_inputs`` returns, in
V2's order (``sort_batch_req_ids``: decodes first, then by ascending scheduled-token count).
The worker wraps three methods of V2's ``GPUModelRunner`` (``worker._patch_runner_class_v2``):

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

from sae_runtime.step.planner import ScheduledRequest, StepDescription
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
