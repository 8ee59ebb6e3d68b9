"""Pixel classification scores of one 2-D slice: confusion matrix, pixel error, IoU, Dice.

* pixel error, IoU per class, foreground IoU, Dice: from a confusion matrix
  (:func:`confusion_matrix`), or, for a probability map, from the pixel counts of a
  two-class decision at every threshold of a sweep (:func:`threshold_counts`).

Conventions (classes, thresholds, empty denominators): :mod:`unet_core.evaluate.score_inputs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from unet_core.evaluate.score_inputs import ISBI_THRESHOLDS, as_probability, check_2d, check_same_shape


def confusion_matrix(true_classes: np.ndarray, pred_classes: np.ndarray, *, n_classes: int = 2) -> np.ndarray:
    """Pixel confusion matrix.

    Args:
        true_classes: (Y, X) integer ground-truth classes in [0, n_classes).
        pred_classes: (Y, X) integer predicted classes in [0, n_classes).
        n_classes: number of classes (2: background, cell).

    Returns:
        (n_classes, n_classes) int64; entry [t, p] counts pixels of true class t predicted p.

    Raises:
        ValueError: shapes differ or a class is out of range.
    """
    true_classes = check_2d("true_classes", true_classes)
    pred_classes = check_2d("pred_classes", pred_classes)
    check_same_shape(true_classes=true_classes, pred_classes=pred_classes)
    t = true_classes.ravel().astype(np.int64)
    p = pred_classes.ravel().astype(np.int64)
    for name, v in (("true_classes", t), ("pred_classes", p)):
        if v.size and (v.min() < 0 or v.max() >= n_classes):
            raise ValueError(f"{name} has values outside [0, {n_classes}): {int(v.min())}..{int(v.max())}")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def pixel_error(cm: np.ndarray) -> float:
    """Fraction of misclassified pixels (0 for an empty matrix)."""
    total = int(cm.sum())
    return float(1.0 - np.trace(cm) / total) if total else 0.0


def class_iou(cm: np.ndarray) -> np.ndarray:
    """IoU |T ∩ P| / |T ∪ P| per class, float64 (C,); 1.0 for a class absent from both."""
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    return np.where(union > 0, tp / np.maximum(union, 1), 1.0)


def class_dice(cm: np.ndarray) -> np.ndarray:
    """Dice 2|T ∩ P| / (|T| + |P|) per class, float64 (C,); 1.0 for a class absent from both."""
    tp = np.diag(cm).astype(np.float64)
    size = cm.sum(axis=0) + cm.sum(axis=1)
    return np.where(size > 0, 2 * tp / np.maximum(size, 1), 1.0)


@dataclass(frozen=True)
class BinaryCounts:
    """Pixel counts of a two-class decision, cell = positive."""

    tp: int
    fp: int
    fn: int
    tn: int

    def __add__(self, other: BinaryCounts) -> BinaryCounts:
        return BinaryCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def pixel_error(self) -> float:
        """Misclassified fraction (fp + fn) / all pixels; 0 for no pixels."""
        n = self.tp + self.fp + self.fn + self.tn
        return (self.fp + self.fn) / n if n else 0.0

    @property
    def f_error(self) -> float:
        """1 - F-score of the cell class, 2tp / (2tp + fp + fn); 0 when both masks are empty."""
        den = 2 * self.tp + self.fp + self.fn
        return 1.0 - 2 * self.tp / den if den else 0.0


def threshold_counts(
    cell_probability: np.ndarray, true_cell: np.ndarray, *, thresholds: Sequence[float] = ISBI_THRESHOLDS
) -> list[BinaryCounts]:
    """Pixel counts of ``cell_probability > t`` against the ground truth, for every threshold.

    One sort of the probabilities serves all thresholds.

    Args:
        cell_probability: (Y, X) float, P(cell interior) in [0, 1].
        true_cell: (Y, X) bool, ground-truth cell interior.
        thresholds: the thresholds t.

    Returns:
        One :class:`BinaryCounts` per threshold, in the given order.
    """
    prob = as_probability("cell_probability", cell_probability)
    truth = check_2d("true_cell", true_cell).astype(bool, copy=False)
    check_same_shape(cell_probability=prob, true_cell=truth)
    p_true = np.sort(prob[truth].ravel())
    p_false = np.sort(prob[~truth].ravel())
    n_true, n_false = p_true.size, p_false.size
    out = []
    for t in thresholds:
        t = prob.dtype.type(t)
        tp = n_true - int(np.searchsorted(p_true, t, side="right"))
        fp = n_false - int(np.searchsorted(p_false, t, side="right"))
        out.append(BinaryCounts(tp=tp, fp=fp, fn=n_true - tp, tn=n_false - fp))
    return out
