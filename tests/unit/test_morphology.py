"""Compiled merge kernels (unet_core/infer/morphology.py) against the scipy / scikit-image calls
they replace: results must be identical (values bit for bit, labels label for label); the flood
against its order written out in Python, and skimage's wherever the heights alone order it."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.morphology import h_maxima as sk_h_maxima
from skimage.segmentation import watershed as sk_watershed

from unet_core.infer import instances
from unet_core.infer import morphology as M

CROSS = ndi.generate_binary_structure(2, 1)
SHAPES = [(1, 1), (1, 7), (7, 1), (2, 2), (3, 5), (16, 16), (23, 41), (64, 48)]


def random_masks(seed: int, n: int):
    """Masks of many kinds: noise, opened/smoothed blobs, overlapping discs, empty, full, lines."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        shape = SHAPES[k % len(SHAPES)] if k < 2 * len(SHAPES) else tuple(rng.integers(1, 70, 2))
        kind = k % 6
        if kind == 0:
            m = rng.random(shape) < rng.uniform(0.3, 0.95)
        elif kind == 1:
            m = ndi.binary_opening(rng.random(shape) < 0.7, iterations=int(rng.integers(1, 3)))
        elif kind == 2:
            m = ndi.gaussian_filter(rng.random(shape), rng.uniform(1, 4)) > 0.5
        elif kind == 3:  # overlapping discs: symmetric shapes, plateaus and ties
            yy, xx = np.indices(shape)
            m = np.zeros(shape, bool)
            for _ in range(int(rng.integers(1, 6))):
                cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
                m |= (yy - cy) ** 2 + (xx - cx) ** 2 <= int(rng.integers(1, 15)) ** 2
        elif kind == 4:
            m = np.zeros(shape, bool) if k % 12 == 4 else np.ones(shape, bool)
        else:
            m = np.ones(shape, bool)
            m[rng.integers(0, shape[0]), :] = False
        yield m


# ------------------------------------------------------------------------------ EDT


def test_edt_equals_scipy_including_empty_and_full_masks() -> None:
    for m in random_masks(0, 150):
        ref = ndi.distance_transform_edt(m)
        out = M.distance_transform_edt(m)
        assert out.dtype == ref.dtype == np.float64 and out.shape == m.shape
        assert np.array_equal(out, ref), m.shape


def test_edt_full_mask_matches_scipy_degenerate_answer() -> None:
    for shape in [(1, 1), (1, 6), (6, 1), (5, 9)]:
        m = np.ones(shape, bool)
        assert np.array_equal(M.distance_transform_edt(m), ndi.distance_transform_edt(m))


def test_edt_accepts_non_bool_and_views() -> None:
    m = (np.random.default_rng(1).random((40, 30)) < 0.8)
    assert np.array_equal(M.distance_transform_edt(m[::2, ::-1].astype(np.uint8)),
                          ndi.distance_transform_edt(m[::2, ::-1]))
    with pytest.raises(ValueError):
        M.distance_transform_edt(np.ones((2, 2, 2), bool))


# ------------------------------------------------------------------------------ h-maxima


def sk_peaks(image: np.ndarray, h: float) -> np.ndarray:
    return sk_h_maxima(image, h, footprint=CROSS) > 0


def test_h_maxima_equals_skimage_on_smoothed_distance_maps() -> None:
    for m in random_masks(2, 120):
        d = instances.mask_distance(m)  # as distance_seed_mask gets it
        for h in (0.3, 1.0, 2.0, 3.7):
            assert np.array_equal(M.h_maxima(d, h), sk_peaks(d, h)), (m.shape, h)


