"""Feature reads split over tensor-parallel ranks by feature columns. Pure: no vLLM here.

Under TP every rank holds the whole activation at a replicated hook site (and at ``z`` after
the op's all-gather), so every rank could encode it; without this module only rank 0 did,
while the other ranks waited for it at the next all-reduce. For architectures whose
activation is element-wise per feature (``needs_full_preactivation`` false: standard,
jumprelu, gated) a feature's activation needs only its own encoder column, so the read is
split by columns instead:

    rank r of n holds features [lo_r, hi_r) of d_sae (``bounds``: contiguous, balanced,
    widths differing by at most one), as an SAE of its own (``slice_sae``)
    local  = kernels.read_topk on that slice, with the row's edits that fall inside it
             (feature ids made slice-local) and its watched features inside it:
             top-min(top_k, width) values, *global* indices, watch values (0 outside)
    packed = [values | indices | watch] as float32, padded to the widest slice's count
             (-inf values), so every rank sends the same shape
    all-gather over the TP group (rank order), then ``merge``:
             values, indices = the top_k of every rank's candidates, value descending,
                               equal values by ascending feature id
             watch           = sum over ranks (exactly one rank holds each feature)

Exact: an element-wise activation of feature i depends only on column i, an edit of
feature i changes only feature i's value (``ops.read_latents``: an edited feature reads as
its edited value), and every feature of a row's global top_k is in the top_k of its own
slice. Each rank contributes ``min(top_k, width_r)`` real candidates, together at least
``min(top_k, d_sae)``, so padding is never picked. Feature ids travel as float32, exact
below 2**24 features (``shardable``).

Ties: among equal values the merge orders by ascending feature id. The unsharded kernels
leave that order unspecified (``reference.read_reference``), so where values are equal the
indices may differ from a single rank's, as they may between two ``topk`` calls; the
values and their multiset agree.

Not split (the callers keep the rank-0 path): TopK-family SAEs (membership needs the whole
pre-activation row) and steps with pooled reads (Encode's dense sums and maxima need every
latent).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sae_runtime import ops, registry
from sae_runtime.saes.base import SAE

MAX_FEATURES = 2**24
"""Feature ids travel as float32 in the all-gather: exact below this."""

PER_FEATURE = ("b_enc", "threshold", "b_mag", "r_mag", "rank_scale")
"""SAE tensors indexed by feature (``[d_sae]``), sliced with the encoder's columns."""

ReadFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""``(sae, x, feat, mode, value, top_k, watch) -> (values, indices, watched)``, the
semantics of ``kernels.read_topk``."""


def bounds(d_sae: int, size: int, rank: int) -> tuple[int, int]:
    """Rank ``rank`` of ``size``'s features ``[lo, hi)``: contiguous, in rank order, the
    first ``d_sae % size`` ranks one wider."""
    base, extra = divmod(d_sae, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def shardable(sae: SAE, size: int) -> bool:
    """Whether reads of ``sae`` split over ``size`` ranks (element-wise activation, at
    least one feature per rank, feature ids exact in float32)."""
    arch = registry.get(sae.cfg.architecture)
    return (size > 1 and not arch.needs_full_preactivation
            and size <= sae.cfg.d_sae <= MAX_FEATURES)


def slice_sae(sae: SAE, lo: int, hi: int) -> SAE:
    """The SAE of features ``[lo, hi)`` alone: encoder columns and per-feature tensors
    sliced (the encoder slice contiguous, for a fast GEMM), the input side (normalisation,
    ``b_dec``) unchanged. Its ``enc_gemm`` is unset; the caller may bind one to its
    ``W_enc``."""
    cut = {name: t[lo:hi] for name in PER_FEATURE if (t := getattr(sae, name)) is not None}
    return dataclasses.replace(
        sae, cfg=dataclasses.replace(sae.cfg, d_sae=hi - lo),
        W_enc=sae.W_enc[:, lo:hi].contiguous(), W_dec=sae.W_dec[lo:hi], enc_gemm=None, **cut)


def candidates_per_rank(d_sae: int, size: int, top_k: int) -> int:
    """Top-k candidates each rank sends: ``top_k``, or the widest slice when narrower."""
    return min(top_k, bounds(d_sae, size, 0)[1])


def local_candidates(part: SAE, lo: int, d_sae: int, size: int, x: torch.Tensor,
                     feat: torch.Tensor, mode: torch.Tensor, value: torch.Tensor,
                     top_k: int, watch: torch.Tensor, read: ReadFn) -> torch.Tensor:
    """One rank's share of a read, packed for the all-gather: ``[R, 2 * kk + W]`` float32,
    ``kk = candidates_per_rank(d_sae, size, top_k)``: its slice's top values (value
    descending, -inf padding), their global feature ids, and the watch values of the
    watched features inside the slice (0 elsewhere).

    ``part`` is the slice ``[lo, lo + part.cfg.d_sae)`` (``slice_sae``); ``x, feat, mode,
    value, top_k, watch`` are what ``kernels.read_topk`` takes for the whole SAE; ``read``
    computes the slice's read (``kernels.read_topk``).
    """
    width = part.cfg.d_sae
    kk = candidates_per_rank(d_sae, size, top_k)
    inside = (feat >= lo) & (feat < lo + width)
    lmode = torch.where(inside, mode, torch.full_like(mode, ops.Mode.NONE))
    lfeat = torch.where(inside, feat - lo, torch.zeros_like(feat))
    w_in = (watch >= lo) & (watch < lo + width)
    vals, idx, watched = read(part, x, lfeat, lmode, value, min(top_k, width),
                              torch.where(w_in, watch - lo, torch.zeros_like(watch)))
    R = x.shape[0]
    out = torch.empty(R, 2 * kk + watch.shape[1], dtype=torch.float32, device=x.device)
    out[:, :kk] = -float("inf")
    out[:, kk : 2 * kk] = float(d_sae)  # padding sorts after every real feature
    out[:, : vals.shape[1]] = vals
    out[:, kk : kk + idx.shape[1]] = idx + lo
    out[:, 2 * kk :] = torch.where(w_in, watched, torch.zeros_like(watched))
    return out


def merge(gathered: torch.Tensor, size: int, top_k: int, kk: int, dtype: torch.dtype
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values [R, top_k], indices [R, top_k], watched [R, W])`` from every rank's
    ``local_candidates`` side by side in rank order (``gathered [R, size * P]``): the top_k
    candidates, value descending and equal values by ascending feature id, and the watch
    values summed over ranks. Values and watch values come back in ``dtype``."""
    R = gathered.shape[0]
    g = gathered.reshape(R, size, -1)
    v = g[:, :, :kk].reshape(R, size * kk)
    i = g[:, :, kk : 2 * kk].reshape(R, size * kk)
    watched = g[:, :, 2 * kk :].sum(dim=1)
    by_id = i.argsort(dim=1)  # then a stable sort by value: ties stay in id order
    v, i = v.gather(1, by_id), i.gather(1, by_id)
    vals, order = v.sort(dim=1, descending=True, stable=True)
    return (vals[:, :top_k].to(dtype), i.gather(1, order[:, :top_k]).long(),
            watched.to(dtype))


@dataclass(frozen=True)
class ReadSplit:
    """One TP rank's share of a hook's reads (``HookTables.read_split``).

    ``part``: its slice ``[lo, hi)`` of the SAE (``slice_sae``); ``gather``: concatenates a
    tensor over the TP group along the last dimension in rank order (every rank calls it
    with the same shape); ``read``: the read kernel (``kernels.read_topk``).
    """

    rank: int
    size: int
    lo: int
    hi: int
    d_sae: int
    part: SAE
    gather: Callable[[torch.Tensor], torch.Tensor]
    read: ReadFn

    @classmethod
    def build(cls, sae: SAE, size: int, rank: int, gather: Callable[[torch.Tensor], torch.Tensor],
              read: ReadFn, gemm: Callable[[SAE], SAE] | None = None) -> ReadSplit:
        """Rank ``rank``'s split of ``sae`` (``gemm`` may bind a faster GEMM to the slice)."""
        lo, hi = bounds(sae.cfg.d_sae, size, rank)
        part = slice_sae(sae, lo, hi)
        return cls(rank, size, lo, hi, sae.cfg.d_sae, gemm(part) if gemm else part, gather, read)

    def __call__(self, x: torch.Tensor, feat: torch.Tensor, mode: torch.Tensor,
                 value: torch.Tensor, top_k: int, watch: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``kernels.read_topk(sae, x, ...)`` of the whole SAE, this rank computing its
        slice; every rank of the group must call it with the same shapes."""
        local = local_candidates(self.part, self.lo, self.d_sae, self.size, x, feat, mode,
                                 value, top_k, watch, self.read)
        kk = candidates_per_rank(self.d_sae, self.size, top_k)
        return merge(self.gather(local), self.size, top_k, kk, x.dtype)
