"""The project's one mirror convention, pinned against numpy, scipy and torch names."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from unet_core.common.mirror import mirror_index, mirror_pad, read_mirrored


def test_five_pixel_row_reflects_without_repeating_the_edge():
    row = np.array([1, 2, 3, 4, 5])
    # c b | a b c d e | d c   (the border pixel is the mirror axis, not repeated)
    np.testing.assert_array_equal(mirror_pad(row, [(2, 2)]), [3, 2, 1, 2, 3, 4, 5, 4, 3])
    np.testing.assert_array_equal(mirror_pad(row, [(2, 2)]), np.pad(row, 2, mode="reflect"))
    assert not np.array_equal(mirror_pad(row, [(2, 2)]), np.pad(row, 2, mode="symmetric"))


def test_matches_scipy_mirror_and_torch_reflect():
    img = np.arange(35, dtype=np.float32).reshape(5, 7)
    shifted = ndi.shift(img, (0, 0), order=0, mode="mirror")
    np.testing.assert_array_equal(shifted, img)
    # scipy "mirror" sampling one pixel outside equals our convention
    coords = np.array([[-1.0], [2.0]])
    assert ndi.map_coordinates(img, coords, order=0, mode="mirror")[0] == mirror_pad(img, [(1, 0), (0, 0)])[0, 2]
    t = F.pad(torch.from_numpy(img)[None, None], (3, 3, 2, 2), mode="reflect")[0, 0].numpy()
    np.testing.assert_array_equal(t, mirror_pad(img, [(2, 2), (3, 3)]))


def test_grid_sample_reflection_align_corners_matches():
    img = torch.arange(20, dtype=torch.float32).reshape(1, 1, 4, 5)
    # sample x = -2 .. 6 (pixel units) on row 1 with align_corners=True normalisation
    xs = torch.arange(-2, 7, dtype=torch.float32)
    gx = xs / (5 - 1) * 2 - 1
    gy = torch.full_like(gx, 1 / (4 - 1) * 2 - 1)
    grid = torch.stack([gx, gy], -1)[None, None]
    out = F.grid_sample(img, grid, mode="nearest", padding_mode="reflection", align_corners=True)[0, 0, 0]
    expected = mirror_pad(img[0, 0].numpy(), [(0, 0), (2, 2)])[1]
    np.testing.assert_array_equal(out.numpy(), expected)


@pytest.mark.parametrize("size, pad", [pytest.param(1, 5, id="single-pixel"), pytest.param(2, 7, id="two-pixels"),
                                       pytest.param(5, 13, id="pad-beyond-one-reflection")])
def test_large_pads_repeat_with_period(size, pad):
    row = np.arange(size) + 10
    np.testing.assert_array_equal(mirror_pad(row, [(pad, pad)]), np.pad(row, pad, mode="reflect") if size > 1 else np.full(size + 2 * pad, 10))


def test_mirror_index_range():
    idx = mirror_index(np.arange(-50, 50), 7)
    assert idx.min() == 0 and idx.max() == 6


def test_read_mirrored_reads_a_box_like_padding_the_whole():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(9, 11))
    whole = mirror_pad(img, [(6, 6), (4, 4)])
    for start, stop in [((-6, -4), (3, 5)), ((2, 3), (15, 15)), ((-6, -4), (15, 15)), ((4, 4), (6, 6))]:
        got = read_mirrored(img, start, stop)
        np.testing.assert_array_equal(got, whole[start[0] + 6: stop[0] + 6, start[1] + 4: stop[1] + 4])
