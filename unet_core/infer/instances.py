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
"""

from __future__ import annotations

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
) -> np.ndarray:
    """(Y, X) bool seed pixels: P > ``seed_threshold``, eroded ``seed_erosion_px`` times, inside the mask.

    The erosion treats pixels outside the array as non-seed, so a window of a larger image
    gives the whole image's seeds everywhere at least ``seed_erosion_px`` from its cut edges.
    """
    p = np.asarray(cell_probability, dtype=np.float32)
    seeds = p > seed_threshold
    if seed_erosion_px > 0:
        seeds = ndi.binary_erosion(seeds, iterations=int(seed_erosion_px))
    return seeds & (p > mask_threshold)


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

    Returns:
        (Y, X) int32 labels: each mask pixel connected to a marker gets its id; 0 elsewhere.
    """
    connectivity_structure(connectivity)
    height, markers = np.asarray(height), np.asarray(markers)
    if height.ndim == 2 and height.dtype.kind in "biuf" and markers.dtype.kind in "biu":
        # compiled; skimage 0.26's watershed(-height, ...) with tied markers in raster order (morphology.py)
        from unet_core.infer.morphology import flood_from_markers

        return flood_from_markers(height, markers, mask, connectivity=connectivity)
    from skimage.segmentation import watershed

    labels = watershed(-height, markers, mask=mask, connectivity=1 if connectivity == 4 else 2)
    return labels.astype(np.int32, copy=False)


def label_unflooded(labels: np.ndarray, mask: np.ndarray, *, first_id: int, connectivity: int = 4) -> int:
    """Give each connected component of the ``mask`` pixels a flood left at 0 its own id, in place.

    Args:
        labels: (Y, X) integer labels of a flood (0 = not reached); changed in place.
        mask: (Y, X) bool pixels that belong to some object.
        first_id: id of the first such component (raster order); the next ones follow it.
        connectivity: 4 or 8, adjacency of the components.

    Returns:
        How many components were labelled.
    """
    unflooded, n = ndi.label(mask & (labels == 0), structure=connectivity_structure(connectivity))
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


def mask_distance(mask: np.ndarray) -> np.ndarray:
    """(Y, X) float64 Euclidean distance of each mask pixel to the nearest non-mask pixel, smoothed
    by a Gaussian of :data:`DISTANCE_SMOOTH_PX` (0 beyond 4 sigma from the mask)."""
    from unet_core.infer.morphology import distance_transform_edt

    mask = np.asarray(mask)
    # compiled EDT, identical to scipy.ndimage.distance_transform_edt (morphology.py)
    edt = distance_transform_edt(mask) if mask.ndim == 2 else ndi.distance_transform_edt(mask)
    return ndi.gaussian_filter(edt, DISTANCE_SMOOTH_PX)


def distance_seed_mask(distance: np.ndarray, mask: np.ndarray, *, h_px: float) -> np.ndarray:
    """(Y, X) bool seeds: mask pixels of the h-maxima (depth ``h_px`` > 0, 4-connected) of
    ``distance`` (:func:`mask_distance`) that are at least ``h_px`` deep.

    The depth condition changes nothing where any object of the slice is deeper than ``h_px``
    (an h-maximum lower than ``h_px`` then does not exist) and makes the rule local: a window of
    a slice gives the whole slice's seeds on every object it holds with a margin.
    """
    if not h_px > 0:
        raise ValueError(f"h_px must be > 0, got {h_px}")
    distance = np.asarray(distance)
    if distance.ndim == 2 and distance.dtype in (np.float32, np.float64):
        # compiled, identical to skimage.morphology.h_maxima with the 4-cross (morphology.py)
        from unet_core.infer.morphology import h_maxima

        peaks = h_maxima(distance, float(h_px))
    else:
        from skimage.morphology import h_maxima

        peaks = h_maxima(distance, float(h_px), footprint=connectivity_structure(4)) > 0
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
