"""Tiled read, sparse decode and kernel dispatch equal their references (CPU)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_runtime import kernels, ops, registry
from sae_runtime.kernels import read_reference, read_tiled, sparse_decode_reference, topk_read
from sae_runtime.kernels.decode import sparse_decode
from sae_runtime.kernels.topk_read import tiled
from sae_runtime.saes.base import NORMALIZATIONS
from tests.sae_runtime._factories import edit_tables, random_sae

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}
D_SAE = 200  # with tile=64: three full tiles and a partial one


def _edits(R: int, K: int, d_sae: int, W: int):
    """Edits and watch lists with the awkward cases in them."""
    feat = torch.randint(0, d_sae, (R, K))
    mode = torch.randint(0, 5, (R, K), dtype=torch.int32)
    val = torch.randn(R, K) * 3  # negative values included
    watch = torch.randint(0, d_sae, (R, W))
    if R and K >= 2:
        feat[0, 1] = feat[0, 0]  # one feature edited twice in a row: the last edit wins
        mode[0, :2] = torch.tensor([int(ops.Mode.CLAMP), int(ops.Mode.ADD)])
        mode[-1] = int(ops.Mode.NONE)  # a row without edits (padding entries only)
    if R and W >= 2 and K:
        watch[:, 0] = feat[:, 0]  # a watched feature that is also edited
    return feat, mode, val, watch


def ranking_score(sae, pre):
    """What a TopK-family SAE ranks by (groupmax: the ReLU'd value, within its group)."""
    arch = sae.cfg.architecture
    if arch == "abstopk":
        return pre.abs()
    if arch == "topk" and sae.rank_scale is not None:
        return pre * sae.rank_scale
    return torch.relu(pre) if arch == "groupmax" else pre


def _untied_rows(sae, x) -> torch.Tensor:
    """Rows whose TopK membership is unambiguous: no tie at the k-th ranking score.

    On such a tie either feature is a member (as between two ``topk`` calls); in bf16 and
    fp16 ties are common enough to meet in a test.
    """
    if sae.cfg.architecture not in ("topk", "abstopk") or x.shape[0] == 0:
        return torch.ones(x.shape[0], dtype=torch.bool)
    score = ranking_score(sae, ops.pre_activations(sae, x))
    top = score.topk(sae.cfg.k + 1, dim=1).values
    return top[:, -2] != top[:, -1]


def assert_splice_matches(got, want, dtype):
    """A splice kernel's output equals the reference's within ``TOL[dtype]``.

    The fused kernels accumulate in fp32 while the reference rounds each step to the SAE
    dtype; where h and the delta cancel only an absolute bound at the delta's scale holds,
    so in bf16/fp16 the absolute tolerance grows with the output's magnitude.
    """
    atol, rtol = TOL[dtype]
    if dtype != torch.float32 and want.numel():
        atol *= 1 + float(want.float().abs().max())
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def no_splice_fallback(monkeypatch):
    """Make the Triton splice fail if it hands the call to ``splice_reference``."""
    def fallback(*args, **kwargs):
        raise AssertionError("splice_triton fell back to splice_reference")

    monkeypatch.setattr("sae_runtime.kernels.triton_splice.splice_reference", fallback)


def assert_reads_match(got, want, dense, dtype, rows=None):
    """Values and watch lists equal the reference; each index names a feature whose
    (edited) dense activation is the value reported for it (ties may pick other ids).
    ``rows`` (bool) limits the comparison to rows without a membership tie."""
    atol, rtol = TOL[dtype]
    if rows is not None:
        assert rows.float().mean() >= 0.5 or rows.numel() < 2, "too many tied rows to test"
        got, want, dense = [t[rows] for t in got], [t[rows] for t in want], dense[rows]
    (gv, gi, gw), (wv, _, ww) = got, want
    assert gv.shape == wv.shape and gi.shape == gv.shape and gw.shape == ww.shape
    torch.testing.assert_close(gv, wv, atol=atol, rtol=rtol)
    torch.testing.assert_close(gw, ww, atol=atol, rtol=rtol)
    if gi.numel():
        assert int(gi.min()) >= 0 and int(gi.max()) < dense.shape[1]
        torch.testing.assert_close(dense.gather(1, gi), gv, atol=atol, rtol=rtol)
        assert (gi.sort(dim=1).values.diff(dim=1) != 0).all(), "a feature reported twice"


@pytest.mark.parametrize("arch", registry.names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("R", [0, 1, 37])
@pytest.mark.parametrize("top_k", [0, 1, 16])
def test_tiled_read_equals_reference(arch, dtype, R, top_k):
    sae = random_sae(arch, 48, D_SAE).to("cpu", dtype)
    x = (torch.randn(R, 48) * 2).to(dtype)
    feat, mode, val, watch = _edits(R, 4, D_SAE, 3)
    want = read_reference(sae, x, feat, mode, val, top_k, watch)
    got = read_tiled(sae, x, feat, mode, val, top_k, watch, tile=64)
    assert_reads_match(got, want, ops.read_latents(sae, x, feat, mode, val), dtype,
                       _untied_rows(sae, x))


@pytest.mark.parametrize("arch", registry.names())
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_tiled_read_normalised_and_rank_scaled(arch, normalization):
    sae = random_sae(arch, 48, D_SAE, normalization=normalization, rank_scale=True)
    x = torch.randn(23, 48)
    x[3] = 0.0  # an all-zero (padding-like) row
    feat, mode, val, watch = _edits(23, 3, D_SAE, 4)
    want = read_reference(sae, x, feat, mode, val, 12, watch)
    got = read_tiled(sae, x, feat, mode, val, 12, watch, tile=48)
    assert_reads_match(got, want, ops.read_latents(sae, x, feat, mode, val), torch.float32)


@pytest.mark.parametrize("arch", registry.names())
@pytest.mark.parametrize("tile", [1, 7, 64, 4096])
def test_tiled_read_any_tile_size(arch, tile):
    """Tiles smaller than top_k, not dividing d_sae, or wider than d_sae."""
    sae = random_sae(arch, 32, 120)
    x = torch.randn(9, 32)
    feat, mode, val, watch = _edits(9, 2, 120, 2)
    want = read_reference(sae, x, feat, mode, val, 10, watch)
    got = read_tiled(sae, x, feat, mode, val, 10, watch, tile=tile)
    assert_reads_match(got, want, ops.read_latents(sae, x, feat, mode, val), torch.float32)


@pytest.mark.parametrize("arch", ["topk", "abstopk"])
@pytest.mark.parametrize("top_k", [3, 6, 40, 120])
def test_tiled_topk_family_around_k_sae(arch, top_k):
    """top_k below, at and above the SAE's own k (=6), up to every feature; AbsTopK's
    negative members rank below the zeros of non-members."""
    sae = random_sae(arch, 32, 120)
    x = torch.randn(11, 32)
    feat, mode, val, watch = _edits(11, 3, 120, 2)
    want = read_reference(sae, x, feat, mode, val, top_k, watch)
    got = read_tiled(sae, x, feat, mode, val, top_k, watch, tile=16)
    assert_reads_match(got, want, ops.read_latents(sae, x, feat, mode, val), torch.float32)
    if arch == "abstopk":
        assert (ops.encode(sae, x) < 0).any(), "the test should cover negative activations"


@pytest.mark.parametrize("arch", registry.names())
@pytest.mark.parametrize("K,W", [(0, 0), (0, 3), (2, 0)])
def test_tiled_read_without_edits_or_watch(arch, K, W):
    sae = random_sae(arch, 32, 120)
    x = torch.randn(6, 32)
    feat, mode, val, watch = _edits(6, K, 120, W)
    want = read_reference(sae, x, feat, mode, val, 5, watch)
    got = read_tiled(sae, x, feat, mode, val, 5, watch, tile=32)
    assert_reads_match(got, want, ops.read_latents(sae, x, feat, mode, val), torch.float32)


def test_edit_of_an_inactive_feature_and_duplicates():
    """Scaling a feature that is not active leaves 0; ablating an active one removes it;
    a duplicated feature reads as its last edit."""
    sae = random_sae("standard", 16, 40)
    x = torch.randn(1, 16)
    acts = ops.encode(sae, x)[0]
    off, on = int((acts == 0).nonzero()[0]), int(acts.argmax())
    feat = torch.tensor([[off, on, 5, 5]])
    mode = torch.tensor([[ops.Mode.SCALE, ops.Mode.ABLATE, ops.Mode.CLAMP, ops.Mode.CLAMP]],
                        dtype=torch.int32)
    val = torch.tensor([[4.0, 0.0, 100.0, 50.0]])
    watch = torch.tensor([[off, on, 5]])
    vals, idx, watched = read_tiled(sae, x, feat, mode, val, 3, watch, tile=8)
    assert watched.tolist() == [[0.0, 0.0, 50.0]]
    assert int(idx[0, 0]) == 5 and float(vals[0, 0]) == 50.0
    assert on not in idx[0].tolist()


@pytest.mark.parametrize("arch", ["standard", "topk", "groupmax"])
def test_default_tile_walks_tiles_past_its_budget(monkeypatch, arch):
    """With the default tile, rows that fit the budget take the dense path; past it the walk
    tiles (TILE_MIN lowered so that a small SAE needs several tiles)."""
    monkeypatch.setattr(topk_read, "TILE_MIN", 16)
    monkeypatch.setattr(topk_read, "TILE_PER_KEPT", 1)
    monkeypatch.setattr(topk_read, "TILE_ELEMENTS", 40 * 64)
    sae = random_sae(arch, 32, 240)
    assert topk_read.default_tile(40, 8) == 64 < 240
    x = torch.randn(40, 32)
    feat, mode, val, watch = _edits(40, 3, 240, 2)
    want = read_reference(sae, x, feat, mode, val, 5, watch)
    got = read_tiled(sae, x, feat, mode, val, 5, watch)
    assert_reads_match(got, want, ops.read_latents(sae, x, feat, mode, val), torch.float32)


def test_which_architectures_tile():
    """top-AFA has no exact tiled form and reads densely; every other one tiles."""
    for arch in registry.names():
        assert tiled(random_sae(arch, 8, 24)) == (arch != "top_afa"), arch


# --------------------------------------------------------------------------- sparse decode


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,k", [(0, 4), (1, 1), (37, 8), (5, 0)])
@pytest.mark.parametrize("d_in", [48, 576])
def test_sparse_decode_equals_reference(dtype, N, k, d_in):
    W_dec = torch.randn(300, d_in).to(dtype)
    idx = torch.randint(0, 300, (N, k))
    if N and k >= 2:
        idx[0, 1] = idx[0, 0]  # duplicates add up
    vals = (torch.randn(N, k) * 2).to(dtype)  # negative values (AbsTopK codes)
    if N > 2 and k:
        vals[2] = 0  # a padding row
    want = sparse_decode_reference(vals, idx, W_dec)
    got = sparse_decode(vals, idx, W_dec)
    assert got.shape == (N, d_in) and got.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol * 10, rtol=rtol)
    if N > 2 and k:
        assert not got[2].any()


@pytest.mark.parametrize("arch", ["topk", "abstopk", "standard"])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_decode_sparse_equals_dense_decode(arch, normalization):
    """``kernels.decode_sparse`` of an SAE's codes equals ``ops.decode`` of its dense latents."""
    sae = random_sae(arch, 48, 120, normalization=normalization)
    x = torch.randn(13, 48)
    acts = ops.encode(sae, x)
    k = int((acts != 0).sum(1).max())
    vals, idx = acts.abs().topk(k, dim=1)
    vals = acts.gather(1, idx)
    torch.testing.assert_close(kernels.decode_sparse(sae, vals, idx, x), ops.decode(sae, acts, x),
                               atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------- dispatch


def test_backend_choice_and_kill_switch(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert kernels.backend_for(cpu) == "compact"
    assert kernels.backend_for(cuda) == "triton"
    for forced, want in (("reference", "reference"), ("compact", "compact"), ("torch", "compact")):
        monkeypatch.setenv(kernels.ENV, forced)
        assert kernels.backend_for(cuda) == want
    monkeypatch.delenv(kernels.ENV)
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    assert kernels.backend_for(cuda) == "compact"


@pytest.mark.parametrize("forced", ["", "reference"])
def test_dispatched_ops_equal_references_on_cpu(monkeypatch, forced):
    monkeypatch.setenv(kernels.ENV, forced)
    sae = random_sae("jumprelu", 48, D_SAE)
    x = torch.randn(17, 48)
    feat, mode, val, watch = _edits(17, 3, D_SAE, 2)
    want = read_reference(sae, x, feat, mode, val, 8, watch)
    got = kernels.read_topk(sae, x, feat, mode, val, 8, watch)
    assert_reads_match(got, want, ops.read_latents(sae, x, feat, mode, val), torch.float32)
    vals, idx = torch.randn(17, 5), torch.randint(0, D_SAE, (17, 5))
    torch.testing.assert_close(kernels.sparse_decode(vals, idx, sae.W_dec),
                               sparse_decode_reference(vals, idx, sae.W_dec))
    T = 9
    tok_slot = torch.randint(-1, 3, (T,))
    sf, sm, sv = torch.randint(0, D_SAE, (3, 2)), torch.randint(0, 5, (3, 2), dtype=torch.int32), \
        torch.randn(3, 2)
    h = torch.randn(T, 48)
    tables = edit_tables(tok_slot, sf, sm, sv)
    torch.testing.assert_close(kernels.splice_fixed(h, h, sae, tables),
                               kernels.splice_reference(h, h, sae, tables))


# --------------------------------------------------------------------------- Triton


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_in_the_interpreter():
    """Runs test_kernels_triton.py in a process with ``TRITON_INTERPRET=1`` (Triton fixes
    the mode at its first import, which this process has long done)."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/sae_runtime/test_kernels_triton.py"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1]
