"""Seeded watershed instances: split cells that connected components merge through a weak gap."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from unet_core.instances import seeded_watershed


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
