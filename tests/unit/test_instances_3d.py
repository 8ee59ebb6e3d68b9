"""Cell instances of (Z, Y, X) volumes (unet_core/infer/instances.py, morphology.py) and per-slice
ids linked into 3-D ids (unet_core/infer/slice_linking.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.morphology import h_maxima as sk_h_maxima
from skimage.segmentation import watershed as sk_watershed

from unet_core.infer import instances as I
from unet_core.infer import morphology as M
from unet_core.infer.slice_linking import link_slices

ANISO = (4.0, 1.0, 1.0)  # µm per voxel (dz, dy, dx): z spacing 4x the in-plane one
BALL = ndi.generate_binary_structure(3, 1)


def balls(shape: tuple[int, int, int], centres_um, radii_um, spacing=ANISO) -> np.ndarray:
    """(Z, Y, X) int32 ids 1..n of balls (µm), later ones drawn over earlier ones."""
    grid = np.indices(shape).astype(np.float64) * np.asarray(spacing)[:, None, None, None]
    out = np.zeros(shape, np.int32)
    for k, (c, r) in enumerate(zip(centres_um, radii_um), start=1):
        d2 = sum((grid[a] - c[a]) ** 2 for a in range(3))
        out[d2 <= r * r] = k
    return out


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label arrays split the voxels alike (equal up to renumbering, 0 kept 0)."""
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# -- the touching-balls scene --------------------------------------------------------------------
SHAPE = (11, 40, 64)
# two balls of radius 11 µm, centres 18 µm apart in x: a neck 2 * sqrt(11² - 9²) = 12.6 µm wide
TWO = balls(SHAPE, [(20.0, 20.0, 21.0), (20.0, 20.0, 39.0)], [11.0, 11.0])


def test_touching_balls_split_by_the_3d_watershed_and_merged_by_components() -> None:
    p = (TWO > 0).astype(np.float32)
    assert I.components_3d(p > 0.5).max() == 1  # one blob of face-connected voxels
    labels = I.distance_seeded_watershed_3d(p, spacing_um=ANISO, h_um=1.5)
    assert labels.dtype == np.int32 and labels.max() == 2
    for k in (1, 2):  # each ball is (nearly all) one object, across all its slices
        best = max(iou(TWO == k, labels == j) for j in (1, 2))
        assert best > 0.9
    # a cell spanning slices keeps one id: the ball's core (every slice it crosses) has one label
    core = balls(SHAPE, [(20.0, 20.0, 21.0)], [8.0])[...] > 0
    assert len(np.unique(labels[core])) == 1 and np.unique(np.nonzero(core)[0]).size >= 4


def test_the_distance_is_in_um_along_every_axis() -> None:
    p = (TWO > 0).astype(np.float32)
    d = I.mask_distance(p > 0.5, spacing_um=ANISO)
    centre = d[5, 20, 21]  # 11 µm from the surface, less the smoothing's rounding of the peak
    assert 9.5 < centre <= 11.0
    # ignoring the spacing, the ball is 2-3 voxels thick along z: a distance of a few px
    assert I.mask_distance(p > 0.5)[5, 20, 21] < 4


def test_stacked_balls_split_along_z_only_with_the_anisotropic_distance() -> None:
    shape = (20, 32, 32)
    stacked = balls(shape, [(24.0, 16.0, 16.0), (48.0, 16.0, 16.0)], [14.0, 14.0])  # neck 7.2 µm
    p = (stacked > 0).astype(np.float32)
    assert I.components_3d(p > 0.5).max() == 1
    labels = I.distance_seeded_watershed_3d(p, spacing_um=ANISO, h_um=2.0)
    assert labels.max() == 2
    for k in (1, 2):
        assert max(iou(stacked == k, labels == j) for j in (1, 2)) > 0.9
    # the same voxels read as isotropic (the spacing ignored): flat discs, no neck along z
    assert I.distance_seeded_watershed_3d(p, spacing_um=(1, 1, 1), h_um=2.0).max() == 1


def test_threshold_seeds_split_a_weak_gap_in_3d() -> None:
    p = np.where(TWO > 0, 0.97, 0.02).astype(np.float32)
    neck = (TWO > 0) & (np.abs(np.indices(SHAPE)[2] - 30) <= 1)
    p[neck] = 0.6  # a weak gap: still mask, never seed
    assert I.components_3d(p > 0.5).max() == 1
    labels = I.seeded_watershed_3d(p, spacing_um=ANISO)
    assert labels.max() == 2
    for k in (1, 2):
        assert max(iou(TWO == k, labels == j) for j in (1, 2)) > 0.9


