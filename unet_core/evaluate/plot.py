"""Evaluation figure: the worst and best slices, instances in colour over ground-truth outlines.

Each row: the predicted cells (one colour per instance) with the ground-truth cells' outlines,
so merges (one colour spanning several outlines) and splits (several colours in one outline)
show at a glance; the argmax errors; the probability map.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")  # figures are written to files; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from unet_core.common.atomic import save_png

MISSED_COLOUR = (0.1, 0.4, 1.0)  # false negative (cell missed): blue
EXTRA_COLOUR = (1.0, 0.2, 0.1)  # false positive (cell predicted on background): red


@dataclass(frozen=True)
class OverlayPanel:
    """One slice of the figure.

    Attributes:
        z: slice index in the stack.
        tag: ``"worst"`` or ``"best"``.
        image: (Y, X) raw grey values.
        true_classes: (Y, X) uint8 ground truth, 1 = cell interior.
        pred_classes: (Y, X) uint8 argmax prediction, 1 = cell interior.
        cell_probability: (Y, X) float32 P(cell interior).
        scores: the slice's row of scores (shown in the title).
        true_instances: (Y, X) integer ground-truth objects, 0 = background.
        pred_instances: (Y, X) integer predicted instances, 0 = background.
    """

    z: int
    tag: str
    image: np.ndarray
    true_classes: np.ndarray
    pred_classes: np.ndarray
    cell_probability: np.ndarray
    scores: dict[str, Any]
    true_instances: np.ndarray
    pred_instances: np.ndarray


def _grey_rgb(image: np.ndarray) -> np.ndarray:
    """(Y, X) grey values -> (Y, X, 3) float RGB stretched to the 0.5-99.5 percentiles."""
    img = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
    grey = np.clip((img - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(img)
    return np.repeat(grey[..., None], 3, axis=2)


def _paint(rgb: np.ndarray, mask: np.ndarray, colour: Sequence[float], alpha: float = 1.0) -> None:
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(colour, dtype=np.float32)


def instance_colours(n: int, *, seed: int = 0) -> np.ndarray:
    """(n + 1, 3) float RGB: 0 -> black, then bright colours in a fixed shuffled order (touching
    cells differ whatever their ids)."""
    rng = np.random.default_rng(seed)
    hue = rng.permutation(n) / max(n, 1) if n else np.zeros(0)
    sat, val = 0.55 + 0.45 * rng.random(n), 0.75 + 0.25 * rng.random(n)
    rgb = matplotlib.colors.hsv_to_rgb(np.stack([hue, sat, val], axis=-1)) if n else np.zeros((0, 3))
    return np.concatenate([np.zeros((1, 3)), rgb])


def instances_rgb(image: np.ndarray, true_instances: np.ndarray, pred_instances: np.ndarray) -> np.ndarray:
    """Grey image with the predicted instances in colour (one per cell) and the ground-truth cells'
    outlines in white, (Y, X, 3) float."""
    rgb = _grey_rgb(image)
    ids = np.unique(pred_instances, return_inverse=True)[1].reshape(pred_instances.shape)  # 0..n, 0 = background
    colours = instance_colours(int(ids.max()))
    cells = ids > 0
    rgb[cells] = 0.45 * rgb[cells] + 0.55 * colours[ids[cells]]
    true = np.asarray(true_instances)
    edges = (true > 0) & ((true != np.roll(true, 1, 0)) | (true != np.roll(true, 1, 1)))
    _paint(rgb, edges, (1.0, 1.0, 1.0))
    return rgb


def error_rgb(image: np.ndarray, true_classes: np.ndarray, pred_classes: np.ndarray) -> np.ndarray:
    """Grey image with missed cell pixels (blue) and extra cell pixels (red), (Y, X, 3) float."""
    rgb = _grey_rgb(image) * 0.6
    truth, pred = true_classes == 1, pred_classes == 1
    _paint(rgb, truth & ~pred, MISSED_COLOUR, 0.8)
    _paint(rgb, pred & ~truth, EXTRA_COLOUR, 0.8)
    return rgb


def _title(panel: OverlayPanel, rank_by: str, n_pred: int, n_true: int) -> str:
    """Three short lines (a long one is cut at the figure's edge): which slice, its scores, its cells."""
    s = panel.scores
    parts = [f"{rank_by} {s[rank_by]:.4g}"]
    if rank_by != "pixel_error":
        parts.append(f"pixel error {s['pixel_error']:.4f}")
    if rank_by != "rand_error_fg":
        parts.append(f"Rand fg {s['rand_error_fg']:.4f}")
    return (f"{panel.tag} slice by {rank_by}: z={panel.z}\n" + ", ".join(parts)
            + f"\n{n_pred} predicted cells, {n_true} true")


def plot_overlays(panels: Sequence[OverlayPanel], path: str | os.PathLike[str], *, rank_by: str) -> None:
    """Write a PNG with one row per slice: overlays, error map and probability map.

    Args:
        panels: the slices, worst first then best.
        path: the PNG to write (atomically).
        rank_by: the score that ranked the slices (shown in the row titles).
    """
    rows = max(len(panels), 1)
    fig, axes = plt.subplots(rows, 3, figsize=(13, 4.3 * rows), squeeze=False, constrained_layout=True)
    for row, panel in zip(axes, panels, strict=False):
        row[0].imshow(instances_rgb(panel.image, panel.true_instances, panel.pred_instances), interpolation="nearest")
        n_pred, n_true = len(np.unique(panel.pred_instances)) - 1, len(np.unique(panel.true_instances)) - 1
        row[0].set_title(_title(panel, rank_by, n_pred, n_true), fontsize=9)
        row[1].imshow(error_rgb(panel.image, panel.true_classes, panel.pred_classes), interpolation="nearest")
        row[1].set_title("argmax errors: blue = missed cell, red = extra cell", fontsize=9)
        im = row[2].imshow(panel.cell_probability, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        row[2].set_title("P(cell interior)", fontsize=9)
        fig.colorbar(im, ax=row[2], fraction=0.046, pad=0.02)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [
        Patch(color=(0.9, 0.5, 0.2), label="predicted cells (one colour each)"),
        Line2D([], [], color="white", lw=2, label="ground-truth cell outlines"),
        Patch(color=MISSED_COLOUR, label="missed cell pixels"),
        Patch(color=EXTRA_COLOUR, label="extra cell pixels"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=9, facecolor="0.6")
    try:
        save_png(fig, path, stage="evaluate", dpi=90)
    finally:
        plt.close(fig)
