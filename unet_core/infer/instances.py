"""Cell instances from a 2D probability map of the cell class: seeded watershed.

Connected components of the thresholded cell interior merge two cells wherever the network
misses a stretch of the membrane between them. The usual remedy is a seeded watershed within
the cell mask (P(cell) > 0.5), with one of two seed rules (:class:`SeedRule`):

``threshold``
    Seeds are the confident cell cores (P(cell) above a high threshold, eroded so that a thin
    confident bridge does not join two cores); each seed floods the mask in order of decreasing
    P(cell). Two cells touching through a weak gap keep separate seeds and meet at the gap's
    lowest probability. Suits membrane EM, where the network marks the gap.
``distance``
    Seeds are the h-maxima of the distance transform of the mask (smoothed by a Gaussian of
    :data:`DISTANCE_SMOOTH_PX`), of depth ``h_px``, and each seed floods the mask in order of
    decreasing distance: one seed per convex blob whatever its size, and two touching blobs split
    where the neck between them is at least ``h_px`` narrower than their radii. ``h_px`` scales
    with the objects: :func:`auto_h_px` = 0.15 x the median object radius of the training
    labels (stored with the model). Suits dense nuclei, where a fixed threshold over-seeds large
    objects.

Mask components without a seed (small or faint objects) are kept as objects of their own.

The distance transform, the h-maxima and the flooding run as compiled kernels
(:mod:`unet_core.infer.morphology`, numba) that give exactly the results of the scipy /
scikit-image calls they replace, several times faster.

Volumes (Z, Y, X) with an anisotropic voxel size ``spacing_um = (dz, dy, dx)`` take the same
rules in 3-D (:func:`components_3d`, :func:`seeded_watershed_3d`,
:func:`distance_seeded_watershed_3d`): components, seeds and flooding with 6-connectivity (face
neighbours); the ``distance`` rule on the Euclidean distance in µm (:func:`mask_distance` with
``spacing_um``) with ``h_um`` in µm; the ``threshold`` rule's erosion in-plane as in 2-D and along
z by the same depth in µm (:func:`seed_mask`); objects below a size in µm³ dropped
(:func:`min_object_voxels`, :func:`drop_small_objects`). The h-maxima and the flooding are the
2-D kernels (a 2-D image is their volume of one slice); the anisotropic distance transform has a
kernel of its own (float µm, where the 2-D one is exact in integer px). A volume of one slice with
``spacing_um = (dz, 1, 1)`` gives the 2-D rules' labels (4-connected).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import numpy as np
from scipy import ndimage as ndi

from unet_core.common.labels import connectivity_structure


class InstanceMethod(str, Enum):
    """How ``unet merge`` turns probabilities into cells."""

    WATERSHED = "watershed"  # seeded watershed of P(cell) (this module)
    COMPONENTS = "components"  # 4-connected components of the argmax cell class


class SeedRule(str, Enum):
    """Where the watershed's seeds come from (see the module docstring)."""

    THRESHOLD = "threshold"  # P > seed_threshold, eroded by seed_erosion_px
    DISTANCE = "distance"  # h-maxima of the smoothed distance transform of the mask


#: ``auto`` for the settings derived from the model's median training object area.
AUTO = "auto"
#: Smallest kept object under ``min_object_px: auto``, as a fraction of the median object area.
MIN_OBJECT_FRACTION = 0.05
#: Depth of the distance seeds under ``h_px: auto``, as a fraction of the median object radius.
H_FRACTION = 0.15
#: Gaussian smoothing of the distance transform before its h-maxima, px (flattens pixel steps).
DISTANCE_SMOOTH_PX = 1.0
#: Default seed threshold on P(cell), seed erosion (px) and mask threshold.
SEED_THRESHOLD = 0.9
SEED_EROSION_PX = 2
MASK_THRESHOLD = 0.5
#: Context around each block when the watershed runs block by block (``unet merge``), px:
#: the result equals the whole slice's where cells are smaller than this.
WATERSHED_HALO_PX = 128
#: Adjacency of components, seeds and flooding in a (Z, Y, X) volume: face neighbours.
VOLUME_CONNECTIVITY = 6


