"""warping_error: the simple-point table and the topology of the warping error."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from unet_core.evaluate.warping_error import (
    _NEIGHBOURS,
    simple_point_table,
    warping_error_count,
    warping_sweep,
)


def _count_topology(img: np.ndarray, connectivity: int) -> tuple[int, int]:
    fg = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    bg = ndimage.generate_binary_structure(2, 2 if connectivity == 4 else 1)
    padded = np.pad(img, 1)
    return ndimage.label(padded, fg)[1], ndimage.label(~padded, bg)[1]


@pytest.mark.parametrize("connectivity", [pytest.param(4, id="fg4-bg8"), pytest.param(8, id="fg8-bg4")])
def test_simple_point_table_preserves_topology(connectivity):
    """Flipping a pixel keeps both component counts exactly when the table calls it simple."""
    table = simple_point_table(connectivity)
    rng = np.random.default_rng(connectivity)
    for _ in range(60):
        img = rng.random((6, 6)) < rng.uniform(0.2, 0.8)
        base = _count_topology(img, connectivity)
        padded = np.pad(img, 1)
        for y in range(6):
            for x in range(6):
                code = sum(1 << k for k, (dy, dx) in enumerate(_NEIGHBOURS) if padded[y + 1 + dy, x + 1 + dx])
                flipped = img.copy()
                flipped[y, x] ^= True
                assert (_count_topology(flipped, connectivity) == base) == table[code], (y, x, code)


def _two_cells() -> np.ndarray:
    truth = np.zeros((12, 21), bool)
    truth[2:10, 2:10] = True
    truth[2:10, 11:19] = True  # separated by the membrane column 10
    return truth


def test_warping_perfect_and_boundary_shift_are_not_errors():
    truth = _two_cells()
    assert warping_error_count(truth, truth).errors == 0
    shifted = np.zeros_like(truth)
    shifted[3:11, 1:9] = True  # both cells moved/resized, membrane wider: same topology
    shifted[1:9, 12:20] = True
    assert (shifted != truth).sum() > 20
    result = warping_error_count(truth, shifted)
    assert result.errors == 0
    np.testing.assert_array_equal(result.warped, shifted)


@pytest.mark.parametrize(
    "edit, expected, splits, merges",
    [
        pytest.param("split", 1, 1, 0, id="split"),  # all cut pixels but the last one can be flipped
        pytest.param("merge1", 1, 0, 1, id="merge-1px-gap"),
        pytest.param("merge3", 3, 0, 3, id="merge-3px-gap"),  # every row of the gap must stay membrane
        pytest.param("missing", 1, 0, 0, id="missing-object"),  # shrinks to one pixel, which cannot vanish
        pytest.param("extra1", 1, 0, 0, id="extra-1px-object"),
        pytest.param("extra3", 3, 0, 0, id="extra-3px-object"),  # the truth cannot grow an object from nothing
        pytest.param("hole", 1, 0, 0, id="hole"),
    ],
)
def test_warping_counts_topological_errors(edit, expected, splits, merges):
    truth = _two_cells()
    pred = truth.copy()
    if edit == "split":
        pred[2:10, 5] = False  # a membrane cuts the left cell
    elif edit == "merge1":
        pred[5, 10] = True  # a 1-px gap in the membrane
    elif edit == "merge3":
        pred[4:7, 10] = True  # a 3-px gap in the membrane
    elif edit == "missing":
        pred[2:10, 11:19] = False
    elif edit == "extra1":
        pred[0, 0] = True
    elif edit == "extra3":
        pred[0, 0:3] = True
    elif edit == "hole":
        pred[5, 5] = False
    result = warping_error_count(truth, pred)
    assert result.errors == expected
    assert (result.splits, result.merges) == (splits, merges)
    assert result.error == pytest.approx(expected / truth.size)
    assert result.split_merge_error == pytest.approx((splits + merges) / truth.size)
    # the warped truth kept its topology
    assert _count_topology(result.warped, 4) == _count_topology(truth, 4)


def test_warping_sweep_thresholds():
    truth = _two_cells()
    prob = np.where(truth, 0.9, 0.05).astype(np.float32)
    prob[5, 10] = 0.3  # a faint 1-px membrane gap: merged below 0.3
    counts = warping_sweep(prob, truth, thresholds=[0.1, 0.5, 0.95])
    assert counts == [(1, 1), (0, 0), (2, 0)]  # merge; perfect; both cells missing (one pixel each)


def test_warping_real_size_is_fast_enough_to_sweep():
    """A 512 x 512 slice with ~10 % mismatching pixels finishes (bounded passes)."""
    rng = np.random.default_rng(3)
    truth = ndimage.gaussian_filter(rng.random((512, 512)), 6) > 0.5
    pred = ndimage.binary_dilation(truth, iterations=2) ^ (rng.random((512, 512)) < 0.002)
    result = warping_error_count(truth, pred)
    assert 0 < result.errors < (truth != pred).sum()
    assert result.passes < 100


def test_warping_split_merge_classes_change_the_object_count():
    """Each residual pixel called a merge joins objects when flipped; a split separates them."""
    rng = np.random.default_rng(11)
    for _ in range(6):
        truth = ndimage.gaussian_filter(rng.random((40, 40)), 2) > 0.5
        pred = ndimage.gaussian_filter(rng.random((40, 40)), 2) > 0.5
        result = warping_error_count(truth, pred)
        assert result.splits + result.merges <= result.errors
        warped = result.warped
        n_objects = _count_topology(warped, 4)[0]
        mismatch = np.argwhere(warped != pred)
        merges = splits = 0
        for y, x in mismatch:
            flipped = warped.copy()
            flipped[y, x] ^= True
            after = _count_topology(flipped, 4)[0]
            if not warped[y, x] and after < n_objects:
                merges += 1
            if warped[y, x] and after > n_objects:
                splits += 1
        assert (result.splits, result.merges) == (splits, merges)
