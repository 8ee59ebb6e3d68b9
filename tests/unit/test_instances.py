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
    from unet_core.io.synth import voronoi_cells

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


@pytest.mark.parametrize("block_px", [16, 48, 100])
def test_blockwise_watershed_equals_whole_slice(block_px: int) -> None:
    from unet_core.infer.merge import watershed_blockwise

    prob = np.stack([_cell_probability((120, 150), 30, seed) for seed in (1, 2)])
    out = np.zeros(prob.shape, np.uint32)
    scratch = np.zeros(prob.shape, np.uint32)
    final, _ = watershed_blockwise(prob, out, scratch, shape=prob.shape, block_px=block_px, halo_px=64)
    out, k = final[out], int(final.max())
    whole = [seeded_watershed(p) for p in prob]
    for z in range(2):
        assert _same_partition(out[z], whole[z]), f"slice {z} differs from the whole-slice watershed"
    assert k == sum(int(w.max()) for w in whole)
    assert set(np.unique(out[0][out[0] > 0])).isdisjoint(np.unique(out[1][out[1] > 0]))  # ids unique per stack
    assert np.array_equal(np.unique(out), np.arange(k + 1))  # ids 1..K, no gaps


def test_blockwise_watershed_joins_unseeded_pixels_across_block_faces() -> None:
    """A faint cell (no seed) cut by block faces stays one object; one touching a seeded cell
    across a face joins it even where that cell's seed lies outside the halo."""
    from unet_core.infer.merge import watershed_blockwise

    p = np.zeros((1, 40, 80), np.float32)
    p[0, 5:35, 5:35] = 0.7  # faint: no seed, cut into 4 blocks by the 20-px grid
    p[0, 5:35, 45:78] = 0.99
    p[0, 5:35, 45:60] = 0.6  # the cell's faint left part, 15 px wide
    out = np.zeros(p.shape, np.uint32)
    scratch = np.zeros(p.shape, np.uint32)
    final, _ = watershed_blockwise(p, out, scratch, shape=p.shape, block_px=20, halo_px=0)
    out = final[out]
    assert final.max() == 2
    assert len(np.unique(out[0, 5:35, 5:35])) == 1 and out[0, 10, 10] > 0
    assert len(np.unique(out[0, 5:35, 45:78])) == 1 and out[0, 10, 50] != out[0, 10, 10]


def test_blockwise_watershed_splits_a_weak_gap_across_blocks() -> None:
    from unet_core.infer.merge import watershed_blockwise

    p = two_cells_with_weak_gap()[None]
    out = np.zeros(p.shape, np.uint32)
    scratch = np.zeros(p.shape, np.uint32)
    final, _ = watershed_blockwise(p, out, scratch, shape=p.shape, block_px=16, halo_px=16)
    assert final.max() == 2
    assert _same_partition(final[out][0], seeded_watershed(p[0]))
