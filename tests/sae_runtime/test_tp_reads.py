"""Reads split over tensor-parallel ranks by feature columns (``sae_runtime.step.tp_reads``).

Every rank's share is computed in this one process (``local_candidates`` on its
``slice_sae``), the all-gather is a concatenation in rank order, and the merge's result is
compared with the unsharded read (``read_reference``, the dense ``ops.read_latents``;
``kernels.read_topk``): values and watch values within float tolerance, each index naming
a feature whose edited latent is its value, and indices equal to the dense order (value
descending, equal values by ascending id) wherever the values are distinct. Edits of every
mode land in different slices (one feature edited twice: the last edit wins), watch lists
span slices, and top_k exceeds a slice's width. Then the same through ``HookTables`` with
one thread per rank and a barrier for the all-gather.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from sae_runtime import kernels, ops, registry
from sae_runtime.kernels import read_reference, read_topk
from sae_runtime.step import tp_reads
from sae_runtime.step.tables import HookTables
from sae_runtime.step.tp_reads import ReadSplit, bounds, local_candidates, merge, slice_sae
from tests.sae_runtime._factories import random_sae

D_IN, D_SAE = 48, 200
ELEMENTWISE = [n for n in registry.names() if not registry.get(n).needs_full_preactivation]
M = ops.Mode


def test_elementwise_architectures_are_the_expected_ones():
    assert {"standard", "jumprelu", "gated"} <= set(ELEMENTWISE)


@pytest.mark.parametrize("d_sae", [1, 2, 7, 200, 16384])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_bounds_are_contiguous_and_balanced(d_sae, size):
    if d_sae < size:
        return
    spans = [bounds(d_sae, size, r) for r in range(size)]
    assert spans[0][0] == 0 and spans[-1][1] == d_sae
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    widths = [hi - lo for lo, hi in spans]
    assert max(widths) - min(widths) <= 1 and min(widths) >= 1


@pytest.mark.parametrize("arch", registry.names())
def test_only_elementwise_architectures_split(arch):
    sae = random_sae(arch, D_IN, D_SAE, seed=0)
    assert tp_reads.shardable(sae, 2) == (arch in ELEMENTWISE)
    assert not tp_reads.shardable(sae, 1)
    if arch in ELEMENTWISE:  # fewer features than ranks: one rank would hold none
        assert not tp_reads.shardable(random_sae(arch, D_IN, 2, seed=0), 3)


def _edits(R: int, size: int, d_sae: int, g: torch.Generator):
    """``feat, mode, value [R, 5]``: rows alternate between no edit and an edit of every
    mode, the edited features spread over every slice (and one feature edited twice, the
    later edit winning); the last two entries of some rows are padding (Mode.NONE)."""
    K = 5
    feat = torch.zeros(R, K, dtype=torch.int64)
    mode = torch.full((R, K), int(M.NONE), dtype=torch.int32)
    value = torch.zeros(R, K)
    for r in range(R):
        if r % 3 == 0:
            continue  # a row without edits
        slices = [bounds(d_sae, size, (r + j) % size) for j in range(4)]
        fs = [int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in slices]
        ms = [M.CLAMP, M.ADD, M.SCALE, M.ABLATE]
        vs = [8.0 + r, 3.0, 2.5, 0.0]  # clamps well above every latent: into the top-k
        if r % 3 == 2:
            fs[3], ms[3], vs[3] = fs[0], M.CLAMP, -1.0  # fs[0] edited again: -1 wins
        for j in range(4):
            feat[r, j], mode[r, j], value[r, j] = fs[j], int(ms[j]), vs[j]
        if r % 2:  # a fifth, real edit at the slice boundary of rank 1
            feat[r, 4], mode[r, 4], value[r, 4] = bounds(d_sae, size, 1)[0], int(M.CLAMP), 5.0
    return feat, mode, value


def _watch(R: int, size: int, d_sae: int) -> torch.Tensor:
    """Every row watches the first and last feature of each slice (and feature 3)."""
    ids = [3] + [f for r in range(size) for f in (bounds(d_sae, size, r)[0], bounds(d_sae, size, r)[1] - 1)]
    return torch.tensor([ids] * R, dtype=torch.int64)


def _simulate(sae, size, x, feat, mode, value, top_k, watch, read=read_reference, broken=""):
    """Every rank's ``local_candidates`` and the merge, in one process."""
    d_sae = sae.cfg.d_sae
    parts = []
    for r in range(size):
        lo, hi = bounds(d_sae, size, r)
        parts.append(local_candidates(slice_sae(sae, lo, hi), lo, d_sae, size, x, feat, mode,
                                      value, top_k, watch, read))
    kk = tp_reads.candidates_per_rank(d_sae, size, top_k)
    if broken == "rank0_only":  # what the merge must not do: trust one rank's candidates
        parts = [parts[0]] * size
    return merge(torch.cat(parts, dim=-1), size, top_k, kk, x.dtype)


