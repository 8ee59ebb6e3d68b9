"""Segmentation scores of one 2-D slice: pure array-in/number-out functions.

Everything here works on one (Y, X) slice and returns *counts* (integers), not ratios, so
that a dataset score is the same formula applied to counts summed over slices (the way the
ISBI 2012 Fiji scripts pooled their slices) and per-slice and per-dataset numbers never
disagree about definitions. The ratio properties (``error``, ``iou`` ...) turn counts into
scores; each says what it returns when its denominator is empty.

Conventions:
    * classes: 0 = background (membrane in EM), 1 = cell interior, as in the weights store.
    * segments / instances: 0 = background, every other value one object.
    * a probability map is P(cell interior) per pixel; thresholding predicts "cell" where
      ``p > threshold`` (strict, like the Fiji scripts), so threshold 1.0 predicts nothing.
    * connected components use 4-connectivity by default (the Fiji scripts' choice);
      ``connectivity=8`` is available. The background then uses the complementary
      connectivity (8 or 4) wherever topology matters (warping error).

Scores and where they come from:
    * pixel error, IoU per class, foreground IoU, Dice: from a confusion matrix.
    * foreground-restricted Rand error (ISBI 2012): ``1 - F`` of the Rand index over pairs
      of ground-truth *foreground* pixels, where predicted segments are the connected
      components of ``p > threshold`` and predicted background pixels inside the ground-truth
      foreground count as singletons (Fiji ``RandError.getRandIndexStats``); the challenge
      reported the best F over thresholds 0.0, 0.1, ..., 1.0 (:data:`ISBI_THRESHOLDS`).
    * adapted Rand error (``skimage.metrics.adapted_rand_error``): the same F-score
      formula, but skimage treats predicted label 0 as one ordinary segment, not as
      singletons, and applies no threshold sweep. :func:`rand_pair_counts` computes both
      (``pred_background="segment"`` reproduces skimage exactly, tested). Note that skimage
      computes its ``precision`` from the ground-truth segment sizes and its ``recall`` from
      the predicted ones, the reverse of the SNEMI3D definition it cites; the error itself
      is symmetric in the two and therefore unaffected. Our :class:`PairCounts` uses
      precision = agreeing pairs / predicted same-segment pairs.
    * object precision/recall/F1: a predicted object matches a ground-truth object when
      their IoU is > 0.5 (strictly greater, which makes the matching one-to-one).
    * SEG (cell tracking challenge): the mean, over ground-truth objects, of the IoU with
      the predicted object covering more than half of it (0 if none). :func:`truth_split`
      splits the predicted foreground as the ground truth does: its SEG is what a perfect
      instance rule would reach on that foreground.
    * warping error (Jain et al. 2010): the ground-truth foreground is deformed by flipping
      simple points (pixels whose flip changes no topology) towards the prediction until no
      mismatching simple point is left; the pixels still mismatching are topological errors
      (splits, merges, holes, missing or extra objects). See :func:`warping_error_count`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np
from scipy import ndimage

from unet_core.common.labels import connectivity_structure
from unet_core.infer.instances import flood_height, label_unflooded

log = logging.getLogger(__name__)

CELL = 1
ISBI_THRESHOLDS: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(11))
"""Thresholds of the ISBI 2012 Fiji evaluation script: 0.0, 0.1, ..., 1.0."""

PRED_BACKGROUND_MODES = ("singletons", "segment")


# ---------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------
def _check_2d(name: str, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (Y, X) array, got shape {array.shape}")
    return array


def _check_same_shape(**arrays: np.ndarray) -> None:
    shapes = {name: np.shape(a) for name, a in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"arrays must have the same (Y, X) shape, got {shapes}")


def connected_components(mask: np.ndarray, *, connectivity: int = 4) -> np.ndarray:
    """Label the connected components of a boolean mask.

    Args:
        mask: (Y, X) bool, True = foreground.
        connectivity: 4 or 8 (pixel adjacency of the foreground).

    Returns:
        (Y, X) int32, 0 = background, components numbered 1..n in raster order.
    """
    labels, _ = ndimage.label(_check_2d("mask", mask).astype(bool, copy=False), structure=connectivity_structure(connectivity))
    return labels.astype(np.int32, copy=False)


def _consecutive(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel non-negative integer labels to 0..n-1 keeping 0 -> 0 when present; returns (idx, n)."""
    labels = labels.ravel()
    if labels.size == 0:
        return labels.astype(np.intp), 0
    top = int(labels.max())
    if top < 4 * labels.size + 16:  # cheap path: a lookup table over the value range
        present = np.bincount(labels.astype(np.intp, copy=False), minlength=top + 1) > 0
        present[0] = True
        lut = np.cumsum(present) - 1
        return lut[labels].astype(np.intp, copy=False), int(lut[-1]) + 1
    values, idx = np.unique(labels, return_inverse=True)
    if values[0] != 0:
        idx = idx + 1
        return idx.astype(np.intp, copy=False), len(values) + 1
    return idx.astype(np.intp, copy=False), len(values)


