"""Box geometry: tiny cases with hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest

from unet_core.common.geometry import Box, chunk_grid


def test_grow_intersect_contains():
    write = Box((16, 32), (100, 50))
    read = write.grow(92)                        # 92 px of context per side
    assert read == Box((-76, -60), (284, 234))
    assert read.contains(write) and not write.contains(read)
    image = Box.from_shape((120, 70))
    assert read.intersect(image) == Box((0, 0), (120, 70))
    assert Box((0,), (5,)).intersect(Box((7,), (3,))).empty    # disjoint 1-D boxes
    assert write.end == (116, 82) and write.size == 5000


def test_slices_and_relative():
    a = np.arange(100).reshape(10, 10)
    box = Box((2, 3), (4, 2))
    np.testing.assert_array_equal(a[box.to_slices()], a[2:6, 3:5])
    assert box.relative_to(Box((2, 2), (8, 8))) == Box((0, 1), (4, 2))


def test_chunk_grid_clips_edges():
    boxes = list(chunk_grid((5, 7), (2, 4)))
    # rows [0,2) [2,4) [4,5) x cols [0,4) [4,7)
    assert [b.shape for b in boxes] == [(2, 4), (2, 3), (2, 4), (2, 3), (1, 4), (1, 3)]
    assert sum(b.size for b in boxes) == 35


def test_invalid_boxes():
    with pytest.raises(ValueError):
        Box((0, 0), (1,))
    with pytest.raises(ValueError):
        Box((0,), (-1,))
