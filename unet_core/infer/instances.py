"""Cell instances from a 2D probability map of the cell class: seeded watershed.

Connected components of the thresholded cell interior merge two cells wherever the network
misses a stretch of the membrane between them. The usual remedy for membrane EM is a seeded
watershed: seeds are the confident cell cores (P(cell) above a high threshold, eroded so that
a thin confident bridge does not join two cores), and each seed floods the image in order of
decreasing P(cell) but only within the cell mask (P(cell) > 0.5). Two cells touching through
a weak gap then keep separate seeds and meet at the gap's lowest probability.
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
    orphans, n_orphans = ndi.label((p > mask_threshold) & (labels == 0), structure=structure)
    labels[orphans > 0] = orphans[orphans > 0] + n
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
    from skimage.segmentation import watershed

    connectivity_structure(connectivity)
    p = np.asarray(cell_probability, dtype=np.float32)
    labels = watershed(-p, markers, mask=p > mask_threshold, connectivity=1 if connectivity == 4 else 2)
    return labels.astype(np.int32, copy=False)
