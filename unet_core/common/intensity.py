"""Grey-value normalisation shared by augmentation, training, validation and prediction.

Three modes (:class:`Normalisation`, config key ``normalisation``):

``stack-zscore``
    ``(x - mean) / std`` with the whole stack's statistics (one affine map for every slice).
``slice-zscore``
    ``(x - mean_z) / std_z`` with slice ``z``'s own statistics.
``slice-percentile``
    ``(x - p1_z) / (p99.8_z - p1_z)`` with slice ``z``'s 1st and 99.8th percentiles (numpy's
    linear interpolation): the low percentile maps to 0, the high one to 1, for slices of one
    stack that come from experiments with different intensity scales.

Every statistic is computed once, at ingest, over whole slices and stored with the stack
(:class:`StackIntensity`), never per tile or block: per-tile statistics would make a tiled
prediction differ from a whole-image one, and a block-wise job never needs a whole slice.
Every user asks :meth:`StackIntensity.scaling` for "the normalisation of slice z under mode m".

Degenerate slices (defined, never a division by zero): a constant slice (std 0, or all
percentiles equal and min = max, e.g. a 1-pixel slice) maps to 0 everywhere. Where the
percentiles coincide but the slice is not constant (a saturated slice, or a few bright pixels
on a flat background), the percentile mode divides by the full range max - min instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from unet_core.common.errors import UserInputError


class Normalisation(str, Enum):
    """How raw grey values become network input (see the module docstring)."""

    STACK_ZSCORE = "stack-zscore"
    SLICE_ZSCORE = "slice-zscore"
    SLICE_PERCENTILE = "slice-percentile"

    @classmethod
    def of_metadata(cls, value: str | None) -> Normalisation:
        """The mode a stored file names (files written before the choice existed say
        ``"stack z-score"`` or nothing: that is ``stack-zscore``)."""
        if value in (None, "stack z-score"):
            return cls.STACK_ZSCORE
        return cls(value)


#: The default mode (the workflow's ``normalisation``, ``unet augment/train --normalisation``).
DEFAULT_NORMALISATION = Normalisation.STACK_ZSCORE


#: The percentiles of ``slice-percentile`` (mapped to 0 and 1), in percent.
PERCENTILES = (1.0, 99.8)


@dataclass(frozen=True)
class IntensityStats:
    """Mean and standard deviation of raw grey values (a stack's, or one slice's)."""

    mean: float
    std: float

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, data: Mapping[str, float]) -> IntensityStats:
        return cls(float(data["mean"]), float(data["std"]))

    def scaling(self) -> Scaling:
        """The z-score ``(x - mean) / std`` (std 0: a constant maps to 0)."""
        return Scaling(self.mean, self.std if self.std > 0 else 1.0)


@dataclass(frozen=True)
class Scaling:
    """The affine map ``x -> (x - offset) / scale`` (float32) that normalises one slice.

    Attributes:
        offset: raw grey value that maps to 0.
        scale: raw grey-value step that maps to 1, > 0.
    """

    offset: float
    scale: float

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")


def normalize(raw: np.ndarray, stats: IntensityStats | Scaling) -> np.ndarray:
    """``(raw - offset) / scale`` as float32, any shape (an :class:`IntensityStats` is its z-score;
    a constant stack maps to 0). The same float32 arithmetic as the inference engine's."""
    s = stats.scaling() if isinstance(stats, IntensityStats) else stats
    return ((np.asarray(raw, dtype=np.float32) - np.float32(s.offset)) / np.float32(s.scale)).astype(
        np.float32, copy=False
    )


@dataclass(frozen=True)
class SliceStats:
    """Statistics of one slice's raw grey values, as ingest stores them.

    Attributes:
        mean, std: mean and (population) standard deviation.
        minimum, maximum: smallest and largest value.
        low, high: the :data:`PERCENTILES` (numpy's linear interpolation).
    """

    mean: float
    std: float
    minimum: float
    maximum: float
    low: float
    high: float

    def scaling(self, mode: Normalisation) -> Scaling:
        """This slice's normalisation under a per-slice ``mode`` (see the module docstring)."""
        if mode is Normalisation.SLICE_ZSCORE:
            return IntensityStats(self.mean, self.std).scaling()
        if mode is not Normalisation.SLICE_PERCENTILE:
            raise ValueError(f"{mode} is not a per-slice mode")
        span = self.high - self.low
        if not span > 0:
            span = self.maximum - self.minimum
        return Scaling(self.low, span if span > 0 else 1.0)