def test_threshold_seed_erosion_along_z_is_the_same_depth_in_um() -> None:
    p = np.zeros((10, 9, 9), np.float32)
    p[:5, 1:8, 1:8] = 1.0  # slices 0..4, 7 x 7 in-plane
    in_plane = I.seed_mask(p[0], seed_erosion_px=2)  # the 2-D rule: 3 x 3 left of 7 x 7
    iso = I.seed_mask(p, seed_erosion_px=2, spacing_um=(1, 1, 1))  # 2 slices off z's cut edge
    assert np.array_equal(iso[:3], np.broadcast_to(in_plane, (3, 9, 9))) and not iso[3:].any()
    aniso = I.seed_mask(p, seed_erosion_px=2, spacing_um=(4, 1, 1))  # 2 µm < dz: no z erosion
    assert np.array_equal(aniso[:5], np.broadcast_to(in_plane, (5, 9, 9))) and not aniso[5:].any()


def probability_planes(seed: int, n: int):
    """2-D P(cell) of touching discs, coded k/255 (as test_morphology's)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        shape = tuple(rng.integers(8, 70, 2))
        yy, xx = np.indices(shape)
        cells = np.zeros(shape, np.float32)
        for _ in range(int(rng.integers(1, 10))):
            cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(2, 14)
            cells = np.maximum(cells, ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.float32))
        p = ndi.gaussian_filter(cells, rng.uniform(0.5, 2.5)) + 0.1 * rng.random(shape).astype(np.float32)
        yield (np.round(np.clip(p, 0, 1) * 255) / 255).astype(np.float32)


def test_a_volume_of_one_slice_gives_the_2d_rules() -> None:
    for p in probability_planes(11, 25):
        vol = p[None]
        for h in (0.8, 2.0):
            assert np.array_equal(I.distance_seeded_watershed_3d(vol, spacing_um=(5, 1, 1), h_um=h)[0],
                                  I.distance_seeded_watershed(p, h_px=h))
        assert np.array_equal(I.seeded_watershed_3d(vol, spacing_um=(1, 1, 1))[0], I.seeded_watershed(p))
        assert np.array_equal(I.components_3d(vol > 0.5)[0], ndi.label(p > 0.5)[0])
        mask = p > 0.5
        if not mask.all():  # (a mask without background has scipy's degenerate distance, per dimension)
            assert np.array_equal(I.mask_distance(mask[None], spacing_um=(3, 1, 1))[0], I.mask_distance(mask))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_flips_give_the_flipped_cells(axis: int) -> None:
    # no ties decide anything here: the balls differ in size and the gap is a strict minimum
    scene = balls(SHAPE, [(20.0, 19.0, 21.0), (21.0, 21.0, 38.5)], [11.0, 9.5])
    p = np.where(scene > 0, 0.95, 0.05).astype(np.float32)
    p -= 0.01 * (np.indices(SHAPE)[2] - 31.3) ** 2 / 100  # P falls towards the neck (x = 31.3)
    for run in (lambda q: I.distance_seeded_watershed_3d(q, spacing_um=ANISO, h_um=1.5),
                lambda q: I.seeded_watershed_3d(q, seed_threshold=0.9, spacing_um=ANISO),
                lambda q: I.components_3d(q > 0.5)):
        assert same_partition(np.flip(run(p), axis), run(np.flip(p, axis)))


def test_min_object_size_in_um3() -> None:
    assert I.min_object_voxels(100.0, ANISO) == 25  # 100 µm³ / 4 µm³
    assert I.min_object_voxels(101.0, ANISO) == 26 and I.min_object_voxels(0.0, ANISO) == 0
    labels = np.zeros((4, 10, 10), np.int32)
    labels[0, :5, :5] = 7  # 25 voxels: kept
    labels[1:, 8:, :4] = 3  # 24 voxels: dropped
    labels[3, 0, 9] = 9  # 1 voxel: dropped
    out = I.drop_small_objects(labels, min_voxels=I.min_object_voxels(100.0, ANISO))
    assert out.dtype == np.int32 and np.array_equal(out, (labels == 7).astype(np.int32))
    assert np.array_equal(I.drop_small_objects(labels, min_voxels=0), labels)


def test_auto_settings_scale_with_the_median_object_volume() -> None:
    ball = 4 / 3 * np.pi * 10.0**3  # radius 10 µm
    assert I.auto_h_um(ball) == pytest.approx(0.15 * 10.0)
    assert I.auto_h_um(8 * ball) == pytest.approx(0.15 * 20.0)  # twice the radius, twice the depth
    assert I.auto_min_object_um3(ball) == pytest.approx(0.05 * ball)


def test_bad_arguments() -> None:
    p = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="spacing_um"):
        I.distance_seeded_watershed_3d(p, spacing_um=(1, 1), h_um=1.0)
    with pytest.raises(ValueError, match="spacing_um"):
        I.seeded_watershed_3d(p, spacing_um=(0, 1, 1))
    with pytest.raises(ValueError, match="spacing_um"):
        I.seed_mask(p)
    with pytest.raises(ValueError, match="3-D"):
        I.seeded_watershed_3d(p[0], spacing_um=ANISO)
    with pytest.raises(ValueError, match="3-D"):
        I.components_3d(p[0])
    with pytest.raises(ValueError, match="h_px must be > 0"):
        I.distance_seeded_watershed_3d(p, spacing_um=ANISO, h_um=0.0)
    with pytest.raises(ValueError, match="connectivity"):
        I.flood_height(p, np.zeros(p.shape, np.int32), mask=p > 0, connectivity=4)
    with pytest.raises(ValueError, match="min_object_um3"):
        I.min_object_voxels(-1.0, ANISO)


# -- the 3-D kernels against scikit-image ---------------------------------------------------------
def random_volumes(seed: int, n: int):
    rng = np.random.default_rng(seed)
    for k in range(n):
        shape = (1, 1, 1) if k == 0 else tuple(int(s) for s in rng.integers(1, 14, 3))
        m = ndi.gaussian_filter(rng.random(shape), rng.uniform(0.5, 2)) > 0.5 if k % 3 else rng.random(shape) < 0.8
        spacing = (float(rng.choice([1.0, 2.5, 4.0])), 1.0, float(rng.choice([1.0, 0.8])))
        yield m, spacing


def test_anisotropic_edt_equals_scipy_to_within_rounding() -> None:
    for m, spacing in random_volumes(0, 120):
        out = M.distance_transform_edt_um(m, spacing)
        ref = ndi.distance_transform_edt(m, sampling=spacing)
        assert out.dtype == np.float64 and out.shape == m.shape
        np.testing.assert_allclose(out, ref, rtol=1e-15, atol=0, err_msg=str((m.shape, spacing)))
    hole = np.ones((5, 7, 9), bool)
    hole[0, 0, 0] = False  # one background voxel in a corner: the distance is sqrt of the sum of terms
    d = M.distance_transform_edt_um(hole, (4.0, 1.0, 0.5))
    assert d[4, 6, 8] == np.sqrt((4.0 * 4) ** 2 + 6.0**2 + (0.5 * 8) ** 2)
    assert np.array_equal(M.distance_transform_edt_um(np.ones((2, 3, 4), bool), ANISO),
                          ndi.distance_transform_edt(np.ones((2, 3, 4), bool), sampling=ANISO))
    with pytest.raises(ValueError):
        M.distance_transform_edt_um(np.ones((3, 3), bool), ANISO)


def test_h_maxima_3d_equals_skimage_with_the_6_cross() -> None:
    for m, spacing in random_volumes(1, 60):
        d = I.mask_distance(m, spacing_um=spacing)
        for h in (0.5, 1.0, 2.5):
            assert np.array_equal(M.h_maxima(d, h), sk_h_maxima(d, h, footprint=BALL) > 0), (m.shape, h)
            d32 = d.astype(np.float32)
            assert np.array_equal(M.h_maxima(d32, h), sk_h_maxima(d32, h, footprint=BALL) > 0), (m.shape, h)


@pytest.mark.parametrize("limit", [0, 1 << 30], ids=["ranked", "heap"])
def test_flood_3d_equals_skimage_where_no_markers_tie(monkeypatch, limit: int) -> None:
    monkeypatch.setattr(M, "_HEAP_LIMIT_PX", limit)
    rng = np.random.default_rng(2)
    for m, spacing in random_volumes(3, 60):
        height = rng.random(m.shape)  # continuous: no two markers share a height
        markers, _ = ndi.label(rng.random(m.shape) < 0.05, structure=BALL)
        out = M.flood_from_markers(height, markers, m, connectivity=6)
        ref = sk_watershed(-height, markers, mask=m, connectivity=1).astype(np.int32)
        assert out.dtype == np.int32 and np.array_equal(out, ref), m.shape


# -- linking per-slice ids into 3-D ids ---------------------------------------------------------
def per_slice_ids(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """The 2-D mode's ids: each slice's objects numbered on their own (shuffled, restarting)."""
    rng = np.random.default_rng(seed)
    out = np.zeros_like(labels)
    for z in range(labels.shape[0]):
        ids = np.unique(labels[z])[1:]
        new = rng.permutation(ids.size) + 1
        table = np.zeros(labels.max() + 1, labels.dtype)
        table[ids] = new
        out[z] = table[labels[z]]
    return out


def raster_renumbered(labels: np.ndarray) -> np.ndarray:
    values, first = np.unique(labels.ravel(), return_index=True)
    table = np.zeros(values.max() + 1, np.int32)
    order = np.argsort(first[values != 0])
    table[values[values != 0][order]] = np.arange(1, order.size + 1)
    return table[labels]


def separated_cells(seed: int) -> np.ndarray:
    """(Z, Y, X) ellipsoids 3-8 slices tall, in-plane gaps of >= 4 px, some stacked with a gap slice."""
    rng = np.random.default_rng(seed)
    out = np.zeros((16, 60, 60), np.int32)
    k = 0
    for cy in range(8, 60, 15):
        for cx in range(8, 60, 15):
            z0 = int(rng.integers(0, 5))
            while z0 < 14:
                k += 1
                top = z0 + int(rng.integers(3, 9))
                zz, yy, xx = np.indices(out.shape)
                rz, r = (top - z0) / 2, rng.uniform(4, 5.5)
                body = ((zz - (z0 + top - 1) / 2) / max(rz, 1)) ** 2 + ((yy - cy) / r) ** 2 + ((xx - cx) / r) ** 2 <= 1.05
                out[body & (zz >= z0) & (zz < top)] = k
                z0 = top + 1  # one empty slice before the next cell in this column
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linking_reproduces_3d_ids_of_well_separated_cells(seed: int) -> None:
    truth = separated_cells(seed)
    linked = link_slices(per_slice_ids(truth, seed))
    assert linked.dtype == np.int32
    assert np.array_equal(linked, raster_renumbered(truth))  # ids 1..n in raster order of first voxels


def test_linking_depends_on_footprints_not_on_ids() -> None:
    truth = separated_cells(4)
    assert np.array_equal(link_slices(per_slice_ids(truth, 1)), link_slices(per_slice_ids(truth, 2)))


def test_linking_fails_on_stacked_cells_and_fast_shrinking_sections() -> None:
    # documented failure 1: two cells stacked along z with one footprint become one 3-D object
    stacked = np.zeros((6, 8, 8), np.int32)
    stacked[:3, 2:6, 2:6] = 1
    stacked[3:, 2:6, 2:6] = 2
    assert link_slices(per_slice_ids(stacked)).max() == 1  # the truth holds 2
    # documented failure 2: a section shrinking faster than the threshold allows starts a new object
    pole = np.zeros((3, 12, 12), np.int32)
    pole[:2, :10, :10] = 1  # 100 px, then the pole: 5 x 5 = 25 px (IoU 0.25, not > 0.25)
    pole[2, :10, :10] = 0
    pole[2, 2:7, 2:7] = 1
    assert link_slices(pole).max() == 2
    assert link_slices(pole, min_iou=0.2).max() == 1


def test_links_are_one_to_one_by_mutual_best_iou() -> None:
    v = np.zeros((2, 6, 10), np.int32)
    v[0, :, :10] = 5  # one cell of 60 px ...
    v[1, :, :6] = 1  # ... split in two in the next slice: 36 px (IoU 0.6) and 24 px (IoU 0.4)
    v[1, :, 6:] = 2
    out = link_slices(v)
    assert np.unique(out[1][:, :6]).tolist() == [1] and np.unique(out[1][:, 6:]).tolist() == [2]
    assert np.array_equal(out[0], np.ones((6, 10)))  # the larger half continues the cell
    gap = np.zeros((3, 4, 4), np.int32)
    gap[0, :2, :2] = gap[2, :2, :2] = 1  # missed in slice 1: two objects
    assert link_slices(gap).max() == 2
    with pytest.raises(ValueError, match="min_iou"):
        link_slices(v, min_iou=1.0)
    with pytest.raises(ValueError, match=r"\(Z, Y, X\)"):
        link_slices(v[0])
