"""Tests of w(x) for (Z, Y, X) volumes with anisotropic voxels (unet_core.weights.maps, *_3d)
and its chunked Dask form (unet_core.weights.blockwise.volume_weight_arrays)."""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import pytest
from scipy.spatial import cKDTree

from unet_core.common.errors import UserInputError
from unet_core.synth.scene import voronoi_cells
from unet_core.weights import blockwise as WD
from unet_core.weights import maps as W

SPACING = (2.0, 0.5, 0.5)  # µm: z steps 4x the in-plane ones, as the synthetic profile
CLASS_WEIGHTS = (0.6, 1.7)


def voronoi_volume(shape: tuple[int, int, int], n: int, *, seed: int, spacing=SPACING, gap: float = 0.0) -> np.ndarray:
    """Touching cells: nearest-seed labels in µm, ids shuffled and spaced (so 'smaller label' is
    not 'nearer the origin'); ``gap > 0`` blanks voxels farther from their seed than ``gap``
    times the radius of a ball of the mean cell volume."""
    rng = np.random.default_rng(seed)
    extent = np.array(shape) * np.array(spacing)
    seeds = rng.uniform(0, 1, (n, 3)) * extent
    grid = np.indices(shape).reshape(3, -1).T * np.array(spacing)
    dist, index = cKDTree(seeds).query(grid)
    ids = (rng.permutation(n) + 1) * 7
    labels = ids[index].reshape(shape).astype(np.int32)
    if gap:
        radius = (3 * np.prod(extent) / (4 * math.pi * n)) ** (1 / 3)
        labels[dist.reshape(shape) > gap * radius] = 0
    return labels


def separated_cells(labels: np.ndarray) -> np.ndarray:
    return np.where(W.class_map_3d(labels, separate_touching=True) == 1, labels, 0).astype(np.int32)


