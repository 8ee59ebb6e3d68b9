"""Stage ``evaluate``: score a prediction against the ground truth of its stack.

Reads the prediction OME-Zarr written by ``unet merge`` (class probabilities (c, z, y, x)
at level ``0``, argmax classes at ``labels/segmentation/0``) and the ingested stack with
its labels, one slice at a time, and writes to ``OUT_DIR``:

* ``metrics.csv``: one row per slice;
* ``metrics.json``: the dataset scores (counts pooled over the scored slices, then the
  formula, as the ISBI 2012 scripts pooled slices), every slice's scores, the decision
  rule of every score, the parameters and the provenance;
* ``overlays.png``: the worst and best slices with prediction / ground-truth overlays.

Ground truth per slice (see :func:`ground_truth_targets`): for binary labels the objects
are the connected components of the foreground and the classes the foreground mask; for
instance labels the objects are the labels and the classes mark the 1-px separation
between touching cells as background, exactly as the training targets do.

Decision rules: scores named without a threshold use the argmax of the probabilities;
the threshold-swept scores (the ISBI 2012 way) threshold P(cell) and report the best
threshold, chosen per slice for the per-slice rows and once for the whole dataset for
the dataset row. The predicted objects are the connected components of the predicted cell
class in each 2-D slice (the stored ``labels/instances`` may be merged in 3-D).

3-D objects (``dims=3``; ``unet evaluate --dims 3``, the default where the prediction records
``attrs["unet"]["dims"] = 3``): the per-slice scores above stay as they are, and the dataset
entry gains the scores of (Z, Y, X) objects over the chosen slices (one contiguous run of at
least 2), every name ending in ``_3d`` (:mod:`unet_core.evaluate.volume_scores`); with
``link_slices`` also those of the per-slice instances linked into 3-D ids (``*_linked_3d``).
metrics.csv and overlays.png stay per slice. Instance ids that lie in several 6-connected pieces
(ids restarting on every slice) are refused: they are not 3-D objects.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from unet_core import __version__
from unet_core.common.atomic import atomic_output, remove_path
from unet_core.common.errors import UserInputError, parse_choice
from unet_core.common.outputs import CsvMark, FolderMark, JsonMark, Mark, PngMark, claim_outputs
from unet_core.common.labels import LabelKind, split_label_id
from unet_core.common.progress import progress
from unet_core.evaluate.object_matching import ObjectCounts, match_objects, truth_split
from unet_core.evaluate.pixel_scores import BinaryCounts, class_dice, class_iou, confusion_matrix, threshold_counts
from unet_core.evaluate.rand_scores import PairCounts, rand_pair_counts, rand_sweep
from unet_core.evaluate.score_inputs import CELL, ISBI_THRESHOLDS, best_index, connected_components
from unet_core.evaluate.volume_scores import (
    DECISION_RULES_3D,
    score_volume,
    summarise_volume,
    truth_volume,
)
from unet_core.evaluate.warping_error import warping_sweep
from unet_core.evaluate.plot import OverlayPanel, plot_overlays
from unet_core.infer.encoding import ProbabilityEncoding
from unet_core.infer.slice_linking import LINK_MIN_IOU, link_slices
from unet_core.io.ngff import Stack, open_group, open_stack, recorded_intensity
from unet_core.weights.maps import class_map, instances_from_labels

log = logging.getLogger(__name__)

CLASS_NAMES = ("background", "cell")
METRICS_FORMAT = "unet-pipeline/metrics/1"
#: How 'unet evaluate' recognises its own output folder and files (:mod:`unet_core.common.outputs`).
OUT_DIR_MARK = FolderMark(
    {
        "metrics.csv": CsvMark("z,pixel_error,", "a metrics table written by 'unet evaluate'"),
        "metrics.json": JsonMark(METRICS_FORMAT, "a metrics.json written by 'unet evaluate'"),
        "overlays.png": PngMark("evaluate"),
    },
    "an output folder of 'unet evaluate' (metrics.csv, metrics.json, overlays.png)",
)

#: Per-score decision rule and definition, written into metrics.json.
DECISION_RULES: dict[str, str] = {
    "instances": "adapted_rand_error, object_precision/recall/f1, seg and n_pred_objects score the instances "
                 "the workflow writes (labels/instances of the prediction: method and settings in "
                 "prediction_unet_attrs.instance_method / watershed); the *_components scores score the "
                 "4-connected components of the argmax cell class instead, for comparison",
    "probabilities": "as written by unet predict: with --decision corrected (default) they include the "
    "model's weight-prior logit offsets (see prediction_unet_attrs.logit_offsets; null = raw softmax)",
    "pixel_error": "argmax of the class probabilities; misclassified fraction of all pixels",
    "iou_<class>": "argmax; |T ∩ P| / |T ∪ P| of each class",
    "foreground_iou": "argmax; IoU of the non-background classes as one mask (cell tracking style)",
    "dice": "argmax; 2|T ∩ P| / (|T| + |P|) of the foreground",
    "pixel_error_best": "P(cell) > threshold, lowest misclassified fraction over the thresholds "
                        "(ISBI 2012 'squared Euclidean distance' reading); threshold in pixel_error_threshold",
    "pixel_f_error_best": "P(cell) > threshold, 1 - maximal F-score of the cell pixels over the thresholds "
                          "(ISBI 2012 '1 - maximal F-score of pixel similarity' reading)",
    "rand_error_fg": "ISBI 2012 foreground-restricted Rand error: 1 - maximal F-score of the Rand index over "
                     "pairs of ground-truth foreground pixels, predicted segments = connected components of "
                     "P(cell) > threshold, predicted background inside the ground-truth foreground = singletons; "
                     "best threshold in rand_threshold",
    "adapted_rand_error": "skimage.metrics.adapted_rand_error of the ground-truth objects (label 0 ignored) and "
                          "the predicted instances, with predicted background counted as one segment (skimage's "
                          "handling); no threshold sweep",
    "object_precision/recall/f1": "a predicted instance matches a ground-truth object when their IoU > 0.5",
    "seg": "cell tracking challenge SEG: mean over ground-truth objects of the IoU with the predicted instance "
           "covering more than half of it (0 if none)",
    "seg_truth_split / object_f1_truth_split": (
        "the same scores of the predicted instances' foreground split as the ground truth splits it (each "
        "ground-truth object seeds the foreground it covers, flooding the rest by decreasing P(cell)): "
        "what a perfect instance rule could reach on this foreground. seg below it is lost to the instance "
        "rule (seeds, merges), 1 - it to the pixel classifier (where cells end)"
    ),
    "warping_error": "Jain et al. 2010 at the Rand operating point: P(cell) > rand_threshold, ground-truth "
                     "foreground warped by simple-point flips towards it, remaining mismatching pixels / all "
                     "pixels (every topological error: splits, merges, holes, missing and extra objects; the "
                     "ISBI 2012 leaderboard counted splits and mergers only)",
    "warping_split_merge_error": "the same, counting only pixels whose flip would split or merge objects of "
                                 "the warped ground truth (the ISBI 2012 'splits and mergers' kind of error)",
    "warping_error_min": "warping_error, lowest over the thresholds (threshold in warping_min_threshold), as the ISBI "
                         "2012 script reported it; beware that near-empty predictions (high thresholds) are "
                         "topologically cheap, so prefer warping_error",
    "pixel_f_error_best_note": "degenerate on cell-dominated data: predicting every pixel as cell gives "
                               "1 - F = 0.112 on ISBI 2012 slices 20-29; compare pixel_error_best with the paper",
}

#: Scores where a larger value is better (used to rank slices for the overlay figure).
HIGHER_IS_BETTER = frozenset(
    {"iou_background", "iou_cell", "foreground_iou", "dice", "object_precision", "object_recall", "object_f1",
     "seg", "seg_truth_split", "object_f1_truth_split", "adapted_rand_precision", "adapted_rand_recall",
     "rand_precision", "rand_recall"}
)


# ---------------------------------------------------------------------------------------
# ground truth
# ---------------------------------------------------------------------------------------
def ground_truth_targets(
    labels: np.ndarray, *, label_kind: LabelKind | str, foreground_value: int | None = None, connectivity: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth objects and classes of one slice.

    Args:
        labels: (Y, X) integer labels as ingested.
        label_kind: ``"instance"`` (0 = background, other values objects) or ``"binary"``.
        foreground_value: for binary labels, the value meaning cell interior (the larger
            of the stack's two values); default: the larger value in this slice.
        connectivity: 4 or 8, adjacency of the foreground components of binary labels.

    The rules are those of the training targets (:func:`unet_core.weights.maps.instances_from_labels`
    and :func:`unet_core.weights.maps.class_map`): binary labels give connected components and
    the foreground mask; instance labels keep their ids and lose the pixel of the smaller
    label on every contact between two cells (a 1-px background line).

    Returns:
        ``(instances, classes)``: (Y, X) int32 objects (0 = background) and (Y, X) uint8
        classes (1 = cell interior, 0 = background / membrane / separation line).

    Raises:
        ValueError: unknown label kind.
        UserInputError: labels not 2-D integer, or more than two values in binary labels.
    """
    label_kind = parse_choice(LabelKind, label_kind, option="label_kind")
    labels = np.asarray(labels)
    if label_kind is LabelKind.BINARY and foreground_value is None:
        foreground_value = 1 if labels.size == 0 or labels.max() == 0 else None  # all-zero slice: no cell
    instances = instances_from_labels(labels, kind=label_kind, connectivity=connectivity, foreground=foreground_value)
    classes = class_map(instances, separate_touching=label_kind is LabelKind.INSTANCE)
    return instances, classes


