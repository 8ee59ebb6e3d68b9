"""Object scores of a (Z, Y, X) stack as 3-D objects: the array core of ``unet evaluate --dims 3``.

Per-slice scoring (:func:`unet_core.evaluate.scoring.score_slice`) counts a cell once in every
slice it crosses and never sees whether the prediction gave it one id across those slices. Here an
id is one object across all its slices, as the 3-D mode of the workflow (issue 36) makes them:

* the ground-truth objects are the stack's instance ids as they are (each must be one 6-connected
  piece: :func:`unet_core.common.labels.split_label_id`), or for binary labels the 6-connected components of the foreground;
* the predicted objects are the prediction's instances as stored (``labels/instances``), or the
  6-connected components of the argmax cell class where it has none; the ``*_components_3d``
  scores always use those components, the ``*_truth_split_3d`` scores the predicted foreground
  split as the ground truth splits it (:func:`~unet_core.evaluate.object_matching.truth_split`);
* optionally, the 2-D per-slice instances (a 2-D prediction) linked into 3-D ids by
  :func:`unet_core.infer.slice_linking.link_slices`: the ``*_linked_3d`` scores, to compare the
  3-D mode with the 2-D per-slice mode on the same volumes.

Every score is :func:`~unet_core.evaluate.object_matching.match_objects` on the volumes (IoU and
SEG over voxels, a match at IoU > 0.5): one definition for 2-D and 3-D. Adjacency in 3-D is the
6-neighbourhood (face neighbours), as :func:`unet_core.infer.instances.components_3d` and the
3-D weights use; the per-slice ``--connectivity`` (4 or 8) does not apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from unet_core.common.errors import UserInputError
from unet_core.common.labels import LabelKind, binary_foreground
from unet_core.evaluate.object_matching import ObjectCounts, match_objects, truth_split
from unet_core.infer.instances import components_3d

#: Definitions of the 3-D scores, written into metrics.json beside the per-slice ones.
DECISION_RULES_3D: dict[str, str] = {
    "per_slice_vs_3d": "scores named without _3d are the per-slice scores (a cell counted once in every slice it "
                       "crosses, counts summed over the slices); names ending in _3d score (Z, Y, X) objects over "
                       "the scored slices as one volume: an id is one object across all its slices, IoU and SEG "
                       "over voxels, 6-connected (face neighbours)",
    "object_precision/recall/f1_3d, seg_3d": "the prediction's instances as stored (labels/instances; without "
                                             "them the 6-connected components of the argmax cell class) as 3-D "
                                             "objects against the ground-truth ids (binary labels: the 6-connected "
                                             "components of the foreground); a match at IoU > 0.5, SEG as per slice",
    "*_components_3d": "the same scores of the 6-connected components of the argmax cell class",
    "*_truth_split_3d": "the same scores of the predicted foreground split in 3-D as the ground truth splits it "
                        "(6-connected flooding by decreasing P(cell)): what a perfect 3-D instance rule could "
                        "reach on this foreground",
    "*_linked_3d": "--link-slices: the per-slice 2-D instances (labels/instances, or the per-slice connected "
                   "components of the argmax) linked into 3-D ids by mutual best IoU > link_min_iou between "
                   "consecutive slices (infer/slice_linking.link_slices), scored as 3-D objects: the 2-D "
                   "per-slice mode with linking, for comparison with the 3-D mode",
}


def truth_volume(labels: np.ndarray, *, label_kind: LabelKind, foreground_value: int | None = None) -> np.ndarray:
    """Ground-truth 3-D objects of a (Z, Y, X) label volume.

    Args:
        labels: (Z, Y, X) integer labels as ingested.
        label_kind: instance labels keep their ids (check them with :func:`unet_core.common.labels.split_label_id` first);
            binary labels give the 6-connected components of the foreground.
        foreground_value: binary labels' value of cell interior (the stack's record); None:
            the larger value present (:func:`~unet_core.common.labels.binary_foreground`).

    Returns:
        (Z, Y, X) int32 objects, 0 = background.

    Raises:
        UserInputError: binary labels with more than two values, or two of which none is the
            foreground value.
    """
    labels = np.asarray(labels)
    if label_kind is LabelKind.INSTANCE:
        return labels.astype(np.int32, copy=False)
    values = np.unique(labels)
    if foreground_value is None:
        foreground_value = binary_foreground(values[-1:])
    if values.size > 2 or (values.size == 2 and foreground_value not in values):
        raise UserInputError(f"binary labels: values {values[:5].tolist()} are not one background and the "
                             f"foreground {foreground_value}; use label kind 'instance' for instance labels")
    return components_3d(labels == foreground_value)


@dataclass(frozen=True)
class VolumeCounts:
    """Object counts of one volume (see the module docstring for which objects).

    Attributes:
        objects: the predicted instances (or the 3-D components of the argmax).
        components: the 6-connected components of the argmax cell class.
        truth_split: the predicted foreground split as the ground truth splits it.
        linked: the per-slice instances linked into 3-D ids (None: not asked for).
    """

    objects: ObjectCounts
    components: ObjectCounts
    truth_split: ObjectCounts
    linked: ObjectCounts | None = None


def score_volume(
    cell_probability: np.ndarray,
    pred_classes: np.ndarray,
    true_instances: np.ndarray,
    *,
    pred_instances: np.ndarray | None = None,
    linked_instances: np.ndarray | None = None,
) -> VolumeCounts:
    """3-D object counts of a volume.

    Args:
        cell_probability: (Z, Y, X) float32 P(cell) in [0, 1] (the truth split's flooding order).
        pred_classes: (Z, Y, X) integer argmax classes (1 = cell).
        true_instances: (Z, Y, X) integer 3-D ground-truth objects, 0 = background
            (:func:`truth_volume`).
        pred_instances: (Z, Y, X) integer 3-D predicted objects; None: the 6-connected
            components of the argmax cell class.
        linked_instances: (Z, Y, X) per-slice instances already linked into 3-D ids
            (:func:`unet_core.infer.slice_linking.link_slices`), or None.

    Returns:
        The :class:`VolumeCounts`.
    """
    components = components_3d(np.asarray(pred_classes) == 1)
    objects = components if pred_instances is None else np.asarray(pred_instances)
    split = truth_split(true_instances, objects, cell_probability, connectivity=6)
    return VolumeCounts(
        objects=match_objects(true_instances, objects),
        components=match_objects(true_instances, components),
        truth_split=match_objects(true_instances, split),
        linked=None if linked_instances is None else match_objects(true_instances, linked_instances),
    )


def summarise_volume(counts: VolumeCounts) -> dict[str, Any]:
    """Scores of :class:`VolumeCounts`, every name ending in ``_3d`` (:data:`DECISION_RULES_3D`)."""
    obj = counts.objects
    out: dict[str, Any] = {
        "object_precision_3d": obj.precision, "object_recall_3d": obj.recall, "object_f1_3d": obj.f1,
        "seg_3d": obj.seg, "n_true_objects_3d": obj.n_true, "n_pred_objects_3d": obj.n_pred,
        "object_f1_components_3d": counts.components.f1, "seg_components_3d": counts.components.seg,
        "n_pred_objects_components_3d": counts.components.n_pred,
        "seg_truth_split_3d": counts.truth_split.seg, "object_f1_truth_split_3d": counts.truth_split.f1,
    }
    if counts.linked is not None:
        link = counts.linked
        out.update({
            "object_precision_linked_3d": link.precision, "object_recall_linked_3d": link.recall,
            "object_f1_linked_3d": link.f1, "seg_linked_3d": link.seg, "n_pred_objects_linked_3d": link.n_pred,
        })
    return out
