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
    StepColumns,
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

    def __init__(self) -> None:
        self._plans: dict[str, RequestPlan] = {}
        self.last: tuple | None = None  # describe_step's previous (request ids, their
        # plans, the steered ones' places, whether any needs tokens), while none is dropped

    def __len__(self) -> int:
        return len(self._plans)

    def get(self, req_id: str, req) -> RequestPlan:
        plan = self._plans.get(req_id)
        if plan is None:
            extra = req.sampling_params.extra_args if req.sampling_params else None
            plan = self._plans[req_id] = compile_request(decode_request(extra),
                                                         int(req.num_prompt_tokens))
        return plan

    def lookup(self, req_ids, requests) -> list[RequestPlan | None]:
        """The plan of each of ``req_ids`` (None where ``requests``, the runner's requests by
        id, does not hold it)."""
        known = self._plans
        out: list[RequestPlan | None] = []
        for req_id in req_ids:
            plan = known.get(req_id)
            if plan is None:
                req = requests.get(req_id)
                plan = None if req is None else self.get(req_id, req)
            out.append(plan)
        return out

    def drop(self, req_id: str) -> None:
        """Forget one request's plan (its latch states with it); no-op for an unknown id."""
        self._plans.pop(req_id, None)
        self.last = None

    def retain(self, live) -> None:
        """Forget requests not in ``live`` (finished or aborted: vLLM dropped them)."""
        if len(self._plans) > 0:
            for req_id in self._plans.keys() - live:
                del self._plans[req_id]
                self.last = None


def describe_step(runner, plans: RequestPlans,
                  read_tokens: TokenReader | None = None) -> StepDescription:
    """The step ``runner`` is about to run, in the planner's terms (as columns:
    ``planner.StepColumns``). ``read_tokens`` reads the device's input ids where the host
    copy may be stale (a GPU runner)."""
    batch = runner.input_batch
    requests = runner.requests
    plans.retain(requests.keys())
    qsl = runner.query_start_loc.np
    computed = batch.num_computed_tokens_cpu
    n = batch.num_reqs
    req_ids = batch.req_ids[:n]
    last = plans.last
    if last is not None and last[0] == req_ids:  # the same requests as the step before
        _, got, keep, needs_tokens = last
    else:
        got = plans.lookup(req_ids, requests)
        keep = [i for i, p in enumerate(got) if p is not None and not p.empty]
        needs_tokens = any(got[i].needs_tokens for i in keep)
        # (a request the runner does not hold yet is looked up again next step)
        held = all(p is not None for p in got)
        plans.last = (req_ids, got, keep, needs_tokens) if held else None
    if not keep:
        return StepDescription([])
    if len(keep) == n:  # every scheduled request is steered
        step_plans, ids = got, list(req_ids)
        cols = StepColumns(ids, step_plans, qsl[:n].astype(np.int64),
                           qsl[1 : n + 1].astype(np.int64), computed[:n].astype(np.int64))
    else:
        step_plans = [got[i] for i in keep]
        idx = np.array(keep, dtype=np.int64)
        cols = StepColumns([req_ids[i] for i in keep], step_plans,
                           qsl[idx].astype(np.int64), qsl[idx + 1].astype(np.int64),
                           computed[idx].astype(np.int64))
    tokens = None
    if needs_tokens:
        if runner.device.type == "cpu":
            tokens = runner.input_ids.np
        else:
            tokens = (read_tokens or DeviceTokens())(runner.input_ids.gpu, int(qsl[n]))
    return StepDescription.of_columns(cols, tokens)
