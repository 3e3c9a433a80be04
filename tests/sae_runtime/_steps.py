"""Steps of a running batch for table tests: requests whose payloads carry unconditional,
conditional (GT / LT) and latched edits, scheduled in changing groups and orders (a prefill
chunk, then one row a step), each step planned into ``HookTables`` by the step planner
itself (``compile_request``, ``StepDescription``, ``plan_step``), so the tests follow
whatever the planner and the tables do inside.

No pytest here: ``loadtests/gpu_check.py`` (``make gpu-check``) uses it on a GPU machine
that may have only torch and Triton.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sae_runtime.spec.interventions import Scope
from sae_runtime.spec.payloads import CondPayload, EditPayload, RequestPayload
from sae_runtime.step.edits import Cond
from sae_runtime.step.planner import (
    RequestPlan,
    ScheduledRequest,
    StepDescription,
    compile_request,
    plan_step,
)
from sae_runtime.step.tables import HookTables
from tests.sae_runtime._factories import random_sae


def transcoder(arch: str, d_in: int, d_sae: int, seed: int):
    """A random ``arch`` SAE that reads ``mlp_in`` and writes ``mlp_out``."""
    sae = random_sae(arch, d_in, d_sae, seed=seed, apply_b_dec_to_input=False)
    cfg = dataclasses.replace(sae.cfg, site="mlp_out", hook_name="blocks.1.hook_mlp_out",
                              input_site="mlp_in")
    return dataclasses.replace(sae, cfg=cfg)


@dataclasses.dataclass
class Request:
    req_id: str
    payload: RequestPayload
    prompt_len: int
    pos: int = 0  # the next position it computes
    plans: dict[int, RequestPlan] = dataclasses.field(default_factory=dict)

    def plan(self, hook: HookTables) -> RequestPlan:
        """This request's plan for one table set (twins keep separate plans: a plan holds
        the request's latch state)."""
        return self.plans.setdefault(id(hook), compile_request(self.payload, self.prompt_len))


def make_requests(g: np.random.Generator, d_sae: int, max_feats: int,
                  n: int = 3) -> list[Request]:
    """``n`` requests at hook 0, each with distinct features: the first unconditional (all
    positions, or generated ones only), the others conditional (GT / LT on another
    feature), the last one's first edit latched (LT: it holds where the feature is off, so
    it fires)."""
    out = []
    for r in range(n):
        k = int(g.integers(1, max_feats + 1))
        feats = g.choice(d_sae, size=2 * k, replace=False)
        edits = []
        for j in range(k):
            when = None
            if r > 0:
                op = int(Cond.LT) if (r == n - 1 and j == 0) else int(g.choice([1, 2]))
                when = CondPayload(int(feats[k + j]), op, 0.05, latch=r == n - 1 and j == 0)
            scope = Scope.ALL if g.random() < 0.5 else Scope.GENERATION_ONLY
            edits.append(EditPayload(0, int(feats[j]), int(g.integers(1, 5)),
                                     float(g.normal(0, 3)), scope.selector, when))
        out.append(Request(f"r{r}", RequestPayload(rid=f"r{r}", edits=tuple(edits)),
                           prompt_len=int(g.integers(1, 4))))
    return out


def schedule(g: np.random.Generator, requests: list[Request],
             rows: int) -> list[tuple[int, int, int, Request]]:
    """One step: some of ``requests``, each ``(a, b, pos0, request)``: rows ``[a, b)`` at
    positions ``pos0..``, in a random order (a prefill chunk first, then one row a step);
    rows from the last ``b`` up to ``rows`` are padding."""
    picked = [r for r in requests if g.random() < 0.8] or requests[:1]
    g.shuffle(picked)
    out, a = [], 0
    for req in picked:
        n = min(int(g.integers(1, 6)) if req.pos == 0 else 1, rows - a)
        if n <= 0:
            break
        out.append((a, a + n, req.pos, req))
        req.pos += n
        a += n
    return out


def fill(hook: HookTables, step) -> None:
    """Clear ``hook`` and plan ``step`` into it (hook id 0), as the worker does each step."""
    hook.clear()
    plan_step([hook], StepDescription([ScheduledRequest(req.req_id, a, b, pos0, req.plan(hook))
                                       for a, b, pos0, req in step]))