# ---------------------------------------------------------------------------------------
# one slice: counts
# ---------------------------------------------------------------------------------------
@dataclass
class SliceCounts:
    """Raw counts of one slice (or, after :meth:`add`, of several), ready to pool.

    Attributes:
        confusion: (C, C) int64 pixel confusion matrix of the argmax classes (rows: truth).
        pixel_sweep: :class:`BinaryCounts` of P(cell) > t per threshold.
        rand_sweep: foreground-restricted Rand :class:`PairCounts` per threshold.
        adapted_rand: skimage-style :class:`PairCounts` of the predicted instances.
        objects: :class:`ObjectCounts` of the predicted instances.
        adapted_rand_cc, objects_cc: the same for the 4-connected components of the argmax.
        objects_split: :class:`ObjectCounts` of the predicted instances' foreground split as
            the ground truth splits it (:func:`~unet_core.evaluate.object_matching.truth_split`).
        warping: (topological-error pixels, split + merge pixels) per threshold (empty when
            not computed).
        pixels: pixels scored.
    """

    confusion: np.ndarray
    pixel_sweep: list[BinaryCounts]
    rand_sweep: list[PairCounts]
    adapted_rand: PairCounts
    objects: ObjectCounts
    adapted_rand_cc: PairCounts
    objects_cc: ObjectCounts
    objects_split: ObjectCounts
    warping: list[tuple[int, int]] = field(default_factory=list)
    pixels: int = 0

    def add(self, other: SliceCounts) -> SliceCounts:
        return SliceCounts(
            confusion=self.confusion + other.confusion,
            pixel_sweep=[a + b for a, b in zip(self.pixel_sweep, other.pixel_sweep, strict=True)],
            rand_sweep=[a + b for a, b in zip(self.rand_sweep, other.rand_sweep, strict=True)],
            adapted_rand=self.adapted_rand + other.adapted_rand,
            objects=self.objects + other.objects,
            adapted_rand_cc=self.adapted_rand_cc + other.adapted_rand_cc,
            objects_cc=self.objects_cc + other.objects_cc,
            objects_split=self.objects_split + other.objects_split,
            warping=[(a[0] + b[0], a[1] + b[1]) for a, b in zip(self.warping, other.warping, strict=True)],
            pixels=self.pixels + other.pixels,
        )


