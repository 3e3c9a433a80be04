"""``HookTables``: the host bookkeeping, the host-to-device staging and the hook's dispatch.

Each step fills the tables the way the planner does (``add_edits`` / ``add_read_rows``,
``upload``, ``apply``, ``clear``), and the output is compared with a per-token oracle
written here from the dense SAE math: ``delta = sum_k (edited_k - act_k) * W_dec[i_k]``
over the edits whose window ``[pos_lo, pos_hi)`` holds the token's position, with
``act = ops.encode`` (itself checked against ``sae-lens`` in test_sae_math.py). The
batches shrink and grow across steps, so a row edited in one step and not the next would
show up if the tables (or their device mirrors) kept it. ``staged=True`` runs the
host-to-device copy path on CPU; the CUDA test at the end captures ``apply`` in a CUDA graph
and replays it with new tables (GPU only).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_runtime import kernels, ops, registry
from sae_runtime.kernels import read_reference
from sae_runtime.step.edits import POS_INF, edit_rows
from sae_runtime.step.tables import HookTables
from tests.sae_runtime._factories import random_sae
from tests.sae_runtime.test_kernels_fused import assert_reads_match

D_IN, D_SAE = 48, 200

# Per step: (tokens, [(first row, end row, number of edits) of each edited segment]).
STEPS = [
    (40, [(0, 9, 3), (9, 10, 1), (10, 40, 2)]),  # every row edited
    (7, [(2, 5, 4)]),
    (0, []),
    (25, [(20, 25, 1)]),  # rows 0..19 were edited two steps ago and must read as unedited
    (30, []),
]


def _oracle(sae, h, resid, edits: dict[int, list[tuple[int, int, float]]]) -> torch.Tensor:
    out = h.clone()
    for t, items in edits.items():
        act = ops.encode(sae, resid[t : t + 1])[0]
        for i, m, v in items:
            a = act[i]
            new = {ops.Mode.CLAMP: torch.tensor(v), ops.Mode.ABLATE: torch.tensor(0.0),
                   ops.Mode.SCALE: a * v, ops.Mode.ADD: a + v}[ops.Mode(m)]
            out[t] += (new - a) * sae.W_dec[i]
    return out


def _fill(tables: HookTables, segments, g: torch.Generator, d_sae: int = D_SAE,
          windows: bool = True) -> dict[int, list]:
    """Each segment's rows get ``n`` random edits; the rows sit at positions from a random
    ``pos0`` and each edit gets a random window (open-ended for the first), so some rows of
    a segment are edited by some of its edits only. Returns the oracle's per-row edits."""
    edits: dict[int, list] = {}
    for a, b, n in segments:
        rows = edit_rows(n)
        rows["feature"] = torch.randint(0, d_sae, (n,), generator=g).numpy()
        if n >= 2:
            rows["feature"][1] = rows["feature"][0]  # one feature edited twice: both apply
        rows["mode"] = torch.randint(1, 5, (n,), generator=g).numpy().astype(np.int32)
        rows["value"] = (torch.randn(n, generator=g) * 3).numpy()  # negative values included
        pos0 = int(torch.randint(0, 50, (1,), generator=g))
        if windows:
            rows["pos_lo"] = torch.randint(pos0, pos0 + b - a + 1, (n,), generator=g).numpy()
            rows["pos_hi"] = rows["pos_lo"] + torch.randint(0, b - a + 1, (n,), generator=g).numpy()
            rows["pos_hi"][0] = POS_INF
        else:
            rows["pos_hi"] = POS_INF
        tables.add_edits(a, b, pos0, rows)
        for t in range(a, b):
            p = pos0 + t - a
            edits[t] = [(int(r["feature"]), int(r["mode"]), float(r["value"])) for r in rows
                        if r["pos_lo"] <= p < r["pos_hi"]]
    return edits


