"""Random in-memory SAEs of every registered architecture, and kernel edit tables (for
kernel and math tests)."""

from __future__ import annotations

import torch

from sae_runtime import registry
from sae_runtime.saes.base import SAE, SAEConfig
from sae_runtime.step.edits import POS_INF, EditTables

K = 6  # active features (TopK family)


def _k(arch: str, d_sae: int) -> int:
    if arch == "groupmax":  # the number of groups must divide d_sae
        return next(k for k in (8, 6, 5, 4, 3, 2, 1) if d_sae % k == 0)
    return K


def random_sae(arch: str, d_in: int, d_sae: int, *, normalization: str = "none",
               apply_b_dec_to_input: bool = True, seed: int | None = None,
               rank_scale: bool = False) -> SAE:
    """A random SAE of ``arch`` whose features fire on a fair share of random inputs.

    Fails for an architecture it does not know how to build, so a newly registered
    architecture cannot silently skip the tests that use it.
    """
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    a = registry.get(arch)
    norm_kw = {}
    if normalization == "constant_scale":
        norm_kw = {"norm_scale_in": 0.7, "norm_scale_out": 1.9}
    cfg = SAEConfig(arch, d_in, d_sae, "blocks.1.hook_resid_post", 1, "resid_post",
                    apply_b_dec_to_input=apply_b_dec_to_input, k=_k(arch, d_sae) if a.needs_k else None,
                    normalization=normalization, **norm_kw)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    tensors: dict[str, torch.Tensor | None] = {
        "W_enc": W_dec.t() * 0.5, "W_dec": W_dec, "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "b_dec": torch.randn(d_in, generator=g) * 0.1,
    }
    for name in a.extra_tensors:
        if name == "threshold":
            tensors[name] = torch.rand(d_sae, generator=g) * 0.3
        elif name == "b_mag":
            tensors[name] = torch.randn(d_sae, generator=g) * 0.2
        elif name == "r_mag":
            tensors[name] = torch.randn(d_sae, generator=g) * 0.3
        else:
            raise KeyError(f"random_sae does not know how to build {arch!r} tensor {name!r}")
    if rank_scale:
        tensors["rank_scale"] = torch.rand(d_sae, generator=g) + 0.5
    return SAE(cfg, **tensors)


def edit_tables(tok_slot: torch.Tensor, feat: torch.Tensor, mode: torch.Tensor,
                val: torch.Tensor, *, tok_pos: torch.Tensor | None = None,
                pos_lo: torch.Tensor | None = None, pos_hi: torch.Tensor | None = None,
                slot_len: torch.Tensor | None = None, by_token: torch.Tensor | None = None,
                tok_match: torch.Tensor | None = None) -> EditTables:
    """Kernel edit tables from per-slot edits ``feat/mode/val [S, K]``: slot s owns edit
    rows ``s*K .. s*K + slot_len[s]`` (all K by default), windows ``[pos_lo, pos_hi)``
    (``[S, K]``, default: every position), token positions ``tok_pos`` (default 0), token
    conditions ``by_token [S, K]`` (default none) with each token row's matches
    ``tok_match [T, K]``."""
    S, K = feat.shape
    dev = feat.device
    cols = {"feature": feat.reshape(-1).long(), "mode": mode.reshape(-1).int(),
            "value": val.reshape(-1).float(),
            "pos_lo": (torch.zeros(S * K, dtype=torch.int64, device=dev) if pos_lo is None
                       else pos_lo.reshape(-1).long()),
            "pos_hi": (torch.full((S * K,), POS_INF, dtype=torch.int64, device=dev)
                       if pos_hi is None else pos_hi.reshape(-1).long())}
    if by_token is not None:
        cols["by_token"] = by_token.reshape(-1).int()
    if tok_match is not None:
        tok_match = tok_match.to(torch.int8).contiguous()
    if tok_pos is None:
        tok_pos = torch.zeros_like(tok_slot)
    if slot_len is None:
        slot_len = torch.full((S,), K, dtype=torch.int64, device=dev)
    start = torch.arange(S, dtype=torch.int64, device=dev) * K
    return EditTables.build(tok_slot, tok_pos, start, slot_len, cols, K, tok_match=tok_match)
