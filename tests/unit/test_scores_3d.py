"""Object F1 and SEG of 3-D objects (unet_core/evaluate/object_matching.py on (Z, Y, X) volumes),
against hand-computed values, beside today's per-slice scores."""

from __future__ import annotations

import numpy as np
import pytest

from unet_core.evaluate.object_matching import ObjectCounts, match_objects
from unet_core.infer.slice_linking import link_slices


def per_slice(truth: np.ndarray, pred: np.ndarray) -> ObjectCounts:
    """Today's per-slice scores of a volume: every slice matched on its own, counts summed."""
    counts = [match_objects(truth[z], pred[z]) for z in range(truth.shape[0])]
    return sum(counts[1:], counts[0])


def scene() -> tuple[np.ndarray, np.ndarray]:
    """Truth: A, a 2x2x2 cube (8 voxels, slices 0-1); B, 3 slices of 2x2 (12 voxels, slices 1-3).
    Prediction: A exactly; B's slices 1-2 only (8 voxels); a false 1-voxel object in slice 3."""
    truth = np.zeros((4, 6, 6), np.int32)
    truth[0:2, 0:2, 0:2] = 4  # A
    truth[1:4, 3:5, 3:5] = 9  # B
    pred = np.zeros_like(truth)
    pred[0:2, 0:2, 0:2] = 1
    pred[1:3, 3:5, 3:5] = 2
    pred[3, 0, 5] = 3
    return truth, pred


def test_3d_f1_and_seg_against_hand_computed_values() -> None:
    s = match_objects(*scene())
    # A: IoU 8/8 = 1; B: IoU 8/12 = 2/3 > 0.5, and 8 > 12/2 covers it for SEG; object 3 unmatched
    assert (s.tp, s.fp, s.fn, s.n_true) == (2, 1, 0, 2)
    assert s.f1 == pytest.approx(2 * 2 / (2 * 2 + 1 + 0))  # 0.8
    assert s.seg == pytest.approx((1 + 2 / 3) / 2)  # 0.8333
    # per slice (A in slices 0-1, B in 1-3: 5 true sections; B's slice 3 missed, object 3 false)
    p = per_slice(*scene())
    assert (p.tp, p.fp, p.fn, p.n_true) == (4, 1, 1, 5)
    assert p.seg == pytest.approx(4 / 5)


def test_a_cell_cut_along_z_fails_in_3d_but_not_per_slice_and_linking_joins_it() -> None:
    truth = np.zeros((4, 5, 5), np.int32)
    truth[:, 1:4, 1:4] = 1  # one cell over 4 slices: 36 voxels
    cut = truth.copy()
    cut[2:] *= 2  # the same footprints, a new id from slice 2 (the 2-D mode's ids, unlinked)
    s = match_objects(truth, cut)
    # two halves of 18 voxels: IoU 18/36 = 0.5, not > 0.5; neither covers more than half for SEG
    assert (s.tp, s.fp, s.fn) == (0, 2, 1) and s.seg == 0.0
    p = per_slice(truth, cut)
    assert (p.tp, p.fp, p.fn) == (4, 0, 0) and p.seg == 1.0  # per slice, nothing is wrong
    linked = match_objects(truth, link_slices(cut))
    assert (linked.tp, linked.fp, linked.fn) == (1, 0, 0) and linked.seg == 1.0


def test_one_slice_volume_scores_as_the_image() -> None:
    truth, pred = scene()
    for z in range(4):
        assert match_objects(truth[z : z + 1], pred[z : z + 1]) == match_objects(truth[z], pred[z])


@pytest.mark.parametrize("axes", [(0,), (1,), (2,), (0, 2)])
def test_3d_scores_are_invariant_to_flips_and_relabelling(axes: tuple[int, ...]) -> None:
    truth, pred = scene()
    s = match_objects(truth, pred)
    assert match_objects(np.flip(truth, axes), np.flip(pred, axes)) == s
    relabel = np.array([0, 7, 3, 11])  # pred ids 1, 2, 3 -> 7, 3, 11
    assert match_objects(truth * 5, relabel[pred]) == s
    assert match_objects(np.transpose(truth, (2, 1, 0)), np.transpose(pred, (2, 1, 0))) == s


def test_shapes_are_checked() -> None:
    truth, pred = scene()
    with pytest.raises(ValueError, match=r"\(Z, Y, X\)"):
        match_objects(truth[None], pred[None])
    with pytest.raises(ValueError):
        match_objects(truth, pred[:3])


def test_truth_split_in_3d_separates_what_the_instances_merged() -> None:
    from unet_core.evaluate.object_matching import truth_split

    truth, _ = scene()
    truth[2:4, 0:2, 0:2] = 6  # C below A, touching it face to face
    merged = ((truth == 4) | (truth == 6)).astype(np.int32)  # A and C as one predicted object
    assert match_objects(truth, merged).tp == 0  # A (8 of 16 voxels): IoU 0.5, not > 0.5
    split = truth_split(truth, merged, np.ones(truth.shape, np.float32))
    assert np.array_equal(split, np.where(merged > 0, truth, 0))
    assert match_objects(truth, split).tp == 2  # A and C; B was not predicted