def adjacency_structure(ndim: int, connectivity: int) -> np.ndarray:
    """scipy.ndimage structuring element of 4- or 8-connectivity in 2-D
    (:func:`~unet_core.common.labels.connectivity_structure`) or 6-connectivity in 3-D.

    Raises:
        ValueError: another connectivity for that number of dimensions, or another dimension.
    """
    if ndim == 2:
        return connectivity_structure(connectivity)
    if ndim == 3 and connectivity == VOLUME_CONNECTIVITY:
        return ndi.generate_binary_structure(3, 1)
    raise ValueError(f"connectivity must be 4 or 8 for (Y, X), 6 for (Z, Y, X), got {connectivity} for {ndim}-D")


def check_spacing(spacing_um: Sequence[float], ndim: int) -> tuple[float, ...]:
    """``spacing_um`` as ``ndim`` floats, µm per voxel along (Z, Y, X) (or (Y, X)).

    Raises:
        ValueError: another length, or a value that is not finite and > 0.
    """
    spacing = tuple(float(s) for s in spacing_um)
    if len(spacing) != ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_um must be {ndim} finite values > 0 (µm per voxel, axes (Z, Y, X)), got {spacing_um}")
    return spacing


def seeded_watershed(
    cell_probability: np.ndarray,
    *,
    seed_threshold: float = SEED_THRESHOLD,
    seed_erosion_px: int = SEED_EROSION_PX,
    mask_threshold: float = MASK_THRESHOLD,
    connectivity: int = 4,
) -> np.ndarray:
    """Instance labels (int32, 0 = background) of one slice by a seeded watershed.

    Args:
        cell_probability: (Y, X) P(cell interior) in [0, 1].
        seed_threshold: seeds are connected components of P > ``seed_threshold``...
        seed_erosion_px: ...after this many binary erosions (4-neighbourhood), px.
        mask_threshold: pixels with P > ``mask_threshold`` are cell; the rest is background.
        connectivity: 4 or 8, adjacency of the seeds and of the flooding.

    Returns:
        (Y, X) int32 labels 1..n; every mask pixel reachable from a seed inside the mask gets
        that seed's label; mask components without a seed keep their own new label.
    """
    p = np.asarray(cell_probability, dtype=np.float32)
    if p.ndim != 2:
        raise ValueError(f"cell_probability must be 2D, got shape {p.shape}")
    structure = connectivity_structure(connectivity)
    markers, n = ndi.label(
        seed_mask(p, seed_threshold=seed_threshold, seed_erosion_px=seed_erosion_px, mask_threshold=mask_threshold),
        structure=structure,
    )
    labels = flood(p, markers, mask_threshold=mask_threshold, connectivity=connectivity)
    # mask components that hold no seed (small or faint cells) are kept as objects of their own
    label_unflooded(labels, p > mask_threshold, first_id=n + 1, connectivity=connectivity)
    return labels


def seed_mask(
    cell_probability: np.ndarray,
    *,
    seed_threshold: float = SEED_THRESHOLD,
    seed_erosion_px: int = SEED_EROSION_PX,
    mask_threshold: float = MASK_THRESHOLD,
    spacing_um: Sequence[float] | None = None,
) -> np.ndarray:
    """Bool seed pixels: P > ``seed_threshold``, eroded ``seed_erosion_px`` times, inside the mask.

    The erosion treats pixels outside the array as non-seed, so a window of a larger image
    gives the whole image's seeds everywhere at least ``seed_erosion_px`` from its cut edges.

    A (Z, Y, X) volume (``spacing_um`` = (dz, dy, dx) µm required) is eroded in each slice as an
    image, then along z by ``floor(seed_erosion_px * min(dy, dx) / dz)`` slices, the same depth in
    µm (0 slices while dz exceeds it: 2 px of 1 µm against dz = 4 µm); along z the first and last
    slices count as continued, not as non-seed, so that a volume thinner than the erosion keeps
    its seeds and a volume of one slice has the image's seeds.
    """
    p = np.asarray(cell_probability, dtype=np.float32)
    seeds = p > seed_threshold
    if p.ndim == 3:
        dz, dy, dx = check_spacing(_required(spacing_um), 3)
        if seed_erosion_px > 0:
            in_plane = connectivity_structure(4)[None]
            seeds = ndi.binary_erosion(seeds, structure=in_plane, iterations=int(seed_erosion_px))
        z_steps = int(np.floor(seed_erosion_px * min(dy, dx) / dz + 1e-9))
        if z_steps > 0:
            seeds = ndi.minimum_filter1d(seeds.view(np.uint8), 2 * z_steps + 1, axis=0, mode="nearest").view(bool)
    elif seed_erosion_px > 0:
        seeds = ndi.binary_erosion(seeds, iterations=int(seed_erosion_px))
    return seeds & (p > mask_threshold)


