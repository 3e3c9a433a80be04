"""Tiled encode + activation + top-k for reads (torch; the CPU path).

Semantics equal ``reference.read_reference`` (dense ``ops.read_latents``, then ``topk`` and
a gather of the watch list), but ``d_sae`` is walked in column tiles of ``tile`` features
and only each tile's top-``C`` per row is kept, so the largest intermediate is
``[R, tile]``, not ``[R, d_sae]`` (the default tile keeps it near 32 MiB however many rows
read; when ``[R, d_sae]`` fits that budget the dense reference runs instead):

    xin = ops.sae_input(sae, x)                              # [R, d_in]
    for each tile [lo, hi) of d_sae:
        pre  = xin @ W_enc[:, lo:hi] + b_enc[lo:hi]          # [R, tile]
        acts = rule(pre)                                     # unedited activations
        keep the tile's top-C of acts (values, feature ids)
        record acts (or pre) at the row's edited and watched features
    candidates = top-C of the tiles' candidates, minus the row's edited features
               + each edited feature with its edited value (the last real edit of a
                 duplicated feature wins, as in ``ops.read_latents``)
    values, indices = top_k of candidates;  watched = recorded values, edits applied

``C = top_k + K`` (``K`` edits per row) is enough: at most ``K`` tracked candidates are
dropped as edited, and ``top_k`` remain.

How each architecture tiles:

- element-wise rules (every architecture with ``needs_full_preactivation`` false:
  standard, jumprelu, gated): ``acts = activate_columns(pre, cols)``, exact by that
  method's contract;
- ``topk`` / ``abstopk``: membership needs the k_sae-th largest score of the whole row, so
  the top-M is kept on the ranking score (``pre`` or ``pre * rank_scale``, resp.
  ``|pre|``) with ``pre`` carried along, ``M = min(d_sae, k_sae + top_k + K)``. After the
  walk the first k_sae tracked features are the members (exactly k_sae, as ``activate``,
  which ``ops.read_latents`` uses); every untracked feature is a non-member (activation 0)
  and at least ``top_k`` zero-valued non-members are tracked, so the top_k values are
  exact. On an exact tie at the k_sae-th score either feature may be the member, as
  between two ``topk`` calls;
- ``groupmax``: the groups are contiguous, so tiles are cut on group boundaries and the
  rule is applied per tile (exact);
- everything else (``top_afa``, whose per-token k depends on a sort and cumulative sum of
  all ``d_sae`` scores, and any architecture not listed here) has no exact tiled form and
  falls back to the dense reference.

Ties: among features of equal value (the zeros above all) the returned indices may differ
from the reference's, as they may between two ``topk`` calls.

Cost: the same multiply-adds as the dense encode (a top-k needs every feature's
pre-activation) and one ``topk`` per tile; the per-tile candidates are concatenated and
reduced once at the end, and edits are matched against candidates by sorting the K edits
per row and binary search (no ``[R, C, K]`` broadcast). Few ops matters on CPU: on a busy
2-core host every op big enough to go parallel waits for a scheduling slice. Measured on
this project's 2-core machine (d_in 576, 512 reading rows, forced tiles at d_sae 16k):
with one thread 14-22% faster than the dense path at d_sae 65k and top_k 16, equal at
top_k 128 or d_sae 16k; with two threads while another process kept both cores busy, from
equal (top_k 16) to 25% slower (top_k 128). The Python loop runs a fixed number of times
given the shapes; nothing reads back to the host.
"""

from __future__ import annotations

import torch

from sae_runtime import ops, registry
from sae_runtime.kernels.reference import read_reference
from sae_runtime.saes.base import SAE

TILE_ELEMENTS = 2**23
"""Default tile budget: about this many ``[R, tile]`` elements (32 MiB in fp32) per tile, in
whole multiples of ``TILE_MIN`` columns. Few rows get wide tiles (fewer, larger matmuls and
top-k calls), many rows narrow ones (bounded memory)."""
TILE_MIN = 1024
TILE_PER_KEPT = 128
"""A tile is at least this many columns per kept candidate: CPU ``topk``'s cost per column
falls as the row grows past its k (measured: about 8 ns a column at 64 columns per kept
value, 4 ns at 128), so narrow tiles with a large top-k would lose to one dense ``topk``."""


def default_tile(rows: int, keep: int = 0) -> int:
    """Tile width for ``rows`` rows keeping ``keep`` candidates per row."""
    budget = TILE_ELEMENTS // max(rows, 1)
    return max(budget, TILE_PER_KEPT * keep + TILE_MIN - 1) // TILE_MIN * TILE_MIN


_TILED_FULL = ("topk", "abstopk", "groupmax")  # full-row architectures with an exact tiling


def tiled(sae: SAE) -> bool:
    """Whether ``read_tiled`` walks tiles for this SAE (False: dense fallback)."""
    arch = registry.get(sae.cfg.architecture)
    return not arch.needs_full_preactivation or arch.name in _TILED_FULL


