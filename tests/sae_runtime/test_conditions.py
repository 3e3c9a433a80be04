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
    release_latches,
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
    if (rows["latch"] >= 0).any():
        ids = tables.alloc_latches(int((rows["latch"] >= 0).sum()))
        rows = rows.copy()
        rows["latch"][rows["latch"] >= 0] = ids
    tables.add_edits(0, x_len, 0, rows)
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
        out = splice_compact(h, x, sae, tables.rows[:12], tables.row_slot[:12], tables.edits,
                             conditions=True)
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
    out = splice_compact(h, x, sae, tables.rows[:12], tables.row_slot[:12], tables.edits)
    torch.testing.assert_close(out, h + _oracle(sae, x, list(range(12)), rows[2:]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["reference", "compact"])
def test_a_latch_stays_on_after_the_first_hit_across_steps(path):
    sae = random_sae("standard", D_IN, D_SAE, seed=5)
    x = torch.randn(10, D_IN, generator=torch.Generator().manual_seed(2)) * 2
    rows = _rows(sae, x, 10, latch=True)
    splice = (lambda h, x, t: splice_reference(h, x, sae, t.edits)) if path == "reference" else (
        lambda h, x, t: splice_compact(h, x, sae, t.rows[: t.n_rows], t.row_slot[: t.n_rows],
                                       t.edits, conditions=True))
    tables = HookTables(sae, max_tokens=64, max_slots=4, max_feats=4, staged=False)
    (lid,) = tables.alloc_latches(1)
    rows["latch"][0] = lid
    # step 1: positions 0..5 (a prefill chunk); step 2..: one position each (decode)
    acts = ops.encode(sae, x)
    c, thr = int(rows["cond_feature"][0]), float(rows["cond_threshold"][0])
    first_hit = next(p for p in range(10) if acts[p, c] > thr)
    latch_at: dict[int, int] = {}
    for lo, hi in [(0, 6), (6, 7), (7, 8), (8, 9), (9, 10)]:
        tables.clear()
        if tables.n_rows == 0:
            tables.add_edits(0, hi - lo, lo, rows)
        h = torch.randn(hi - lo, D_IN)
        xs = x[lo:hi]
        pad = torch.zeros(64 - (hi - lo), D_IN)  # the reference reads every table row
        got = splice(torch.cat([h, pad]), torch.cat([xs, pad]), tables)[: hi - lo]
        want = h + _oracle(sae, xs, list(range(lo, hi)), rows, latch_at)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if any(acts[p, c] > thr for p in range(lo, hi)):
            latch_at.setdefault(0, next(p for p in range(lo, hi) if acts[p, c] > thr))
    assert int(tables.latch_pos[lid]) == first_hit
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


def test_the_planner_gives_each_latched_request_its_own_latches_and_takes_them_back():
    sae = random_sae("standard", D_IN, D_SAE, seed=3)
    hook = HookTables(sae, max_tokens=64, max_slots=4, max_feats=4, staged=False, max_latches=3)
    latched = EditPayload(0, 1, int(ops.Mode.CLAMP), 2.0, when=CondPayload(4, int(Cond.GT), 0.5, True))
    plain = EditPayload(0, 2, int(ops.Mode.ADD), 1.0, when=CondPayload(4, int(Cond.LT), 0.5))
    plans = [compile_request(RequestPayload(f"r{i}", (latched, plain),
                                            (ReadPayload(0, 2, ()),)), 4) for i in range(2)]
    assert plans[0].edits[0]["cond_op"].tolist() == [Cond.GT, Cond.LT]
    step = StepDescription([ScheduledRequest("a", 0, 4, 0, plans[0]),
                            ScheduledRequest("b", 4, 8, 0, plans[1])])
    plan_step([hook], step)
    ids = [int(p.edits[0]["latch"][0]) for p in plans]
    assert sorted(ids) == sorted(set(ids)) and all(i >= 0 for i in ids)
    assert [int(p.edits[0]["latch"][1]) for p in plans] == [-1, -1]  # not latched
    assert len(hook._free_latches) == 1
    hook.clear()
    plan_step([hook], step)  # scheduled again: keeps its latches
    assert [int(p.edits[0]["latch"][0]) for p in plans] == ids and len(hook._free_latches) == 1
    release_latches([hook], plans[0])
    assert len(hook._free_latches) == 2
    with pytest.raises(RuntimeError, match="out of latches"):
        hook.alloc_latches(3)