def _required(spacing_um: Sequence[float] | None) -> Sequence[float]:
    if spacing_um is None:
        raise ValueError("a (Z, Y, X) volume needs spacing_um = (dz, dy, dx), µm per voxel")
    return spacing_um


def flood(
    cell_probability: np.ndarray,
    markers: np.ndarray,
    *,
    mask_threshold: float = MASK_THRESHOLD,
    connectivity: int = 4,
) -> np.ndarray:
    """Flood the mask P > ``mask_threshold`` from ``markers`` in order of decreasing P.

    Args:
        cell_probability: (Y, X) P(cell).
        markers: (Y, X) integer seed ids, 0 = no seed.

    Returns:
        (Y, X) int32 labels: each mask pixel connected to a marker gets its id; 0 elsewhere.
    """
    p = np.asarray(cell_probability, dtype=np.float32)
    return flood_height(p, markers, mask=p > mask_threshold, connectivity=connectivity)


def flood_height(height: np.ndarray, markers: np.ndarray, *, mask: np.ndarray, connectivity: int = 4) -> np.ndarray:
    """Flood ``mask`` from ``markers`` in order of decreasing ``height`` (P(cell) or a distance).

    Args:
        height, markers, mask: (Y, X) or (Z, Y, X) arrays of one shape.
        connectivity: 4 or 8 for (Y, X); 6 (:data:`VOLUME_CONNECTIVITY`) for (Z, Y, X).

    Returns:
        int32 labels: each mask pixel connected to a marker gets its id; 0 elsewhere.
    """
    height, markers = np.asarray(height), np.asarray(markers)
    adjacency_structure(height.ndim, connectivity)
    if height.ndim in (2, 3) and height.dtype.kind in "biuf" and markers.dtype.kind in "biu":
        # compiled; skimage 0.26's watershed(-height, ...) with tied markers in raster order (morphology.py)
        from unet_core.infer.morphology import flood_from_markers

        return flood_from_markers(height, markers, mask, connectivity=connectivity)
    from skimage.segmentation import watershed

    labels = watershed(-height, markers, mask=mask, connectivity=1 if connectivity in (4, 6) else 2)
    return labels.astype(np.int32, copy=False)


def label_unflooded(labels: np.ndarray, mask: np.ndarray, *, first_id: int, connectivity: int = 4) -> int:
    """Give each connected component of the ``mask`` pixels a flood left at 0 its own id, in place.

    Args:
        labels: (Y, X) or (Z, Y, X) integer labels of a flood (0 = not reached); changed in place.
        mask: bool pixels that belong to some object, of the same shape.
        first_id: id of the first such component (raster order); the next ones follow it.
        connectivity: 4 or 8 for (Y, X), 6 for (Z, Y, X): adjacency of the components.

    Returns:
        How many components were labelled.
    """
    structure = adjacency_structure(np.ndim(labels), connectivity)
    unflooded, n = ndi.label(mask & (labels == 0), structure=structure)
    labels[unflooded > 0] = unflooded[unflooded > 0] + (first_id - 1)
    return int(n)


def median_radius_px(median_area_px: float) -> float:
    """Radius, px, of a disc of the median object area."""
    return float(np.sqrt(max(float(median_area_px), 0.0) / np.pi))


