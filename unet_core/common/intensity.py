"""Grey-value normalisation shared by training and prediction.

Images are z-scored with statistics of their whole stack (computed once at ingest and
stored in the stack's attributes), never per tile: per-tile statistics would make a
tiled prediction differ from a whole-image one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class IntensityStats:
    """Mean and standard deviation of a stack's raw grey values."""

    mean: float
    std: float

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> IntensityStats:
        return cls(float(data["mean"]), float(data["std"]))


def normalize(raw: np.ndarray, stats: IntensityStats) -> np.ndarray:
    """``(raw - mean) / std`` as float32, any shape; a constant stack maps to 0."""
    std = stats.std if stats.std > 0 else 1.0
    return ((np.asarray(raw, dtype=np.float32) - np.float32(stats.mean)) / np.float32(std)).astype(
        np.float32, copy=False
    )


HIST_PIECE = 1 << 18  # pixels per bincount call (2 MiB of 64-bit indices)


class RunningStats:
    """Exact streaming mean/std over many arrays.

    8/16-bit integer data is counted in a histogram (exact, one pass, no float copies);
    other data uses the parallel update of Chan et al. in float64.
    """

    def __init__(self) -> None:
        self.hist: np.ndarray | None = None
        self.offset = 0
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values)
        if values.size == 0:
            return
        if values.dtype.kind in "iub" and values.dtype.itemsize <= 2:
            offset = -int(np.iinfo(values.dtype).min) if values.dtype.kind == "i" else 0
            bins = 256 ** values.dtype.itemsize
            if self.hist is None:
                self.hist = np.zeros(bins, np.int64)
            flat = values.ravel()
            # in pieces that stay in cache: bincount casts its input to 64-bit integers first
            for start in range(0, flat.size, HIST_PIECE):
                piece = flat[start : start + HIST_PIECE]
                self.hist += np.bincount((piece.astype(np.int32) + offset) if offset else piece, minlength=bins)
            self.offset = offset
            return
        values = values.astype(np.float64, copy=False).ravel()
        n_b = values.size
        mean_b = float(values.mean())
        m2_b = float(np.dot(values - mean_b, values - mean_b))
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta**2 * self.n * n_b / n
        self.n = n

    def result(self) -> IntensityStats:
        if self.hist is not None:
            levels = np.arange(self.hist.size, dtype=np.float64) - self.offset
            n = float(self.hist.sum())
            mean = float(np.dot(self.hist, levels) / n)
            var = float(np.dot(self.hist, (levels - mean) ** 2) / n)
            return IntensityStats(mean, var**0.5)
        std = (self.m2 / self.n) ** 0.5 if self.n else 0.0
        return IntensityStats(self.mean, std)
