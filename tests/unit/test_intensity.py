"""Intensity statistics: exact streaming mean/std, normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from unet_core.common.intensity import IntensityStats, RunningStats, normalize


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64])
def test_running_stats_equal_numpy(dtype):
    rng = np.random.default_rng(3)
    parts = [rng.normal(200, 40, size=(13, 17 + i)).clip(0).astype(dtype) for i in range(5)]
    stats = RunningStats()
    for part in parts:
        stats.update(part)
    flat = np.concatenate([p.ravel() for p in parts]).astype(np.float64)
    result = stats.result()
    assert result.mean == pytest.approx(flat.mean(), rel=1e-12)
    assert result.std == pytest.approx(flat.std(), rel=1e-9)


def test_normalize_and_constant_stack():
    raw = np.array([[10, 20], [30, 40]], np.uint16)
    out = normalize(raw, IntensityStats(25.0, 10.0))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[-1.5, -0.5], [0.5, 1.5]])
    assert np.all(normalize(raw, IntensityStats(25.0, 0.0)) == raw - 25.0)


# -- normalisation modes ------------------------------------------------------------------------
from unet_core.common.errors import UserInputError  # noqa: E402
from unet_core.common.intensity import (  # noqa: E402
    PERCENTILES,
    Normalisation,
    Scaling,
    SliceStats,
    StackIntensity,
    histogram_percentiles,
    slice_stats_from_attrs,
    slice_stats_to_attrs,
)

PER_SLICE = (Normalisation.SLICE_ZSCORE, Normalisation.SLICE_PERCENTILE)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
def test_histogram_percentiles_equal_numpy_exactly(dtype):
    rng = np.random.default_rng(5)
    info = np.iinfo(dtype)
    for n in (1, 2, 7, 1000, 4099):
        values = rng.integers(max(info.min, -3000), min(info.max, 3000), size=n, endpoint=True).astype(dtype)
        offset = -int(info.min) if info.min < 0 else 0
        hist = np.bincount(values.astype(np.int64) + offset, minlength=256 ** values.dtype.itemsize)
        qs = [0.0, *PERCENTILES, 37.5, 50.0, 100.0]
        assert histogram_percentiles(hist, offset, qs) == [float(v) for v in np.percentile(values, qs)]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32])
def test_running_stats_per_slice_equal_numpy(dtype):
    rng = np.random.default_rng(4)
    stats = RunningStats()
    planes = [rng.gamma(2.0, 20.0 * (z + 1), size=(31, 29)).astype(dtype) for z in range(3)]
    returned = [stats.update(p) for p in planes]
    assert returned == stats.slices and len(stats.slices) == 3
    for plane, s in zip(planes, stats.slices):
        x = plane.astype(np.float64)
        assert s.mean == pytest.approx(x.mean(), rel=1e-12) and s.std == pytest.approx(x.std(), rel=1e-9)
        assert (s.minimum, s.maximum) == (x.min(), x.max())
        assert (s.low, s.high) == tuple(float(v) for v in np.percentile(plane, PERCENTILES))


def _stats_of(plane: np.ndarray) -> StackIntensity:
    stats = RunningStats()
    stats.update(plane)
    return StackIntensity(stats.result(), tuple(stats.slices), "test.ome.zarr")


@pytest.mark.parametrize("plane", [np.full((5, 7), 42, np.uint8), np.array([[7]], np.uint16),
                                   np.full((3, 3), -2.5, np.float32)], ids=["constant", "one-pixel", "float"])
@pytest.mark.parametrize("mode", list(Normalisation))
def test_constant_and_one_pixel_slices_map_to_zero(plane, mode):
    with np.errstate(all="raise"):  # no division by zero anywhere
        scaling = _stats_of(plane).scaling(0, mode)
        out = normalize(plane, scaling)
    assert scaling.scale == 1.0 and np.all(out == 0.0)


def test_saturated_slice_uses_the_full_range_when_the_percentiles_coincide():
    # 999 saturated pixels and one dark one: p1 = p99.8 = 255, so the span falls back to max - min
    plane = np.full(1000, 255, np.uint8)
    plane[0] = 0
    intensity = _stats_of(plane.reshape(40, 25))
    s = intensity.slices[0]
    assert (s.low, s.high, s.minimum, s.maximum) == (255.0, 255.0, 0.0, 255.0)
    scaling = intensity.scaling(0, Normalisation.SLICE_PERCENTILE)
    assert scaling == Scaling(255.0, 255.0)
    out = normalize(plane, scaling)
    assert out[0] == -1.0 and np.all(out[1:] == 0.0)
    assert np.all(np.isfinite(normalize(plane, intensity.scaling(0, Normalisation.SLICE_ZSCORE))))


def test_modes_use_stack_or_slice_statistics():
    planes = [np.arange(100, dtype=np.uint8).reshape(10, 10), (np.arange(100).reshape(10, 10) * 2 + 50).astype(np.uint8)]
    stats = RunningStats()
    for p in planes:
        stats.update(p)
    intensity = StackIntensity(stats.result(), tuple(stats.slices), "s")
    both = np.concatenate([p.ravel() for p in planes]).astype(np.float64)
    assert intensity.scaling(1, Normalisation.STACK_ZSCORE) == Scaling(both.mean(), both.std())
    z1 = normalize(planes[1], intensity.scaling(1, Normalisation.SLICE_ZSCORE))
    assert float(z1.mean()) == pytest.approx(0.0, abs=1e-6) and float(z1.std()) == pytest.approx(1.0, rel=1e-6)
    lo, hi = np.percentile(planes[1], PERCENTILES)
    p1 = normalize(planes[1], intensity.scaling(1, Normalisation.SLICE_PERCENTILE))
    np.testing.assert_allclose(p1, (planes[1] - lo) / (hi - lo), rtol=1e-6, atol=1e-6)
    # the two slices differ by an affine map: per-slice modes give (nearly) the same input
    np.testing.assert_allclose(normalize(planes[0], intensity.scaling(0, Normalisation.SLICE_ZSCORE)), z1, atol=1e-5)


def test_stack_without_per_slice_statistics_asks_for_reingest():
    old = StackIntensity(IntensityStats(3.0, 2.0), None, "old.ome.zarr")
    assert old.scaling(5, Normalisation.STACK_ZSCORE) == Scaling(3.0, 2.0)
    for mode in PER_SLICE:
        with pytest.raises(UserInputError, match=r"old\.ome\.zarr: ingested before per-slice .* ingest it again"):
            old.scaler(mode)


def test_slice_stats_round_trip_and_legacy_names():
    slices = [SliceStats(1.0, 2.0, 0.0, 9.0, 0.5, 8.5), SliceStats(3.0, 0.0, 3.0, 3.0, 3.0, 3.0)]
    assert slice_stats_from_attrs(slice_stats_to_attrs(slices)) == slices
    assert Normalisation.of_metadata("stack z-score") is Normalisation.of_metadata(None) is Normalisation.STACK_ZSCORE
    assert Normalisation.of_metadata("slice-percentile") is Normalisation.SLICE_PERCENTILE
    with pytest.raises(ValueError):
        Scaling(0.0, 0.0)
