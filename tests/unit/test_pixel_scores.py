"""pixel_scores: hand-computed confusion matrix, pixel error, IoU and Dice; threshold counts."""

from __future__ import annotations

import numpy as np
import pytest

from unet_core.evaluate.pixel_scores import (
    class_dice,
    class_iou,
    confusion_matrix,
    pixel_error,
    threshold_counts,
)

RNG = np.random.default_rng(7)


def test_confusion_iou_dice_hand_computed():
    truth = np.array([[0, 0, 1, 1],
                      [0, 1, 1, 1]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 0, 1, 1]])
    cm = confusion_matrix(truth, pred)
    # background: 2 right (0,0),(1,0); 1 bg->cell (0,1). cell: 4 right, 1 cell->bg (1,1)
    np.testing.assert_array_equal(cm, [[2, 1], [1, 4]])
    assert pixel_error(cm) == pytest.approx(2 / 8)
    # IoU background 2 / (3 + 3 - 2) = 0.5; cell 4 / (5 + 5 - 4) = 2/3
    np.testing.assert_allclose(class_iou(cm), [0.5, 2 / 3])
    # Dice background 2*2 / 6, cell 2*4 / 10
    np.testing.assert_allclose(class_dice(cm), [4 / 6, 0.8])


def test_perfect_prediction_pixels():
    truth = (RNG.random((16, 16)) > 0.5).astype(np.uint8)
    cm = confusion_matrix(truth, truth)
    assert pixel_error(cm) == 0.0
    np.testing.assert_array_equal(class_iou(cm), [1.0, 1.0])
    np.testing.assert_array_equal(class_dice(cm), [1.0, 1.0])


def test_empty_prediction_pixels():
    truth = np.zeros((4, 4), np.uint8)
    truth[1:3, 1:3] = 1
    cm = confusion_matrix(truth, np.zeros_like(truth))
    assert pixel_error(cm) == pytest.approx(4 / 16)
    assert class_iou(cm)[1] == 0.0 and class_dice(cm)[1] == 0.0
    # nothing to find and nothing found: a perfect score, not NaN
    empty = confusion_matrix(np.zeros((3, 3), int), np.zeros((3, 3), int))
    assert class_iou(empty)[1] == 1.0 and class_dice(empty)[1] == 1.0


def test_confusion_rejects_bad_input():
    with pytest.raises(ValueError, match="same"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.zeros((2, 2), int), np.full((2, 2), 2))
    with pytest.raises(ValueError, match="2-D"):
        confusion_matrix(np.zeros((2, 2, 2), int), np.zeros((2, 2, 2), int))


def test_threshold_counts_match_direct_thresholding():
    prob = RNG.random((20, 30)).astype(np.float32)
    prob[0, :5] = [0.0, 0.1, 0.5, 1.0, 0.3]  # exact threshold values: "> t" is strict
    truth = RNG.random((20, 30)) > 0.4
    thresholds = [0.0, 0.1, 0.3, 0.5, 0.9, 1.0]
    for t, c in zip(thresholds, threshold_counts(prob, truth, thresholds=thresholds), strict=True):
        pred = prob > t
        assert (c.tp, c.fp, c.fn, c.tn) == (
            int((pred & truth).sum()), int((pred & ~truth).sum()),
            int((~pred & truth).sum()), int((~pred & ~truth).sum()),
        )
        assert c.pixel_error == pytest.approx(float((pred != truth).mean()))
    assert threshold_counts(prob, truth, thresholds=[1.0])[0].tp == 0
