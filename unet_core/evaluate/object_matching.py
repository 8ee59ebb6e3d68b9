"""Object scores of one 2-D slice or one 3-D volume: one-to-one matching at IoU > 0.5 (precision,
recall, F1) and SEG.

* object precision/recall/F1: a predicted object matches a ground-truth object when
  their IoU is > 0.5 (strictly greater, which makes the matching one-to-one).
* SEG (cell tracking challenge): the mean, over ground-truth objects, of the IoU with
  the predicted object covering more than half of it (0 if none). :func:`truth_split`
  splits the predicted foreground as the ground truth does: its SEG is what a perfect
  instance rule would reach on that foreground.

:func:`match_objects` scores (Z, Y, X) volumes as 3-D objects (IoU and SEG over voxels: an id is
one object across all its slices), the same formula as in 2-D; today's per-slice scores of a
volume are the counts of its slices summed, ``sum(match_objects(t[z], p[z]) for z ...)``, where a
3-D object counts once in every slice it crosses.

Conventions (labels, connectivity): :mod:`unet_core.evaluate.score_inputs`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from unet_core.evaluate.score_inputs import check_same_shape, consecutive_labels
from unet_core.infer.instances import flood_height, label_unflooded


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
        true_instances: (Y, X) or (Z, Y, X) integer ground-truth objects, 0 = background; in a
            volume an id is one 3-D object, its pixels counted over every slice.
        pred_instances: integer predicted objects of the same shape, 0 = background.

    Returns:
        The :class:`ObjectCounts`; invariant to relabelling either array.
    """
    true_instances = _image_or_volume("true_instances", true_instances)
    pred_instances = _image_or_volume("pred_instances", pred_instances)
    check_same_shape(true_instances=true_instances, pred_instances=pred_instances)
    t_idx, n_t = consecutive_labels(true_instances)
    p_idx, n_p = consecutive_labels(pred_instances)
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


def _image_or_volume(name: str, array: np.ndarray) -> np.ndarray:
    """``array`` if it is (Y, X) or (Z, Y, X), else ValueError."""
    array = np.asarray(array)
    if array.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2-D (Y, X) or 3-D (Z, Y, X) array, got shape {array.shape}")
    return array


def truth_split(
    true_instances: np.ndarray,
    pred_instances: np.ndarray,
    cell_probability: np.ndarray,
    *,
    connectivity: int | None = None,
) -> np.ndarray:
    """The predicted cell foreground split into objects as the ground truth splits it.

    Each ground-truth object seeds the predicted foreground pixels it covers, and the seeds flood
    the rest of the foreground in order of decreasing P(cell); foreground components that touch no
    ground-truth object stay objects of their own (false positives). Scored with
    :func:`match_objects`, this is what a perfect instance rule would reach on the predicted
    foreground: the gap from the instances' own score to it is the instance rule's loss, the gap
    from it to 1 the pixel classifier's.

    Args:
        true_instances: (Y, X) or (Z, Y, X) integer ground-truth objects, 0 = background.
        pred_instances: integer predicted objects of the same shape, 0 = background (only their
            union is used).
        cell_probability: P(cell) in [0, 1] of the same shape, the flooding order.
        connectivity: adjacency of the flooding and of the leftover components: 4 or 8 in
            (Y, X) (None: 4), 6 in (Z, Y, X) (None: 6).

    Returns:
        int32 objects, 0 = background: ground-truth ids, then leftovers numbered above them.
    """
    true_instances = _image_or_volume("true_instances", true_instances)
    foreground = _image_or_volume("pred_instances", pred_instances) != 0
    check_same_shape(true_instances=true_instances, pred_instances=foreground,
                     cell_probability=_image_or_volume("cell_probability", cell_probability))
    if connectivity is None:
        connectivity = 4 if true_instances.ndim == 2 else 6
    markers = np.where(foreground, true_instances, 0).astype(np.int32)
    labels = flood_height(np.asarray(cell_probability, dtype=np.float32), markers, mask=foreground,
                          connectivity=connectivity)
    first_leftover = int(true_instances.max(initial=0)) + 1
    label_unflooded(labels, foreground, first_id=first_leftover, connectivity=connectivity)
    return labels