def brute_force_distances(cells: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Untruncated d1, d2 (µm) at every voxel: for each cell, the minimum over all of its voxels
    of the anisotropic Euclidean distance; then the two smallest per-cell minima."""
    grid = np.indices(cells.shape).reshape(3, -1).T
    per_cell = []
    for label in np.unique(cells[cells != 0]):
        voxels = np.argwhere(cells == label)
        diff = (grid[:, None, :] - voxels[None, :, :]) * np.array(spacing)
        per_cell.append(np.sqrt((diff**2).sum(-1)).min(axis=1))
    per_cell += [np.full(len(grid), np.inf)] * 2
    nearest = np.sort(np.stack(per_cell), axis=0)
    return nearest[0].reshape(cells.shape), nearest[1].reshape(cells.shape)


def test_halo_per_axis_from_cutoff_and_spacing():
    # cutoff = 2.5 * sqrt(2 ln 1e4) = 10.73 um -> z: ceil(10.73 / 2) + 1 = 7, y/x: ceil(21.46) + 1 = 23
    params = W.VolumeWeightParams(sigma_um=2.5)
    assert params.cutoff_um == pytest.approx(10.73, abs=0.01)
    assert params.halo_voxels(SPACING) == (7, 23, 23)


@pytest.mark.parametrize(
    "axis,gap_voxels,expected_um",
    [pytest.param(0, 1, 2.0, id="z-gap-2um"), pytest.param(2, 1, 0.5, id="x-gap-0.5um"),
     pytest.param(1, 3, 1.0, id="y-gap-1um")],
)
def test_two_slabs_hand_computed(axis, gap_voxels, expected_um):
    # two slabs one or three voxels apart along one axis: in the middle of the gap d1 = d2
    shape = [9, 12, 11]
    labels = np.zeros(shape, np.int32)
    middle = shape[axis] // 2
    low = [slice(None)] * 3
    high = [slice(None)] * 3
    low[axis] = slice(0, middle - gap_voxels // 2)
    high[axis] = slice(middle + gap_voxels // 2 + 1, None)
    labels[tuple(low)], labels[tuple(high)] = 3, 5
    params = W.VolumeWeightParams(sigma_um=1.5, w0=10)
    term = W.border_weight_3d(labels, params, spacing_um=SPACING)
    at = [slice(None)] * 3
    at[axis] = middle
    np.testing.assert_allclose(term[tuple(at)], 10 * math.exp(-(2 * expected_um) ** 2 / (2 * 1.5**2)), rtol=1e-6)
    assert np.all(term[labels != 0] == 0)


@pytest.mark.parametrize("method", ["kdtree", "bbox"])
@pytest.mark.parametrize("pixels", ["background", "all"])
@pytest.mark.parametrize("gap", [pytest.param(0.0, id="touching"), pytest.param(0.8, id="gaps")])
def test_matches_brute_force_reference(method, pixels, gap):
    labels = voronoi_volume((9, 17, 15), 7, seed=4, gap=gap)
    cells = separated_cells(labels)
    params = W.VolumeWeightParams(sigma_um=1.2, w0=10, tolerance=1e-3, border_pixels=pixels, method=method)
    cutoff = params.cutoff_um
    ref1, ref2 = brute_force_distances(cells, SPACING)
    target, d1, d2 = W.two_nearest_distances_3d(cells, spacing_um=SPACING, cutoff_um=cutoff, pixels=pixels,
                                                method=method)
    np.testing.assert_array_equal(target, cells == 0 if pixels == "background" else np.ones(cells.shape, bool))
    r1, r2 = ref1[target], ref2[target]
    within = r1 + r2 <= cutoff * (1 - 1e-9)
    assert within.sum() > 50
    np.testing.assert_allclose(d1[within], r1[within], rtol=1e-12)
    np.testing.assert_allclose(d2[within], r2[within], rtol=1e-12)
    assert np.all(np.isinf(d2[r2 > cutoff * (1 + 1e-9)]))
    ref_term = np.where(np.isfinite(ref2), 10 * np.exp(-((ref1 + ref2) ** 2) / (2 * 1.2**2)), 0.0)
    if pixels == "background":
        ref_term[cells != 0] = 0
    got = W.border_weight_3d(cells, params, spacing_um=SPACING)
    assert got.dtype == np.float32
    assert np.abs(got - ref_term).max() <= 1e-3
    assert np.abs(got - ref_term).max() > 0  # the truncation is real


@pytest.mark.parametrize("pixels", ["background", "all"])
@pytest.mark.parametrize("spacing", [pytest.param(SPACING, id="dyadic"), pytest.param((1.3, 0.4, 0.4), id="decimal")])
def test_methods_identical(spacing, pixels):
    labels = voronoi_volume((11, 31, 29), 12, seed=8, spacing=spacing, gap=0.9)
    cells = separated_cells(labels)
    kd, bb = (W.border_weight_3d(cells, W.VolumeWeightParams(sigma_um=1.5, method=m, border_pixels=pixels),
                                 spacing_um=spacing)
              for m in ("kdtree", "bbox"))
    assert kd.max() > 0
    np.testing.assert_array_equal(kd, bb)


@pytest.mark.parametrize("method", ["kdtree", "bbox"])
def test_distances_do_not_depend_on_position(method):
    # what chunking relies on: a voxel's d1, d2 (float64, bit for bit) are the same wherever the
    # volume sits in a larger array, also for voxel sizes that are not powers of two
    spacing = (1.3, 0.4, 0.4)
    labels = voronoi_volume((9, 23, 21), 9, seed=12, spacing=spacing, gap=0.9)
    cells = separated_cells(labels)
    shifted = np.pad(cells, ((3, 0), (17, 2), (29, 1)))
    box = (slice(3, 12), slice(17, 40), slice(29, 50))
    cutoff = W.VolumeWeightParams(sigma_um=1.5).cutoff_um
    _, d1, d2 = W.two_nearest_distances_3d(cells, spacing_um=spacing, cutoff_um=cutoff, pixels="all", method=method)
    _, e1, e2 = W.two_nearest_distances_3d(shifted, spacing_um=spacing, cutoff_um=cutoff, pixels="all", method=method)
    e1, e2 = e1.reshape(shifted.shape)[box].ravel(), e2.reshape(shifted.shape)[box].ravel()
    exact = d1 + d2 <= cutoff  # the promise; beyond it a search may stop early (inf) or not
    np.testing.assert_array_equal(e1 + e2 <= cutoff, exact)
    assert exact.sum() > 500
    assert e1[exact].tobytes() == d1[exact].tobytes() and e2[exact].tobytes() == d2[exact].tobytes()

def _crosses_z_face(cells: np.ndarray, z: int) -> bool:
    """Two different cells touch across the face between slices z - 1 and z (before separation)."""
    a, b = cells[z - 1], cells[z]
    return bool(np.any((a != 0) & (b != 0) & (a != b)))


@pytest.mark.parametrize(
    "method,pixels,gap",
    [pytest.param("auto", "background", 0.0, id="auto-bg-touching"),
     pytest.param("auto", "background", 0.85, id="auto-bg-gaps"),
     pytest.param("kdtree", "background", 0.0, id="kdtree-bg-touching"),
     pytest.param("bbox", "all", 0.85, id="bbox-all-gaps")],
)  # (the k-d tree with 'all' is slow in 3-D: it meets the bbox method in test_methods_identical)
def test_chunked_equals_whole_volume(method, pixels, gap):
    shape, chunks = (23, 45, 41), (6, 16, 15)  # odd sizes; no axis divided by its chunk
    labels = voronoi_volume(shape, 14, seed=21, gap=gap)
    assert all(_crosses_z_face(labels, z) for z in (6, 12, 18))  # touching cells across every z face
    params = W.VolumeWeightParams(sigma_um=1.5, border_pixels=pixels, method=method)
    assert params.halo_voxels(SPACING) == (5, 14, 14)
    classes = W.class_map_3d(labels, separate_touching=True)
    whole = W.weight_map_3d(labels, classes, class_weights=CLASS_WEIGHTS, params=params, spacing_um=SPACING)
    lazy_classes, lazy_weights = WD.volume_weight_arrays(da.from_array(labels, chunks=chunks),
                                                         class_weights=CLASS_WEIGHTS, params=params, spacing_um=SPACING)
    got_classes, got = da.compute(lazy_classes, lazy_weights, scheduler="synchronous")
    assert got.dtype == np.float32 and got.shape == shape and lazy_weights.chunks == da.from_array(labels, chunks=chunks).chunks
    assert got.tobytes() == whole.tobytes()
    assert got_classes.tobytes() == classes.tobytes()
    assert (whole > CLASS_WEIGHTS[1]).sum() > 100  # the border term is present


def test_chunked_equals_whole_volume_with_decimal_spacing():
    spacing = (1.3, 0.4, 0.4)
    labels = voronoi_volume((19, 37, 33), 12, seed=5, spacing=spacing, gap=0.9)
    params = W.VolumeWeightParams(sigma_um=1.2)
    classes = W.class_map_3d(labels, separate_touching=True)
    whole = W.weight_map_3d(labels, classes, class_weights=CLASS_WEIGHTS, params=params, spacing_um=spacing)
    _, lazy = WD.volume_weight_arrays(da.from_array(labels, chunks=(7, 17, 16)), class_weights=CLASS_WEIGHTS,
                                      params=params, spacing_um=spacing)
    assert lazy.compute(scheduler="synchronous").tobytes() == whole.tobytes()


def test_chunked_equals_whole_volume_thinner_than_the_halo():
    # 3 slices against a z halo of 5, z chunks of 2: the halo reads only the zero boundary there
    labels = voronoi_volume((3, 33, 29), 6, seed=2, gap=0.8)
    params = W.VolumeWeightParams(sigma_um=1.5)
    classes = W.class_map_3d(labels, separate_touching=True)
    whole = W.weight_map_3d(labels, classes, class_weights=CLASS_WEIGHTS, params=params, spacing_um=SPACING)
    _, lazy = WD.volume_weight_arrays(da.from_array(labels, chunks=(2, 16, 15)), class_weights=CLASS_WEIGHTS,
                                      params=params, spacing_um=SPACING)
    assert (whole > CLASS_WEIGHTS[1]).any()
    assert lazy.compute(scheduler="synchronous").tobytes() == whole.tobytes()

@pytest.mark.parametrize("seed", [1, 2, 3])
def test_separation_leaves_no_two_cells_face_adjacent(seed):
    labels = voronoi_volume((12, 20, 18), 15, seed=seed)
    cells = separated_cells(labels)
    for axis in range(3):
        a = np.moveaxis(cells, axis, 0)
        lo, hi = a[:-1], a[1:]
        assert not np.any((lo != 0) & (hi != 0) & (lo != hi)), f"cells touch across a face along axis {axis}"
    # and it removes no more than it must: every removed voxel had a larger face neighbour
    padded = np.pad(labels, 1)
    larger = np.zeros(labels.shape, bool)
    for offset in ((-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)):
        neighbour = padded[tuple(slice(1 + o, 1 + o + n) for o, n in zip(offset, labels.shape))]
        larger |= neighbour > labels
    removed = (labels != 0) & (cells == 0)
    assert removed.any() and np.all(larger[removed])


def test_separation_hand_cases():
    # a z contact: the smaller label's slice goes; cells meeting along an edge only both stay
    labels = np.zeros((4, 3, 3), np.int32)
    labels[:2], labels[2:] = 9, 4
    np.testing.assert_array_equal(W.class_map_3d(labels, separate_touching=True)[:, 1, 1], [1, 1, 0, 1])
    edge = np.zeros((2, 2, 1), np.int32)
    edge[0, 0, 0], edge[1, 1, 0] = 1, 2  # one step in z and one in y: an edge, not a face
    np.testing.assert_array_equal(W.class_map_3d(edge, separate_touching=True), edge != 0)
    np.testing.assert_array_equal(W.class_map_3d(labels, separate_touching=False), np.ones(labels.shape))


@pytest.mark.parametrize("method", ["kdtree", "bbox"])
def test_one_slice_isotropic_reduces_to_2d(method):
    # (beyond the cutoff the methods may differ: d2 inf or a value; so one method at a time)
    labels2d = voronoi_cells((90, 77), 14, seed=6, gap=1.1)
    cells2d = W.cells_from(labels2d, W.class_map(labels2d, separate_touching=True))
    params2d = W.WeightParams(w0=10, sigma_px=4, method=method)
    target, d1, d2 = W.two_nearest_distances(cells2d, cutoff=params2d.cutoff_px, method=method)
    for dz in (1.0, 7.0):  # with one slice the z size never enters
        t3, e1, e2 = W.two_nearest_distances_3d(cells2d[None], spacing_um=(dz, 1.0, 1.0),
                                                cutoff_um=params2d.cutoff_px, method=method)
        np.testing.assert_array_equal(t3[0], target)
        assert e1.tobytes() == d1.tobytes() and e2.tobytes() == d2.tobytes()
    # distances scale with the voxel size (0.5 um: exactly half)
    _, h1, h2 = W.two_nearest_distances_3d(cells2d[None], spacing_um=(0.5, 0.5, 0.5),
                                           cutoff_um=params2d.cutoff_px / 2, method=method)
    assert h1.tobytes() == (d1 / 2).tobytes() and h2.tobytes() == (d2 / 2).tobytes()
    term3 = W.border_weight_3d(cells2d[None], W.VolumeWeightParams(w0=10, sigma_um=4, method=method),
                               spacing_um=(1.0, 1.0, 1.0))
    assert term3[0].tobytes() == W.border_weight(cells2d, params2d).tobytes()
    # the 6-connected rule cuts at face contacts only: a subset of what the 2-D 3x3 rule cuts
    assert np.all(W.class_map_3d(labels2d[None], separate_touching=True)[0] >= W.class_map(labels2d, separate_touching=True))


@pytest.mark.parametrize("axes", [pytest.param((0,), id="z"), pytest.param((1,), id="y"), pytest.param((2,), id="x"),
                                  pytest.param((0, 1, 2), id="zyx")])
def test_invariant_under_flips(axes):
    labels = voronoi_volume((13, 27, 25), 12, seed=9, gap=0.85)
    params = W.VolumeWeightParams(sigma_um=1.5)

    def weights(volume):
        classes = W.class_map_3d(volume, separate_touching=True)
        return classes, W.weight_map_3d(volume, classes, class_weights=CLASS_WEIGHTS, params=params, spacing_um=SPACING)

    classes, w = weights(labels)
    flipped_classes, flipped_w = weights(np.flip(labels, axes))
    np.testing.assert_array_equal(flipped_classes, np.flip(classes, axes))
    np.testing.assert_array_equal(flipped_w, np.flip(w, axes))


def test_empty_and_single_cell_volumes_get_class_weights_only():
    params = W.VolumeWeightParams(sigma_um=1.0)
    one = np.zeros((5, 9, 8), np.int32)
    one[1:4, 2:6, 2:5] = 3
    for labels in (np.zeros((5, 9, 8), np.int32), one):
        classes = W.class_map_3d(labels, separate_touching=True)
        w = W.weight_map_3d(labels, classes, class_weights=CLASS_WEIGHTS, params=params, spacing_um=SPACING)
        np.testing.assert_array_equal(w, np.where(classes == 1, *np.float32(CLASS_WEIGHTS)[::-1]))


@pytest.mark.parametrize(
    "call,msg",
    [
        pytest.param(lambda: W.class_map_3d(np.zeros((3, 4, 5), np.float32), separate_touching=True), "integers",
                     id="float-labels"),
        pytest.param(lambda: W.class_map_3d(np.zeros((4, 5), np.int32), separate_touching=True), "3-D",
                     id="2d-labels"),
        pytest.param(lambda: W.border_weight_3d(np.zeros((2, 3, 4, 5), np.int32), W.VolumeWeightParams(sigma_um=1),
                                                spacing_um=SPACING), "3-D", id="4d-labels"),
        pytest.param(lambda: W.class_map_3d(-np.ones((3, 4, 5), np.int16), separate_touching=True), "negative",
                     id="negative-labels"),
        pytest.param(lambda: W.border_weight_3d(np.zeros((3, 4, 5), np.int32), W.VolumeWeightParams(sigma_um=1),
                                                spacing_um=(0.0, 0.5, 0.5)), "spacing_um", id="zero-spacing"),
        pytest.param(lambda: W.border_weight_3d(np.zeros((3, 4, 5), np.int32), W.VolumeWeightParams(sigma_um=1),
                                                spacing_um=(2.0, -0.5, 0.5)), "spacing_um", id="negative-spacing"),
        pytest.param(lambda: W.two_nearest_distances_3d(np.zeros((3, 4, 5), np.int32), spacing_um=(0.5, 0.5),
                                                        cutoff_um=3.0), "spacing_um", id="two-spacings"),
        pytest.param(lambda: W.VolumeWeightParams(sigma_um=1).halo_voxels((float("nan"), 1, 1)), "spacing_um",
                     id="nan-spacing"),
        pytest.param(lambda: W.VolumeWeightParams(sigma_um=0.0), "sigma_um", id="zero-sigma"),
        pytest.param(lambda: W.VolumeWeightParams(sigma_um=1.0, method="fast"), "method", id="bad-method"),
        pytest.param(lambda: WD.volume_weight_arrays(da.zeros((3, 4, 5), dtype=np.float32), class_weights=CLASS_WEIGHTS,
                                                     params=W.VolumeWeightParams(sigma_um=1), spacing_um=SPACING),
                     "integer", id="dask-float-labels"),
        pytest.param(lambda: WD.volume_weight_arrays(da.zeros((3, 4, 5), dtype=np.int32), class_weights=CLASS_WEIGHTS,
                                                     params=W.VolumeWeightParams(sigma_um=1), spacing_um=(1, 0, 1)),
                     "spacing_um", id="dask-zero-spacing"),
    ],
)
def test_bad_input_raises_one_line(call, msg):
    with pytest.raises(UserInputError, match=msg) as err:
        call()
    assert "\n" not in str(err.value)