def test_h_maxima_equals_skimage_on_plateaus_and_coded_probabilities() -> None:
    rng = np.random.default_rng(3)
    for k in range(80):
        shape = tuple(rng.integers(1, 50, 2))
        img = rng.integers(0, 5, shape).astype(np.float64)  # integer-valued: plateaus, ties
        if k % 3 == 1:
            img = ndi.grey_opening(img, size=3)
        if k % 3 == 2:  # float32-coded probabilities k/255
            img = (np.round(ndi.gaussian_filter(rng.random(shape), 2) * 255) / 255).astype(np.float32)
        for h in (0.5, 1.0, 2.0, 1 / 255):
            assert np.array_equal(M.h_maxima(img, h), sk_peaks(img, h)), (k, h)
    const = np.full((9, 7), 3.5)
    assert np.array_equal(M.h_maxima(const, 1.0), sk_peaks(const, 1.0))
    assert M.h_maxima(np.zeros((0, 4)), 1.0).shape == (0, 4)


def test_h_maxima_non_finite_images() -> None:
    img = instances.mask_distance(np.pad(np.ones((9, 9), bool), 3))
    for dtype in (np.float64, np.float32):
        x = img.astype(dtype)
        x[2, 2] = -np.inf  # skimage copes: same answer
        with np.errstate(invalid="ignore"):
            assert np.array_equal(M.h_maxima(x, 1.0), sk_peaks(x, 1.0))
        for bad in (np.nan, np.inf):  # skimage crashes or hangs: a clear error instead
            x[2, 2] = bad
            with pytest.raises(ValueError, match="NaN or \\+inf"):
                M.h_maxima(x, 1.0)


def test_h_maxima_rejects_what_it_does_not_reproduce() -> None:
    with pytest.raises(TypeError):
        M.h_maxima(np.zeros((3, 3), np.uint8), 1.0)
    with pytest.raises(ValueError):
        M.h_maxima(np.arange(9.0).reshape(3, 3), 0.0)


# ------------------------------------------------------------------------------ flood


def sk_flood(height, markers, mask, connectivity):
    return sk_watershed(-height, markers, mask=mask, connectivity=1 if connectivity == 4 else 2).astype(np.int32)


def reference_flood(height, markers, mask, connectivity):
    """The flood's order written out in Python: markers inside the mask queued first, in raster
    order; pops in (value, age) order, value = -height (as ``-height`` computes it, then float);
    a popped pixel labels each unlabelled mask neighbour (skimage's neighbour order) and queues
    it at max(its value, the popped value)."""
    import heapq

    value = (-np.asarray(height)).astype(np.float64) + 0.0
    ny, nx = value.shape
    steps = [(-1, 0), (0, -1), (0, 1), (1, 0)] + ([(-1, -1), (-1, 1), (1, -1), (1, 1)] if connectivity == 8 else [])
    labels = np.where(mask & (markers != 0), markers, 0).astype(np.int64)
    queue, age = [], 0
    for i, j in zip(*np.nonzero(labels)):
        queue.append((value[i, j], age, i, j))
        age += 1
    heapq.heapify(queue)
    while queue:
        v, _, i, j = heapq.heappop(queue)
        for di, dj in steps:
            qi, qj = i + di, j + dj
            if 0 <= qi < ny and 0 <= qj < nx and mask[qi, qj] and labels[qi, qj] == 0:
                labels[qi, qj] = labels[i, j]
                heapq.heappush(queue, (max(value[qi, qj], v), age, qi, qj))
                age += 1
    return labels.astype(np.int32)


def tied_markers(height, markers, mask, connectivity) -> bool:
    """Whether two markers of different labels with equal heights share a mask component (where
    skimage's heap layout, not the heights, orders them)."""
    comp, _ = ndi.label(mask, structure=ndi.generate_binary_structure(2, 1 if connectivity == 4 else 2))
    on = mask & (markers != 0)
    seen = {}
    for c, v, m in zip(comp[on], (-np.asarray(height)).astype(np.float64)[on] + 0.0, markers[on]):
        if seen.setdefault((c, v), m) != m:
            return True
    return False


PATHS_SEEN = set()


