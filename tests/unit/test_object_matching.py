"""object_matching: matching at IoU > 0.5, SEG, and the ground truth's split of the prediction."""

from __future__ import annotations

import numpy as np
import pytest

from unet_core.evaluate.object_matching import match_objects, truth_split


def test_objects_perfect_split_merge_empty():
    truth = np.zeros((6, 12), np.int32)
    truth[1:5, 1:5] = 1  # 16 px
    truth[1:5, 7:11] = 2  # 16 px
    perfect = match_objects(truth, truth * 3)
    assert (perfect.tp, perfect.fp, perfect.fn, perfect.f1, perfect.seg) == (2, 0, 0, 1.0, 1.0)

    split = truth.copy()
    split[1:5, 3:5] = np.where(truth[1:5, 3:5] == 1, 5, 0)  # cell 1 cut into halves of 8 px: IoU 0.5 each
    s = match_objects(truth, split)
    assert (s.tp, s.fp, s.fn) == (1, 2, 1)  # IoU exactly 0.5 is no match (strict)
    assert s.precision == pytest.approx(1 / 3) and s.recall == pytest.approx(1 / 2)
    # SEG: no half covers > 50 % of cell 1 -> 0; cell 2 -> 1
    assert s.seg == pytest.approx(0.5)

    merged = np.zeros_like(truth)
    merged[1:5, 1:11] = 1  # one object of 40 px over both cells: IoU 16/40 each
    mm = match_objects(truth, merged)
    assert (mm.tp, mm.fp, mm.fn, mm.seg) == (0, 1, 2, pytest.approx(0.4))

    empty = match_objects(truth, np.zeros_like(truth))
    assert (empty.precision, empty.recall, empty.f1, empty.seg) == (0.0, 0.0, 0.0, 0.0)
    nothing = match_objects(np.zeros_like(truth), np.zeros_like(truth))
    assert (nothing.precision, nothing.recall, nothing.f1, nothing.seg) == (1.0, 1.0, 1.0, 1.0)


def test_objects_iou_above_half_matches_and_seg_value():
    truth = np.zeros((4, 10), np.int32)
    truth[:, :5] = 1  # 20 px
    pred = np.zeros_like(truth)
    pred[:, :4] = 1  # 16 px inside: IoU 0.8
    c = match_objects(truth, pred)
    assert (c.tp, c.fp, c.fn) == (1, 0, 0)
    assert c.seg == pytest.approx(0.8)
    assert (match_objects(truth, pred) + c).tp == 2  # counts pool over slices


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
    assert match_objects(truth, merged).seg == pytest.approx(0.4)
    split = truth_split(truth, merged, np.ones(truth.shape, np.float32))
    assert set(np.unique(split)) == {0, 7, 9}
    assert (split == 7).sum() == (split == 9).sum() == 20  # each cell gets the gap column beside it
    c = match_objects(truth, split)
    assert (c.tp, c.fp, c.fn, c.seg) == (2, 0, 0, pytest.approx(16 / 20))


def test_truth_split_keeps_unmatched_foreground_and_ignores_predicted_ids():
    truth, merged = _two_cells_and_a_merge()
    pred = merged * 5
    pred[1:5, 3:5] = 2  # other predicted ids over the same foreground: only the union counts
    pred[0, 1] = 3  # 4-connected to cell 7's foreground: flooded into it
    pred[5, 11] = 4  # only diagonal to the foreground: a false positive of its own, numbered above the truth
    p = np.ones(truth.shape, np.float32)
    split = truth_split(truth, pred, p)
    assert split[0, 1] == 7 and split[5, 11] > truth.max()
    c = match_objects(truth, split)
    assert (c.tp, c.fp, c.fn) == (2, 1, 0)
    assert truth_split(truth, np.zeros_like(truth), p).max() == 0  # nothing predicted: nothing to split
    missed = truth_split(truth, np.where(truth == 7, 1, 0), p)
    assert match_objects(truth, missed).seg == pytest.approx(0.5)  # cell 9 is missing, not invented
