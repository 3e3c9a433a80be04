"""Conditional edits and latches in the hook (``edits.Cond``), every kernel path, against a
per-row oracle written from the rule (dense ``ops.encode`` of the row, the condition checked
in Python, the delta summed edit by edit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_runtime import ops
from sae_runtime.kernels import splice_compact, splice_reference
from sae_runtime.spec.payloads import CondPayload, EditPayload, ReadPayload, RequestPayload
from sae_runtime.step.edits import POS_INF, Cond, edit_rows
from sae_runtime.step.planner import (
    ScheduledRequest,
    StepDescription,
    compile_request,
    plan_step,
)
from sae_runtime.step.tables import HookTables
from tests.sae_runtime._factories import random_sae

D_IN, D_SAE = 16, 48
ARCHS = ["standard", "topk", "jumprelu"]


def _oracle(sae, x: torch.Tensor, pos: list[int], rows: np.ndarray,
            latch_from: dict[int, int] | None = None) -> torch.Tensor:
    """Row by row: the edits of ``rows`` (EDIT_DTYPE, one slot) that apply at each position.
    ``latch_from[j]``: the position edit j's latch was set at before this call."""
    latch = dict(latch_from or {})
    out = torch.zeros_like(x)
    acts = ops.encode(sae, x)  # dense, the reference encode
    for t, p in enumerate(pos):
        for j, e in enumerate(rows):
            if not e["pos_lo"] <= p < e["pos_hi"]:
                continue
            if e["cond_op"] != Cond.NONE:
                a = float(acts[t, e["cond_feature"]])
                ok = a > e["cond_threshold"] if e["cond_op"] == Cond.GT else a < e["cond_threshold"]
                if e["latch"] >= 0:
                    if ok:
                        latch[j] = min(latch.get(j, POS_INF), p)
                    ok = ok or p >= latch.get(j, POS_INF)
                if not ok:
                    continue
            i = int(e["feature"])
            a = acts[t, i]
            new = ops.edited_values(torch.tensor(int(e["mode"])), torch.tensor(float(e["value"])), a)
            out[t] += (new - a) * sae.W_dec[i]
    return out


def _rows(sae, x, n: int, latch: bool) -> np.ndarray:
    """Two conditional edits (GT at the median of one feature, LT at the median of another)
    and one unconditional one, so the conditions split the rows."""
    acts = ops.encode(sae, x)
    live = [f for f in range(D_SAE) if (acts[:, f] > 0).sum() >= 2 and (acts[:, f] == 0).sum() >= 2]
    if len(live) < 5:
        live = list(range(5))
    rows = edit_rows(3)
    rows["feature"] = live[:3]
    rows["mode"] = [ops.Mode.CLAMP, ops.Mode.ADD, ops.Mode.SCALE]
    rows["value"] = [5.0, 2.0, 0.5]
    rows["pos_lo"], rows["pos_hi"] = 0, POS_INF
    c1, c2 = live[3], live[4]
    rows["cond_feature"][:2] = [c1, c2]
    rows["cond_op"][:2] = [Cond.GT, Cond.LT]
    rows["cond_threshold"][:2] = [float(acts[:, c1].median()), float(acts[:, c2].median())]
    if latch:
        rows["latch"][0] = 0
    return rows


def _hook(sae, rows, x_len):
    tables = HookTables(sae, max_tokens=64, max_slots=4, max_feats=4, max_watch=4, staged=False)
    state = np.full(int((rows["latch"] >= 0).sum()), POS_INF, dtype=np.int64)
    tables.add_edits(0, x_len, 0, rows, latch_state=state)
    return tables


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("path", ["reference", "compact"])
def test_conditional_edits_apply_only_where_the_condition_holds(arch, path):
    sae = random_sae(arch, D_IN, D_SAE, seed=3)
    x = torch.randn(12, D_IN, generator=torch.Generator().manual_seed(1)) * 2
    rows = _rows(sae, x, 12, latch=False)
    tables = _hook(sae, rows, 12)
    assert tables.n_cond == 2
    h = torch.randn(12, D_IN)
    if path == "reference":
        out = splice_reference(h, x, sae, tables.edits)
    else:
        out = splice_compact(h, x, sae, tables.rows[:12], tables.edits, conditions=True)
    want = h + _oracle(sae, x, list(range(12)), rows)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # the conditions really split the rows: some rows get the conditional edits, some not
    uncond = rows.copy()
    uncond["cond_op"] = Cond.NONE
    assert not torch.allclose(out, h + _oracle(sae, x, list(range(12)), uncond))
    assert not torch.allclose(out, h + _oracle(sae, x, list(range(12)), rows[2:]))


