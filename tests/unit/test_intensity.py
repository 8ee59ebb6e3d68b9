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
