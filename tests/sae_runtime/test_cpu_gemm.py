"""vLLM's prepacked oneDNN GEMM as the SAE's dense encode (``SAE.enc_gemm``) on CPU.

The fast path must give what torch's plain ``xin @ W_enc`` gives, for every architecture,
through every operation that uses a dense encode (encode, reads, the TopK-family splice);
and the worker must refuse a GEMM that disagrees with torch on its probe.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sae_runtime import ops, registry
from sae_runtime.kernels import read_reference
from sae_runtime.vllm import compat
from tests.sae_runtime._factories import random_sae

ARCHS = registry.names()


def _fast(sae):
    sae = sae.to("cpu")  # contiguous weights, as the worker loads them
    mm = compat.cpu_dense_gemm(sae.W_enc)
    if mm is None:
        pytest.skip("this vLLM build has no oneDNN")
    return sae, dataclasses.replace(sae, enc_gemm=mm)


@pytest.mark.parametrize("rows", [1, 7, 32, 130])
@pytest.mark.parametrize("d_in,d_sae", [(64, 256), (48, 200)])
def test_gemm_equals_torch_matmul(rows, d_in, d_sae):
    sae, fast = _fast(random_sae("standard", d_in, d_sae, seed=1))
    x = torch.randn(rows, d_in)
    want = x @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(ops.dense_pre(fast, x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_and_reads_match_the_torch_path(arch):
    plain, fast = _fast(random_sae(arch, 64, 256, seed=2))
    x = torch.randn(33, 64)
    torch.testing.assert_close(ops.encode(fast, x), ops.encode(plain, x), rtol=1e-4, atol=1e-4)
    feat = torch.randint(0, 256, (33, 3))
    mode = torch.full((33, 3), int(ops.Mode.CLAMP), dtype=torch.int32)
    val = torch.rand(33, 3) * 3
    watch = torch.randint(0, 256, (33, 4))
    v1, i1, w1 = read_reference(fast, x, feat, mode, val, 8, watch)
    v0, i0, w0 = read_reference(plain, x, feat, mode, val, 8, watch)
    torch.testing.assert_close(v1, v0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w1, w0, rtol=1e-4, atol=1e-4)


def test_empty_and_3d_inputs_fall_back_to_torch():
    plain, fast = _fast(random_sae("standard", 64, 256, seed=3))
    assert ops.dense_pre(fast, torch.randn(0, 64)).shape == (0, 256)
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(ops.dense_pre(fast, x), x @ plain.W_enc + plain.b_enc)


def test_to_drops_the_gemm_bound_to_the_old_weights():
    _, fast = _fast(random_sae("standard", 64, 256, seed=4))
    assert fast.to("cpu", torch.float64).enc_gemm is None


def test_worker_refuses_a_gemm_that_disagrees(monkeypatch):
    from sae_runtime.vllm import worker

    sae = random_sae("standard", 64, 256, seed=5).to("cpu")
    got, kind = worker._with_cpu_gemm(sae)
    assert kind == ("onednn" if compat.cpu_dense_gemm(sae.W_enc) is not None else "torch")
    monkeypatch.setattr(compat, "cpu_dense_gemm", lambda w: (lambda x: x @ w * 1.01))
    got, kind = worker._with_cpu_gemm(sae)
    assert kind == "torch" and got.enc_gemm is None
