"""Steering vectors fitted from contrastive examples (``TrainVector``): pure numpy, arrays in,
arrays out, no engine in it.

The server reads each prompt's activation at one site (``blocks.L.hook_resid_post``, the
last token or the mean over a selector) and hands this module ``pos [n_pos, d]`` and
``neg [n_neg, d]`` per layer:

- ``MEAN_DIFF`` (CAA, Rimsky et al.): ``mean(pos) - mean(neg)``; pairs or two sets of any
  sizes;
- ``PCA`` (repeng's ``pca_diff``): the first principal component of the paired differences
  ``pos[i] - neg[i]`` (centred, as ``sklearn.decomposition.PCA`` centres), unit norm. Its
  sign is repeng's: flipped when fewer pairs have ``pos[i]`` projecting above ``neg[i]``
  than below (a tie is broken by the mean projections), so positives project higher.

``normalize`` scales a MEAN_DIFF vector to unit norm (a PCA one is unit already).

Separation statistics (``separation``), computed on the unit direction ``v / |v|``: the
mean projection of the positives and of the negatives, and the accuracy of the projection
as a probe (threshold halfway between the two means) on all examples, and on held-out
examples: every ``HOLDOUT_EVERY``-th example of each side (indices ``i % HOLDOUT_EVERY ==
HOLDOUT_EVERY - 1``, so a pair stays together) is held out, the direction is fitted on the
rest with the same method, and the held-out examples are classified with the threshold of
the training part. With fewer than ``HOLDOUT_EVERY`` examples on a side nothing is held
out (``held_out == 0``, accuracy NaN). The returned vector is always fitted on every example.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class Method(IntEnum):
    """Numbers match ``steering.v1.VectorMethod``."""

    MEAN_DIFF = 1
    PCA = 2


HOLDOUT_EVERY = 5
"""Every 5th example of each side (20%) is held out for the held-out accuracy."""


@dataclass(frozen=True)
class Separation:
    """How well one layer's vector separates the examples (module doc)."""

    mean_positive: float  # mean projection of the positives on the unit direction
    mean_negative: float
    accuracy: float  # the probe (threshold halfway between the means) on every example
    held_out_accuracy: float  # fitted without the held-out examples, scored on them; NaN if none
    held_out: int  # held-out examples, both sides together


def _check(pos: np.ndarray, neg: np.ndarray, method: Method) -> None:
    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1]:
        raise ValueError(f"pos and neg must be [n, d] with the same d; got {pos.shape}, {neg.shape}")
    if not len(pos) or not len(neg):
        raise ValueError("give at least one positive and one negative")
    if method is Method.PCA and len(pos) != len(neg):
        raise ValueError(f"PCA takes pairs: {len(pos)} positives, {len(neg)} negatives")


def fit(pos: np.ndarray, neg: np.ndarray, method: Method, normalize: bool = False) -> np.ndarray:
    """The steering vector ``[d]`` float32 of ``pos [n, d]`` over ``neg [m, d]`` (module doc).

    PCA needs ``n == m`` (pairs, ``pos[i]`` with ``neg[i]``) and at least two pairs' worth
    of spread; a zero spread gives the mean difference's direction."""
    method = Method(method)
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    _check(pos, neg, method)
    if method is Method.MEAN_DIFF:
        v = pos.mean(0) - neg.mean(0)
        if normalize:
            n = np.linalg.norm(v)
            v = v / n if n > 0 else v
        return v.astype(np.float32)
    diffs = pos - neg  # [n, d]
    centred = diffs - diffs.mean(0)
    if not np.any(centred):  # one pair, or identical differences: no principal component
        v = diffs.mean(0)
    else:
        v = np.linalg.svd(centred, full_matrices=False)[2][0]  # first right singular vector
    n = np.linalg.norm(v)
    v = v / n if n > 0 else v
    pp, pn = pos @ v, neg @ v
    above, below = np.mean(pp > pn), np.mean(pp < pn)
    if below > above or (below == above and pp.mean() < pn.mean()):
        v = -v
    return v.astype(np.float32)


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def _probe(v: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> tuple[float, float, float]:
    """Mean projections of ``pos`` and ``neg`` on ``v``'s direction and the threshold."""
    u = _unit(np.asarray(v, np.float64))
    mp, mn = float((pos @ u).mean()), float((neg @ u).mean())
    return mp, mn, (mp + mn) / 2


def _accuracy(u: np.ndarray, threshold: float, pos: np.ndarray, neg: np.ndarray) -> float:
    right = np.sum(pos @ u > threshold) + np.sum(neg @ u < threshold)
    return float(right / (len(pos) + len(neg)))


def holdout_mask(n: int) -> np.ndarray:
    """``[n]`` bool: the examples held out (every ``HOLDOUT_EVERY``-th; none when n < 5)."""
    i = np.arange(n)
    return (i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) if n >= HOLDOUT_EVERY else np.zeros(n, bool)


def separation(v: np.ndarray, pos: np.ndarray, neg: np.ndarray, method: Method,
               normalize: bool = False) -> Separation:
    """``v``'s separation of ``pos`` and ``neg`` and the held-out accuracy of ``method``
    fitted without the held-out examples (module doc)."""
    method = Method(method)
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    mp, mn, thr = _probe(v, pos, neg)
    acc = _accuracy(_unit(np.asarray(v, np.float64)), thr, pos, neg)
    hp, hn = holdout_mask(len(pos)), holdout_mask(len(neg))
    if not hp.any() or not hn.any():
        return Separation(mp, mn, acc, float("nan"), 0)
    w = fit(pos[~hp], neg[~hn], method, normalize).astype(np.float64)
    _, _, t = _probe(w, pos[~hp], neg[~hn])
    held = _accuracy(_unit(w), t, pos[hp], neg[hn])
    return Separation(mp, mn, acc, held, int(hp.sum() + hn.sum()))
