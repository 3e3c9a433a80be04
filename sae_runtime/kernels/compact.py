"""Compact splice (torch): only the rows that intervene do any work.

Semantics equal ``reference.splice_reference`` restricted to ``rows``: the host lists the
token rows with an intervention (``rows [R]``); each row's edits, masked by their position
windows, token matches and conditions, come from ``reference.row_edits``. Instead
of gathering ``[R, K, d_in]`` encoder columns, the union U of features used in this step is
gathered once: ``pre = x @ W_enc[:, U]`` is ``[R, |U|]`` and the decode is one
``[R, |U|] @ [|U|, d_in]`` product. With R = 0 the output is an exact copy of ``h``.
For a normalised SAE the delta is mapped back to the stream's space per row
(``ops.encoder_input`` gives the encoder input and that scale from one pass).
"""

from __future__ import annotations

import torch

from sae_runtime import ops, registry
from sae_runtime.kernels.reference import row_edits
from sae_runtime.saes.base import SAE
from sae_runtime.step.edits import EditTables


def splice_compact(
    h: torch.Tensor,  # [T, d]
    resid: torch.Tensor,  # [T, d]
    sae: SAE,
    rows: torch.Tensor,  # [R] int64 token rows that intervene
    tables: EditTables,
    conditions: bool = False,
    width: int | None = None,
    placed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``conditions``: some edit row of this step is conditional; ``width``: no slot of the
    step has more edit rows; ``placed``: ``reference.placed_edits`` of ``rows``, computed
    beforehand (``row_edits``; all three known on the host)."""
    out = h.clone()
    if rows.numel() == 0:
        return out
    arch = registry.get(sae.cfg.architecture)
    x, scale = ops.encoder_input(sae, resid[rows].to(sae.W_enc.dtype))  # [R, d], [R|1, 1]
    # one full pre-activation (TopK) serves the conditions and the edits
    pre_full = ops.dense_pre(sae, x) if arch.needs_full_preactivation else None  # [R, d_sae]
    cond = (lambda cols: ops._column_activations(sae, x, cols, pre_full)) if conditions else None
    feat, mode, val = row_edits(tables, rows, cond, width, placed)  # [R, K]
    union, inv = torch.unique(feat, return_inverse=True)  # [U], [R, K]
    if pre_full is not None:
        pre_u = pre_full[:, union]
    else:
        pre_u = x @ sae.W_enc[:, union] + sae.b_enc[union]  # [R, U]
    pre = pre_u.gather(1, inv)  # [R, K]
    act = arch.activate_columns(sae, pre, feat, pre_full, x)
    coef = ops.edited_values(mode, val.to(act.dtype), act) - act
    coef_u = torch.zeros_like(pre_u).scatter_add_(1, inv, coef)  # [R, U]
    delta = coef_u @ sae.W_dec[union]  # [R, d]
    if scale is not None:
        delta = delta * scale
    out.index_add_(0, rows, delta.to(h.dtype))
    return out
