"""Validation during training: loss, pixel error and IoU of held-out slices (3-D: volumes).

The slices are predicted by the production inference engine
(:func:`unet_core.infer.predict.network_logits`: mirrored borders, tile origins on multiples of
``UNetSpec.stride``, equal to one pass over the whole slice), so validation measures the network
``unet predict`` will run; the decision is the argmax of the logits plus the weight-prior offsets
that ``unet predict`` adds. A 3-D network's held-out volumes go through the same engine with a
3-D :class:`unet_core.infer.tiling.Tiling` (the same function: blocks of ``block_z`` slices,
tiles aligned to the z stride, equal to one pass over the whole mirror-padded volume).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from unet_core.infer.predict import network_logits
from unet_core.model.decision import correct
from unet_core.model.loss import weighted_cross_entropy
from unet_core.model.unet import UNet
from unet_core.train.data import ValidationSlice
from unet_core.train.runtime import Runtime


def pixel_metrics(
    logits: np.ndarray, classes: np.ndarray, weights: np.ndarray | None, offsets: np.ndarray | None = None
) -> dict[str, float]:
    """Sums for loss, pixel error and per-class IoU of one slice.

    Args:
        logits: (C, Y, X) float32 (a volume: (C, Z, Y, X)).
        classes: (Y, X) (volume: (Z, Y, X)) integer targets.
        weights: float32 w(x) shaped as ``classes``, or None (unweighted loss).
        offsets: (C,) logit offsets of the decision rule (:mod:`unet_core.model.decision`); the
            loss is always that of the raw logits (the training objective).

    Returns:
        ``loss_sum``, ``errors``, ``pixels`` and per foreground class c ``inter_c``/``union_c``.
    """
    logits_t = torch.from_numpy(logits)[None]
    target = torch.from_numpy(classes.astype(np.int64))[None]
    w = None if weights is None else torch.from_numpy(weights)[None]
    loss = float(weighted_cross_entropy(logits_t, target, w)) * classes.size
    pred = correct(logits, offsets).argmax(axis=0)
    out = {
        "loss_sum": loss,
        "errors": float(np.count_nonzero(pred != classes)),
        "pixels": float(classes.size),
    }
    for c in range(1, logits.shape[0]):
        p, g = pred == c, classes == c
        out[f"inter_{c}"] = float(np.count_nonzero(p & g))
        out[f"union_{c}"] = float(np.count_nonzero(p | g))
    return out


def validate(
    model: UNet,
    slices: Sequence[ValidationSlice],
    *,
    tile_out: int,
    runtime: Runtime,
    weighted: bool,
    offsets: np.ndarray | None = None,
    tile_z: int | None = None,
) -> dict[str, float]:
    """Loss, pixel error and mean foreground IoU over all validation pixels (voxels).

    The decision is the argmax of the logits plus ``offsets`` (the weight-prior correction
    that ``unet predict`` applies; None: plain argmax). The model is left in the mode it was in.
    ``tile_z``: a 3-D network's output tile along z, slices (its items are volumes).
    """
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    try:
        for item in slices:
            logits = network_logits(model, item.image, tile_out=tile_out, tile_z=tile_z or 1, device=runtime.device,
                                    precision=runtime.precision, channels_last=runtime.channels_last)
            metrics = pixel_metrics(logits, item.classes, item.weights if weighted else None, offsets)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v
    finally:
        model.train(was_training)
    ious = [
        totals[f"inter_{c}"] / totals[f"union_{c}"]
        for c in range(1, model.spec.n_classes)
        if totals[f"union_{c}"] > 0
    ]
    return {
        "val_loss": totals["loss_sum"] / totals["pixels"],
        "val_pixel_error": totals["errors"] / totals["pixels"],
        "val_iou": float(np.mean(ious)) if ious else float("nan"),
    }