def _dense_order(dense: torch.Tensor, top_k: int):
    """Value descending, equal values by ascending feature id (the merge's order)."""
    ids = torch.arange(dense.shape[1]).expand_as(dense)
    _, order = dense.sort(dim=1, descending=True, stable=True)  # stable: ids ascending
    return dense.gather(1, order[:, :top_k]), ids.gather(1, order[:, :top_k])


def _check(got, sae, x, feat, mode, value, top_k, watch):
    dense = ops.read_latents(sae, x, feat, mode, value)
    want_v, want_i, want_w = read_reference(sae, x, feat, mode, value, top_k, watch)
    gv, gi, gw = got
    assert gv.shape == want_v.shape and gi.shape == want_i.shape and gw.shape == want_w.shape
    assert gi.dtype == torch.int64 and gv.dtype == x.dtype
    torch.testing.assert_close(gv, want_v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, want_w, atol=1e-5, rtol=1e-5)
    assert bool((gv[:, 1:] <= gv[:, :-1]).all()), "values not descending"
    if gi.numel():
        assert int(gi.min()) >= 0 and int(gi.max()) < sae.cfg.d_sae
        torch.testing.assert_close(dense.gather(1, gi), gv, atol=1e-5, rtol=1e-5)
        assert bool((gi.sort(dim=1).values.diff(dim=1) != 0).all()), "a feature reported twice"
        # Where a value is apart from its neighbours in the dense row, the id is the dense one.
        ov, oi = _dense_order(dense, top_k)
        dense_sorted = dense.sort(dim=1, descending=True).values
        gap_lo = ov - dense_sorted[:, 1 : top_k + 1] if top_k < dense.shape[1] else None
        apart = torch.ones_like(ov, dtype=torch.bool)
        apart[:, 1:] &= (ov[:, :-1] - ov[:, 1:]) > 1e-4
        apart[:, :-1] &= (ov[:, :-1] - ov[:, 1:]) > 1e-4
        if gap_lo is not None:
            apart[:, -1] &= gap_lo[:, -1] > 1e-4
        assert bool((gi[apart] == oi[apart]).all()), "an index differs from the unsharded read"
        assert apart.any() or top_k == 0


@pytest.mark.parametrize("arch", ELEMENTWISE)
@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("top_k", [0, 1, 5, 80])  # 80: wider than every slice at size 3
@pytest.mark.parametrize("norm", ["none", "token_norm"])
def test_split_read_equals_the_unsharded_read(arch, size, top_k, norm):
    sae = random_sae(arch, D_IN, D_SAE, seed=1, normalization=norm,
                     rank_scale=arch == "jumprelu")
    g = torch.Generator().manual_seed(2)
    R = 13
    x = torch.randn(R, D_IN, generator=g) * 2
    feat, mode, value = _edits(R, size, D_SAE, g)
    watch = _watch(R, size, D_SAE)
    for read in (read_reference, read_topk):
        got = _simulate(sae, size, x, feat, mode, value, top_k, watch, read)
        _check(got, sae, x, feat, mode, value, top_k, watch)


def test_split_read_with_tiles_and_ties():
    """The tiled kernel inside each slice (forced narrow tiles), and a ReLU SAE whose rows
    have fewer active features than top_k: the zeros tie."""
    sae = random_sae("standard", D_IN, 2000, seed=3)
    sae = dataclasses.replace(sae, b_enc=sae.b_enc - 10.0)  # few features fire
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, D_IN, generator=g)
    feat, mode, value = _edits(9, 3, 2000, g)
    watch = _watch(9, 3, 2000)

    def tiled(part, *a):
        return kernels.read_tiled(part, *a, tile=128)

    got = _simulate(sae, 3, x, feat, mode, value, 40, watch, tiled)
    _check(got, sae, x, feat, mode, value, 40, watch)
    dense = ops.read_latents(sae, x, feat, mode, value)
    assert bool(((dense > 0).sum(1) < 40).any()), "no row with tied zeros in its top-k"
    # Which zero-valued features a slice's kernel keeps is as unspecified as in one topk;
    # the merge lists the tied ones by ascending id.
    for v, i in zip(got[0], got[1], strict=True):
        assert bool((i[v == 0].diff() > 0).all())