def test_without_the_host_flag_conditional_entries_are_off_not_on():
    """The compact path skips the condition pass when the host says the step has none; a
    conditional entry must then contribute nothing (never an unconditional edit)."""
    sae = random_sae("standard", D_IN, D_SAE, seed=3)
    x = torch.randn(12, D_IN, generator=torch.Generator().manual_seed(1)) * 2
    rows = _rows(sae, x, 12, latch=False)
    tables = _hook(sae, rows, 12)
    h = torch.randn(12, D_IN)
    out = splice_compact(h, x, sae, tables.rows[:12], tables.edits)
    torch.testing.assert_close(out, h + _oracle(sae, x, list(range(12)), rows[2:]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("path", ["reference", "compact"])
def test_a_latch_stays_on_after_the_first_hit_across_steps(path, staged):
    """The request's latch state (its plan's, on the host) is loaded into the step's
    tables with its rows, lowered in the op, and handed back after the forward (``clear``;
    staged: through a device-to-host copy settled before the next plan)."""
    sae = random_sae("standard", D_IN, D_SAE, seed=5)
    x = torch.randn(10, D_IN, generator=torch.Generator().manual_seed(2)) * 2
    rows = _rows(sae, x, 10, latch=True)
    splice = (lambda h, x, t: splice_reference(h, x, sae, t.edits)) if path == "reference" else (
        lambda h, x, t: splice_compact(h, x, sae, t.rows[: t.n_rows], t.edits, conditions=True))
    tables = HookTables(sae, max_tokens=64, max_slots=4, max_feats=4, staged=staged)
    state = np.full(1, POS_INF, dtype=np.int64)  # RequestPlan.latch_state of one hook
    # step 1: positions 0..5 (a prefill chunk); step 2..: one position each (decode), the
    # request in another slot (a plain request's slot first) from the third step on
    acts = ops.encode(sae, x)
    c, thr = int(rows["cond_feature"][0]), float(rows["cond_threshold"][0])
    first_hit = next(p for p in range(10) if acts[p, c] > thr)
    latch_at: dict[int, int] = {}
    for step, (lo, hi) in enumerate([(0, 6), (6, 7), (7, 8), (8, 9), (9, 10)]):
        tables.settle_latches()  # what plan_step does first
        n = hi - lo
        if step >= 2:
            tables.add_edits(n, n + 1, 0, rows[2:])  # another request, first slot
        tables.add_edits(0, n, lo, rows, latch_state=state)
        tables.upload()
        h = torch.randn(n, D_IN)
        xs = x[lo:hi]
        pad = torch.zeros(64 - n, D_IN)  # the reference reads every table row
        got = splice(torch.cat([h, pad]), torch.cat([xs, pad]), tables)[:n]
        want = h + _oracle(sae, xs, list(range(lo, hi)), rows, latch_at)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if any(acts[p, c] > thr for p in range(lo, hi)):
            latch_at.setdefault(0, next(p for p in range(lo, hi) if acts[p, c] > thr))
        tables.clear()
    tables.settle_latches()
    assert int(state[0]) == first_hit
    # the latch made a difference: some later position had the condition false
    assert any(not acts[p, c] > thr for p in range(first_hit + 1, 10)), "pick another seed"


def test_reads_see_conditional_edits_only_where_they_apply():
    sae = random_sae("standard", D_IN, D_SAE, seed=3)
    x = torch.randn(12, D_IN, generator=torch.Generator().manual_seed(1)) * 2
    rows = _rows(sae, x, 12, latch=False)[:1]  # one conditional clamp (to 5.0)
    tables = _hook(sae, rows, 12)
    f = int(rows["feature"][0])
    tables.add_read_rows(0, 12, 0, (f,), False)
    tables.apply(torch.zeros(12, D_IN), x)
    watched = tables.read_out[2][:, 0]
    acts = ops.encode(sae, x)
    holds = acts[:, int(rows["cond_feature"][0])] > float(rows["cond_threshold"][0])
    want = torch.where(holds, torch.tensor(5.0), acts[:, f])
    torch.testing.assert_close(watched, want, rtol=1e-5, atol=1e-5)
    assert holds.any() and not holds.all()


@pytest.mark.parametrize("staged", [False, True])
def test_the_planner_keeps_each_latched_request_its_own_latch_state(staged):
    """Two requests with the same latched edit, their rows in different slots and orders
    step by step: each one's latch state stays its own (the first position its condition
    held in its own rows), and the edits equal the per-row oracle with that latch."""
    sae = random_sae("standard", D_IN, D_SAE, seed=3)
    hook = HookTables(sae, max_tokens=64, max_slots=4, max_feats=4, staged=staged)
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(9, D_IN, generator=g) * 2 for _ in range(2)]
    rows = _rows(sae, torch.cat(xs), 18, latch=True)
    c, thr = int(rows["cond_feature"][0]), float(rows["cond_threshold"][0])
    edit = EditPayload(0, int(rows["feature"][0]), int(rows["mode"][0]), float(rows["value"][0]),
                       when=CondPayload(c, int(Cond.GT), thr, True))
    plain = EditPayload(0, 2, int(ops.Mode.ADD), 1.0, when=CondPayload(4, int(Cond.LT), 0.5))
    plans = [compile_request(RequestPayload(f"r{i}", (edit, plain), (ReadPayload(0, 2, ()),)), 4)
             for i in range(2)]
    assert plans[0].edits[0]["cond_op"].tolist() == [Cond.GT, Cond.LT]
    assert plans[0].edits[0]["latch"].tolist() == [0, -1]  # index into its latch state
    assert plans[0].latch_state[0] is not plans[1].latch_state[0]
    # (rows per request) per step: request 0 prefills 0..5 while request 1 waits, then both
    # decode, in swapped order from the third step
    schedule = [[(0, 0, 6)], [(1, 0, 5), (0, 6, 7)], [(0, 7, 8), (1, 5, 6)],
                [(1, 6, 9), (0, 8, 9)]]
    latch_at = [dict(), dict()]
    for step in schedule:
        reqs, row = [], 0
        for i, lo, hi in step:
            reqs.append(ScheduledRequest(f"r{i}", row, row + hi - lo, lo, plans[i]))
            row += hi - lo
        plan_step([hook], StepDescription(reqs))
        h = torch.zeros(64, D_IN)
        resid = torch.zeros(64, D_IN)
        for (i, lo, hi), sr in zip(step, reqs, strict=True):
            resid[sr.start : sr.end] = xs[i][lo:hi]
        out = splice_reference(h, resid, sae, hook.edits)
        for (i, lo, hi), sr in zip(step, reqs, strict=True):
            rs = plans[i].edits[0].copy()
            want = _oracle(sae, xs[i][lo:hi], list(range(lo, hi)), rs, latch_at[i])
            torch.testing.assert_close(out[sr.start : sr.end], want, rtol=1e-5, atol=1e-5)
            acts = ops.encode(sae, xs[i][lo:hi])[:, c]
            hits = [p for p, a in zip(range(lo, hi), acts, strict=True) if a > thr]
            if hits:
                latch_at[i].setdefault(0, hits[0])
        hook.clear()
    hook.settle_latches()
    for i in range(2):
        assert int(plans[i].latch_state[0][0]) == latch_at[i].get(0, POS_INF)
    assert latch_at[0] != latch_at[1] and all(latch_at), "pick seeds where the latches differ"


def test_a_latch_set_in_one_window_holds_in_the_selectors_other_windows():
    """A latched edit whose selector has two windows keeps one latch: once its condition
    held in the first window, the edit is on in the second one too, where the condition
    fails (the rule in docs/controls.md and the HF reference of tests/e2e/reference.py)."""
    from sae_runtime.spec.selectors import Frame, Range, Selector

    sae = random_sae("standard", D_IN, D_SAE, seed=3)
    x = torch.randn(10, D_IN, generator=torch.Generator().manual_seed(6)) * 2
    acts = ops.encode(sae, x)
    # held in the first window, not at the start of the second (per-window latches differ)
    c, thr = next((c, float(acts[:, c].median())) for c in range(D_SAE)
                  if (acts[:3, c] > acts[:, c].median()).any()
                  and acts[6, c] <= acts[:, c].median())
    sel = Selector((Range(Frame.ABSOLUTE, 0, 3), Range(Frame.ABSOLUTE, 6)))
    f = next(f for f in range(D_SAE) if f != c)
    edit = EditPayload(0, f, int(ops.Mode.CLAMP), 5.0, sel, when=CondPayload(c, int(Cond.GT), thr, True))
    plan = compile_request(RequestPayload("r", (edit,)), 4)
    assert plan.edits[0]["latch"].tolist() == [0, 0] and len(plan.latch_state[0]) == 1
    hook = HookTables(sae, max_tokens=64, max_slots=4, max_feats=4, staged=False)
    first = next(p for p in range(3) if acts[p, c] > thr)
    for lo, hi in [(0, 5), (5, 8), (8, 10)]:  # a prefill chunk, then two more steps
        plan_step([hook], StepDescription([ScheduledRequest("r", 0, hi - lo, lo, plan)]))
        h = torch.zeros(hi - lo, D_IN)
        out = hook.apply(h, x[lo:hi])
        for r, p in enumerate(range(lo, hi)):
            on = (p < 3 or p >= 6) and (bool(acts[p, c] > thr) or p >= first)
            a = acts[p, f]
            want = (5.0 - a) * sae.W_dec[f] if on else torch.zeros(D_IN)
            torch.testing.assert_close(out[r], want, rtol=1e-5, atol=1e-5)
        hook.clear()
    assert int(plan.latch_state[0][0]) == first
