"""The Triton kernels equal their references, run on CPU by Triton's interpreter.

Triton decides between compiling and interpreting when it is first imported, and other
test modules import it earlier, so this file runs only in a process started with
``TRITON_INTERPRET=1``: ``test_kernels_fused.test_triton_kernels_in_the_interpreter``
starts one (so ``make test`` covers it), and ``make test-triton`` runs it directly. Skipped
when Triton is not installed.
"""

from __future__ import annotations

import pytest
import torch

from sae_runtime import ops, registry
from sae_runtime.kernels import read_reference, sparse_decode_reference, splice_reference
from sae_runtime.saes.base import NORMALIZATIONS
from tests.sae_runtime._factories import random_sae
from tests.sae_runtime.test_kernels_fused import (
    TOL,
    _edits,
    _untied_rows,
    assert_reads_match,
)

triton = pytest.importorskip("triton")
if not triton.knobs.runtime.interpret:
    pytest.skip("needs a process started with TRITON_INTERPRET=1", allow_module_level=True)

from sae_runtime.kernels import (  # noqa: E402  (after the interpreter check)
    triton_decode,
    triton_splice,
    triton_topk_read,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,k", [(0, 4), (1, 1), (37, 8), (5, 40)])
def test_triton_sparse_decode(dtype, N, k):
    W_dec = torch.randn(300, 48).to(dtype)
    idx = torch.randint(0, 300, (N, k))
    if N and k >= 2:
        idx[0, 1] = idx[0, 0]
    vals = (torch.randn(N, k) * 2).to(dtype)
    got = triton_decode.sparse_decode_triton(vals, idx, W_dec)
    want = sparse_decode_reference(vals, idx, W_dec)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol * 10, rtol=rtol)


@pytest.mark.parametrize("arch", registry.names())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [0, 1, 37])
def test_triton_splice(arch, dtype, T):
    sae = random_sae(arch, 48, 200).to("cpu", dtype)
    S, K = 4, 3
    tok_slot = torch.randint(-1, S, (T + 3,))  # trailing padding entries
    feat = torch.randint(0, 200, (S, K))
    feat[0, 1] = feat[0, 0]
    mode = torch.randint(0, 5, (S, K), dtype=torch.int32)
    val = torch.randn(S, K) * 3
    h = torch.randn(T, 48).to(dtype)
    resid = (h.float() + torch.randn(T, 48)).to(dtype)
    got = triton_splice.splice_triton(h, resid, sae, tok_slot, feat, mode, val)
    want = splice_reference(h, resid, sae, tok_slot, feat, mode, val)
    atol, rtol = TOL[dtype]
    if dtype != torch.float32 and T:
        # The kernel accumulates in fp32, the reference rounds each step to the SAE dtype;
        # where h and the delta cancel only an absolute bound at the delta's scale holds.
        atol *= 1 + float(want.float().abs().max())
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    untouched = tok_slot[:T] < 0
    assert torch.equal(got[untouched], h[untouched])


@pytest.mark.parametrize("arch", sorted(["standard", "jumprelu", "gated"]))
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_triton_splice_normalised(arch, normalization):
    sae = random_sae(arch, 40, 96, normalization=normalization, rank_scale=True)
    tok_slot = torch.randint(-1, 3, (11,))
    feat, mode = torch.randint(0, 96, (3, 4)), torch.randint(0, 5, (3, 4), dtype=torch.int32)
    val = torch.randn(3, 4)
    h = torch.randn(11, 40)
    resid = h + torch.randn(11, 40)
    got = triton_splice.splice_triton(h, resid, sae, tok_slot, feat, mode, val)
    want = splice_reference(h, resid, sae, tok_slot, feat, mode, val)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# The interpreter runs tl.topk slowly (about a second per program), so the cases are picked
# rather than crossed: every dtype, zero rows, one row, a full and a partial block of 16.
READ_CASES = [(torch.float32, 0, 16), (torch.float32, 1, 0), (torch.float32, 20, 16),
              (torch.bfloat16, 20, 16), (torch.float16, 1, 16)]


@pytest.mark.parametrize("arch", registry.names())
@pytest.mark.parametrize("dtype,R,top_k", READ_CASES)
def test_triton_read(arch, dtype, R, top_k):
    sae = random_sae(arch, 48, 200).to("cpu", dtype)
    x = (torch.randn(R, 48) * 2).to(dtype)
    feat, mode, val, watch = _edits(R, 4, 200, 3)
    want = read_reference(sae, x, feat, mode, val, top_k, watch)
    got = triton_topk_read.read_triton(sae, x, feat, mode, val, top_k, watch)
    assert_reads_match(got, want, ops.read_latents(sae, x, feat, mode, val), dtype,
                       _untied_rows(sae, x))


@pytest.mark.parametrize("arch", sorted(["standard", "jumprelu", "gated"]))
def test_triton_read_rank_scaled_normalised(arch):
    sae = random_sae(arch, 40, 200, normalization="layer_norm", rank_scale=True)
    x = torch.randn(5, 40)
    feat, mode, val, watch = _edits(5, 2, 200, 2)
    want = read_reference(sae, x, feat, mode, val, 7, watch)
    got = triton_topk_read.read_triton(sae, x, feat, mode, val, 7, watch)
    assert_reads_match(got, want, ops.read_latents(sae, x, feat, mode, val), torch.float32)
