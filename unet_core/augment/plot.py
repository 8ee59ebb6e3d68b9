"""Figure of the augmentation: originals vs deformed samples, label outlines, displacement grid.

One row per sample. Left: the undeformed tile at the sample's origin with its label
outlines, a regular grid (every ``GRID_STEP_PX`` px), and the coarse knots with arrows from
where each knot would sample without deformation to where it does (rotation/flip included).
Right: the deformed tile as stored, with its label outlines and the same grid lines carried
along by the deformation (contours of the source coordinates), so the grid shows exactly how
the tile was warped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are written to files; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
from skimage.segmentation import find_boundaries

from unet_core.common.atomic import save_png

GRID_STEP_PX = 64
OUTLINE_RGBA = (1.0, 0.55, 0.0, 0.9)
GRID_COLOUR = "deepskyblue"


def _outline_overlay(instances: np.ndarray) -> np.ndarray:
    """(H, W) int labels -> (H, W, 4) RGBA with the instance boundaries coloured."""
    edges = find_boundaries(instances, mode="inner")
    rgba = np.zeros((*instances.shape, 4), np.float32)
    rgba[edges] = OUTLINE_RGBA
    return rgba


def _show(ax, image: np.ndarray, instances: np.ndarray, title: str) -> None:
    lo, hi = np.percentile(image, (1, 99))
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    ax.imshow(_outline_overlay(instances), interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_augmentation(path: str | os.PathLike[str], rows: Sequence, *, title: str | None = None) -> Path:
    """Write the originals-vs-deformed PNG (atomically).

    Args:
        path: output ``.png``.
        rows: :class:`unet_core.augment.samples.PreviewRow` objects (one figure row each).
        title: figure title.

    Returns:
        ``path``.
    """
    if not rows:
        raise ValueError("no samples to plot")
    fig, axes = plt.subplots(len(rows), 2, figsize=(8, 4 * len(rows)), squeeze=False, constrained_layout=True)
    for (ax_o, ax_d), row in zip(axes, rows):
        h, w = row.original.shape
        levels_y = np.arange(0, h, GRID_STEP_PX, dtype=float)
        levels_x = np.arange(0, w, GRID_STEP_PX, dtype=float)
        _show(ax_o, row.original, row.original_instances, f"{row.name}: original (undeformed tile)")
        for v in levels_y:
            ax_o.axhline(v, color=GRID_COLOUR, lw=0.5)
        for v in levels_x:
            ax_o.axvline(v, color=GRID_COLOUR, lw=0.5)
        start = row.knot_sources
        disp = row.transform.coarse
        ax_o.scatter(start[1].ravel(), start[0].ravel(), s=10, c="yellow", zorder=3)
        ax_o.quiver(start[1].ravel(), start[0].ravel(), disp[1].ravel(), disp[0].ravel(), color="yellow",
                    angles="xy", scale_units="xy", scale=0.2, width=0.006, zorder=3)
        ax_o.set_xlim(-0.5, w - 0.5)
        ax_o.set_ylim(h - 0.5, -0.5)

        angle = np.degrees(row.transform.angle) % 360
        flips = "".join(a for a, f in zip("yx", row.transform.flip) if f) or "none"
        _show(ax_d, row.deformed, row.deformed_instances,
              f"deformed: rotation {angle:.0f} deg, flip {flips}, max |d| "
              f"{np.abs(disp).max():.1f} px (arrows x5)")
        ax_d.contour(row.coords[0], levels=levels_y, colors=GRID_COLOUR, linewidths=0.5)
        ax_d.contour(row.coords[1], levels=levels_x, colors=GRID_COLOUR, linewidths=0.5)
        ax_d.scatter(row.knots[1].ravel(), row.knots[0].ravel(), s=10, c="yellow", zorder=3)
    if title:
        fig.suptitle(title, fontsize=9)  # constrained layout keeps it clear of the first row's titles
    try:
        save_png(fig, path, stage="augment", dpi=80)
    finally:
        plt.close(fig)
    return Path(path)


def plot_volume_samples(path: str | os.PathLike[str], samples: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
                        *, spacing_um: Sequence[float], title: str | None = None) -> Path:
    """Write the PNG of a 3-D training set (atomically): per sample, the stored (Z, H, W) tile through
    its middle slice (y, x), through its middle row (z, x; drawn at the voxel size's aspect, so
    nuclei look as round as they are), each with the instances' outlines, and w(x) of the middle slice.

    Args:
        path: output ``.png``.
        samples: ``(name, image, instances, weights)``, each array (Z, H, W) as stored.
        spacing_um: voxel size (z, y, x), µm: the aspect of the (z, x) section.
        title: figure title.

    Returns:
        ``path``.
    """
    if not samples:
        raise ValueError("no samples to plot")
    dz, _, dx = (float(v) for v in spacing_um)
    fig, axes = plt.subplots(len(samples), 3, figsize=(12, 4 * len(samples)), squeeze=False, constrained_layout=True)
    for (ax_yx, ax_zx, ax_w), (name, image, instances, weights) in zip(axes, samples):
        z, y = image.shape[0] // 2, image.shape[1] // 2
        _show(ax_yx, image[z], instances[z], f"{name}: slice z={z} (y, x)")
        _show(ax_zx, image[:, y], instances[:, y], f"row y={y} (z, x), {dz:g} x {dx:g} µm voxels")
        ax_zx.set_aspect(dz / dx)
        shown = ax_w.imshow(weights[z], cmap="viridis", interpolation="nearest")
        ax_w.set_title(f"w(x), slice z={z} (max {weights[z].max():.1f})", fontsize=8)
        ax_w.set_xticks([])
        ax_w.set_yticks([])
        fig.colorbar(shown, ax=ax_w, shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=9)
    try:
        save_png(fig, path, stage="augment", dpi=80)
    finally:
        plt.close(fig)
    return Path(path)