def check_flood(height, markers, mask, monkeypatch) -> None:
    """The public function through both of its kernels (a heap per component; the bucket queue
    over ranks) equals the order written out, and skimage wherever skimage's order is defined by
    the heights alone (no tied markers of different labels in one component)."""
    for conn in (4, 8):
        ref = reference_flood(height, markers, mask, conn)
        for limit in (0, 1 << 30):  # every marked component to the ranked flood / to a heap
            monkeypatch.setattr(M, "_HEAP_LIMIT_PX", limit)
            out = M.flood_from_markers(height, markers, mask, connectivity=conn)
            assert out.dtype == np.int32
            assert np.array_equal(out, ref), (height.shape, conn, limit)
        tied = tied_markers(height, markers, mask, conn)
        PATHS_SEEN.add(tied)
        if not tied:
            assert np.array_equal(out, sk_flood(height, markers, mask, conn)), (height.shape, conn)


def test_flood_equals_skimage_on_distance_maps_with_h_maxima_seeds(monkeypatch) -> None:
    for m in random_masks(4, 120):
        d = instances.mask_distance(m)
        markers, _ = ndi.label(sk_peaks(d, 1.0) & m, structure=CROSS) if d.size else (np.zeros(m.shape, int), 0)
        check_flood(d, markers, m, monkeypatch)


def test_flood_on_ties_markers_off_mask_and_no_markers(monkeypatch) -> None:
    rng = np.random.default_rng(5)
    for k in range(150):
        shape = SHAPES[k % len(SHAPES)] if k < len(SHAPES) else tuple(rng.integers(1, 45, 2))
        kind = k % 5
        if kind == 0:  # integer heights: large plateaus, ties everywhere
            height = rng.integers(0, 3, shape).astype(np.float32)
        elif kind == 1:  # float32-coded probabilities
            height = (rng.integers(0, 256, shape) / 255).astype(np.float32)
        elif kind == 2:  # constant
            height = np.full(shape, 0.7, np.float64)
        elif kind == 3:  # symmetric: distance to the centre
            yy, xx = np.indices(shape)
            height = -np.hypot(yy - (shape[0] - 1) / 2, xx - (shape[1] - 1) / 2)
        else:
            height = ndi.gaussian_filter(rng.random(shape), 1.5)
        mask = rng.random(shape) < (1.0 if k % 7 == 0 else 0.85)
        density = [0.0, 0.02, 0.2][k % 3]
        markers = np.where(rng.random(shape) < density, rng.integers(1, 6, shape), 0).astype(np.int32)
        check_flood(height, markers, mask, monkeypatch)  # markers lie on and off the mask
        check_flood(height, markers.astype(np.int64), np.zeros(shape, bool), monkeypatch)  # empty mask
    assert PATHS_SEEN >= {False, True}  # both with and without tied markers


def test_flood_tied_markers_go_in_raster_order(monkeypatch) -> None:
    # two touching mirror-image discs: their seeds have equal heights and different labels; the
    # first in raster order floods first, so it takes the tied pixels, whatever the labels' values
    yy, xx = np.indices((21, 37))
    mask = ((yy - 10) ** 2 + (xx - 10) ** 2 <= 64) | ((yy - 10) ** 2 + (xx - 26) ** 2 <= 64)
    d = instances.mask_distance(mask)
    markers, n = ndi.label(sk_peaks(d, 1.0) & mask, structure=CROSS)
    assert n == 2 and tied_markers(d, markers, mask, 4)
    check_flood(d, markers, mask, monkeypatch)
    swapped = np.where(markers > 0, 3 - markers, 0)
    for conn in (4, 8):
        a = M.flood_from_markers(d, markers, mask, connectivity=conn)
        b = M.flood_from_markers(d, swapped, mask, connectivity=conn)
        assert np.array_equal(np.where(a > 0, 3 - a, 0), b)  # labels permute with the markers


def test_flood_marker_ids_of_any_integer_value(monkeypatch) -> None:
    rng = np.random.default_rng(9)
    height = ndi.gaussian_filter(rng.random((30, 40)), 2.0)
    mask = rng.random((30, 40)) < 0.9
    small = np.where(rng.random((30, 40)) < 0.03, rng.integers(1, 5, (30, 40)), 0)
    for ids in (np.array([0, -7, 2**40, 2**31 + 5, 11]), np.array([0, 1, 2, 3, 4])):
        markers = ids[small]
        out = M.flood_from_markers(height, markers, mask)
        assert np.array_equal(out, ids.astype(np.int32)[M.flood_from_markers(height, small, mask)])
        check_flood(height, markers, mask, monkeypatch)


