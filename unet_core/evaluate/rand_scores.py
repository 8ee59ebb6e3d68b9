"""Rand scores of one 2-D slice: pixel-pair agreement of two segmentations.

* foreground-restricted Rand error (ISBI 2012): ``1 - F`` of the Rand index over pairs
  of ground-truth *foreground* pixels, where predicted segments are the connected
  components of ``p > threshold`` and predicted background pixels inside the ground-truth
  foreground count as singletons (Fiji ``RandError.getRandIndexStats``); the challenge
  reported the best F over thresholds 0.0, 0.1, ..., 1.0 (:data:`ISBI_THRESHOLDS`,
  :func:`rand_sweep`).
* adapted Rand error (``skimage.metrics.adapted_rand_error``): the same F-score
  formula, but skimage treats predicted label 0 as one ordinary segment, not as
  singletons, and applies no threshold sweep. :func:`rand_pair_counts` computes both
  (``pred_background="segment"`` reproduces skimage exactly, tested). Note that skimage
  computes its ``precision`` from the ground-truth segment sizes and its ``recall`` from
  the predicted ones, the reverse of the SNEMI3D definition it cites; the error itself
  is symmetric in the two and therefore unaffected. Our :class:`PairCounts` uses
  precision = agreeing pairs / predicted same-segment pairs.

Conventions (labels, thresholds, connectivity): :mod:`unet_core.evaluate.score_inputs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from unet_core.evaluate.score_inputs import (
    ISBI_THRESHOLDS,
    above_threshold,
    as_probability,
    check_2d,
    check_same_shape,
    connected_components,
    consecutive_labels,
)

PRED_BACKGROUND_MODES = ("singletons", "segment")


def _joint_counts(a: np.ndarray, n_a: int, b: np.ndarray, n_b: int) -> np.ndarray:
    """Non-zero counts of the contingency table of two consecutive label vectors."""
    key = a.astype(np.int64) * n_b + b
    if n_a * n_b <= 8 * key.size + 1024:
        counts = np.bincount(key, minlength=0)
        return counts[counts > 0]
    _, counts = np.unique(key, return_counts=True)
    return counts


def _pairs(counts: np.ndarray) -> int:
    """Number of unordered pixel pairs within groups of the given sizes: sum n (n - 1) / 2."""
    c = counts.astype(np.int64, copy=False)
    return int((c * (c - 1) // 2).sum())


@dataclass(frozen=True)
class PairCounts:
    """Pixel-pair counts of the foreground-restricted Rand index.

    Only pairs of ground-truth foreground pixels (label != 0) are counted.

    Attributes:
        same_both: pairs in one ground-truth segment and in one predicted segment.
        same_true: pairs in one ground-truth segment.
        same_pred: pairs in one predicted segment.
    """

    same_both: int
    same_true: int
    same_pred: int

    def __add__(self, other: PairCounts) -> PairCounts:
        return PairCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def precision(self) -> float:
        """same_both / same_pred: how rarely predicted segments merge; 1.0 with no predicted pairs."""
        return self.same_both / self.same_pred if self.same_pred else 1.0

    @property
    def recall(self) -> float:
        """same_both / same_true: how rarely true segments are split; 1.0 with no true pairs."""
        return self.same_both / self.same_true if self.same_true else 1.0

    @property
    def f_score(self) -> float:
        """2 same_both / (same_true + same_pred); 1.0 when neither has a pair."""
        den = self.same_true + self.same_pred
        return 2 * self.same_both / den if den else 1.0

    @property
    def error(self) -> float:
        """1 - F-score (the "Rand error" of ISBI 2012 and skimage's adapted Rand error)."""
        return 1.0 - self.f_score


@dataclass(frozen=True)
class _TruthSegments:
    """Ground-truth segments restricted to their foreground, prepared once per slice."""

    mask: np.ndarray  # (Y, X) bool, label != 0
    idx: np.ndarray  # consecutive ids of the foreground pixels, raster order
    n: int
    same_true: int


def _prepare_truth(true_segments: np.ndarray) -> _TruthSegments:
    true_segments = check_2d("true_segments", true_segments)
    if true_segments.dtype.kind not in "iub":
        raise ValueError(f"true_segments must be integer labels, got dtype {true_segments.dtype}")
    if true_segments.size and true_segments.min() < 0:
        raise ValueError("true_segments must be >= 0 (0 = background)")
    mask = true_segments != 0
    idx, n = consecutive_labels(true_segments[mask])
    return _TruthSegments(mask, idx, n, _pairs(np.bincount(idx, minlength=n)))


def _rand_from_truth(truth: _TruthSegments, pred_segments: np.ndarray, *, pred_background: str) -> PairCounts:
    if pred_background not in PRED_BACKGROUND_MODES:
        raise ValueError(f"pred_background must be one of {PRED_BACKGROUND_MODES}, got {pred_background!r}")
    if pred_segments.dtype.kind not in "iub":
        raise ValueError(f"pred_segments must be integer labels, got dtype {pred_segments.dtype}")
    p = pred_segments[truth.mask]
    if p.size and p.min() < 0:
        raise ValueError("pred_segments must be >= 0 (0 = background)")
    t = truth.idx
    if pred_background == "singletons":
        keep = p != 0  # a singleton shares its segment with no other pixel: contributes no pair
        p, t = p[keep], t[keep]
    p_idx, n_p = consecutive_labels(p)
    same_pred = _pairs(np.bincount(p_idx, minlength=n_p))
    same_both = _pairs(_joint_counts(t, truth.n, p_idx, max(n_p, 1)))
    return PairCounts(same_both=same_both, same_true=truth.same_true, same_pred=same_pred)


def rand_pair_counts(
    true_segments: np.ndarray, pred_segments: np.ndarray, *, pred_background: str = "singletons"
) -> PairCounts:
    """Pair counts of the Rand index over the ground-truth foreground.

    Invariant to any relabelling of either segmentation (only co-membership counts).

    Args:
        true_segments: (Y, X) integer ground-truth segments, 0 = background (ignored).
        pred_segments: (Y, X) integer predicted segments, 0 = background.
        pred_background: how predicted label 0 inside the ground-truth foreground counts:
            ``"singletons"`` (each such pixel its own segment; ISBI 2012 Fiji scoring) or
            ``"segment"`` (all of it one segment; ``skimage.metrics.adapted_rand_error``).

    Returns:
        The :class:`PairCounts`; ``.error`` is the (adapted) Rand error.
    """
    true_segments = check_2d("true_segments", true_segments)
    pred_segments = check_2d("pred_segments", pred_segments)
    check_same_shape(true_segments=true_segments, pred_segments=pred_segments)
    return _rand_from_truth(_prepare_truth(true_segments), pred_segments, pred_background=pred_background)


def rand_sweep(
    cell_probability: np.ndarray,
    true_segments: np.ndarray,
    *,
    thresholds: Sequence[float] = ISBI_THRESHOLDS,
    connectivity: int = 4,
) -> list[PairCounts]:
    """Foreground-restricted Rand pair counts of ``components(p > t)`` for every threshold t.

    This is the ISBI 2012 Rand scoring of one slice: the predicted segments are the
    connected components of the thresholded cell-probability map (the non-membrane
    regions), predicted background inside the ground-truth foreground counts as
    singletons. Take the threshold with the largest F-score (:func:`best_index`) per
    slice, or add the counts over slices first for a dataset score.

    Args:
        cell_probability: (Y, X) float, P(cell interior).
        true_segments: (Y, X) integer ground-truth segments, 0 = background.
        thresholds: the thresholds t.
        connectivity: 4 or 8, adjacency of the predicted components.

    Returns:
        One :class:`PairCounts` per threshold.
    """
    prob = as_probability("cell_probability", cell_probability)
    true_segments = check_2d("true_segments", true_segments)
    check_same_shape(cell_probability=prob, true_segments=true_segments)
    truth = _prepare_truth(true_segments)
    return [
        _rand_from_truth(
            truth, connected_components(above_threshold(prob, t), connectivity=connectivity),
            pred_background="singletons",
        )
        for t in thresholds
    ]
