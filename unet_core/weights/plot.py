"""Figure of the loss weight map of one slice, like Fig. 3 of the U-Net paper."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # figures are written to files; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np

from unet_core.common.atomic import save_png


def plot_weights(
    labels2d: np.ndarray,
    classes2d: np.ndarray,
    weights2d: np.ndarray,
    *,
    class_weights: Sequence[float],
    path: str | os.PathLike[str],
    title: str = "",
) -> None:
    """Write a PNG with four panels: labels | w_c | border term | w(x).

    Args:
        labels2d: (Y, X) integer ground truth as stored (instances or binary mask).
        classes2d: (Y, X) uint8 classes (1 = cell interior).
        weights2d: (Y, X) float32 w(x).
        class_weights: (w_background, w_cell).
        path: PNG to write (atomically).
        title: figure title.
    """
    wc = np.asarray(class_weights, dtype=np.float32)[(np.asarray(classes2d) == 1).astype(np.intp)]
    border = np.asarray(weights2d, dtype=np.float32) - wc
    labels2d = np.asarray(labels2d)
    shown = np.where(labels2d > 0, (labels2d.astype(np.int64) * 2654435761) % 255 + 1, 0)
    panels = [
        ("labels", shown, "nipy_spectral", None),
        ("class weight w_c", wc, "viridis", None),
        ("border term w0 exp(-(d1+d2)^2 / 2 sigma^2)", border, "magma", None),
        ("w(x)", weights2d, "jet", None),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.6), constrained_layout=True)
    for ax, (name, data, cmap, _) in zip(axes, panels, strict=True):
        image = ax.imshow(data, cmap=cmap, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
        if name != "labels":
            fig.colorbar(image, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    try:
        save_png(fig, path, stage="weights", dpi=110)
    finally:
        plt.close(fig)
