"""What every slice score takes: the label and probability conventions, input checks, thresholds.

The scores of one 2-D slice (:mod:`~unet_core.evaluate.pixel_scores`,
:mod:`~unet_core.evaluate.rand_scores`, :mod:`~unet_core.evaluate.object_matching`,
:mod:`~unet_core.evaluate.warping_error`) are pure array-in/number-out functions. Each works on
one (Y, X) slice and returns *counts* (integers), not ratios, so that a dataset score is the same
formula applied to counts summed over slices (the way the ISBI 2012 Fiji scripts pooled their
slices) and per-slice and per-dataset numbers never disagree about definitions. The ratio
properties (``error``, ``iou`` ...) turn counts into scores; each says what it returns when its
denominator is empty.

Conventions:
    * classes: 0 = background (membrane in EM), 1 = cell interior, as in the weights store.
    * segments / instances: 0 = background, every other value one object.
    * a probability map is P(cell interior) per pixel; thresholding predicts "cell" where
      ``p > threshold`` (strict, like the Fiji scripts), so threshold 1.0 predicts nothing.
    * connected components use 4-connectivity by default (the Fiji scripts' choice);
      ``connectivity=8`` is available. The background then uses the complementary
      connectivity (8 or 4) wherever topology matters (warping error).
    * a threshold sweep scores every threshold of :data:`ISBI_THRESHOLDS` (the ISBI 2012
      challenge reported the best one); :func:`best_index` picks it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from unet_core.common.labels import connectivity_structure

CELL = 1
ISBI_THRESHOLDS: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(11))
"""Thresholds of the ISBI 2012 Fiji evaluation script: 0.0, 0.1, ..., 1.0."""


def check_2d(name: str, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (Y, X) array, got shape {array.shape}")
    return array


def check_same_shape(**arrays: np.ndarray) -> None:
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
    labels, _ = ndimage.label(check_2d("mask", mask).astype(bool, copy=False), structure=connectivity_structure(connectivity))
    return labels.astype(np.int32, copy=False)


def consecutive_labels(labels: np.ndarray) -> tuple[np.ndarray, int]:
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



def as_probability(name: str, array: np.ndarray) -> np.ndarray:
    """A 2-D floating-point probability map (integers are converted to float32)."""
    array = check_2d(name, array)
    return array if array.dtype.kind == "f" else array.astype(np.float32)


def above_threshold(prob: np.ndarray, threshold: float) -> np.ndarray:
    """``prob > threshold`` with the threshold rounded to the map's dtype first.

    Every thresholded score goes through this, so a pixel of exactly float32(0.1) is on the
    same side of "0.1" for the pixel, Rand and warping scores.
    """
    return prob > prob.dtype.type(threshold)



def best_index(scores: Sequence[float], *, lower_is_better: bool = True) -> int:
    """Index of the best score (the first one on ties, i.e. the lowest threshold)."""
    values = np.asarray(scores, dtype=np.float64)
    return int(np.argmin(values) if lower_is_better else np.argmax(values))