def auto_min_object_px(median_area_px: float) -> int:
    """``min_object_px: auto``: :data:`MIN_OBJECT_FRACTION` of the median object area, px (rounded)."""
    return int(round(MIN_OBJECT_FRACTION * float(median_area_px)))


def auto_h_px(median_area_px: float) -> float:
    """``h_px: auto``: :data:`H_FRACTION` of the median object radius, px."""
    return H_FRACTION * median_radius_px(median_area_px)


def mask_distance(mask: np.ndarray, *, spacing_um: Sequence[float] | None = None) -> np.ndarray:
    """float64 Euclidean distance of each mask pixel to the nearest non-mask pixel (pixels
    outside the array do not count), smoothed by a Gaussian (0 beyond 4 sigma from the mask).

    Args:
        mask: (Y, X) or (Z, Y, X) bool.
        spacing_um: None: distances in px (unit spacing), smoothed by :data:`DISTANCE_SMOOTH_PX`
            px. Else µm per voxel along each axis (e.g. (dz, dy, dx)): distances in µm, the
            anisotropic Euclidean distance, smoothed by a Gaussian of the same width in µm
            along every axis, :data:`DISTANCE_SMOOTH_PX` finest in-plane pixels (so 1/4 voxel
            along z where dz = 4 dy); not along an axis of one voxel, so a volume of one slice
            with spacing (dz, 1, 1) gives the image's distance exactly.
    """
    mask = np.asarray(mask)
    if spacing_um is None:
        from unet_core.infer.morphology import distance_transform_edt

        # compiled EDT, identical to scipy.ndimage.distance_transform_edt (morphology.py)
        edt = distance_transform_edt(mask) if mask.ndim == 2 else ndi.distance_transform_edt(mask)
        return ndi.gaussian_filter(edt, DISTANCE_SMOOTH_PX)
    from unet_core.infer.morphology import distance_transform_edt_um

    spacing = check_spacing(spacing_um, mask.ndim)
    # compiled for volumes, scipy's distance_transform_edt(mask, sampling) to within rounding
    edt = distance_transform_edt_um(mask, spacing) if mask.ndim == 3 else ndi.distance_transform_edt(mask, sampling=spacing)
    sigma_um = DISTANCE_SMOOTH_PX * min(spacing[-2:])
    sigma = [sigma_um / s if n > 1 else 0.0 for s, n in zip(spacing, mask.shape)]
    return ndi.gaussian_filter(edt, sigma)


def distance_seed_mask(distance: np.ndarray, mask: np.ndarray, *, h_px: float) -> np.ndarray:
    """Bool seeds: mask pixels of the h-maxima (depth ``h_px`` > 0, 4-connected in (Y, X),
    6-connected in (Z, Y, X)) of ``distance`` (:func:`mask_distance`) that are at least ``h_px``
    deep. ``h_px`` is in the distance's units: px, or µm for a distance in µm.

    The depth condition changes nothing where any object of the slice is deeper than ``h_px``
    (an h-maximum lower than ``h_px`` then does not exist) and makes the rule local: a window of
    a slice gives the whole slice's seeds on every object it holds with a margin.
    """
    if not h_px > 0:
        raise ValueError(f"h_px must be > 0, got {h_px}")
    distance = np.asarray(distance)
    if distance.ndim in (2, 3) and distance.dtype in (np.float32, np.float64):
        # compiled, identical to skimage.morphology.h_maxima with the cross (morphology.py)
        from unet_core.infer.morphology import h_maxima

        peaks = h_maxima(distance, float(h_px))
    else:
        from skimage.morphology import h_maxima

        cross = adjacency_structure(distance.ndim, 4 if distance.ndim == 2 else VOLUME_CONNECTIVITY)
        peaks = h_maxima(distance, float(h_px), footprint=cross) > 0
    return peaks & (distance >= h_px) & mask


