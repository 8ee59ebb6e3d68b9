"""Seeded watershed instances: split cells that connected components merge through a weak gap."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from unet_core.infer.instances import seeded_watershed


def two_cells_with_weak_gap() -> np.ndarray:
    """P(cell): two 20x20 cells separated by a membrane column that fades (P = 0.6) over 3 rows."""
    p = np.full((30, 50), 0.02, np.float32)
    p[5:25, 5:45] = 0.98
    p[5:25, 24:26] = 0.05  # membrane between the cells
    p[14:17, 24:26] = 0.6  # ...missed over 3 rows: above 0.5, so the cell mask joins there
    return p


def test_weak_gap_merges_components_but_not_watershed_instances() -> None:
    p = two_cells_with_weak_gap()
    assert ndi.label(p > 0.5)[1] == 1  # connected components: one merged object
    labels = seeded_watershed(p)
    assert labels.dtype == np.int32
    left, right = labels[15, 10], labels[15, 40]
    assert left > 0 and right > 0 and left != right
    np.testing.assert_array_equal(labels > 0, p > 0.5)  # exactly the cell mask is labelled
    assert set(np.unique(labels)) == {0, left, right}


def test_seedless_faint_cell_is_kept_and_labels_are_distinct() -> None:
    p = np.full((20, 40), 0.0, np.float32)
    p[2:12, 2:12] = 0.99
    p[2:12, 25:35] = 0.7  # never above the seed threshold
    labels = seeded_watershed(p)
    assert len(np.unique(labels[labels > 0])) == 2
    assert labels[6, 6] != labels[6, 30] and labels[6, 30] > 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="2D"):
        seeded_watershed(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="connectivity"):
        seeded_watershed(np.zeros((3, 4)), connectivity=6)


# -- block-wise form (unet merge) ---------------------------------------------------------------
def _cell_probability(shape: tuple[int, int], n: int, seed: int) -> np.ndarray:
    """A P(cell) map of touching cells: interiors near 1, 2-px membranes near 0, a few weak gaps."""
    from unet_core.synth.scene import voronoi_cells

    labels = voronoi_cells(shape, n, seed)
    membrane = ndi.morphological_gradient(labels, size=(2, 2)) > 0
    rng = np.random.default_rng(seed)
    p = np.where(membrane, 0.05, 0.97) + rng.normal(0, 0.02, shape)
    p = ndi.gaussian_filter(p, 1.0)
    p[rng.random(shape) < 0.003] = 0.7  # isolated noisy pixels, some on membranes
    return np.clip(p, 0, 1).astype(np.float32)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to a relabelling of the non-zero ids (0 stays 0)."""
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


@pytest.mark.parametrize(("block_px", "jobs"), [(16, 3), (48, 2), (100, 1)])
def test_blockwise_watershed_equals_whole_slice(merge_probability, block_px: int, jobs: int) -> None:
    prob = np.stack([_cell_probability((120, 150), 30, seed) for seed in (1, 2)])
    out, stored = merge_probability(prob, block_px=block_px, jobs=jobs, instances="watershed",
                                    watershed={"halo_px": 64})
    k = int(out.max())
    whole = [seeded_watershed(p) for p in stored]
    for z in range(2):
        assert _same_partition(out[z], whole[z]), f"slice {z} differs from the whole-slice watershed"
    assert k == sum(int(w.max()) for w in whole)
    assert set(np.unique(out[0][out[0] > 0])).isdisjoint(np.unique(out[1][out[1] > 0]))  # ids unique per stack
    assert np.array_equal(np.unique(out), np.arange(k + 1))  # ids 1..K, no gaps


def test_blockwise_watershed_joins_unseeded_pixels_across_block_faces(merge_probability) -> None:
    """A faint cell (no seed) cut by block faces stays one object; one touching a seeded cell
    across a face joins it even where that cell's seed lies outside the halo."""
    p = np.full((1, 40, 80), 0.001, np.float32)
    p[0, 5:35, 5:35] = 0.7  # faint: no seed, cut into 4 blocks by the 20-px grid
    p[0, 5:35, 45:78] = 0.99
    p[0, 5:35, 45:60] = 0.6  # the cell's faint left part, 15 px wide
    out, _ = merge_probability(p, block_px=20, jobs=3, instances="watershed", watershed={"halo_px": 0})
    assert out.max() == 2
    assert len(np.unique(out[0, 5:35, 5:35])) == 1 and out[0, 10, 10] > 0
    assert len(np.unique(out[0, 5:35, 45:78])) == 1 and out[0, 10, 50] != out[0, 10, 10]