def score_slice(
    cell_probability: np.ndarray,
    pred_classes: np.ndarray,
    true_instances: np.ndarray,
    true_classes: np.ndarray,
    *,
    pred_instances: np.ndarray | None = None,
    n_classes: int = 2,
    thresholds: Sequence[float] = ISBI_THRESHOLDS,
    connectivity: int = 4,
    warping: bool = True,
) -> SliceCounts:
    """All counts of one slice.

    Args:
        cell_probability: (Y, X) float32 P(cell interior) in [0, 1].
        pred_classes: (Y, X) integer argmax classes in [0, n_classes).
        true_instances: (Y, X) integer ground-truth objects, 0 = background.
        true_classes: (Y, X) uint8 ground-truth classes (1 = cell interior).
        pred_instances: (Y, X) integer predicted instances, 0 = background (the prediction's
            ``labels/instances``); None: the connected components of the argmax cell class.
        n_classes: classes of the prediction.
        thresholds: thresholds of P(cell) for the swept scores.
        connectivity: 4 or 8, adjacency of predicted components (and of the foreground in
            the warping error).
        warping: compute the warping error (the slowest score).

    Returns:
        The :class:`SliceCounts`.
    """
    cm = confusion_matrix(true_classes, pred_classes, n_classes=n_classes)
    true_fg = np.asarray(true_classes) == CELL
    components = connected_components(np.asarray(pred_classes) == CELL, connectivity=connectivity)
    pred_instances = components if pred_instances is None else np.asarray(pred_instances)
    return SliceCounts(
        confusion=cm,
        pixel_sweep=threshold_counts(cell_probability, true_fg, thresholds=thresholds),
        rand_sweep=rand_sweep(cell_probability, true_instances, thresholds=thresholds, connectivity=connectivity),
        adapted_rand=rand_pair_counts(true_instances, pred_instances, pred_background="segment"),
        objects=match_objects(true_instances, pred_instances),
        adapted_rand_cc=rand_pair_counts(true_instances, components, pred_background="segment"),
        objects_cc=match_objects(true_instances, components),
        objects_split=match_objects(true_instances, truth_split(
            true_instances, pred_instances, cell_probability, connectivity=connectivity)),
        warping=(
            warping_sweep(cell_probability, true_fg, thresholds=thresholds, connectivity=connectivity)
            if warping else []
        ),
        pixels=int(np.asarray(true_classes).size),
    )


def class_names(n_classes: int) -> list[str]:
    return [CLASS_NAMES[k] if k < len(CLASS_NAMES) else f"class{k}" for k in range(n_classes)]


