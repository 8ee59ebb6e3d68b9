"""metrics: hand-computed scores on tiny arrays, skimage agreement, topology of the warping error."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from unet_core.evaluate import metrics as m

skimage_metrics = pytest.importorskip("skimage.metrics")

RNG = np.random.default_rng(7)


# --------------------------------------------------------------------------- pixels
def test_confusion_iou_dice_hand_computed():
    truth = np.array([[0, 0, 1, 1],
                      [0, 1, 1, 1]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 0, 1, 1]])
    cm = m.confusion_matrix(truth, pred)
    # background: 2 right (0,0),(1,0); 1 bg->cell (0,1). cell: 4 right, 1 cell->bg (1,1)
    np.testing.assert_array_equal(cm, [[2, 1], [1, 4]])
    assert m.pixel_error(cm) == pytest.approx(2 / 8)
    # IoU background 2 / (3 + 3 - 2) = 0.5; cell 4 / (5 + 5 - 4) = 2/3
    np.testing.assert_allclose(m.class_iou(cm), [0.5, 2 / 3])
    # Dice background 2*2 / 6, cell 2*4 / 10
    np.testing.assert_allclose(m.class_dice(cm), [4 / 6, 0.8])


def test_perfect_prediction_pixels():
    truth = (RNG.random((16, 16)) > 0.5).astype(np.uint8)
    cm = m.confusion_matrix(truth, truth)
    assert m.pixel_error(cm) == 0.0
    np.testing.assert_array_equal(m.class_iou(cm), [1.0, 1.0])
    np.testing.assert_array_equal(m.class_dice(cm), [1.0, 1.0])


def test_empty_prediction_pixels():
    truth = np.zeros((4, 4), np.uint8)
    truth[1:3, 1:3] = 1
    cm = m.confusion_matrix(truth, np.zeros_like(truth))
    assert m.pixel_error(cm) == pytest.approx(4 / 16)
    assert m.class_iou(cm)[1] == 0.0 and m.class_dice(cm)[1] == 0.0
    # nothing to find and nothing found: a perfect score, not NaN
    empty = m.confusion_matrix(np.zeros((3, 3), int), np.zeros((3, 3), int))
    assert m.class_iou(empty)[1] == 1.0 and m.class_dice(empty)[1] == 1.0


def test_confusion_rejects_bad_input():
    with pytest.raises(ValueError, match="same"):
        m.confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="outside"):
        m.confusion_matrix(np.zeros((2, 2), int), np.full((2, 2), 2))
    with pytest.raises(ValueError, match="2-D"):
        m.confusion_matrix(np.zeros((2, 2, 2), int), np.zeros((2, 2, 2), int))


def test_threshold_counts_match_direct_thresholding():
    prob = RNG.random((20, 30)).astype(np.float32)
    prob[0, :5] = [0.0, 0.1, 0.5, 1.0, 0.3]  # exact threshold values: "> t" is strict
    truth = RNG.random((20, 30)) > 0.4
    thresholds = [0.0, 0.1, 0.3, 0.5, 0.9, 1.0]
    for t, c in zip(thresholds, m.threshold_counts(prob, truth, thresholds=thresholds), strict=True):
        pred = prob > t
        assert (c.tp, c.fp, c.fn, c.tn) == (
            int((pred & truth).sum()), int((pred & ~truth).sum()),
            int((~pred & truth).sum()), int((~pred & ~truth).sum()),
        )
        assert c.pixel_error == pytest.approx(float((pred != truth).mean()))
    assert m.threshold_counts(prob, truth, thresholds=[1.0])[0].tp == 0


# --------------------------------------------------------------------------- Rand
def test_rand_perfect_and_relabelled_is_zero():
    truth = np.array([[1, 1, 0, 2, 2],
                      [1, 1, 0, 2, 2]])
    pred = np.where(truth == 1, 9, np.where(truth == 2, 4, 0))
    c = m.rand_pair_counts(truth, pred)
    # same_true = 2 segments of 4 pixels = 2 * 6 pairs
    assert (c.same_both, c.same_true, c.same_pred) == (12, 12, 12)
    assert c.error == 0.0


def test_rand_known_split():
    truth = np.array([[0, 1, 1, 1, 1, 0]])
    pred = np.array([[0, 1, 1, 2, 2, 0]])  # one cell of 4 pixels cut into 2 + 2
    c = m.rand_pair_counts(truth, pred)
    # true pairs C(4,2) = 6; predicted pairs 1 + 1 = 2, both kept together in the truth
    assert (c.same_both, c.same_true, c.same_pred) == (2, 6, 2)
    assert c.precision == 1.0  # a split merges nothing
    assert c.recall == pytest.approx(2 / 6)
    assert c.error == pytest.approx(1 - 2 * 2 / (6 + 2))  # 0.5


def test_rand_known_merge():
    truth = np.array([[1, 1, 0, 2, 2]])  # two cells separated by a membrane pixel
    pred = np.array([[3, 3, 3, 3, 3]])  # membrane missed: one segment
    c = m.rand_pair_counts(truth, pred)
    # only ground-truth foreground pixels count: 4 of them, all in one predicted segment
    assert (c.same_both, c.same_true, c.same_pred) == (2, 2, 6)
    assert c.precision == pytest.approx(2 / 6)
    assert c.recall == 1.0
    assert c.error == pytest.approx(0.5)


def test_rand_empty_prediction():
    truth = np.array([[1, 1, 0, 2, 2]])
    pred = np.zeros_like(truth)
    # ISBI: predicted background inside the truth's foreground is singletons -> nothing agrees
    c = m.rand_pair_counts(truth, pred, pred_background="singletons")
    assert (c.same_both, c.same_pred) == (0, 0)
    assert c.error == 1.0
    # skimage: label 0 is one segment -> it looks like a total merge
    s = m.rand_pair_counts(truth, pred, pred_background="segment")
    assert (s.same_both, s.same_true, s.same_pred) == (2, 2, 6)
    # nothing in the truth either: no pairs at all is a perfect score
    assert m.rand_pair_counts(np.zeros((3, 3), int), np.zeros((3, 3), int)).error == 0.0


@pytest.mark.parametrize("mode", [pytest.param("singletons", id="isbi"), pytest.param("segment", id="skimage")])
def test_rand_invariant_to_label_permutation(mode):
    truth = RNG.integers(0, 8, (30, 30))
    pred = RNG.integers(0, 6, (30, 30))
    base = m.rand_pair_counts(truth, pred, pred_background=mode)
    perm_t = np.concatenate([[0], RNG.permutation(np.arange(1, 8)) * 1000 + 7])  # keeps 0 = background
    perm_p = np.concatenate([[0], RNG.permutation(np.arange(1, 6)) + 40_000])
    assert m.rand_pair_counts(perm_t[truth], perm_p[pred], pred_background=mode) == base


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"seed{s}") for s in range(4)])
def test_rand_agrees_with_skimage(seed):
    rng = np.random.default_rng(seed)
    truth = ndimage.label(ndimage.uniform_filter(rng.random((48, 40)), 5) > 0.5)[0]
    pred = ndimage.label(ndimage.uniform_filter(rng.random((48, 40)), 5) > 0.45)[0]
    ours = m.rand_pair_counts(truth, pred, pred_background="segment")
    error, sk_precision, sk_recall = skimage_metrics.adapted_rand_error(truth, pred)
    assert ours.error == pytest.approx(error, abs=1e-12)
    # skimage's precision/recall are computed from the other side's segment sizes
    assert ours.precision == pytest.approx(sk_recall, abs=1e-12)
    assert ours.recall == pytest.approx(sk_precision, abs=1e-12)
    # ISBI's singleton handling = skimage after giving every predicted background pixel its own label
    singles = pred.copy()
    zero = singles == 0
    singles[zero] = pred.max() + 1 + np.arange(zero.sum())
    isbi = m.rand_pair_counts(truth, pred, pred_background="singletons")
    assert isbi.error == pytest.approx(skimage_metrics.adapted_rand_error(truth, singles)[0], abs=1e-12)


def test_rand_modes_differ_only_where_prediction_has_background_inside_truth():
    truth = np.array([[1, 1, 1, 0, 2, 2, 2]])
    pred_no_gap = np.array([[5, 5, 5, 0, 6, 6, 6]])  # background only where the truth has it
    a = m.rand_pair_counts(truth, pred_no_gap, pred_background="singletons")
    b = m.rand_pair_counts(truth, pred_no_gap, pred_background="segment")
    assert a == b and a.error == 0.0
    pred_gaps = np.array([[5, 0, 5, 0, 6, 0, 6]])  # membrane predicted inside both cells
    a = m.rand_pair_counts(truth, pred_gaps, pred_background="singletons")
    b = m.rand_pair_counts(truth, pred_gaps, pred_background="segment")
    assert a.error < b.error  # skimage sees the two gap pixels as one segment merging both cells


def test_rand_sweep_picks_the_threshold_that_closes_the_membrane():
    truth = np.zeros((5, 9), np.int32)
    truth[:, :4] = 1
    truth[:, 5:] = 2
    prob = np.where(truth > 0, 0.9, 0.0).astype(np.float32)
    prob[:, 4] = 0.4  # a faint membrane: open below 0.4, closed above
    thresholds = [0.2, 0.5, 0.95]
    sweep = m.rand_sweep(prob, truth, thresholds=thresholds)
    # 0.2: both cells one component -> merge; C(20,2)*2 = 380 true pairs, 20+20 pixels merged
    assert sweep[0].same_pred == 40 * 39 // 2 and sweep[0].error > 0
    assert sweep[1].error == 0.0
    assert sweep[2].error == 1.0  # nothing above 0.95: everything is a singleton
    assert m.best_index([c.error for c in sweep]) == 1
    for t, c in zip(thresholds, sweep, strict=True):
        assert c == m.rand_pair_counts(truth, m.connected_components(prob > t))


def test_components_connectivity():
    mask = np.array([[1, 0], [0, 1]], bool)
    assert m.connected_components(mask, connectivity=4).max() == 2
    assert m.connected_components(mask, connectivity=8).max() == 1
    with pytest.raises(ValueError, match="connectivity"):
        m.connected_components(mask, connectivity=6)


# --------------------------------------------------------------------------- objects
def test_objects_perfect_split_merge_empty():
    truth = np.zeros((6, 12), np.int32)
    truth[1:5, 1:5] = 1  # 16 px
    truth[1:5, 7:11] = 2  # 16 px
    perfect = m.match_objects(truth, truth * 3)
    assert (perfect.tp, perfect.fp, perfect.fn, perfect.f1, perfect.seg) == (2, 0, 0, 1.0, 1.0)

    split = truth.copy()
    split[1:5, 3:5] = np.where(truth[1:5, 3:5] == 1, 5, 0)  # cell 1 cut into halves of 8 px: IoU 0.5 each
    s = m.match_objects(truth, split)
    assert (s.tp, s.fp, s.fn) == (1, 2, 1)  # IoU exactly 0.5 is no match (strict)
    assert s.precision == pytest.approx(1 / 3) and s.recall == pytest.approx(1 / 2)
    # SEG: no half covers > 50 % of cell 1 -> 0; cell 2 -> 1
    assert s.seg == pytest.approx(0.5)

    merged = np.zeros_like(truth)
    merged[1:5, 1:11] = 1  # one object of 40 px over both cells: IoU 16/40 each
    mm = m.match_objects(truth, merged)
    assert (mm.tp, mm.fp, mm.fn, mm.seg) == (0, 1, 2, pytest.approx(0.4))

    empty = m.match_objects(truth, np.zeros_like(truth))
    assert (empty.precision, empty.recall, empty.f1, empty.seg) == (0.0, 0.0, 0.0, 0.0)
    nothing = m.match_objects(np.zeros_like(truth), np.zeros_like(truth))
    assert (nothing.precision, nothing.recall, nothing.f1, nothing.seg) == (1.0, 1.0, 1.0, 1.0)


def test_objects_iou_above_half_matches_and_seg_value():
    truth = np.zeros((4, 10), np.int32)
    truth[:, :5] = 1  # 20 px
    pred = np.zeros_like(truth)
    pred[:, :4] = 1  # 16 px inside: IoU 0.8
    c = m.match_objects(truth, pred)
    assert (c.tp, c.fp, c.fn) == (1, 0, 0)
    assert c.seg == pytest.approx(0.8)
    assert (m.match_objects(truth, pred) + c).tp == 2  # counts pool over slices


def _two_cells_and_a_merge() -> tuple[np.ndarray, np.ndarray]:
    """Two 16-px true cells 2 px apart, and one predicted object over both and the gap (40 px)."""
    truth = np.zeros((6, 12), np.int32)
    truth[1:5, 1:5] = 7
    truth[1:5, 7:11] = 9
    merged = np.zeros_like(truth)
    merged[1:5, 1:11] = 1
    return truth, merged


def test_truth_split_separates_what_the_instances_merged():
    truth, merged = _two_cells_and_a_merge()
    assert m.match_objects(truth, merged).seg == pytest.approx(0.4)
    split = m.truth_split(truth, merged, np.ones(truth.shape, np.float32))
    assert set(np.unique(split)) == {0, 7, 9}
    assert (split == 7).sum() == (split == 9).sum() == 20  # each cell gets the gap column beside it
    c = m.match_objects(truth, split)
    assert (c.tp, c.fp, c.fn, c.seg) == (2, 0, 0, pytest.approx(16 / 20))


def test_truth_split_keeps_unmatched_foreground_and_ignores_predicted_ids():
    truth, merged = _two_cells_and_a_merge()
    pred = merged * 5
    pred[1:5, 3:5] = 2  # other predicted ids over the same foreground: only the union counts
    pred[0, 1] = 3  # 4-connected to cell 7's foreground: flooded into it
    pred[5, 11] = 4  # only diagonal to the foreground: a false positive of its own, numbered above the truth
    p = np.ones(truth.shape, np.float32)
    split = m.truth_split(truth, pred, p)
    assert split[0, 1] == 7 and split[5, 11] > truth.max()
    c = m.match_objects(truth, split)
    assert (c.tp, c.fp, c.fn) == (2, 1, 0)
    assert m.truth_split(truth, np.zeros_like(truth), p).max() == 0  # nothing predicted: nothing to split
    missed = m.truth_split(truth, np.where(truth == 7, 1, 0), p)
    assert m.match_objects(truth, missed).seg == pytest.approx(0.5)  # cell 9 is missing, not invented


# --------------------------------------------------------------------------- warping
def _count_topology(img: np.ndarray, connectivity: int) -> tuple[int, int]:
    fg = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    bg = ndimage.generate_binary_structure(2, 2 if connectivity == 4 else 1)
    padded = np.pad(img, 1)
    return ndimage.label(padded, fg)[1], ndimage.label(~padded, bg)[1]


@pytest.mark.parametrize("connectivity", [pytest.param(4, id="fg4-bg8"), pytest.param(8, id="fg8-bg4")])
def test_simple_point_table_preserves_topology(connectivity):
    """Flipping a pixel keeps both component counts exactly when the table calls it simple."""
    table = m.simple_point_table(connectivity)
    rng = np.random.default_rng(connectivity)
    for _ in range(60):
        img = rng.random((6, 6)) < rng.uniform(0.2, 0.8)
        base = _count_topology(img, connectivity)
        padded = np.pad(img, 1)
        for y in range(6):
            for x in range(6):
                code = sum(1 << k for k, (dy, dx) in enumerate(m._NEIGHBOURS) if padded[y + 1 + dy, x + 1 + dx])
                flipped = img.copy()
                flipped[y, x] ^= True
                assert (_count_topology(flipped, connectivity) == base) == table[code], (y, x, code)


def _two_cells() -> np.ndarray:
    truth = np.zeros((12, 21), bool)
    truth[2:10, 2:10] = True
    truth[2:10, 11:19] = True  # separated by the membrane column 10
    return truth


def test_warping_perfect_and_boundary_shift_are_not_errors():
    truth = _two_cells()
    assert m.warping_error_count(truth, truth).errors == 0
    shifted = np.zeros_like(truth)
    shifted[3:11, 1:9] = True  # both cells moved/resized, membrane wider: same topology
    shifted[1:9, 12:20] = True
    assert (shifted != truth).sum() > 20
    result = m.warping_error_count(truth, shifted)
    assert result.errors == 0
    np.testing.assert_array_equal(result.warped, shifted)


@pytest.mark.parametrize(
    "edit, expected, splits, merges",
    [
        pytest.param("split", 1, 1, 0, id="split"),  # all cut pixels but the last one can be flipped
        pytest.param("merge1", 1, 0, 1, id="merge-1px-gap"),
        pytest.param("merge3", 3, 0, 3, id="merge-3px-gap"),  # every row of the gap must stay membrane
        pytest.param("missing", 1, 0, 0, id="missing-object"),  # shrinks to one pixel, which cannot vanish
        pytest.param("extra1", 1, 0, 0, id="extra-1px-object"),
        pytest.param("extra3", 3, 0, 0, id="extra-3px-object"),  # the truth cannot grow an object from nothing
        pytest.param("hole", 1, 0, 0, id="hole"),
    ],
)
def test_warping_counts_topological_errors(edit, expected, splits, merges):
    truth = _two_cells()
    pred = truth.copy()
    if edit == "split":
        pred[2:10, 5] = False  # a membrane cuts the left cell
    elif edit == "merge1":
        pred[5, 10] = True  # a 1-px gap in the membrane
    elif edit == "merge3":
        pred[4:7, 10] = True  # a 3-px gap in the membrane
    elif edit == "missing":
        pred[2:10, 11:19] = False
    elif edit == "extra1":
        pred[0, 0] = True
    elif edit == "extra3":
        pred[0, 0:3] = True
    elif edit == "hole":
        pred[5, 5] = False
    result = m.warping_error_count(truth, pred)
    assert result.errors == expected
    assert (result.splits, result.merges) == (splits, merges)
    assert result.error == pytest.approx(expected / truth.size)
    assert result.split_merge_error == pytest.approx((splits + merges) / truth.size)
    # the warped truth kept its topology
    assert _count_topology(result.warped, 4) == _count_topology(truth, 4)


def test_warping_sweep_thresholds():
    truth = _two_cells()
    prob = np.where(truth, 0.9, 0.05).astype(np.float32)
    prob[5, 10] = 0.3  # a faint 1-px membrane gap: merged below 0.3
    counts = m.warping_sweep(prob, truth, thresholds=[0.1, 0.5, 0.95])
    assert counts == [(1, 1), (0, 0), (2, 0)]  # merge; perfect; both cells missing (one pixel each)


def test_warping_real_size_is_fast_enough_to_sweep():
    """A 512 x 512 slice with ~10 % mismatching pixels finishes (bounded passes)."""
    rng = np.random.default_rng(3)
    truth = ndimage.gaussian_filter(rng.random((512, 512)), 6) > 0.5
    pred = ndimage.binary_dilation(truth, iterations=2) ^ (rng.random((512, 512)) < 0.002)
    result = m.warping_error_count(truth, pred)
    assert 0 < result.errors < (truth != pred).sum()
    assert result.passes < 100


def test_warping_split_merge_classes_change_the_object_count():
    """Each residual pixel called a merge joins objects when flipped; a split separates them."""
    rng = np.random.default_rng(11)
    for _ in range(6):
        truth = ndimage.gaussian_filter(rng.random((40, 40)), 2) > 0.5
        pred = ndimage.gaussian_filter(rng.random((40, 40)), 2) > 0.5
        result = m.warping_error_count(truth, pred)
        assert result.splits + result.merges <= result.errors
        warped = result.warped
        n_objects = _count_topology(warped, 4)[0]
        mismatch = np.argwhere(warped != pred)
        merges = splits = 0
        for y, x in mismatch:
            flipped = warped.copy()
            flipped[y, x] ^= True
            after = _count_topology(flipped, 4)[0]
            if not warped[y, x] and after < n_objects:
                merges += 1
            if warped[y, x] and after > n_objects:
                splits += 1
        assert (result.splits, result.merges) == (splits, merges)