@pytest.mark.parametrize("arch", registry.names())
@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("backend", ["", "reference"])
def test_apply_over_steps_equals_per_token_oracle(monkeypatch, arch, staged, backend):
    monkeypatch.setenv(kernels.ENV, backend)
    sae = random_sae(arch, D_IN, D_SAE, seed=0)
    tables = HookTables(sae, max_tokens=64, max_slots=8, max_feats=4, staged=staged)
    assert (tables.tok_slot is tables.host["tok_slot"]) is not staged
    g = torch.Generator().manual_seed(1)
    for T, segments in STEPS:
        h, residual = torch.randn(T, D_IN, generator=g), torch.randn(T, D_IN, generator=g)
        edits = _fill(tables, segments, g)
        tables.upload()
        got = tables.apply(h, residual)
        torch.testing.assert_close(got, _oracle(sae, h, h + residual, edits),
                                   atol=1e-4, rtol=1e-4)
        unedited = [t for t in range(T) if not edits.get(t)]
        assert torch.equal(got[unedited], h[unedited])
        assert T == 0 or got.data_ptr() != h.data_ptr()  # the op returns a new tensor
        tables.clear()
        if staged:  # what the device would read next step: no row left marked
            assert int(tables.host["tok_slot"].max()) == -1
            tables.upload()
            assert int(tables.dev["tok_slot"].max()) == -1


def test_device_tables_keep_their_addresses():
    sae = random_sae("standard", D_IN, D_SAE, seed=0)
    tables = HookTables(sae, max_tokens=64, max_slots=8, max_feats=4, max_watch=3, staged=True)
    ptrs = {n: t.data_ptr() for n, t in tables.dev.items()}
    g = torch.Generator().manual_seed(2)
    for T, segments in STEPS:
        _fill(tables, segments, g)
        if T:
            tables.add_read_rows(0, T, 4, (1, 2), pooled=False)
        tables.upload()
        tables.clear()
    assert {n: t.data_ptr() for n, t in tables.dev.items()} == ptrs
    assert all(getattr(tables, n) is t for n, t in tables.dev.items())


@pytest.mark.parametrize("arch", registry.names())
@pytest.mark.parametrize("staged", [False, True])
def test_reads_of_edited_and_plain_rows_equal_the_reference(arch, staged):
    sae = random_sae(arch, D_IN, D_SAE, seed=3)
    tables = HookTables(sae, max_tokens=64, max_slots=8, max_feats=4, max_watch=3, staged=staged)
    g = torch.Generator().manual_seed(4)
    T = 30
    h, residual = torch.randn(T, D_IN, generator=g), torch.randn(T, D_IN, generator=g)
    edits = _fill(tables, [(0, 10, 3), (20, 30, 1)], g)
    # Two reading requests: rows 5..14 (top-8, watching 2 features), rows 25..29 (top-3).
    off_a, pool_a = tables.add_read_rows(5, 15, 8, (7, 11), pooled=False)
    off_b, pool_b = tables.add_read_rows(25, 30, 3, (), pooled=False)
    assert (off_a, off_b, pool_a, pool_b) == (0, 10, -1, -1)
    tables.upload()
    tables.apply(h, residual)
    vals, idx, watch, pools = tables.read_out_host()
    assert pools is None and vals.shape == (15, 8) and watch.shape == (15, 2)
    resid = h + residual
    for rows, off, k, w in ((range(5, 15), off_a, 8, [7, 11]), (range(25, 30), off_b, 3, [])):
        rows = list(rows)
        K = 3
        feat = torch.zeros(len(rows), K, dtype=torch.int64)
        mode = torch.zeros(len(rows), K, dtype=torch.int32)
        value = torch.zeros(len(rows), K)
        for r, t in enumerate(rows):
            for j, (i, m, v) in enumerate(edits.get(t, [])):
                feat[r, j], mode[r, j], value[r, j] = i, m, v
        watch_idx = torch.tensor([w] * len(rows), dtype=torch.int64).reshape(len(rows), len(w))
        want = read_reference(sae, resid[rows], feat, mode, value, k, watch_idx)
        sl = slice(off, off + len(rows))
        got = (vals[sl, :k], idx[sl, :k], watch[sl, : len(w)])
        assert_reads_match(got, want, ops.read_latents(sae, resid[rows], feat, mode, value),
                           torch.float32)