def summarise(counts: SliceCounts, *, thresholds: Sequence[float]) -> dict[str, Any]:
    """Scores from counts (one slice, or pooled slices for a dataset).

    Args:
        counts: the :class:`SliceCounts`.
        thresholds: the thresholds the sweeps used, in order.

    Returns:
        Ordered ``{name: value}``: floats, integer counts and the chosen thresholds (the
        CSV/JSON columns; :data:`DECISION_RULES` explains each).
    """
    cm = counts.confusion
    total = int(cm.sum())
    out: dict[str, Any] = {"pixel_error": float(1.0 - np.trace(cm) / total) if total else 0.0}
    for name, value in zip(class_names(cm.shape[0]), class_iou(cm), strict=True):
        out[f"iou_{name}"] = float(value)
    fg_cm = np.array([[cm[0, 0], cm[0, 1:].sum()], [cm[1:, 0].sum(), cm[1:, 1:].sum()]])
    out["foreground_iou"] = float(class_iou(fg_cm)[1])
    out["dice"] = float(class_dice(fg_cm)[1])

    i = best_index([c.pixel_error for c in counts.pixel_sweep])
    out["pixel_error_best"] = counts.pixel_sweep[i].pixel_error
    out["pixel_error_threshold"] = float(thresholds[i])
    i = best_index([c.f_error for c in counts.pixel_sweep])
    out["pixel_f_error_best"] = counts.pixel_sweep[i].f_error
    out["pixel_f_error_threshold"] = float(thresholds[i])

    i = best_index([c.error for c in counts.rand_sweep])
    best = counts.rand_sweep[i]
    out["rand_error_fg"] = best.error
    out["rand_threshold"] = float(thresholds[i])
    out["rand_precision"] = best.precision
    out["rand_recall"] = best.recall

    out["adapted_rand_error"] = counts.adapted_rand.error
    out["adapted_rand_precision"] = counts.adapted_rand.precision
    out["adapted_rand_recall"] = counts.adapted_rand.recall

    obj = counts.objects
    out["object_precision"] = obj.precision
    out["object_recall"] = obj.recall
    out["object_f1"] = obj.f1
    out["seg"] = obj.seg
    out["n_true_objects"] = obj.n_true
    out["n_pred_objects"] = obj.n_pred
    out["adapted_rand_error_components"] = counts.adapted_rand_cc.error
    out["object_f1_components"] = counts.objects_cc.f1
    out["seg_components"] = counts.objects_cc.seg
    out["n_pred_objects_components"] = counts.objects_cc.n_pred
    out["seg_truth_split"] = counts.objects_split.seg
    out["object_f1_truth_split"] = counts.objects_split.f1

    if counts.warping:
        i_rand = best_index([c.error for c in counts.rand_sweep])
        n = max(counts.pixels, 1)
        errors, split_merge = counts.warping[i_rand]
        out["warping_error"] = errors / n
        out["warping_split_merge_error"] = split_merge / n
        out["warping_pixels"] = int(errors)
        i = best_index([w[0] for w in counts.warping])
        out["warping_error_min"] = counts.warping[i][0] / n
        out["warping_min_threshold"] = float(thresholds[i])
    out["pixels"] = counts.pixels
    return out


# ---------------------------------------------------------------------------------------
# I/O adapter
# ---------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """A prediction store opened for reading (lazy Zarr arrays)."""

    path: Path
    probabilities: zarr.Array  # (C, Z, Y, X) float32
    segmentation: zarr.Array | None  # (Z, Y, X) uint8
    attrs: dict[str, Any]
    instances: zarr.Array | None = None  # (Z, Y, X) uint32, as merge wrote them

    @property
    def n_classes(self) -> int:
        return int(self.probabilities.shape[0])

    def slice(self, z: int) -> tuple[np.ndarray, np.ndarray]:
        """(P(cell), argmax classes) of slice ``z``: (Y, X) float32 and (Y, X) uint8.

        Probabilities are decoded from their stored encoding (uint8 codes, float16, float32).
        """
        probs = ProbabilityEncoding.of(self.probabilities.dtype).decode(np.asarray(self.probabilities[:, z]))
        if self.segmentation is not None:
            classes = np.asarray(self.segmentation[z])
        else:
            classes = probs.argmax(axis=0).astype(np.uint8)
        return probs[CELL], classes

    def instances_slice(self, z: int) -> np.ndarray | None:
        """(Y, X) uint32 predicted instances of slice ``z`` (None where the store has none)."""
        return None if self.instances is None else np.asarray(self.instances[z])