def test_blockwise_watershed_splits_a_weak_gap_across_blocks(merge_probability) -> None:
    p = two_cells_with_weak_gap()[None]
    out, stored = merge_probability(p, block_px=16, jobs=2, instances="watershed", watershed={"halo_px": 16})
    assert out.max() == 2
    assert _same_partition(out[0], seeded_watershed(stored[0]))


# -- distance seeds (size-scaled) -----------------------------------------------------------------
from unet_core.infer.instances import (  # noqa: E402
    auto_h_px,
    auto_min_object_px,
    distance_seeded_watershed,
    median_radius_px,
)


def _nuclei_probability(shape: tuple[int, int], n: int, seed: int) -> np.ndarray:
    """P(cell) of blob-like nuclei of radius 4-14 px, many touching or overlapping in pairs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(shape)
    mask = np.zeros(shape, bool)
    for _ in range(n):
        cy, cx, r = rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(4, 14)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        if rng.random() < 0.5:  # a touching neighbour
            a = rng.uniform(0, 2 * np.pi)
            r2 = rng.uniform(4, 14)
            mask |= (yy - cy - (r + r2) * 0.9 * np.sin(a)) ** 2 + (xx - cx - (r + r2) * 0.9 * np.cos(a)) ** 2 <= r2**2
    p = ndi.gaussian_filter(mask.astype(np.float32), 1.0) * 0.96 + 0.02 + rng.normal(0, 0.01, shape)
    return np.clip(p, 0, 1).astype(np.float32)


def test_distance_seeds_split_touching_nuclei_of_any_size_where_thresholds_cannot() -> None:
    yy, xx = np.indices((60, 90))
    big = (yy - 30) ** 2 + (xx - 28) ** 2 <= 18**2
    small = (yy - 30) ** 2 + (xx - 54) ** 2 <= 9**2  # overlaps the big one: a neck 11 px wide
    p = np.where(big | small, 0.98, 0.02).astype(np.float32)
    assert seeded_watershed(p).max() == 1  # a flat P: the eroded threshold seeds stay joined
    labels = distance_seeded_watershed(p, h_px=auto_h_px(np.pi * 12**2))
    assert labels.max() == 2 and labels[30, 20] != labels[30, 58] and labels[30, 58] > 0
    np.testing.assert_array_equal(labels > 0, p > 0.5)
    # one convex blob gets one seed, however large
    ellipse = ((yy - 30) / 25.0) ** 2 + ((xx - 45) / 40.0) ** 2 <= 1
    assert distance_seeded_watershed(np.where(ellipse, 0.9, 0.1), h_px=1.0).max() == 1


def test_auto_settings_scale_with_the_median_object_area() -> None:
    assert median_radius_px(np.pi * 10**2) == pytest.approx(10.0)
    assert auto_h_px(np.pi * 10**2) == pytest.approx(1.5)
    assert auto_min_object_px(127.0) == 6 and auto_min_object_px(540.0) == 27
    with pytest.raises(ValueError, match="h_px"):
        distance_seeded_watershed(np.zeros((5, 5), np.float32), h_px=0.0)


@pytest.mark.parametrize(("block_px", "jobs"), [(16, 2), (48, 3), (100, 1)])
def test_blockwise_distance_watershed_equals_whole_slice(merge_probability, block_px: int, jobs: int) -> None:
    prob = np.stack([_nuclei_probability((120, 150), 25, seed) for seed in (3, 4)])
    h = auto_h_px(np.pi * 8**2)
    out, stored = merge_probability(prob, block_px=block_px, jobs=jobs, instances="watershed",
                                    watershed={"halo_px": 64, "seeds": "distance", "h_px": h})
    k = int(out.max())
    whole = [distance_seeded_watershed(p, h_px=h) for p in stored]
    for z in range(2):
        assert _same_partition(out[z], whole[z]), f"slice {z} differs from the whole-slice distance watershed"
        assert whole[z].max() > ndi.label(stored[z] > 0.5)[1]  # touching nuclei were split
    assert k == sum(int(w.max()) for w in whole)
    assert np.array_equal(np.unique(out), np.arange(k + 1))