def distance_seeded_watershed(
    cell_probability: np.ndarray, *, h_px: float, mask_threshold: float = MASK_THRESHOLD, connectivity: int = 4,
) -> np.ndarray:
    """Instance labels (int32, 0 = background) of one slice by the ``distance`` seed rule: seeds
    from :func:`distance_seed_mask`, flooding the mask in order of decreasing distance.

    Args:
        cell_probability: (Y, X) P(cell interior) in [0, 1].
        h_px: depth of the distance maxima that seed, px (e.g. :func:`auto_h_px`).
        mask_threshold: pixels with P > ``mask_threshold`` are cell.
        connectivity: 4 or 8, adjacency of the seeds and of the flooding.
    """
    p = np.asarray(cell_probability, dtype=np.float32)
    if p.ndim != 2:
        raise ValueError(f"cell_probability must be 2D, got shape {p.shape}")
    structure = connectivity_structure(connectivity)
    mask = p > mask_threshold
    distance = mask_distance(mask)
    markers, n = ndi.label(distance_seed_mask(distance, mask, h_px=h_px), structure=structure)
    labels = flood_height(distance, markers, mask=mask, connectivity=connectivity)
    label_unflooded(labels, mask, first_id=n + 1, connectivity=connectivity)
    return labels


# -- volumes (Z, Y, X) ------------------------------------------------------------------------------
def components_3d(foreground: np.ndarray) -> np.ndarray:
    """(Z, Y, X) int32 cells as the 6-connected components of a bool ``foreground`` (e.g. the
    argmax cell class of a volume), numbered 1..n in raster order of their first voxel; 0 =
    background. Face neighbours only, as the 4-neighbourhood in 2-D: two cells touching along an
    edge or a corner stay apart."""
    fg = np.asarray(foreground, dtype=bool)
    if fg.ndim != 3:
        raise ValueError(f"foreground must be 3-D (Z, Y, X), got shape {fg.shape}")
    labels, _ = ndi.label(fg, structure=adjacency_structure(3, VOLUME_CONNECTIVITY))
    return labels.astype(np.int32, copy=False)


def seeded_watershed_3d(
    cell_probability: np.ndarray,
    *,
    spacing_um: Sequence[float],
    seed_threshold: float = SEED_THRESHOLD,
    seed_erosion_px: int = SEED_EROSION_PX,
    mask_threshold: float = MASK_THRESHOLD,
) -> np.ndarray:
    """Instance labels (int32, 0 = background) of a volume by the ``threshold`` seed rule in 3-D.

    Seeds: 6-connected components of :func:`seed_mask` (P > ``seed_threshold``, eroded
    ``seed_erosion_px`` in-plane pixels in each slice and the same depth in µm along z), flooding
    the mask in order of decreasing P with 6-connectivity; mask components without a seed are
    objects of their own (after the seeds' ids).

    Args:
        cell_probability: (Z, Y, X) P(cell interior) in [0, 1].
        spacing_um: (dz, dy, dx) µm per voxel.
        seed_threshold, seed_erosion_px, mask_threshold: as :func:`seeded_watershed`.
    """
    p = _volume(cell_probability)
    structure = adjacency_structure(3, VOLUME_CONNECTIVITY)
    seeds = seed_mask(p, seed_threshold=seed_threshold, seed_erosion_px=seed_erosion_px,
                      mask_threshold=mask_threshold, spacing_um=spacing_um)
    markers, n = ndi.label(seeds, structure=structure)
    mask = p > mask_threshold
    labels = flood_height(p, markers, mask=mask, connectivity=VOLUME_CONNECTIVITY)
    label_unflooded(labels, mask, first_id=n + 1, connectivity=VOLUME_CONNECTIVITY)
    return labels


