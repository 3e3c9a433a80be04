"""Steps of a running batch for table tests: requests with persistent edit rows (windows,
GT / LT conditions, a latch), scheduled in changing groups and orders, each step written
into ``HookTables`` the way the planner writes them (``add_edits``, ``upload``).

No pytest here: ``loadtests/gpu_check.py`` (``make gpu-check``) uses it on a GPU machine
that may have only torch and Triton.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sae_runtime.step.edits import POS_INF, Cond, edit_rows
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
    rows: np.ndarray  # EDIT_DTYPE rows at the hook
    pos: int = 0  # the next position it computes


def make_requests(g: np.random.Generator, hooks: list[HookTables], d_sae: int,
                  max_feats: int, n: int = 3) -> list[Request]:
    """``n`` requests: the first with unconditional edits, the others with conditional ones
    (GT / LT on another feature), the last one's first row latched. A latched row holds a
    latch id in every hook of ``hooks`` (the same id: same allocation order)."""
    out = []
    for r in range(n):
        k = int(g.integers(1, max_feats + 1))
        rows = edit_rows(k)
        rows["feature"] = g.integers(0, d_sae, k)
        rows["mode"] = g.integers(1, 5, k)
        rows["value"] = g.normal(0, 3, k)
        rows["pos_lo"] = g.integers(0, 4, k)
        rows["pos_hi"] = POS_INF
        if r > 0:
            rows["cond_feature"] = g.integers(0, d_sae, k)
            rows["cond_op"] = g.choice([int(Cond.GT), int(Cond.LT)], k)
            rows["cond_threshold"] = 0.05
        if r == n - 1:
            ids = [h.alloc_latches(1) for h in hooks]
            assert all(np.array_equal(ids[0], i) for i in ids)
            rows["latch"][0] = ids[0][0]
            rows["cond_op"][0] = int(Cond.LT)  # holds where the feature is off: it fires
        out.append(Request(rows))
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
    """Clear ``hook`` and write ``step`` into it, as ``planner.plan_step`` does."""
    hook.clear()
    for a, b, pos0, req in step:
        hook.add_edits(a, b, pos0, req.rows)
    hook.upload()
