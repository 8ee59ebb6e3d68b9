"""The package's cover image: the sample crop beside its prediction (P(cell) over the grey values)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def save_cover(path: Path, crop: Any, probabilities: np.ndarray) -> None:
    """Write a 2:1 PNG (the zoo's cover aspect): the crop, and the crop with the last class's
    probability in colour over it and its 0.5 contour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = np.asarray(crop.raw, np.float32)
    lo, hi = np.percentile(raw, (1.0, 99.8))
    grey = np.clip((raw - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(raw)
    cell = probabilities[-1]
    fig, axes = plt.subplots(1, 2, figsize=(6, 3), dpi=100)
    fig.subplots_adjust(0, 0, 1, 1, 0, 0)
    for ax in axes:
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_axis_off()
    axes[1].imshow(np.ma.masked_less(cell, 0.5), cmap="viridis", alpha=0.45, vmin=0, vmax=1,
                   interpolation="nearest")
    if cell.min() < 0.5 < cell.max():
        axes[1].contour(cell, levels=[0.5], colors="yellow", linewidths=0.8)
    fig.savefig(path, format="png")
    plt.close(fig)
