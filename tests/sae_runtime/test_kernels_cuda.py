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
from tests.sae_runtime._factories import random_sae
from tests.sae_runtime.test_kernels_fused import TOL, _edits, _untied_rows, assert_reads_match

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


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated", "topk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [0, 1, 300])
def test_cuda_splice(arch, dtype, T):
    sae = random_sae(arch, 576, 16384).to(DEV, dtype)
    tok_slot = torch.randint(-1, 8, (T + 5,), device=DEV)
    feat = torch.randint(0, 16384, (8, 16), device=DEV)
    mode = torch.randint(0, 5, (8, 16), dtype=torch.int32, device=DEV)
    val = torch.randn(8, 16, device=DEV)
    h = torch.randn(T, 576, device=DEV).to(dtype)
    got = kernels.splice_fixed(h, h, sae, tok_slot, feat, mode, val)
    want = splice_reference(h, h, sae, tok_slot, feat, mode, val)
    atol, rtol = TOL[dtype]
    if dtype != torch.float32 and T:
        atol *= 1 + float(want.float().abs().max())
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


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


def test_cuda_splice_captures_in_a_graph():
    """Fixed addresses, no host syncs: the fused splice records and replays in a CUDA graph,
    and a replay sees the tables as they are at replay time."""
    sae = random_sae("jumprelu", 576, 16384).to(DEV)
    T = 64
    h = torch.randn(T, 576, device=DEV)
    tok_slot = torch.full((T,), -1, dtype=torch.int64, device=DEV)
    feat = torch.randint(0, 16384, (4, 8), device=DEV)
    mode = torch.full((4, 8), int(ops.Mode.CLAMP), dtype=torch.int32, device=DEV)
    val = torch.randn(4, 8, device=DEV) * 5
    kernels.splice_fixed(h, h, sae, tok_slot, feat, mode, val)  # compile before capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = kernels.splice_fixed(h, h, sae, tok_slot, feat, mode, val)
    tok_slot.copy_(torch.randint(-1, 4, (T,), device=DEV))  # the step's tables, in place
    g.replay()
    torch.testing.assert_close(out, splice_reference(h, h, sae, tok_slot, feat, mode, val),
                               atol=1e-4, rtol=1e-4)
