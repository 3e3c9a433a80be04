"""Adapter from vLLM's V1 model runner (CPU and the GPU V1 runner) to the step planner.

Builds a ``planner.StepDescription`` from the runner's state just before
``_model_forward``: request order ``input_batch.req_ids``, token rows from the CPU copy of
``query_start_loc``, first positions from ``input_batch.num_computed_tokens_cpu`` (row
``start + j`` is at position ``computed + j``), and each request's payload from
``runner.requests[req_id].sampling_params.extra_args``. The payload is decoded and compiled
once per request (``RequestPlans``, keyed by vLLM's request id) and dropped once the runner
no longer holds the request.

When a scheduled request selects positions by token id, the step's input token ids come
from ``runner.input_ids.np`` (the host side of vLLM's ``CpuGpuBuffer``, filled by
``_prepare_inputs`` before ``_model_forward``): on CPU that is the very tensor the model
reads, so no device sync. (On a GPU V1 runner with async scheduling the host copy lacks
the tokens sampled by the previous step; a GPU adapter must take them from
``input_batch.token_ids_cpu`` after the update, or from the device.)
"""

from __future__ import annotations

from sae_runtime.spec.payloads import decode_request
from sae_runtime.step.planner import (
    RequestPlan,
    ScheduledRequest,
    StepDescription,
    compile_request,
)


class RequestPlans:
    """Compiled payloads of the requests the runner holds, by vLLM request id."""

    def __init__(self) -> None:
        self._plans: dict[str, RequestPlan] = {}

    def __len__(self) -> int:
        return len(self._plans)

    def get(self, req_id: str, req) -> RequestPlan:
        plan = self._plans.get(req_id)
        if plan is None:
            extra = req.sampling_params.extra_args if req.sampling_params else None
            plan = self._plans[req_id] = compile_request(decode_request(extra),
                                                         int(req.num_prompt_tokens))
        return plan

    def retain(self, live) -> None:
        """Forget requests not in ``live`` (finished or aborted: vLLM dropped them)."""
        if len(self._plans) > 0:
            for req_id in self._plans.keys() - live:
                del self._plans[req_id]


def describe_step(runner, plans: RequestPlans) -> StepDescription:
    """The step ``runner`` is about to run, in the planner's terms."""
    batch = runner.input_batch
    requests = runner.requests
    plans.retain(requests.keys())
    qsl = runner.query_start_loc.np
    computed = batch.num_computed_tokens_cpu
    scheduled = []
    needs_tokens = False
    for i, req_id in enumerate(batch.req_ids[: batch.num_reqs]):
        req = requests.get(req_id)
        if req is None:
            continue
        plan = plans.get(req_id, req)
        if plan.empty:
            continue
        scheduled.append(ScheduledRequest(req_id, int(qsl[i]), int(qsl[i + 1]),
                                          int(computed[i]), plan))
        needs_tokens |= plan.needs_tokens
    tokens = runner.input_ids.np if needs_tokens else None
    return StepDescription(scheduled, tokens)