def test_flood_nan_heights_left_to_skimage() -> None:
    height = np.random.default_rng(8).random((12, 12))
    height[3, 4] = np.nan
    markers = np.zeros((12, 12), np.int32)
    markers[1, 1], markers[9, 9] = 1, 2
    mask = np.ones((12, 12), bool)
    for conn in (4, 8):
        assert np.array_equal(M.flood_from_markers(height, markers, mask, connectivity=conn),
                              sk_flood(height, markers, mask, conn))


def test_flood_other_dtypes(monkeypatch) -> None:
    rng = np.random.default_rng(6)
    height = rng.integers(0, 4, (20, 30)).astype(np.uint8)  # -height wraps in uint8, as before
    markers = (rng.random((20, 30)) < 0.05).astype(np.uint16) * 3
    mask = rng.random((20, 30)) < 0.8
    check_flood(height, markers, mask, monkeypatch)
    check_flood(height.astype(np.int16), markers.astype(bool), mask, monkeypatch)


# ------------------------------------------------------------------------------ instances


def old_seeded_watershed(p, seed_threshold=0.9, seed_erosion_px=2, mask_threshold=0.5, connectivity=4):
    s = ndi.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    seeds = ndi.binary_erosion(p > seed_threshold, iterations=seed_erosion_px) & (p > mask_threshold)
    markers, n = ndi.label(seeds, structure=s)
    labels = reference_flood(p, markers, p > mask_threshold, connectivity)
    un, _ = ndi.label((p > mask_threshold) & (labels == 0), structure=s)
    labels[un > 0] = un[un > 0] + n
    return labels


def old_distance_seeded_watershed(p, h_px, mask_threshold=0.5, connectivity=4):
    s = ndi.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    mask = p > mask_threshold
    d = ndi.gaussian_filter(ndi.distance_transform_edt(mask), 1.0)
    seeds = sk_peaks(d, float(h_px)) & (d >= h_px) & mask
    markers, n = ndi.label(seeds, structure=s)
    labels = reference_flood(d, markers, mask, connectivity)
    un, _ = ndi.label(mask & (labels == 0), structure=s)
    labels[un > 0] = un[un > 0] + n
    return labels


def probability_images(seed: int, n: int):
    rng = np.random.default_rng(seed)
    for k in range(n):
        shape = tuple(rng.integers(8, 90, 2))
        yy, xx = np.indices(shape)
        cells = np.zeros(shape, np.float32)
        for _ in range(int(rng.integers(1, 12))):
            cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(2, 14)
            cells = np.maximum(cells, ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.float32))
        p = ndi.gaussian_filter(cells, rng.uniform(0.5, 2.5)) + 0.1 * rng.random(shape).astype(np.float32)
        yield (np.round(np.clip(p, 0, 1) * 255) / 255).astype(np.float32)  # coded as k/255


def test_instances_equal_the_old_scipy_skimage_pipeline() -> None:
    for k, p in enumerate(probability_images(7, 40)):
        conn = 4 if k % 2 == 0 else 8
        for h in (0.8, 2.0):
            new = instances.distance_seeded_watershed(p, h_px=h, connectivity=conn)
            assert new.dtype == np.int32
            assert np.array_equal(new, old_distance_seeded_watershed(p, h, connectivity=conn)), (k, h)
        new = instances.seeded_watershed(p, connectivity=conn)
        assert np.array_equal(new, old_seeded_watershed(p, connectivity=conn)), k
        mask = p > 0.5
        d = instances.mask_distance(mask)
        assert np.array_equal(d, ndi.gaussian_filter(ndi.distance_transform_edt(mask), 1.0))
        assert np.array_equal(instances.distance_seed_mask(d, mask, h_px=1.5),
                              sk_peaks(d, 1.5) & (d >= 1.5) & mask)
