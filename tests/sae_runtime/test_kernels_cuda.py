"""The Triton kernels on a CUDA device equal their torch references (GPU only).

Marked ``cuda`` and skipped without a CUDA device (or under ``TRITON_INTERPRET``), so CI
never needs a GPU. Shapes are the real ones (d_in 576/2304, d_sae up to 65k).
"""

from __future__ import annotations

import os

import pytest
import torch

from sae_runtime import kernels, ops
from sae_runtime.kernels import read_reference, sparse_decode_reference, splice_reference
from tests.sae_runtime._factories import edit_tables, random_sae
from tests.sae_runtime.test_kernels_fused import (
    TOL,
    _edits,
    _untied_rows,
    assert_reads_match,
    assert_splice_matches,
    no_splice_fallback,
    ranking_score,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter mode"),
]

DEV = "cuda"


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert kernels.backend_for(torch.device(DEV)) == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,k", [(0, 8), (1, 32), (512, 64)])
def test_cuda_sparse_decode(dtype, N, k):
    W_dec = torch.randn(16384, 576, device=DEV).to(dtype)
    idx = torch.randint(0, 16384, (N, k), device=DEV)
    vals = torch.randn(N, k, device=DEV).to(dtype)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(kernels.sparse_decode(vals, idx, W_dec),
                               sparse_decode_reference(vals, idx, W_dec), atol=atol * 10, rtol=rtol)


FUSED_SPLICE = ["standard", "jumprelu", "gated", "topk", "abstopk", "groupmax"]


@pytest.mark.parametrize("arch", FUSED_SPLICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [0, 1, 300])
def test_cuda_splice(arch, dtype, T, monkeypatch):
    no_splice_fallback(monkeypatch)
    sae = random_sae(arch, 576, 16384).to(DEV, dtype)
    tok_slot = torch.randint(-1, 8, (T + 5,), device=DEV)
    feat = torch.randint(0, 16384, (8, 16), device=DEV)
    mode = torch.randint(0, 5, (8, 16), dtype=torch.int32, device=DEV)
    val = torch.randn(8, 16, device=DEV)
    h = torch.randn(T, 576, device=DEV).to(dtype)
    tables = edit_tables(tok_slot, feat, mode, val)
    got = kernels.splice_fixed(h, h, sae, tables)
    want = splice_reference(h, h, sae, tables)
    assert_splice_matches(got, want, dtype)


@pytest.mark.parametrize("arch,rank_scale", [("topk", False), ("topk", True),
                                             ("abstopk", False), ("groupmax", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_splice_topk_family_at_the_boundary(arch, rank_scale, dtype, monkeypatch):
    """Each row edits its own last member and first non-member (topk, abstopk), or its
    first group's max and runner-up (groupmax): membership equals the reference's."""
    no_splice_fallback(monkeypatch)
    sae = random_sae(arch, 576, 16384, rank_scale=rank_scale).to(DEV, dtype)
    T, k = 300, sae.cfg.k
    h = torch.randn(T, 576, device=DEV).to(dtype)
    score = ranking_score(sae, ops.pre_activations(sae, h))
    if arch == "groupmax":
        boundary = score[:, :16384 // k].topk(2, dim=1).indices
    else:
        boundary = score.topk(k + 1, dim=1).indices[:, k - 1:]
    feat = torch.cat([boundary, boundary], dim=1)  # [T, 4]
    mode = torch.tensor([int(ops.Mode.CLAMP), int(ops.Mode.ADD), int(ops.Mode.SCALE),
                         int(ops.Mode.ABLATE)], dtype=torch.int32, device=DEV).repeat(T, 1)
    val = torch.randn(T, 4, device=DEV) * 3
    tok_slot = torch.arange(T, device=DEV)
    tok_slot[::7] = -1
    tables = edit_tables(tok_slot, feat, mode, val)
    got = kernels.splice_fixed(h, h, sae, tables)
    want = splice_reference(h, h, sae, tables)
    assert_splice_matches(got, want, dtype)
    assert torch.equal(got[::7], h[::7])


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated", "topk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R", [0, 1, 300])
def test_cuda_read(arch, dtype, R):
    sae = random_sae(arch, 576, 65536).to(DEV, dtype)
    x = torch.randn(R, 576, device=DEV).to(dtype)
    feat, mode, val, watch = (t.to(DEV) for t in _edits(R, 8, 65536, 4))
    got = kernels.read_topk(sae, x, feat, mode, val, 16, watch)
    want = read_reference(sae, x, feat, mode, val, 16, watch)
    assert_reads_match(got, want, ops.read_latents(sae, x, feat, mode, val), dtype,
                       _untied_rows(sae, x).to(DEV))


@pytest.mark.parametrize("arch", ["jumprelu", "topk", "groupmax"])
def test_cuda_splice_captures_in_a_graph(arch, monkeypatch):
    """Fixed addresses, no host syncs: the fused splice records and replays in a CUDA graph,
    and a replay sees the tables as they are at replay time (the TopK family's torch
    threshold pass included)."""
    no_splice_fallback(monkeypatch)
    sae = random_sae(arch, 576, 16384).to(DEV)
    T = 64
    h = torch.randn(T, 576, device=DEV)
    tok_slot = torch.full((T,), -1, dtype=torch.int64, device=DEV)
    feat = torch.randint(0, 16384, (4, 8), device=DEV)
    mode = torch.full((4, 8), int(ops.Mode.CLAMP), dtype=torch.int32, device=DEV)
    val = torch.randn(4, 8, device=DEV) * 5
    tables = edit_tables(tok_slot, feat, mode, val)
    kernels.splice_fixed(h, h, sae, tables)  # compile before capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = kernels.splice_fixed(h, h, sae, tables)
    tok_slot.copy_(torch.randint(-1, 4, (T,), device=DEV))  # the step's tables, in place
    g.replay()
    torch.testing.assert_close(out, splice_reference(h, h, sae, tables),
                               atol=1e-4, rtol=1e-4)