@pytest.mark.parametrize("staged", [False, True])
def test_pooled_reads_fold_bounded_chunks_into_sums_and_maxima(monkeypatch, staged):
    """A step with two pooled reads (one of an edited request) and a plain one: each pooled
    read's sums and maxima equal the dense reference's over its rows, the top-k and watch
    values equal the reference's, and no dense latents exist for more than ``pool_chunk``
    rows at once (the preallocated pools are the only ``d_sae``-wide buffers that last)."""
    sae = random_sae("jumprelu", D_IN, D_SAE, seed=5)
    tables = HookTables(sae, max_tokens=32, max_slots=4, max_feats=3, max_watch=2, staged=staged)
    assert tables.pool_sum.shape == (tables.sizes.pool_slots + 1, D_SAE)
    tables.pool_chunk = 3
    widest = []
    real = ops.read_latents

    def spy(sae_, x, *a):
        widest.append(x.shape[0])
        return real(sae_, x, *a)

    monkeypatch.setattr(ops, "read_latents", spy)
    g = torch.Generator().manual_seed(6)
    h = torch.randn(20, D_IN, generator=g) * 2
    edits = _fill(tables, [(10, 20, 3)], g)
    segs = [tables.add_read_rows(0, 7, 2, (5,), pooled=True),
            tables.add_read_rows(7, 10, 4, (), pooled=False),
            tables.add_read_rows(10, 20, 3, (1, 9), pooled=True)]
    assert [p for _, p in segs] == [0, -1, 1]
    tables.upload()
    tables.apply(h, None)
    vals, idx, watch, (psum, pmax) = tables.read_out_host()
    assert max(widest) == 3 and sum(widest) == 20
    assert psum.shape == pmax.shape == (2, D_SAE)
    for (off, pool), (lo, hi), k, w in zip(segs, [(0, 7), (7, 10), (10, 20)], [2, 4, 3],
                                           [[5], [], [1, 9]], strict=True):
        rows = list(range(lo, hi))
        feat = torch.zeros(len(rows), 3, dtype=torch.int64)
        mode = torch.zeros(len(rows), 3, dtype=torch.int32)
        value = torch.zeros(len(rows), 3)
        for r, t in enumerate(rows):
            for j, (i, m, v) in enumerate(edits.get(t, [])):
                feat[r, j], mode[r, j], value[r, j] = i, m, v
        dense = real(sae, h[rows], feat, mode, value)  # [rows, d_sae], the reference
        sl = slice(off, off + len(rows))
        torch.testing.assert_close(vals[sl, :k], dense.topk(k, dim=1).values)
        torch.testing.assert_close(watch[sl, : len(w)], dense[:, w])
        if pool >= 0:
            torch.testing.assert_close(psum[pool], dense.sum(0), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pmax[pool], dense.max(0).values)


# --------------------------------------------------------------------------- CUDA graphs


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_cuda_graph_replay_reads_the_current_tables(monkeypatch, arch):
    """``apply`` captured once in a CUDA graph (no edits at capture time), then replayed
    after each step's ``upload``: every replay applies that step's edits and no other."""
    monkeypatch.delenv(kernels.ENV, raising=False)
    dev = torch.device("cuda")
    ref = random_sae(arch, 576, 16384, seed=0)
    sae = ref.to(dev)
    tables = HookTables(sae, max_tokens=64, max_slots=8, max_feats=4)
    assert tables.staged and tables.host["tok_slot"].is_pinned()
    T = 40
    h, residual = torch.zeros(T, 576, device=dev), torch.zeros(T, 576, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compiles) outside the capture
        for _ in range(2):
            tables.apply(h, residual)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tables.apply(h, residual)
    g = torch.Generator().manual_seed(1)
    for segments in ([(0, 9, 3), (9, 10, 1), (10, 40, 2)], [(2, 5, 4)], [], [(30, 40, 2)]):
        h.copy_(torch.randn(T, 576, generator=g))
        residual.copy_(torch.randn(T, 576, generator=g))
        edits = _fill(tables, segments, g, d_sae=16384)
        tables.upload()
        graph.replay()
        want = _oracle(ref, h.cpu(), (h + residual).cpu(), edits)
        torch.testing.assert_close(out.cpu(), want, atol=1e-3, rtol=1e-3)
        tables.clear()


# --------------------------------------------------------------------------- engine settings


def test_cuda_engine_keeps_the_hook_out_of_captured_graphs():
    """vLLM's own config accepts the settings: piecewise graphs, split at vLLM's default
    ops and at the hook (a vLLM upgrade that changes either shows up here)."""
    from sae_runtime.vllm import compat, worker

    cfg = compat.cuda_compilation_config(v2=False)
    assert hasattr(torch.ops.sae_steer, worker.compat.HOOK_OP.split("::")[1])
    cc = compat.CompilationConfig(mode=compat.CompilationMode.VLLM_COMPILE, **cfg)
    cc.set_splitting_ops_for_v1("allgather_reducescatter")
    assert cc.cudagraph_mode.name == "PIECEWISE"
    assert "sae_steer::sae_hook" in cc.splitting_ops
    assert "vllm::unified_attention_with_output" in cc.splitting_ops