FIELDS = ("mean", "std", "minimum", "maximum", "low", "high")
#: The largest grey value any stage can normalise: every stage does it in float32.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def impossible_statistics(mean: float, std: float, minimum: float, maximum: float,
                          percentiles: Sequence[float] = ()) -> str | None:
    """Why statistics of grey values can be no data's (a stack's attributes edited or damaged after
    ingest), or None: values beyond float32, a negative std, a mean or percentile outside
    [minimum, maximum], a std larger than half the range (it cannot be), or std 0 for values that
    differ in float32 (a z-score would then not scale them at all). ``minimum`` and ``maximum`` are
    trusted as given; rounding of the float64 sums is allowed for."""
    values = (mean, std, minimum, maximum, *percentiles)
    if not all(abs(v) <= FLOAT32_MAX for v in values):
        return f"values beyond the float32 range ±{FLOAT32_MAX:.3g}"
    tol = 1e-6 * max(abs(minimum), abs(maximum))
    if std < 0:
        return f"std {std} < 0"
    if minimum > maximum:
        return f"minimum {minimum} > maximum {maximum}"
    outside = [v for v in (mean, *percentiles) if not minimum - tol <= v <= maximum + tol]
    if outside:
        return f"mean or percentile {outside[0]} outside the grey values' range [{minimum}, {maximum}]"
    if std > (maximum - minimum) / 2 + tol:
        return f"std {std} > half the range of the grey values [{minimum}, {maximum}]"
    if std == 0 and np.float32(minimum) != np.float32(maximum):
        return f"std 0 for grey values that differ (range [{minimum}, {maximum}])"
    return None


def slice_stats_to_attrs(slices: Sequence[SliceStats]) -> dict[str, Any]:
    """Per-slice statistics as stored in a stack's ``attrs["unet"]["slice_intensity"]`` (columns)."""
    return {"percentiles": list(PERCENTILES), **{f: [float(getattr(s, f)) for s in slices] for f in FIELDS}}


def slice_stats_from_attrs(data: Mapping[str, Any]) -> list[SliceStats]:
    """The inverse of :func:`slice_stats_to_attrs`."""
    if tuple(data["percentiles"]) != PERCENTILES:
        raise ValueError(f"stored percentiles {data['percentiles']} differ from {list(PERCENTILES)}")
    return [SliceStats(*values) for values in zip(*(data[f] for f in FIELDS), strict=True)]


@dataclass(frozen=True)
class StackIntensity:
    """The intensity statistics an ingested stack carries: of the whole stack and per slice.

    Attributes:
        stack: the whole stack's mean and std.
        slices: one :class:`SliceStats` per slice, or None for a stack ingested before they
            were stored.
        where: the stack's path (for error messages).
    """

    stack: IntensityStats
    slices: tuple[SliceStats, ...] | None
    where: str

    def scaling(self, z: int, mode: Normalisation) -> Scaling:
        """The normalisation of slice ``z`` under ``mode``."""
        return self.scaler(mode)(z)

    def scaler(self, mode: Normalisation) -> Callable[[int], Scaling]:
        """``z -> Scaling`` under ``mode`` (what the inference engine takes).

        Raises:
            UserInputError: a per-slice mode on a stack without per-slice statistics.
        """
        if mode is Normalisation.STACK_ZSCORE:  # parsed where it entered (Stack.scaler, the settings)
            whole = self.stack.scaling()
            return lambda z: whole
        if self.slices is None:
            raise UserInputError(
                f"{self.where}: ingested before per-slice intensity statistics were stored, which "
                f"normalisation {mode.value} needs; ingest it again ('unet ingest', or snakemake --forcerun ingest)")
        table = {m: s.scaling(mode) for m, s in enumerate(self.slices)}
        return table.__getitem__


