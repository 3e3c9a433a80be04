"""Sparse decode in Triton: an embedding-bag over decoder rows (the CUDA path).

Semantics (``reference.sparse_decode_reference``):

    for n in range(N):                       # one program per (row, block of d_in)
        out[n, :] = 0
        for j in range(k):
            out[n, :] += values[n, j] * W_dec[indices[n, j], :]   # fp32 accumulation
    out = out.to(W_dec.dtype)

Each program loads only the ``k`` decoder rows its token names (contiguous along ``d_in``,
so the loads coalesce); nothing of size ``d_sae`` is touched. Shapes come from the
arguments alone and nothing reads back to the host, so the launch is safe to capture in
a CUDA graph. Traffic: ``N * k * d_in`` decoder elements read, ``N * d_in`` written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sparse_decode_kernel(
    val_ptr, idx_ptr, w_ptr, out_ptr,
    K, D,
    stride_vn, stride_in, stride_wr, stride_on,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        j = k0 + tl.arange(0, BLOCK_K)
        jmask = j < K
        v = tl.load(val_ptr + n * stride_vn + j, mask=jmask, other=0.0).to(tl.float32)
        i = tl.load(idx_ptr + n * stride_in + j, mask=jmask, other=0)
        w = tl.load(w_ptr + i[:, None] * stride_wr + d[None, :],
                    mask=jmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v[:, None] * w, axis=0)
    tl.store(out_ptr + n * stride_on + d, acc.to(out_ptr.dtype.element_ty), mask=dmask)


def sparse_decode_triton(
    values: torch.Tensor,  # [N, k]
    indices: torch.Tensor,  # [N, k] int64
    W_dec: torch.Tensor,  # [d_sae, d_in]
) -> torch.Tensor:
    """``[N, d_in]``; see the module docstring."""
    N, K = indices.shape
    D = W_dec.shape[1]
    out = W_dec.new_empty(N, D)
    if N == 0:
        return out
    values = values.to(W_dec.dtype).contiguous()
    indices = indices.contiguous()
    W_dec = W_dec.contiguous()
    BLOCK_D = min(256, triton.next_power_of_2(D))
    BLOCK_K = min(32, triton.next_power_of_2(max(K, 1)))
    grid = (N, triton.cdiv(D, BLOCK_D))
    _sparse_decode_kernel[grid](values, indices, W_dec, out, K, D,
                                values.stride(0), indices.stride(0), W_dec.stride(0), out.stride(0),
                                BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D)
    return out