def read_tiled(
    sae: SAE,
    x: torch.Tensor,  # [R, d_in] rows that read, in the SAE's dtype
    feat: torch.Tensor,  # [R, K] int64 edits at this SAE
    mode: torch.Tensor,  # [R, K] int (ops.Mode; NONE = no edit)
    value: torch.Tensor,  # [R, K] float
    top_k: int,
    watch: torch.Tensor,  # [R, W] int64
    tile: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values [R, top_k], indices [R, top_k], watched [R, W])``, as ``read_reference``.

    ``tile``: columns per tile. By default ``default_tile(R, top_k + K)``, and when that
    holds the whole row the dense reference runs instead: the same multiply-adds in fewer,
    larger ops (which matters on a busy CPU, where every op that goes parallel waits for
    its threads), and the ``[R, d_sae]`` buffers then fit in one tile's budget anyway.
    """
    if tile is None:
        tile = default_tile(x.shape[0], top_k + feat.shape[1])
        if tile >= sae.cfg.d_sae:
            return read_reference(sae, x, feat, mode, value, top_k, watch)
    if not tiled(sae):
        return read_reference(sae, x, feat, mode, value, top_k, watch)
    name = sae.cfg.architecture
    d_sae = sae.cfg.d_sae
    K = feat.shape[1]
    xin = ops.sae_input(sae, x)
    need = torch.cat([feat, watch], dim=1)  # [R, K + W] columns whose activation is recorded
    if top_k == 0 and not registry.get(name).needs_full_preactivation:
        # Nothing to rank: the gathered encoder columns are all that is needed.
        need_act = ops.feature_activations(sae, x, need)
        return _finish(need_act[:, :0], feat[:, :0], need_act, feat, mode, value, watch, 0)
    if name in ("topk", "abstopk"):
        assert sae.cfg.k is not None, f"{name} SAE without k"
        k_sae = sae.cfg.k
        M = min(d_sae, k_sae + top_k + K)
        _, pre_v, ids, pre_need = _walk_ranked(sae, xin, need, M, tile, name == "abstopk")
        # The k_sae best-ranked features are the members (exactly k_sae, as ``activate``).
        member_ids = ids[:, :k_sae]  # [R, k_sae]
        rank = torch.arange(M, device=x.device)
        cand_v = _ranked_act(name, pre_v, rank < k_sae)
        need_member = _member(member_ids.sort(dim=1).values, need)  # [R, K + W]
        need_act = _ranked_act(name, pre_need, need_member)
    else:
        if name == "groupmax":
            assert sae.cfg.k is not None, "groupmax SAE without k"
            g = d_sae // sae.cfg.k
            tile = g * max(1, tile // g)  # whole groups per tile
        C = min(d_sae, top_k + K)
        cand_v, ids, need_act = _walk_elementwise(sae, xin, need, C, tile)
    return _finish(cand_v, ids, need_act, feat, mode, value, watch, top_k)


def _walk_elementwise(sae: SAE, xin: torch.Tensor, need: torch.Tensor, C: int, tile: int):
    """Top-C activations per row (values, feature ids; any order) and the activations at
    ``need`` (element-wise rules)."""
    arch = registry.get(sae.cfg.architecture)
    d_sae = sae.cfg.d_sae
    need_act = xin.new_zeros(need.shape)
    vals, ids = [], []
    for lo in range(0, d_sae, tile):
        hi = min(lo + tile, d_sae)
        pre = xin @ sae.W_enc[:, lo:hi] + sae.b_enc[lo:hi]  # [R, w]
        if arch.name == "groupmax":
            acts = _groupmax(sae, pre)
        else:
            cols = torch.arange(lo, hi, device=xin.device)
            acts = arch.activate_columns(sae, pre, cols, None, xin)
        need_act = _record(need_act, acts, need, lo, hi, d_sae)
        tv, ti = acts.topk(min(C, hi - lo), dim=1, sorted=False)
        vals.append(tv)
        ids.append(ti)
    v, i = _tile_candidates(vals, ids, tile)  # [R, n_tiles * C]
    top_v, pos = v.topk(min(C, v.shape[1]), dim=1, sorted=False)
    return top_v, i.gather(1, pos), need_act


def _walk_ranked(sae: SAE, xin: torch.Tensor, need: torch.Tensor, M: int, tile: int,
                 absolute: bool):
    """Top-M by ranking score in rank order, with the pre-activations of those features, and
    the pre-activations at ``need`` (TopK, AbsTopK)."""
    d_sae = sae.cfg.d_sae
    pre_need = xin.new_zeros(need.shape)
    scores, pres, ids = [], [], []
    for lo in range(0, d_sae, tile):
        hi = min(lo + tile, d_sae)
        pre = xin @ sae.W_enc[:, lo:hi] + sae.b_enc[lo:hi]  # [R, w]
        score = pre.abs() if absolute else (
            pre if sae.rank_scale is None else pre * sae.rank_scale[lo:hi])
        pre_need = _record(pre_need, pre, need, lo, hi, d_sae)
        tv, ti = score.topk(min(M, hi - lo), dim=1, sorted=False)
        scores.append(tv)
        pres.append(pre.gather(1, ti))
        ids.append(ti)
    s, i = _tile_candidates(scores, ids, tile)
    top_s, pos = s.topk(min(M, s.shape[1]), dim=1)  # sorted: rank order decides membership
    return top_s, torch.cat(pres, dim=1).gather(1, pos), i.gather(1, pos), pre_need


def _tile_candidates(vals: list[torch.Tensor], ids: list[torch.Tensor], tile: int):
    """Per-tile candidates side by side, tile-local column ids made global.

    One concatenation and one ``topk`` at the end instead of a merge per tile: on a busy
    CPU every op large enough to go parallel costs a scheduling slice.
    """
    if len(vals) == 1:
        return vals[0], ids[0]
    i = torch.cat(ids, dim=1)
    offsets = torch.cat([torch.full((t.shape[1],), j * tile, dtype=i.dtype, device=i.device)
                         for j, t in enumerate(ids)])  # device fills: no host-built tensor
    return torch.cat(vals, dim=1), i + offsets


def _ranked_act(name: str, pre: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    return pre * member if name == "abstopk" else torch.relu(pre) * member


def _groupmax(sae: SAE, pre: torch.Tensor) -> torch.Tensor:
    """``groupmax.activate`` on a tile of whole groups."""
    assert sae.cfg.k is not None
    g = sae.cfg.d_sae // sae.cfg.k
    acts = torch.relu(pre)
    gmax = acts.unflatten(-1, (acts.shape[-1] // g, g)).amax(dim=-1)
    return acts * (acts >= gmax.repeat_interleave(g, dim=-1))


def _record(buf: torch.Tensor, tile_v: torch.Tensor, cols: torch.Tensor, lo: int, hi: int,
            d_sae: int):
    """``buf`` with the entries whose column falls in [lo, hi) taken from ``tile_v``."""
    if lo == 0 and hi == d_sae:  # one tile holds every column
        return tile_v.gather(1, cols)
    inside = (cols >= lo) & (cols < hi)
    got = tile_v.gather(1, (cols - lo).clamp(0, hi - lo - 1))
    return torch.where(inside, got, buf)


def _finish(cand_v, cand_i, need_act, feat, mode, value, watch, top_k: int):
    """Apply the row's edits to the candidates and the watch list; take the top_k.

    ``cand_v/cand_i [R, C]`` are unedited activations and feature ids, ``need_act
    [R, K + W]`` the unedited activations at ``feat [R, K]`` then ``watch [R, W]``.
    Membership tests sort the K edits per row and binary-search them: no ``[R, C, K]``
    broadcast (on a busy 2-core host every op big enough to go parallel costs a
    scheduling slice).
    """
    K = feat.shape[1]
    act_e, act_w = need_act[:, :K], need_act[:, K:]
    if K == 0:
        vals, pos = cand_v.topk(top_k, dim=1)
        return vals, cand_i.gather(1, pos), act_w
    new = ops.edited_values(mode, value.to(act_e.dtype), act_e)  # [R, K]
    real = mode != ops.Mode.NONE
    # Edits sorted by feature, stably, so that the last real edit of a feature ends its run:
    # that one is kept (the last write wins, as in ops.read_latents); -1 marks no edit.
    fs, order = torch.where(real, feat, -1).sort(dim=1, stable=True)  # [R, K]
    run_end = torch.cat([fs[:, 1:] != fs[:, :-1], torch.ones_like(fs[:, :1], dtype=torch.bool)], 1)
    keep = torch.zeros_like(real).scatter_(1, order, run_end & (fs >= 0))  # [R, K]
    edited = _member(fs, cand_i)  # [R, C] the candidate is edited: its value comes from `new`
    ninf = torch.full_like(new, -float("inf"))
    v = torch.cat([cand_v.masked_fill(edited, -float("inf")), torch.where(keep, new, ninf)], dim=1)
    i = torch.cat([cand_i, feat], dim=1)
    vals, pos = v.topk(top_k, dim=1)
    # A watched feature that is edited reads as its kept edited value.
    ks, korder = torch.where(keep, feat, -1).sort(dim=1)
    at = torch.searchsorted(ks, watch.contiguous()).clamp(max=K - 1)  # [R, W]
    hit = ks.gather(1, at) == watch
    watched = torch.where(hit, new.gather(1, korder.gather(1, at)), act_w)
    return vals, i.gather(1, pos), watched


def _member(sorted_ids: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``ids [R, n]`` found in the row's ``sorted_ids [R, m]`` (ascending, m >= 1)."""
    at = torch.searchsorted(sorted_ids, ids.contiguous()).clamp(max=sorted_ids.shape[1] - 1)
    return sorted_ids.gather(1, at) == ids
