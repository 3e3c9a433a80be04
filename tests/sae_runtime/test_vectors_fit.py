"""``sae_runtime.training.vectors_fit`` (TrainVector's math) against independent references:
the mean difference in torch, the PCA direction against ``torch.linalg.eigh`` of the
difference covariance and against ``sklearn.decomposition.PCA`` (what repeng calls), the
sign rule, and the separation statistics on data whose answer is known. The same math on
the engine's activations vs HF and repeng: tests/e2e/test_train_vectors.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_runtime.errors import InvalidRequestError
from sae_runtime.spec.budget import MAX_TRAIN_LAYERS, MAX_TRAIN_PROMPTS, check_train
from sae_runtime.training.vectors_fit import HOLDOUT_EVERY, Method, fit, holdout_mask, separation

D = 48


def _pairs(n: int, seed: int = 0, shift: float = 2.0):
    """Pairs whose differences vary most along ``axis`` and are shifted along it."""
    g = np.random.default_rng(seed)
    axis = g.normal(size=D)
    axis /= np.linalg.norm(axis)
    base = g.normal(size=(n, D))
    diffs = np.outer(shift + 3.0 * g.normal(size=n), axis) + 0.1 * g.normal(size=(n, D))
    return base + diffs, base, axis


def test_mean_diff_is_the_difference_of_the_means():
    g = np.random.default_rng(1)
    pos, neg = g.normal(1, 1, (7, D)), g.normal(0, 1, (4, D))  # two sets of other sizes
    want = torch.from_numpy(pos).mean(0) - torch.from_numpy(neg).mean(0)
    np.testing.assert_allclose(fit(pos, neg, Method.MEAN_DIFF), want.numpy(), rtol=1e-6, atol=1e-6)
    unit = fit(pos, neg, Method.MEAN_DIFF, normalize=True)
    np.testing.assert_allclose(unit, (want / want.norm()).numpy(), rtol=1e-5, atol=1e-6)


def test_pca_is_the_first_component_of_the_centred_differences():
    pos, neg, axis = _pairs(20)
    v = fit(pos, neg, Method.PCA)
    d = torch.from_numpy(pos - neg)
    d = d - d.mean(0)
    _, vecs = torch.linalg.eigh(d.T @ d)  # ascending eigenvalues
    top = vecs[:, -1].numpy()
    assert abs(np.linalg.norm(v) - 1) < 1e-6
    np.testing.assert_allclose(np.abs(v @ top), 1.0, atol=1e-5)
    assert v @ axis > 0.99, "the direction is the one the differences vary along"


def test_pca_matches_sklearn_as_repeng_calls_it():
    decomposition = pytest.importorskip("sklearn.decomposition")
    pos, neg, _ = _pairs(16, seed=3)
    comp = decomposition.PCA(n_components=1, whiten=False).fit(pos - neg).components_[0]
    v = fit(pos, neg, Method.PCA)
    np.testing.assert_allclose(np.abs(v @ comp), 1.0, atol=1e-5)


def test_the_sign_makes_positives_project_higher():
    pos, neg, axis = _pairs(15, seed=4)
    for method in Method:
        v = fit(pos, neg, method)
        assert np.mean(pos @ v > neg @ v) > 0.5
        swapped = fit(neg, pos, method)
        np.testing.assert_allclose(swapped, -v, rtol=1e-5, atol=1e-6)


def test_pca_sign_is_repengs_majority_of_pairs_not_the_means():
    # 3 of 4 pairs project slightly higher on +e0; one pair is far lower: the means say -e0,
    # repeng's vote (and ours) says +e0
    e0 = np.eye(D)[0]
    neg = np.zeros((4, D))
    pos = np.outer([1.0, 1.2, 0.8, -30.0], e0)
    v = fit(pos, neg, Method.PCA)
    assert v @ e0 > 0.99


def test_separation_on_separable_data_and_the_holdout_split():
    pos, neg, axis = _pairs(10, seed=5, shift=6.0)
    mu = 5 * axis
    pos, neg = pos - pos.mean(0) + mu, neg - neg.mean(0) - mu
    for method in Method:
        v = fit(pos, neg, method)
        s = separation(v, pos, neg, method)
        u = v / np.linalg.norm(v)
        assert s.mean_positive == pytest.approx(float((pos @ u).mean()))
        assert s.mean_negative == pytest.approx(float((neg @ u).mean()))
        assert s.mean_positive > s.mean_negative
        assert s.accuracy == 1.0 and s.held_out_accuracy == 1.0
        assert s.held_out == 4  # indices 4 and 9 of each side
    assert list(np.flatnonzero(holdout_mask(10))) == [4, 9]
    assert not holdout_mask(HOLDOUT_EVERY - 1).any()


def test_held_out_accuracy_is_scored_on_examples_the_fit_did_not_see():
    # Training examples separate along e0; the held-out ones (4, 9, 14, 19) lie the other
    # way on e0 but far apart on e1. A fit that saw them would lean to e1 and call them
    # right; one that did not (the contract) calls every one of them wrong.
    e0, e1 = np.eye(D)[0], np.eye(D)[1]
    pos, neg = np.tile(e0, (20, 1)), np.tile(-e0, (20, 1))
    held = holdout_mask(20)
    pos[held], neg[held] = -0.5 * e0 + 10 * e1, 0.5 * e0 - 10 * e1
    for method in Method:
        s = separation(fit(pos, neg, method), pos, neg, method)
        assert s.held_out == 8 and s.held_out_accuracy == 0.0, method


def test_too_few_to_hold_out():
    pos, neg, _ = _pairs(3)
    s = separation(fit(pos, neg, Method.PCA), pos, neg, Method.PCA)
    assert s.held_out == 0 and np.isnan(s.held_out_accuracy)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="pairs"):
        fit(np.zeros((3, D)), np.zeros((2, D)), Method.PCA)
    with pytest.raises(ValueError, match="same d"):
        fit(np.zeros((3, D)), np.zeros((3, D + 1)), Method.MEAN_DIFF)


@pytest.mark.parametrize("args, field", [
    ((0, 3, [1]), "positive"),
    ((3, 0, [1]), "negative"),
    ((MAX_TRAIN_PROMPTS + 1, 3, [1]), "positive"),
    ((3, MAX_TRAIN_PROMPTS + 1, [1]), "negative"),
    ((3, 3, []), "layers"),
    ((3, 3, list(range(MAX_TRAIN_LAYERS + 1))), "layers"),
    ((3, 3, [1, 2, 1]), r"layers\[2\]"),
])
def test_check_train_names_the_field(args, field):
    with pytest.raises(InvalidRequestError, match=f"^{field}: "):
        check_train(*args, paired=False, max_reads=64)


def test_check_train_pairs_and_the_read_cap():
    with pytest.raises(InvalidRequestError, match="^negative: PCA takes pairs"):
        check_train(3, 4, [1], paired=True, max_reads=8)
    check_train(3, 4, [1], paired=False, max_reads=8)
    with pytest.raises(InvalidRequestError, match="^layers: 3 layers given.*at most 2.*"
                                                  "--max-activation-reads"):
        check_train(3, 3, [0, 1, 2], paired=False, max_reads=2)
