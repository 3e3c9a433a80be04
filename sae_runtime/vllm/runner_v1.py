"""Adapter from vLLM's V1 model runner (CPU and the GPU V1 runner) to the step planner
(``runner_v2`` is the one for Model Runner V2, the CUDA default).

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
reads, so no device sync. On a GPU, under async scheduling (vLLM's default), the host copy
lacks the tokens sampled by the previous step (``_prepare_input_ids`` scatters them on the
device), so such steps read ``runner.input_ids.gpu`` back (``DeviceTokens``: one copy to
pinned memory and one wait).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from sae_runtime.spec.payloads import decode_request
from sae_runtime.step.planner import (
    RequestPlan,
    ScheduledRequest,
    StepDescription,
    compile_request,
)

TokenReader = Callable[[torch.Tensor, int], np.ndarray]
"""``(input_ids, n) -> host int array [n]``: the first ``n`` token ids the step consumes."""


class DeviceTokens:
    """Reads a step's ``input_ids`` to the host: a pinned buffer, one copy, one event wait
    (on CUDA); a CPU tensor is read in place."""

    def __init__(self, capacity: int = 0) -> None:
        self._buf: torch.Tensor | None = None
        self._capacity = capacity
        self._event = None

    def __call__(self, ids: torch.Tensor, n: int) -> np.ndarray:
        if ids.device.type == "cpu":
            return ids[:n].numpy()
        if self._buf is None or self._buf.numel() < n:
            self._buf = torch.empty(max(n, self._capacity), dtype=ids.dtype, pin_memory=True)
            self._event = torch.cuda.Event()
        self._buf[:n].copy_(ids[:n], non_blocking=True)
        self._event.record()
        self._event.synchronize()
        return self._buf[:n].numpy()


class RequestPlans:
    """Compiled payloads of the requests the runner holds, by vLLM request id."""

    def __init__(self, on_drop: Callable[[RequestPlan], None] | None = None) -> None:
        """``on_drop(plan)``: called for each plan forgotten (its latches go back)."""
        self._plans: dict[str, RequestPlan] = {}
        self._on_drop = on_drop

    def __len__(self) -> int:
        return len(self._plans)

    def get(self, req_id: str, req) -> RequestPlan:
        plan = self._plans.get(req_id)
        if plan is None:
            extra = req.sampling_params.extra_args if req.sampling_params else None
            plan = self._plans[req_id] = compile_request(decode_request(extra),
                                                         int(req.num_prompt_tokens))
        return plan

    def drop(self, req_id: str) -> None:
        """Forget one request's plan (its latches go back); no-op for an unknown id."""
        plan = self._plans.pop(req_id, None)
        if plan is not None and self._on_drop is not None:
            self._on_drop(plan)

    def retain(self, live) -> None:
        """Forget requests not in ``live`` (finished or aborted: vLLM dropped them)."""
        if len(self._plans) > 0:
            for req_id in self._plans.keys() - live:
                plan = self._plans.pop(req_id)
                if self._on_drop is not None:
                    self._on_drop(plan)


def describe_step(runner, plans: RequestPlans,
                  read_tokens: TokenReader | None = None) -> StepDescription:
    """The step ``runner`` is about to run, in the planner's terms. ``read_tokens`` reads
    the device's input ids where the host copy may be stale (a GPU runner)."""
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
    tokens = None
    if needs_tokens:
        if runner.device.type == "cpu":
            tokens = runner.input_ids.np
        else:
            tokens = (read_tokens or DeviceTokens())(runner.input_ids.gpu,
                                                     int(qsl[batch.num_reqs]))
    return StepDescription(scheduled, tokens)
