"""Training curve: loss against iteration, and validation pixel error / IoU."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # figures are written to files; never open a window
import matplotlib.pyplot as plt  # noqa: E402

from unet_core.common.atomic import save_png


def plot_training_curve(
    train_log: Sequence[Sequence[float]],
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
) -> None:
    """Write a two-panel PNG: losses (log scale) and validation pixel error / IoU.

    Args:
        train_log: ``[iteration, mean training loss of the logging window]`` pairs.
        rows: validation rows with ``iteration``, ``val_loss``, ``val_pixel_error``, ``val_iou``
            (missing or None values are skipped).
        path: the PNG to write (atomically).
    """
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    if train_log:
        its, losses = zip(*[(a, b) for a, b in train_log], strict=True)
        ax_loss.plot(its, losses, lw=0.8, label="train (window mean)")
    val = [r for r in rows if r.get("val_loss") not in (None, "")]
    if val:
        ax_loss.plot(
            [r["iteration"] for r in val], [r["val_loss"] for r in val], "o-", ms=3, label="validation"
        )
        ax_metric.plot(
            [r["iteration"] for r in val],
            [r["val_pixel_error"] for r in val],
            "o-",
            ms=3,
            label="pixel error",
        )
        ax_metric.plot(
            [r["iteration"] for r in val], [r["val_iou"] for r in val], "s-", ms=3, label="foreground IoU"
        )
        ax_metric.legend()
    else:
        ax_metric.text(
            0.5, 0.5, "no validation data", ha="center", va="center", transform=ax_metric.transAxes
        )
    if train_log and min(losses) > 0:
        ax_loss.set_yscale("log")
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("weighted cross-entropy")
    ax_loss.set_title("loss")
    ax_loss.legend()
    ax_metric.set_xlabel("iteration")
    ax_metric.set_ylim(0, 1)
    ax_metric.set_title("validation (argmax)")
    ax_metric.grid(alpha=0.3)
    try:
        save_png(fig, path, stage="train", dpi=110)
    finally:
        plt.close(fig)