def distance_seeded_watershed_3d(
    cell_probability: np.ndarray,
    *,
    spacing_um: Sequence[float],
    h_um: float,
    mask_threshold: float = MASK_THRESHOLD,
) -> np.ndarray:
    """Instance labels (int32, 0 = background) of a volume by the ``distance`` seed rule in 3-D.

    The mask P > ``mask_threshold``; its anisotropic Euclidean distance in µm, smoothed
    (:func:`mask_distance` with ``spacing_um``); seeds its h-maxima of depth ``h_um`` at least
    ``h_um`` deep, 6-connected (:func:`distance_seed_mask`); each floods the mask in order of
    decreasing distance, 6-connected. Two touching blobs split where the neck between them is at
    least ``h_um`` narrower than their radii, measured in µm whatever the axis, so a z spacing 4x
    the in-plane one neither splits cells along z nor merges them in-plane.

    Args:
        cell_probability: (Z, Y, X) P(cell interior) in [0, 1].
        spacing_um: (dz, dy, dx) µm per voxel.
        h_um: depth of the distance maxima that seed, µm (> 0; e.g. 0.15 x the median radius).
        mask_threshold: voxels with P > ``mask_threshold`` are cell.
    """
    p = _volume(cell_probability)
    mask = p > mask_threshold
    distance = mask_distance(mask, spacing_um=check_spacing(spacing_um, 3))
    seeds = distance_seed_mask(distance, mask, h_px=h_um)
    markers, n = ndi.label(seeds, structure=adjacency_structure(3, VOLUME_CONNECTIVITY))
    labels = flood_height(distance, markers, mask=mask, connectivity=VOLUME_CONNECTIVITY)
    label_unflooded(labels, mask, first_id=n + 1, connectivity=VOLUME_CONNECTIVITY)
    return labels


def _volume(cell_probability: np.ndarray) -> np.ndarray:
    p = np.asarray(cell_probability, dtype=np.float32)
    if p.ndim != 3:
        raise ValueError(f"cell_probability must be 3-D (Z, Y, X), got shape {p.shape}")
    return p


def min_object_voxels(min_object_um3: float, spacing_um: Sequence[float]) -> int:
    """The fewest voxels of an object of at least ``min_object_um3`` µm³ at voxel size
    ``spacing_um`` (dz, dy, dx) µm: ceil(volume / voxel volume), 0 for 0."""
    if not (np.isfinite(min_object_um3) and min_object_um3 >= 0):
        raise ValueError(f"min_object_um3 must be finite and >= 0, got {min_object_um3}")
    voxel_um3 = float(np.prod(check_spacing(spacing_um, 3)))
    return int(np.ceil(min_object_um3 / voxel_um3 - 1e-9))


def auto_h_um(median_volume_um3: float) -> float:
    """``h: auto`` of a volume: :data:`H_FRACTION` of the radius, µm, of a ball of the median
    object volume (µm³), as :func:`auto_h_px` takes it of a disc of the median area."""
    return H_FRACTION * float(np.cbrt(3.0 * max(float(median_volume_um3), 0.0) / (4.0 * np.pi)))


def auto_min_object_um3(median_volume_um3: float) -> float:
    """``min_object: auto`` of a volume: :data:`MIN_OBJECT_FRACTION` of the median object volume, µm³."""
    return MIN_OBJECT_FRACTION * float(median_volume_um3)


def drop_small_objects(labels: np.ndarray, *, min_voxels: int) -> np.ndarray:
    """int32 labels with objects of fewer than ``min_voxels`` voxels (pixels) sent to
    background and the others renumbered 1..K in the order of their ids (``min_voxels`` <= 0:
    the labels unchanged, as int32). The rule of the merge's ``min_object_px``
    (:func:`~unet_core.infer.block_labels.drop_small`), for a whole array of any dimension.

    Args:
        labels: integer labels >= 0, 0 = background, e.g. (Z, Y, X).
        min_voxels: smallest kept object, voxels (see :func:`min_object_voxels` for µm³).
    """
    from unet_core.infer.block_labels import drop_small

    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
        raise ValueError(f"labels must be integers >= 0, got dtype {labels.dtype}")
    if min_voxels <= 0:
        return labels.astype(np.int32, copy=False)
    sizes = np.bincount(labels.ravel().astype(np.intp, copy=False))
    table = drop_small(np.arange(sizes.size, dtype=np.int64), sizes, min_px=int(min_voxels))
    return table.astype(np.int32)[labels]
