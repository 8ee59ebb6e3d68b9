"""rand_scores: hand-computed Rand pair counts, invariance, skimage agreement, the threshold sweep."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from unet_core.evaluate.rand_scores import rand_pair_counts, rand_sweep
from unet_core.evaluate.score_inputs import best_index, connected_components

skimage_metrics = pytest.importorskip("skimage.metrics")

RNG = np.random.default_rng(7)


def test_rand_perfect_and_relabelled_is_zero():
    truth = np.array([[1, 1, 0, 2, 2],
                      [1, 1, 0, 2, 2]])
    pred = np.where(truth == 1, 9, np.where(truth == 2, 4, 0))
    c = rand_pair_counts(truth, pred)
    # same_true = 2 segments of 4 pixels = 2 * 6 pairs
    assert (c.same_both, c.same_true, c.same_pred) == (12, 12, 12)
    assert c.error == 0.0


def test_rand_known_split():
    truth = np.array([[0, 1, 1, 1, 1, 0]])
    pred = np.array([[0, 1, 1, 2, 2, 0]])  # one cell of 4 pixels cut into 2 + 2
    c = rand_pair_counts(truth, pred)
    # true pairs C(4,2) = 6; predicted pairs 1 + 1 = 2, both kept together in the truth
    assert (c.same_both, c.same_true, c.same_pred) == (2, 6, 2)
    assert c.precision == 1.0  # a split merges nothing
    assert c.recall == pytest.approx(2 / 6)
    assert c.error == pytest.approx(1 - 2 * 2 / (6 + 2))  # 0.5


def test_rand_known_merge():
    truth = np.array([[1, 1, 0, 2, 2]])  # two cells separated by a membrane pixel
    pred = np.array([[3, 3, 3, 3, 3]])  # membrane missed: one segment
    c = rand_pair_counts(truth, pred)
    # only ground-truth foreground pixels count: 4 of them, all in one predicted segment
    assert (c.same_both, c.same_true, c.same_pred) == (2, 2, 6)
    assert c.precision == pytest.approx(2 / 6)
    assert c.recall == 1.0
    assert c.error == pytest.approx(0.5)


def test_rand_empty_prediction():
    truth = np.array([[1, 1, 0, 2, 2]])
    pred = np.zeros_like(truth)
    # ISBI: predicted background inside the truth's foreground is singletons -> nothing agrees
    c = rand_pair_counts(truth, pred, pred_background="singletons")
    assert (c.same_both, c.same_pred) == (0, 0)
    assert c.error == 1.0
    # skimage: label 0 is one segment -> it looks like a total merge
    s = rand_pair_counts(truth, pred, pred_background="segment")
    assert (s.same_both, s.same_true, s.same_pred) == (2, 2, 6)
    # nothing in the truth either: no pairs at all is a perfect score
    assert rand_pair_counts(np.zeros((3, 3), int), np.zeros((3, 3), int)).error == 0.0


@pytest.mark.parametrize("mode", [pytest.param("singletons", id="isbi"), pytest.param("segment", id="skimage")])
def test_rand_invariant_to_label_permutation(mode):
    truth = RNG.integers(0, 8, (30, 30))
    pred = RNG.integers(0, 6, (30, 30))
    base = rand_pair_counts(truth, pred, pred_background=mode)
    perm_t = np.concatenate([[0], RNG.permutation(np.arange(1, 8)) * 1000 + 7])  # keeps 0 = background
    perm_p = np.concatenate([[0], RNG.permutation(np.arange(1, 6)) + 40_000])
    assert rand_pair_counts(perm_t[truth], perm_p[pred], pred_background=mode) == base


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"seed{s}") for s in range(4)])
def test_rand_agrees_with_skimage(seed):
    rng = np.random.default_rng(seed)
    truth = ndimage.label(ndimage.uniform_filter(rng.random((48, 40)), 5) > 0.5)[0]
    pred = ndimage.label(ndimage.uniform_filter(rng.random((48, 40)), 5) > 0.45)[0]
    ours = rand_pair_counts(truth, pred, pred_background="segment")
    error, sk_precision, sk_recall = skimage_metrics.adapted_rand_error(truth, pred)
    assert ours.error == pytest.approx(error, abs=1e-12)
    # skimage's precision/recall are computed from the other side's segment sizes
    assert ours.precision == pytest.approx(sk_recall, abs=1e-12)
    assert ours.recall == pytest.approx(sk_precision, abs=1e-12)
    # ISBI's singleton handling = skimage after giving every predicted background pixel its own label
    singles = pred.copy()
    zero = singles == 0
    singles[zero] = pred.max() + 1 + np.arange(zero.sum())
    isbi = rand_pair_counts(truth, pred, pred_background="singletons")
    assert isbi.error == pytest.approx(skimage_metrics.adapted_rand_error(truth, singles)[0], abs=1e-12)


def test_rand_modes_differ_only_where_prediction_has_background_inside_truth():
    truth = np.array([[1, 1, 1, 0, 2, 2, 2]])
    pred_no_gap = np.array([[5, 5, 5, 0, 6, 6, 6]])  # background only where the truth has it
    a = rand_pair_counts(truth, pred_no_gap, pred_background="singletons")
    b = rand_pair_counts(truth, pred_no_gap, pred_background="segment")
    assert a == b and a.error == 0.0
    pred_gaps = np.array([[5, 0, 5, 0, 6, 0, 6]])  # membrane predicted inside both cells
    a = rand_pair_counts(truth, pred_gaps, pred_background="singletons")
    b = rand_pair_counts(truth, pred_gaps, pred_background="segment")
    assert a.error < b.error  # skimage sees the two gap pixels as one segment merging both cells


def test_rand_sweep_picks_the_threshold_that_closes_the_membrane():
    truth = np.zeros((5, 9), np.int32)
    truth[:, :4] = 1
    truth[:, 5:] = 2
    prob = np.where(truth > 0, 0.9, 0.0).astype(np.float32)
    prob[:, 4] = 0.4  # a faint membrane: open below 0.4, closed above
    thresholds = [0.2, 0.5, 0.95]
    sweep = rand_sweep(prob, truth, thresholds=thresholds)
    # 0.2: both cells one component -> merge; C(20,2)*2 = 380 true pairs, 20+20 pixels merged
    assert sweep[0].same_pred == 40 * 39 // 2 and sweep[0].error > 0
    assert sweep[1].error == 0.0
    assert sweep[2].error == 1.0  # nothing above 0.95: everything is a singleton
    assert best_index([c.error for c in sweep]) == 1
    for t, c in zip(thresholds, sweep, strict=True):
        assert c == rand_pair_counts(truth, connected_components(prob > t))


def test_components_connectivity():
    mask = np.array([[1, 0], [0, 1]], bool)
    assert connected_components(mask, connectivity=4).max() == 2
    assert connected_components(mask, connectivity=8).max() == 1
    with pytest.raises(ValueError, match="connectivity"):
        connected_components(mask, connectivity=6)