def open_prediction(path: str | os.PathLike[str]) -> Prediction:
    """Open a prediction written by ``unet merge``.

    Raises:
        UserInputError: not a Zarr store, or not the (c, z, y, x) probability layout.
    """
    path = Path(path)
    root = open_group(path, hint="run 'unet merge' to create the prediction")
    if "0" not in root or root["0"].ndim != 4:
        raise UserInputError(
            f"{path}: expected class probabilities (c, z, y, x) at level '0', as written by 'unet merge'"
        )
    probs = root["0"]
    if probs.dtype.name not in {e.value for e in ProbabilityEncoding}:
        raise UserInputError(f"{path}: probabilities of dtype {probs.dtype}; expected uint8, float16 or float32")
    if probs.shape[0] < 2:
        raise UserInputError(f"{path}: level '0' has {probs.shape[0]} class channel(s); need >= 2 (background, cell)")
    seg = None
    try:
        seg = root["labels/segmentation/0"]
    except KeyError:
        log.info("%s has no labels/segmentation; using the argmax of the probabilities", path)
    if seg is not None and tuple(seg.shape) != tuple(probs.shape[1:]):
        raise UserInputError(f"{path}: labels/segmentation/0 shape {seg.shape} does not match probabilities {probs.shape}")
    instances = root["labels/instances/0"] if "labels/instances/0" in root else None
    if instances is None:
        log.info("%s has no labels/instances; scoring the connected components of the argmax", path)
    elif tuple(instances.shape) != tuple(probs.shape[1:]):
        raise UserInputError(f"{path}: labels/instances/0 shape {instances.shape} does not match probabilities {probs.shape}")
    return Prediction(path, probs, seg, dict(root.attrs), instances)