HIST_PIECE = 1 << 18  # pixels per bincount call (2 MiB of 64-bit indices)


def _histogram(values: np.ndarray) -> tuple[np.ndarray, int]:
    """(counts per level, offset) of 8/16-bit integer data: level ``i`` is value ``i - offset``."""
    offset = -int(np.iinfo(values.dtype).min) if values.dtype.kind == "i" else 0
    bins = 256 ** values.dtype.itemsize
    hist = np.zeros(bins, np.int64)
    flat = values.ravel()
    # in pieces that stay in cache: bincount casts its input to 64-bit integers first
    for start in range(0, flat.size, HIST_PIECE):
        piece = flat[start : start + HIST_PIECE]
        hist += np.bincount((piece.astype(np.int32) + offset) if offset else piece, minlength=bins)
    return hist, offset


def histogram_percentiles(hist: np.ndarray, offset: int, qs: Sequence[float]) -> list[float]:
    """Percentiles ``qs`` (in percent) of the values a histogram counts, equal to
    ``np.percentile(values, qs)`` (linear interpolation, numpy's formula)."""
    cum = np.cumsum(hist)
    n = int(cum[-1])
    out = []
    for q in qs:
        h = q / 100.0 * (n - 1)
        i = int(np.floor(h))
        t = h - i
        a = float(np.searchsorted(cum, i, side="right") - offset)
        b = float(np.searchsorted(cum, min(i + 1, n - 1), side="right") - offset)
        diff = b - a
        out.append(b - diff * (1 - t) if t >= 0.5 else a + diff * t)
    return out


def _stats_of_histogram(hist: np.ndarray, offset: int) -> SliceStats:
    levels = np.arange(hist.size, dtype=np.float64) - offset
    n = float(hist.sum())
    mean = float(np.dot(hist, levels) / n)
    var = float(np.dot(hist, (levels - mean) ** 2) / n)
    present = np.flatnonzero(hist)
    low, high = histogram_percentiles(hist, offset, PERCENTILES)
    return SliceStats(mean, var**0.5, float(present[0] - offset), float(present[-1] - offset), low, high)


class RunningStats:
    """Exact statistics of a stack fed one slice at a time: the whole stack's mean/std and each
    slice's :class:`SliceStats`.

    8/16-bit integer data is counted in histograms (exact, one pass, no float copies); other
    data uses the parallel update of Chan et al. in float64 and ``np.percentile`` per slice.
    """

    def __init__(self) -> None:
        self.hist: np.ndarray | None = None
        self.offset = 0
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.slices: list[SliceStats] = []

    def update(self, values: np.ndarray) -> SliceStats | None:
        """Add one slice (any shape); returns its statistics (None for an empty array)."""
        values = np.asarray(values)
        if values.size == 0:
            return None
        if values.dtype.kind in "iub" and values.dtype.itemsize <= 2:
            hist, self.offset = _histogram(values)
            self.hist = hist if self.hist is None else self.hist + hist
            self.slices.append(_stats_of_histogram(hist, self.offset))
            return self.slices[-1]
        values = values.astype(np.float64, copy=False).ravel()
        n_b = values.size
        mean_b = float(values.mean())
        m2_b = float(np.dot(values - mean_b, values - mean_b))
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta**2 * self.n * n_b / n
        self.n = n
        low, high = (float(v) for v in np.percentile(values, PERCENTILES))
        self.slices.append(SliceStats(mean_b, (m2_b / n_b) ** 0.5, float(values.min()), float(values.max()), low, high))
        return self.slices[-1]

    def result(self) -> IntensityStats:
        """The whole stack's mean and std so far."""
        if self.hist is not None:
            s = _stats_of_histogram(self.hist, self.offset)
            return IntensityStats(s.mean, s.std)
        std = (self.m2 / self.n) ** 0.5 if self.n else 0.0
        return IntensityStats(self.mean, std)
