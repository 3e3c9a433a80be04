"""Sparse decode (torch): an embedding-bag over decoder rows.

Semantics equal ``reference.sparse_decode_reference``:

    out[n] = sum_j values[n, j] * W_dec[indices[n, j]]          # [N, d_in], no bias

``torch.nn.functional.embedding_bag(mode="sum", per_sample_weights=values)`` reads the
``N * k`` decoder rows it needs and never forms the ``[N, k, d_in]`` gather the reference
builds (nor the ``[N, d_sae]`` dense code a dense decode multiplies). Padding entries carry
value 0 and any valid index. Shapes are static (the ``k == 0`` branch depends on a shape
only), so the call is safe inside a captured graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_decode(
    values: torch.Tensor,  # [N, k] feature values
    indices: torch.Tensor,  # [N, k] int64 feature ids in [0, d_sae)
    W_dec: torch.Tensor,  # [d_sae, d_in]
) -> torch.Tensor:
    """``[N, d_in]``: the decoder rows of each row's codes, weighted and summed."""
    N, k = indices.shape
    if k == 0:  # embedding_bag cannot build offsets for empty bags
        return W_dec.new_zeros(N, W_dec.shape[1])
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")