def evaluate_arrays(
    prediction: Prediction,
    stack,
    *,
    slices: Sequence[int],
    thresholds: Sequence[float],
    connectivity: int,
    warping: bool,
    foreground_value: int | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score the chosen slices; returns (per-slice rows, dataset scores)."""
    kind = stack.label_kind
    rows: list[dict[str, Any]] = []
    pooled: SliceCounts | None = None
    for z in progress(slices, desc="evaluate", unit="slice"):
        cell_probability, pred_classes = prediction.slice(z)
        true_instances, true_classes = ground_truth_targets(
            np.asarray(stack.labels[z]), label_kind=kind, foreground_value=foreground_value, connectivity=connectivity
        )
        if int(pred_classes.max(initial=0)) >= prediction.n_classes:
            raise UserInputError(
                f"{prediction.path}: slice {z} of labels/segmentation has class {int(pred_classes.max())} "
                f">= {prediction.n_classes} channels"
            )
        counts = score_slice(
            cell_probability, pred_classes, true_instances, true_classes, pred_instances=prediction.instances_slice(z),
            n_classes=prediction.n_classes, thresholds=thresholds, connectivity=connectivity, warping=warping,
        )
        rows.append({"z": int(z), **summarise(counts, thresholds=thresholds)})
        pooled = counts if pooled is None else pooled.add(counts)
    if pooled is None:
        raise UserInputError("no slices selected to evaluate")
    dataset = {"slices": len(slices), **summarise(pooled, thresholds=thresholds)}
    return rows, dataset


# ---------------------------------------------------------------------------------------
# 3-D objects (--dims 3)
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VolumeMode:
    """What ``--dims 3`` scores: the slices ``z0 .. z0 + Z - 1`` as one volume.

    Attributes:
        z0: first scored slice of the stack.
        truth: (Z, Y, X) int32 ground-truth 3-D objects (:func:`truth_volume`).
        link_min_iou: IoU a slice link needs; None: no ``--link-slices`` scores.
    """

    z0: int
    truth: np.ndarray
    link_min_iou: float | None = None

    def parameters(self) -> dict[str, Any]:
        """The ``parameters`` entries of metrics.json that only 3-D scoring adds."""
        out: dict[str, Any] = {"dims": 3, "volume_slices": [self.z0, self.z0 + self.truth.shape[0] - 1],
                               "volume_connectivity": 6, "link_slices": self.link_min_iou is not None}
        if self.link_min_iou is not None:
            out["link_min_iou"] = self.link_min_iou
        return out


def _recorded_dims(prediction: Prediction) -> int | None:
    dims = prediction.attrs.get("unet", {}).get("dims")
    return None if dims is None else int(dims)


def _volume_mode(prediction: Prediction, stack: Stack, slices: list[int], *, dims: int | None, link_slices: bool,
                 link_min_iou: float, foreground_value: int | None) -> VolumeMode | None:
    """Check the 3-D options and read the ground-truth objects (None in 2-D): every refusal comes
    before any slice is scored or any file written.

    Raises:
        UserInputError: dims not 2 or 3; linking without 3-D or on 3-D instances; a single slice, a
            selection with gaps; instance ids in more than one 6-connected piece.
    """
    recorded = _recorded_dims(prediction)
    dims = dims if dims is not None else (recorded or 2)
    if dims not in (2, 3):
        raise UserInputError(f"--dims must be 2 or 3, got {dims}")
    if link_slices and dims != 3:
        raise UserInputError("--link-slices scores per-slice instances linked into 3-D objects: add --dims 3")
    if dims == 2:
        return None
    if link_slices and recorded == 3:
        raise UserInputError(f"--link-slices: {prediction.path} holds 3-D instances already (attrs unet.dims 3); "
                             "link the instances of a 2-D prediction")
    if not 0.0 <= link_min_iou < 1.0:
        raise UserInputError(f"--link-min-iou must be in [0, 1), got {link_min_iou}")
    if stack.shape[0] < 2 or len(slices) < 2:
        what = f"{stack.path} has a single slice" if stack.shape[0] < 2 else "--slices selects a single slice"
        raise UserInputError(f"--dims 3: {what}; 3-D objects need a volume (score it per slice with --dims 2)")
    z0 = slices[0]
    if slices != list(range(z0, z0 + len(slices))):
        run = f"{z0}-{z0 + len(slices) - 1}"
        raise UserInputError(f"--dims 3: --slices must be one contiguous ascending run (e.g. {run}) to score 3-D objects")
    labels = np.asarray(stack.labels[z0:z0 + len(slices)])
    if stack.label_kind is LabelKind.INSTANCE and (split := split_label_id(iter(labels))):
        first, pieces = split
        raise UserInputError(
            f"--dims 3: {stack.path}: label id {first} lies in {len(pieces)} separate 6-connected pieces: ids that "
            "restart on every slice are 2-D labels, not 3-D objects; score per slice (--dims 2) or relabel the "
            "cells in 3-D"
        )
    truth = truth_volume(labels, label_kind=stack.label_kind, foreground_value=foreground_value)
    return VolumeMode(z0=z0, truth=truth, link_min_iou=link_min_iou if link_slices else None)


def score_prediction_volume(prediction: Prediction, mode: VolumeMode, *, connectivity: int = 4) -> dict[str, Any]:
    """The ``*_3d`` scores of the prediction over ``mode``'s slices (:func:`score_volume`).

    Reads P(cell), the argmax and the instances of the slices into memory (about 9 bytes per
    voxel beside the ground truth's 4). ``connectivity`` (4 or 8) makes the per-slice components
    that ``--link-slices`` links where the prediction stores no instances.
    """
    shape = mode.truth.shape
    cell_probability = np.empty(shape, np.float32)
    pred_classes = np.empty(shape, np.uint8)
    for k in range(shape[0]):
        cell_probability[k], pred_classes[k] = prediction.slice(mode.z0 + k)
    stored = None
    if prediction.instances is not None:
        stored = np.asarray(prediction.instances[mode.z0:mode.z0 + shape[0]])
        if mode.link_min_iou is None and _recorded_dims(prediction) != 3:
            log.warning("%s does not record dims 3: if its instance ids are per slice (a 2-D merge), every slice "
                        "of a cell scores as an object of its own; --link-slices links them", prediction.path)
    linked = None
    if mode.link_min_iou is not None:
        per_slice = stored if stored is not None else np.stack(
            [connected_components(c == CELL, connectivity=connectivity) for c in pred_classes])
        linked = link_slices(per_slice, min_iou=mode.link_min_iou)
    counts = score_volume(cell_probability, pred_classes, mode.truth, pred_instances=stored, linked_instances=linked)
    return summarise_volume(counts)


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def _write_text(path: Path, text: str, *, own: Mark) -> None:
    with atomic_output(path, own=own) as tmp:
        tmp.write_text(text, encoding="utf-8")


def rank_slices(rows: list[dict[str, Any]], *, by: str, count: int) -> tuple[list[int], list[int]]:
    """Row indices of the ``count`` worst and ``count`` best slices by score ``by`` (of fewer than
    ``2 * count`` slices, the worse half and the better half: none is shown twice).

    Raises:
        UserInputError: ``by`` is not a per-slice score.
    """
    if by not in rows[0] or by in ("z", "pixels") or by.endswith("_threshold"):
        choices = [k for k in rows[0] if k not in ("z", "pixels") and not k.endswith("_threshold")]
        raise UserInputError(f"--rank-by {by!r} is not a per-slice score; choose one of {', '.join(choices)}")
    values = np.array([float(r[by]) for r in rows])
    order = np.argsort(values, kind="stable")  # ascending
    if by not in HIGHER_IS_BETTER:
        order = order[::-1]  # worst (largest error) first
    n_worst = min(count, (len(order) + 1) // 2)  # with few slices, both ends still get a row
    worst = [int(i) for i in order[:n_worst]]
    best = [int(i) for i in order[::-1][: min(count, len(order) - n_worst)]]
    return worst, best


def evaluate(
    prediction_path: str | os.PathLike[str],
    stack_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    slices: Sequence[int] | None = None,
    thresholds: Sequence[float] = ISBI_THRESHOLDS,
    connectivity: int = 4,
    warping: bool = True,
    overlay_count: int = 2,
    rank_by: str = "adapted_rand_error",
    dims: int | None = None,
    link_slices: bool = False,
    link_min_iou: float = LINK_MIN_IOU,
) -> dict[str, Any]:
    """Score a prediction against its stack's ground truth and write the report files.

    Args:
        prediction_path: prediction OME-Zarr from ``unet merge``.
        stack_path: the ingested stack (with labels) the prediction was made on.
        out_dir: directory for ``metrics.csv``, ``metrics.json`` and ``overlays.png``.
        slices: stack slice indices to score (default: all), e.g. the held-out ones.
        thresholds: thresholds of P(cell) for the swept (ISBI 2012) scores, in [0, 1].
        connectivity: 4 or 8, adjacency of connected components.
        warping: compute the warping error.
        overlay_count: worst and best slices each shown in ``overlays.png``.
        rank_by: per-slice score that ranks slices for the figure.
        dims: 3 adds the scores of 3-D objects (names ending in ``_3d``,
            :mod:`~unet_core.evaluate.volume_scores`) over the chosen slices, which must be a
            contiguous run of at least 2; 2 scores per slice only. None: the prediction's record
            (``attrs["unet"]["dims"]``, written by a 3-D merge), else 2.
        link_slices: with ``dims=3``, also score the per-slice 2-D instances of a 2-D prediction
            linked into 3-D ids (:func:`~unet_core.infer.slice_linking.link_slices`).
        link_min_iou: the IoU a link needs, in [0, 1).

    Returns:
        The dataset scores (the ``dataset`` entry of ``metrics.json``).

    Raises:
        UserInputError: missing or mismatching inputs, no labels, bad options.
    """
    claim_outputs([(out_dir, OUT_DIR_MARK)], [prediction_path, stack_path])
    stack, prediction = _open_inputs(prediction_path, stack_path)
    chosen = list(range(stack.shape[0])) if slices is None else [int(z) for z in slices]
    thresholds = [float(t) for t in thresholds]
    _check_options(chosen, thresholds, connectivity=connectivity, overlay_count=overlay_count)
    fg_value = stack.binary_foreground(chosen)
    volume = _volume_mode(prediction, stack, chosen, dims=dims, link_slices=link_slices, link_min_iou=link_min_iou,
                          foreground_value=fg_value)
    rows, dataset = evaluate_arrays(
        prediction, stack, slices=chosen, thresholds=thresholds, connectivity=connectivity, warping=warping,
        foreground_value=fg_value,
    )
    if volume is not None:
        dataset.update(score_prediction_volume(prediction, volume, connectivity=connectivity))
    worst, best = rank_slices(rows, by=rank_by, count=overlay_count)
    report = _report(prediction_path, stack_path, prediction, stack, dataset, rows, volume, parameters={
        "slices": chosen, "thresholds": thresholds, "connectivity": connectivity, "warping": warping,
    }, rank_by=rank_by)
    panels = [
        _overlay_panel(prediction, stack, rows[i], tag, foreground_value=fg_value, connectivity=connectivity)
        for tag, picks in (("worst", worst), ("best", best)) for i in picks
    ]
    _write_report(Path(out_dir), report, rows, panels, rank_by=rank_by)
    _log_summary(len(chosen), dataset, out_dir)
    return dataset


def _report(prediction_path: str | os.PathLike[str], stack_path: str | os.PathLike[str], prediction: Prediction,
            stack: Stack, dataset: dict[str, Any], rows: list[dict[str, Any]], volume: VolumeMode | None, *,
            parameters: dict[str, Any], rank_by: str) -> dict[str, Any]:
    """The content of metrics.json (3-D entries only where ``volume`` was scored)."""
    return {
        "format": METRICS_FORMAT,
        "dataset": dataset,
        "slices": rows,
        "decision_rules": DECISION_RULES if volume is None else {**DECISION_RULES, **DECISION_RULES_3D},
        "parameters": {
            **parameters,
            "label_kind": stack.label_kind.value,
            "n_classes": prediction.n_classes,
            "dataset_pooling": "counts summed over slices, then the formula; swept scores pick one threshold "
                               "for the dataset",
            "rank_by": rank_by,
            **({} if volume is None else volume.parameters()),
        },
        "provenance": {
            "prediction": str(Path(prediction_path).resolve()),
            "stack": str(Path(stack_path).resolve()),
            "prediction_unet_attrs": prediction.attrs.get("unet", {}),
            "tool": f"unet-pipeline {__version__}",
        },
    }


def _log_summary(n_slices: int, dataset: dict[str, Any], out_dir: str | os.PathLike[str]) -> None:
    """The run's scores in two log lines (the second, 3-D objects, only where scored)."""
    log.info(
        "%d slices: pixel error %.4f (argmax), foreground Rand error %.4f (threshold %.1f), instances: adapted Rand "
        "%.4f, object F1 %.4f, SEG %.4f (components of the argmax: %.4f / %.4f; the same foreground split "
        "as the ground truth: SEG %.4f), foreground IoU %.4f -> %s",
        n_slices, dataset["pixel_error"], dataset["rand_error_fg"], dataset["rand_threshold"],
        dataset["adapted_rand_error"], dataset["object_f1"], dataset["seg"], dataset["adapted_rand_error_components"],
        dataset["object_f1_components"], dataset["seg_truth_split"], dataset["foreground_iou"], out_dir,
    )
    if "object_f1_3d" in dataset:
        linked = (f"; per-slice instances linked: object F1 {dataset['object_f1_linked_3d']:.4f}, "
                  f"SEG {dataset['seg_linked_3d']:.4f}" if "object_f1_linked_3d" in dataset else "")
        log.info(
            "3-D objects (%d true, %d predicted): object F1 %.4f, SEG %.4f (per slice: %.4f / %.4f; 3-D components "
            "of the argmax: %.4f / %.4f; the same foreground split as the ground truth: SEG %.4f)%s",
            dataset["n_true_objects_3d"], dataset["n_pred_objects_3d"], dataset["object_f1_3d"], dataset["seg_3d"],
            dataset["object_f1"], dataset["seg"], dataset["object_f1_components_3d"], dataset["seg_components_3d"],
            dataset["seg_truth_split_3d"], linked,
        )


def _open_inputs(prediction_path: str | os.PathLike[str], stack_path: str | os.PathLike[str]) -> tuple[Stack, Prediction]:
    """The labelled stack and the prediction made on it (one-line errors where they do not fit)."""
    stack = open_stack(stack_path, require_labels=True)
    if stack.label_kind is None:  # open_stack parsed it; an unknown one was refused there
        raise UserInputError(f"{stack.path}: no label kind in attrs['unet']; re-ingest with --label-kind")
    prediction = open_prediction(prediction_path)
    if tuple(prediction.probabilities.shape[1:]) != tuple(stack.shape):
        raise UserInputError(
            f"{prediction.path}: prediction (z, y, x) {tuple(prediction.probabilities.shape[1:])} does not match "
            f"stack {stack.path} {tuple(stack.shape)}; score the prediction against the stack it was made on"
        )
    stack.check_made_from(recorded_intensity(prediction.attrs), result=prediction.path)
    return stack, prediction


def _check_options(slices: list[int], thresholds: list[float], *, connectivity: int, overlay_count: int) -> None:
    if not slices:
        raise UserInputError("no slices selected to evaluate")
    if connectivity not in (4, 8):
        raise UserInputError(f"--connectivity must be 4 or 8, got {connectivity}")
    if not thresholds or any(not 0.0 <= t <= 1.0 for t in thresholds):
        raise UserInputError(f"--thresholds must be values in [0, 1], got {thresholds}")
    if overlay_count < 1:
        raise UserInputError(f"--overlays must be >= 1, got {overlay_count}")


def _overlay_panel(prediction: Prediction, stack: Stack, row: dict[str, Any], tag: str, *,
                   foreground_value: int | None, connectivity: int) -> OverlayPanel:
    """One slice of the overlay figure: image, truth, prediction, instances and the scores."""
    z = row["z"]
    cell_probability, pred_classes = prediction.slice(z)
    true_instances, true_classes = ground_truth_targets(
        np.asarray(stack.labels[z]), label_kind=stack.label_kind, foreground_value=foreground_value,
        connectivity=connectivity,
    )
    pred_instances = prediction.instances_slice(z)
    if pred_instances is None:
        pred_instances = connected_components(pred_classes == CELL, connectivity=connectivity)
    return OverlayPanel(z=z, tag=tag, image=np.asarray(stack.image[z]), true_classes=true_classes,
                        pred_classes=pred_classes, cell_probability=cell_probability, scores=row,
                        true_instances=true_instances, pred_instances=pred_instances)


def _write_report(out: Path, report: dict[str, Any], rows: list[dict[str, Any]], panels: list[OverlayPanel], *,
                  rank_by: str) -> None:
    """All three files or none of this run's: metrics.csv (the workflow's target) is written last,
    and a failure (e.g. a full disk) removes what this run already wrote."""
    report_text = json.dumps(report, indent=2, default=_json_default) + "\n"
    written: list[Path] = []
    try:
        for path, write in (
            (out / "overlays.png", lambda p: plot_overlays(panels, p, rank_by=rank_by)),
            (out / "metrics.json", lambda p: _write_text(p, report_text, own=OUT_DIR_MARK.files["metrics.json"])),
            (out / "metrics.csv", lambda p: _write_text(p, _csv_text(rows), own=OUT_DIR_MARK.files["metrics.csv"])),
        ):
            write(path)
            written.append(path)
    except BaseException:
        for path in written:
            remove_path(path)
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