def _joint_counts(a: np.ndarray, n_a: int, b: np.ndarray, n_b: int) -> np.ndarray:
    """Non-zero counts of the contingency table of two consecutive label vectors."""
    key = a.astype(np.int64) * n_b + b
    if n_a * n_b <= 8 * key.size + 1024:
        counts = np.bincount(key, minlength=0)
        return counts[counts > 0]
    _, counts = np.unique(key, return_counts=True)
    return counts


def _probability(name: str, array: np.ndarray) -> np.ndarray:
    """A 2-D floating-point probability map (integers are converted to float32)."""
    array = _check_2d(name, array)
    return array if array.dtype.kind == "f" else array.astype(np.float32)


def _above(prob: np.ndarray, threshold: float) -> np.ndarray:
    """``prob > threshold`` with the threshold rounded to the map's dtype first.

    Every thresholded score goes through this, so a pixel of exactly float32(0.1) is on the
    same side of "0.1" for the pixel, Rand and warping scores.
    """
    return prob > prob.dtype.type(threshold)


def _pairs(counts: np.ndarray) -> int:
    """Number of unordered pixel pairs within groups of the given sizes: sum n (n - 1) / 2."""
    c = counts.astype(np.int64, copy=False)
    return int((c * (c - 1) // 2).sum())


# ---------------------------------------------------------------------------------------
# pixel classification: confusion matrix
# ---------------------------------------------------------------------------------------
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
    true_classes = _check_2d("true_classes", true_classes)
    pred_classes = _check_2d("pred_classes", pred_classes)
    _check_same_shape(true_classes=true_classes, pred_classes=pred_classes)
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
    prob = _probability("cell_probability", cell_probability)
    truth = _check_2d("true_cell", true_cell).astype(bool, copy=False)
    _check_same_shape(cell_probability=prob, true_cell=truth)
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


# ---------------------------------------------------------------------------------------
# Rand index (pairs of pixels)
# ---------------------------------------------------------------------------------------
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
    true_segments = _check_2d("true_segments", true_segments)
    if true_segments.dtype.kind not in "iub":
        raise ValueError(f"true_segments must be integer labels, got dtype {true_segments.dtype}")
    if true_segments.size and true_segments.min() < 0:
        raise ValueError("true_segments must be >= 0 (0 = background)")
    mask = true_segments != 0
    idx, n = _consecutive(true_segments[mask])
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
    p_idx, n_p = _consecutive(p)
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
    true_segments = _check_2d("true_segments", true_segments)
    pred_segments = _check_2d("pred_segments", pred_segments)
    _check_same_shape(true_segments=true_segments, pred_segments=pred_segments)
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
    prob = _probability("cell_probability", cell_probability)
    true_segments = _check_2d("true_segments", true_segments)
    _check_same_shape(cell_probability=prob, true_segments=true_segments)
    truth = _prepare_truth(true_segments)
    return [
        _rand_from_truth(truth, connected_components(_above(prob, t), connectivity=connectivity), pred_background="singletons")
        for t in thresholds
    ]


def best_index(scores: Sequence[float], *, lower_is_better: bool = True) -> int:
    """Index of the best score (the first one on ties, i.e. the lowest threshold)."""
    values = np.asarray(scores, dtype=np.float64)
    return int(np.argmin(values) if lower_is_better else np.argmax(values))


# ---------------------------------------------------------------------------------------
# objects: matching at IoU > 0.5 and the cell tracking challenge's SEG
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectCounts:
    """Object-level matching counts.

    Attributes:
        tp: predicted objects matched to a ground-truth object (IoU > 0.5).
        fp: predicted objects without a match.
        fn: ground-truth objects without a match.
        seg_sum: sum over ground-truth objects of the SEG Jaccard (see :func:`match_objects`).
        n_true: ground-truth objects.
    """

    tp: int
    fp: int
    fn: int
    seg_sum: float
    n_true: int

    def __add__(self, other: ObjectCounts) -> ObjectCounts:
        return ObjectCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def n_pred(self) -> int:
        return self.tp + self.fp

    @property
    def precision(self) -> float:
        """tp / predicted objects; with no predicted object 1.0 if there is no true object, else 0.0."""
        if self.n_pred:
            return self.tp / self.n_pred
        return 1.0 if self.n_true == 0 else 0.0

    @property
    def recall(self) -> float:
        """tp / true objects; with no true object 1.0 if nothing was predicted, else 0.0."""
        if self.n_true:
            return self.tp / self.n_true
        return 1.0 if self.n_pred == 0 else 0.0

    @property
    def f1(self) -> float:
        """2tp / (2tp + fp + fn); 1.0 when both are empty."""
        den = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / den if den else 1.0

    @property
    def seg(self) -> float:
        """Mean SEG Jaccard over ground-truth objects; 1.0 if there is none and none predicted."""
        if self.n_true:
            return self.seg_sum / self.n_true
        return 1.0 if self.n_pred == 0 else 0.0


def match_objects(true_instances: np.ndarray, pred_instances: np.ndarray) -> ObjectCounts:
    """Match predicted to ground-truth objects.

    A pair matches when IoU > 0.5; at most one partner can exceed 0.5, so the matching is
    one-to-one without any assignment step. SEG follows the cell tracking challenge: a
    ground-truth object R is paired with the predicted object S covering more than half of
    R (|R ∩ S| > 0.5 |R|), scoring |R ∩ S| / |R ∪ S|, else 0.

    Args:
        true_instances: (Y, X) integer ground-truth objects, 0 = background.
        pred_instances: (Y, X) integer predicted objects, 0 = background.

    Returns:
        The :class:`ObjectCounts`; invariant to relabelling either image.
    """
    true_instances = _check_2d("true_instances", true_instances)
    pred_instances = _check_2d("pred_instances", pred_instances)
    _check_same_shape(true_instances=true_instances, pred_instances=pred_instances)
    t_idx, n_t = _consecutive(true_instances)
    p_idx, n_p = _consecutive(pred_instances)
    size_t = np.bincount(t_idx, minlength=n_t)
    size_p = np.bincount(p_idx, minlength=n_p)
    n_true = int((size_t[1:] > 0).sum())
    n_pred = int((size_p[1:] > 0).sum())
    both = (t_idx != 0) & (p_idx != 0)
    if not both.any():
        return ObjectCounts(tp=0, fp=n_pred, fn=n_true, seg_sum=0.0, n_true=n_true)
    key = t_idx[both].astype(np.int64) * n_p + p_idx[both]
    keys, inter = np.unique(key, return_counts=True)
    ti, pi = keys // n_p, keys % n_p
    union = size_t[ti] + size_p[pi] - inter
    iou = inter / union
    tp = int((iou > 0.5).sum())
    seg_sum = float(iou[inter * 2 > size_t[ti]].sum())
    return ObjectCounts(tp=tp, fp=n_pred - tp, fn=n_true - tp, seg_sum=seg_sum, n_true=n_true)


def truth_split(
    true_instances: np.ndarray,
    pred_instances: np.ndarray,
    cell_probability: np.ndarray,
    *,
    connectivity: int = 4,
) -> np.ndarray:
    """The predicted cell foreground split into objects as the ground truth splits it.

    Each ground-truth object seeds the predicted foreground pixels it covers, and the seeds flood
    the rest of the foreground in order of decreasing P(cell); foreground components that touch no
    ground-truth object stay objects of their own (false positives). Scored with
    :func:`match_objects`, this is what a perfect instance rule would reach on the predicted
    foreground: the gap from the instances' own score to it is the instance rule's loss, the gap
    from it to 1 the pixel classifier's.

    Args:
        true_instances: (Y, X) integer ground-truth objects, 0 = background.
        pred_instances: (Y, X) integer predicted objects, 0 = background (only their union is used).
        cell_probability: (Y, X) P(cell) in [0, 1], the flooding order.
        connectivity: 4 or 8, adjacency of the flooding and of the leftover components.

    Returns:
        (Y, X) int32 objects, 0 = background: ground-truth ids, then leftovers numbered above them.
    """
    true_instances = _check_2d("true_instances", true_instances)
    foreground = _check_2d("pred_instances", pred_instances) != 0
    _check_same_shape(true_instances=true_instances, pred_instances=foreground,
                      cell_probability=_check_2d("cell_probability", cell_probability))
    markers = np.where(foreground, true_instances, 0).astype(np.int32)
    labels = flood_height(np.asarray(cell_probability, dtype=np.float32), markers, mask=foreground,
                          connectivity=connectivity)
    first_leftover = int(true_instances.max(initial=0)) + 1
    label_unflooded(labels, foreground, first_id=first_leftover, connectivity=connectivity)
    return labels


# ---------------------------------------------------------------------------------------
# warping error (Jain et al. 2010)
# ---------------------------------------------------------------------------------------
# Neighbour offsets (dy, dx) in the order of the bits of a 3x3 neighbourhood code.
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def _components_in_ring(bits: Sequence[bool], connectivity: int, *, adjacent_to_centre: bool) -> int:
    """Connected components of the set pixels of the 8-neighbourhood (centre excluded)."""
    cells = {_NEIGHBOURS[k] for k in range(8) if bits[k]}
    seen: set[tuple[int, int]] = set()
    count = 0
    for start in cells:
        if start in seen:
            continue
        stack, comp = [start], {start}
        seen.add(start)
        while stack:
            y, x = stack.pop()
            for q in cells - seen:
                dy, dx = abs(q[0] - y), abs(q[1] - x)
                if (dy + dx == 1) or (connectivity == 8 and max(dy, dx) == 1):
                    seen.add(q)
                    comp.add(q)
                    stack.append(q)
        if not adjacent_to_centre or any(abs(y) + abs(x) == 1 for y, x in comp):
            count += 1
    return count


@lru_cache(maxsize=2)
def topological_numbers(connectivity: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Look-up tables of the topological numbers of a pixel's 3x3 neighbourhood.

    For foreground connectivity 4 (background 8): T_fg = number of 4-components of the
    foreground of the 8-neighbourhood that are 4-adjacent to the pixel, T_bg = number of
    8-components of its background (Bertrand 1994); for foreground connectivity 8 the
    roles swap.

    Args:
        connectivity: foreground connectivity, 4 or 8.

    Returns:
        ``(t_fg, t_bg)``: two (256,) uint8 arrays indexed by the neighbourhood code (bit k
        set when neighbour ``_NEIGHBOURS[k]`` is foreground).
    """
    connectivity_structure(connectivity)
    background = 12 - connectivity  # 4 <-> 8
    t_fg = np.zeros(256, dtype=np.uint8)
    t_bg = np.zeros(256, dtype=np.uint8)
    for code in range(256):
        fg = [bool(code >> k & 1) for k in range(8)]
        t_fg[code] = _components_in_ring(fg, connectivity, adjacent_to_centre=connectivity == 4)
        t_bg[code] = _components_in_ring([not b for b in fg], background, adjacent_to_centre=background == 4)
    return t_fg, t_bg


@lru_cache(maxsize=2)
def simple_point_table(connectivity: int = 4) -> np.ndarray:
    """Look-up table: is a pixel with this 3x3 neighbourhood a simple point?

    A pixel is simple when flipping it changes no topology: T_fg = 1 and T_bg = 1
    (:func:`topological_numbers`). The test does not depend on the pixel's own value, so
    it serves both directions of the flip.

    Args:
        connectivity: foreground connectivity, 4 or 8.

    Returns:
        (256,) bool, indexed by the neighbourhood code.
    """
    t_fg, t_bg = topological_numbers(connectivity)
    return (t_fg == 1) & (t_bg == 1)


@dataclass(frozen=True)
class WarpResult:
    """Outcome of warping the ground truth towards a prediction.

    Attributes:
        errors: pixels still mismatching after the warp (topological errors).
        splits: of those, pixels whose flip would split an object of the warped truth.
        merges: of those, pixels whose flip would join two objects of the warped truth.
        pixels: pixels in the slice.
        passes: sweeps over the mismatching pixels that were needed.
        warped: (Y, X) bool, the warped ground-truth foreground.

    The other errors (``errors - splits - merges``) are missing or extra objects and
    added or removed holes.
    """

    errors: int
    splits: int
    merges: int
    pixels: int
    passes: int
    warped: np.ndarray

    @property
    def error(self) -> float:
        """All topological-error pixels / pixels."""
        return self.errors / self.pixels if self.pixels else 0.0

    @property
    def split_merge_error(self) -> float:
        """Split and merge pixels / pixels (the ISBI 2012 "splits and mergers" warping error)."""
        return (self.splits + self.merges) / self.pixels if self.pixels else 0.0


def warping_error_count(
    true_fg: np.ndarray, pred_fg: np.ndarray, *, connectivity: int = 4, max_passes: int = 100_000
) -> WarpResult:
    """Warping error of a binary prediction (Jain et al. 2010, as used by ISBI 2012).

    The ground-truth foreground L is deformed into L* by flipping, one at a time, pixels
    where L* differs from the prediction T and that are simple points of L*; L* therefore
    keeps the topology of L. What still differs from T when no mismatching simple point is
    left is counted: each split, merge, hole, missing or extra object leaves at least one
    such pixel, while boundary shifts leave none. Outside the image is background.

    Flips are done in parallel on the four (y mod 2, x mod 2) subfields: two pixels of a
    subfield are never in each other's 3x3 neighbourhood, so flipping them together equals
    flipping them in sequence. After the first sweep only mismatching pixels next to a
    flipped pixel are tested again (nothing else can have become simple), and every pass
    but the last flips a pixel, so passes <= mismatches + 1 and the work is about
    O(mismatches x 8) plus a cheap filter per pass. The order of flips can change which pixel of a topological
    defect remains, not how many defects remain (one pixel per defect in the usual
    cases); the Fiji implementation orders flips by the prediction's confidence instead.

    Args:
        true_fg: (Y, X) bool ground-truth foreground (cell interior).
        pred_fg: (Y, X) bool predicted foreground.
        connectivity: foreground connectivity, 4 (background 8) or 8 (background 4).
        max_passes: safety cap on sweeps (never reached in practice; logged if it is).

    Returns:
        The :class:`WarpResult`.
    """
    true_fg = _check_2d("true_fg", true_fg).astype(bool, copy=False)
    pred_fg = _check_2d("pred_fg", pred_fg).astype(bool, copy=False)
    _check_same_shape(true_fg=true_fg, pred_fg=pred_fg)
    table = simple_point_table(connectivity)
    h, w = true_fg.shape
    width = w + 2
    padded = np.zeros((h + 2, width), dtype=np.uint8)
    padded[1:-1, 1:-1] = true_fg
    target = np.zeros_like(padded)
    target[1:-1, 1:-1] = pred_fg
    flat, goal = padded.ravel(), target.ravel()
    offsets = np.array([dy * width + dx for dy, dx in _NEIGHBOURS], dtype=np.intp)
    weights = (1 << np.arange(8)).astype(np.intp)
    todo = np.flatnonzero(flat != goal)
    ys, xs = np.divmod(todo, width)
    subfield = (ys % 2) * 2 + xs % 2
    todo_by_field = [todo[subfield == s] for s in range(4)]
    # A pixel's simplicity can only change when its 3x3 neighbourhood changes: after the
    # first sweep only the mismatching neighbours of flipped pixels are looked at again.
    dirty = np.ones(flat.size, dtype=bool)
    passes = 0
    while passes < max_passes:
        passes += 1
        flipped_any = False
        for s in range(4):
            remaining = todo_by_field[s]
            cand = remaining[dirty[remaining]]
            if cand.size == 0:
                continue
            dirty[cand] = False
            codes = (flat[cand[:, None] + offsets] * weights).sum(axis=1)
            simple = table[codes]
            if simple.any():
                flips = cand[simple]
                flat[flips] ^= 1
                dirty[(flips[:, None] + offsets).ravel()] = True
                keep = np.ones(remaining.size, dtype=bool)
                keep[np.searchsorted(remaining, flips)] = False
                todo_by_field[s] = remaining[keep]
                flipped_any = True
        if not flipped_any:
            break
    else:
        log.warning("warping stopped after max_passes=%d sweeps; the error is an upper bound", max_passes)
    residual = np.concatenate(todo_by_field)
    splits, merges = _classify_residual(padded, residual, connectivity=connectivity)
    return WarpResult(
        errors=int(residual.size), splits=splits, merges=merges, pixels=h * w, passes=passes,
        warped=padded[1:-1, 1:-1].astype(bool),
    )


def _distinct_nonzero(labels: np.ndarray) -> np.ndarray:
    """Number of distinct non-zero values in each row of a (M, k) integer array."""
    if labels.shape[0] == 0:
        return np.zeros(0, dtype=np.intp)
    srt = np.sort(labels, axis=1)
    new = np.concatenate([srt[:, :1] != 0, (np.diff(srt, axis=1) != 0) & (srt[:, 1:] != 0)], axis=1)
    return new.sum(axis=1)


def _classify_residual(padded: np.ndarray, residual: np.ndarray, *, connectivity: int) -> tuple[int, int]:
    """Split and merge pixels among the non-simple mismatches left by the warp.

    A background pixel of L* whose flip would join foreground pieces (T_fg >= 2) that
    belong to different objects of L* is a merge; a foreground pixel whose flip would
    join background pieces (T_bg >= 2) of which two are the same background region is a
    split (the background loop cuts the object). Other flips would close a loop into a
    hole, open a hole, or create or delete an object.
    """
    if residual.size == 0:
        return 0, 0
    width = padded.shape[1]
    flat = padded.ravel()
    background = 12 - connectivity
    t_fg, t_bg = topological_numbers(connectivity)
    all8 = np.array([dy * width + dx for dy, dx in _NEIGHBOURS], dtype=np.intp)
    four = np.array([dy * width + dx for dy, dx in _NEIGHBOURS if abs(dy) + abs(dx) == 1], dtype=np.intp)
    codes = (flat[residual[:, None] + all8] * (1 << np.arange(8))).sum(axis=1)
    is_fg = flat[residual] == 1
    fg_labels = ndimage.label(padded, structure=connectivity_structure(connectivity))[0].ravel()
    bg_labels = ndimage.label(padded == 0, structure=connectivity_structure(background))[0].ravel()
    fg_adjacent = four if connectivity == 4 else all8
    bg_adjacent = four if background == 4 else all8
    objects = _distinct_nonzero(fg_labels[residual[:, None] + fg_adjacent])
    regions = _distinct_nonzero(bg_labels[residual[:, None] + bg_adjacent])
    merges = ~is_fg & (t_fg[codes] >= 2) & (objects >= 2)
    splits = is_fg & (t_bg[codes] >= 2) & (regions < t_bg[codes])
    return int(splits.sum()), int(merges.sum())


def warping_sweep(
    cell_probability: np.ndarray,
    true_fg: np.ndarray,
    *,
    thresholds: Sequence[float] = ISBI_THRESHOLDS,
    connectivity: int = 4,
) -> list[tuple[int, int]]:
    """Warping-error pixel counts of ``cell_probability > t`` for every threshold t.

    Args:
        cell_probability: (Y, X) float, P(cell interior).
        true_fg: (Y, X) bool ground-truth foreground.
        thresholds: the thresholds t.
        connectivity: foreground connectivity, 4 or 8.

    Returns:
        ``(all topological-error pixels, split + merge pixels)`` per threshold (divide by
        the pixel count).
    """
    prob = _probability("cell_probability", cell_probability)
    out = []
    for t in thresholds:
        r = warping_error_count(true_fg, _above(prob, t), connectivity=connectivity)
        out.append((r.errors, r.splits + r.merges))
    return out