def test_a_broken_merge_fails_the_comparison():
    sae = random_sae("jumprelu", D_IN, D_SAE, seed=5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(7, D_IN, generator=g) * 2
    feat, mode, value = _edits(7, 2, D_SAE, g)
    watch = _watch(7, 2, D_SAE)
    got = _simulate(sae, 2, x, feat, mode, value, 8, watch, broken="rank0_only")
    with pytest.raises(AssertionError):
        _check(got, sae, x, feat, mode, value, 8, watch)


# ------------------------------------------------------------- through HookTables, threaded


class _Group:
    """An in-process all-gather over ``size`` threads (rank order, last dimension)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list[torch.Tensor | None] = [None] * size
        self.barrier = threading.Barrier(size)
        self.calls = [0] * size

    def gather_for(self, rank: int):
        def gather(t: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = t
            self.barrier.wait()
            out = torch.cat(self.slots, dim=-1)  # type: ignore[arg-type]
            self.barrier.wait()
            return out
        return gather


def _run_ranks(group: _Group, tables: list[HookTables], h: torch.Tensor) -> list[torch.Tensor]:
    outs: list = [None] * len(tables)
    errors: list = []

    def run(r):
        try:
            outs[r] = tables[r].apply(h, None)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)
            group.barrier.abort()  # release the other ranks

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(tables))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return outs


@pytest.mark.parametrize("arch", ["standard", "gated"])
@pytest.mark.parametrize("size", [2, 3])
def test_hook_tables_split_reads_equal_a_single_rank(arch, size):
    from tests.sae_runtime.test_tables import _fill

    sae = random_sae(arch, D_IN, D_SAE, seed=7)
    group = _Group(size)
    whole = HookTables(sae, max_tokens=64, max_slots=8, max_feats=4, max_watch=5)
    ranks = [HookTables(sae, max_tokens=64, max_slots=8, max_feats=4, max_watch=5)
             for _ in range(size)]
    for r, t in enumerate(ranks):
        t.read_split = ReadSplit.build(sae, size, r, group.gather_for(r), read_topk)
    T = 30
    g = torch.Generator().manual_seed(8)
    h = torch.randn(T, D_IN, generator=g) * 2
    watch = (0, 66, 67, 133, 199)
    for t in [whole, *ranks]:
        _fill(t, [(0, 10, 3), (20, 30, 4)], torch.Generator().manual_seed(9))
        t.add_read_rows(5, 15, 8, watch, pooled=False)
        t.add_read_rows(25, 30, 90, watch[:2], pooled=False)
        t.upload()
    want = whole.apply(h, None)
    outs = _run_ranks(group, ranks, h)
    assert group.calls == [1] * size  # every rank entered the all-gather once
    for out in outs:
        torch.testing.assert_close(out, want)  # the edits are not touched
    wv, wi, ww, _ = whole.read_out_host()
    for t in ranks:
        gv, gi, gw, pools = t.read_out_host()
        assert pools is None
        torch.testing.assert_close(gv, wv, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gw, ww, atol=1e-5, rtol=1e-5)
        # ids equal wherever the value has no (near) tie among the row's read values, the
        # last one kept included (it may tie with features not listed, zeros above all)
        near = ((wv[:, :, None] - wv[:, None, :]).abs() <= 1e-4).sum(-1) > 1
        distinct = ~near & (wv > 0)
        bad = distinct & (gi != wi)
        assert not bool(bad.any()), (gv[bad], wv[bad], gi[bad], wi[bad], bad.nonzero())
    # A step with a pooled read: rank 0 reads it whole, the others skip it (no gather).
    for t in [whole, *ranks]:
        t.clear()
        t.add_read_rows(1, 4, 2, (3,), pooled=True)
    whole.apply(h, None)
    _run_ranks(group, ranks, h)
    assert group.calls == [1] * size
    for got, want in zip(ranks[0].read_out_host()[3], whole.read_out_host()[3], strict=True):
        torch.testing.assert_close(got, want)
    assert all(t.read_out is None for t in ranks[1:])
