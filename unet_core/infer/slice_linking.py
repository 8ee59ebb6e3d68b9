"""Per-slice 2-D cell ids linked into 3-D ids by their overlap between consecutive slices.

The 2-D mode labels each slice of a stack on its own, so a cell spanning slices gets a new id in
every slice. For a comparison with cells segmented in 3-D, :func:`link_slices` joins them, slice
by slice from the top:

* an object of slice z and an object of slice z - 1 are *linked* when each is the other's best
  partner by IoU (|A ∩ B| / |A ∪ B|, pixels of the two 2-D footprints) and their IoU exceeds
  ``min_iou``; the object of slice z then continues the 3-D object of its partner;
* every other object of slice z starts a new 3-D object.

IoU, not the overlap fraction |A ∩ B| / min(|A|, |B|): a fraction joins a small object to a large
one that covers it (two cells under one) and is not symmetric in what it forgives. Mutual best
partners make the links one-to-one at any threshold: a cell split in two in slice z continues in
the larger half only, and two cells in z - 1 merged in slice z continue one of them. Ties in IoU
go to the object whose first pixel comes first in raster order, so the result depends on the
footprints alone, not on the input ids. The output ids are 1..n in raster order of each 3-D
object's first voxel (z, then y, then x).

Cellpose's ``stitch3D(masks, stitch_threshold=0.25)`` is the same idea with the same default:
there each object of the previous slice keeps only its best partner, then each object of slice z
takes its best remaining one (IoU >= the threshold), which can link an object to its second
choice; here both must be each other's first choice.

Where the rule fails (by construction; a 3-D segmentation does not):

* **stacked cells:** a cell that ends in slice z - 1 directly above another that starts in
  slice z, with similar footprints, becomes one 3-D object (nothing in two footprints tells a
  boundary along z);
* **fast-moving sections:** a cell whose footprint shifts or shrinks by more than the threshold
  allows between consecutive slices (an oblique, thin cell; the pole of a round cell where the z
  spacing is coarse: concentric discs of radii r < R have IoU r²/R², so ``min_iou`` = 0.25 cuts a
  cell where its section's radius halves from one slice to the next) is cut into two 3-D objects;
* **gaps:** a slice where the cell is missed ends it (only consecutive slices are compared).
"""

from __future__ import annotations

import numpy as np

#: Default IoU above which two footprints in consecutive slices are one cell (concentric discs:
#: radius ratio above 1/2); Cellpose's ``stitch3D`` default.
LINK_MIN_IOU = 0.25


def link_slices(labels: np.ndarray, *, min_iou: float = LINK_MIN_IOU) -> np.ndarray:
    """3-D ids of per-slice 2-D objects, by mutual best IoU between consecutive slices.

    Args:
        labels: (Z, Y, X) integer ids >= 0 numbered per slice (0 = background; equal ids in
            different slices mean nothing; within a slice, one id is one object, connected or not).
        min_iou: a link needs IoU > ``min_iou`` (in [0, 1)).

    Returns:
        (Z, Y, X) int32 3-D ids 1..n (raster order of each object's first voxel), 0 = background.

    Raises:
        ValueError: ``labels`` is not 3-D integer >= 0, or ``min_iou`` is outside [0, 1).
    """
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
        raise ValueError(f"labels must be (Z, Y, X) integers >= 0, got shape {labels.shape}, dtype {labels.dtype}")
    if not 0 <= min_iou < 1:
        raise ValueError(f"min_iou must be in [0, 1), got {min_iou}")
    out = np.zeros(labels.shape, np.int32)
    previous, prev_ids, next_id = np.zeros(labels.shape[1:], np.intp), np.zeros(1, np.int64), 1
    for z in range(labels.shape[0]):
        local, n = raster_numbered(labels[z])
        partner = best_partners(local, n, previous, prev_ids.size - 1, min_iou=min_iou)
        ids = np.zeros(n + 1, np.int64)
        linked = partner > 0
        ids[1:][linked] = prev_ids[partner[linked]]
        fresh = np.count_nonzero(~linked)
        ids[1:][~linked] = np.arange(next_id, next_id + fresh)
        next_id += fresh
        out[z] = ids[local]
        previous, prev_ids = local, ids
    return out


def raster_numbered(plane: np.ndarray) -> tuple[np.ndarray, int]:
    """(Y, X) ids of ``plane`` renumbered 1..n in raster order of each object's first pixel
    (0 stays 0), as intp, and n: a numbering that depends on the footprints alone."""
    values, first, inverse = np.unique(plane.ravel(), return_index=True, return_inverse=True)
    objects = values != 0
    table = np.zeros(values.size, np.intp)
    table[np.flatnonzero(objects)[np.argsort(first[objects], kind="stable")]] = np.arange(1, objects.sum() + 1)
    local = table[inverse.reshape(plane.shape)]
    return local, int(objects.sum())


def best_partners(current: np.ndarray, n_current: int, previous: np.ndarray, n_previous: int, *,
                  min_iou: float) -> np.ndarray:
    """For each object 1..n_current of ``current``, its linked object of ``previous`` (0: none).

    Both (Y, X) are numbered 1..n in raster order (:func:`raster_numbered`). A pair is linked when
    its IoU exceeds ``min_iou`` and each is the other's best (highest IoU; ties to the lower
    number). Returns (n_current,) intp.
    """
    partner = np.zeros(n_current, np.intp)
    both = (current > 0) & (previous > 0)
    if not both.any():
        return partner
    size_c = np.bincount(current.ravel(), minlength=n_current + 1)
    size_p = np.bincount(previous.ravel(), minlength=n_previous + 1)
    pairs, inter = np.unique(current[both] * (n_previous + 1) + previous[both], return_counts=True)
    c, p = pairs // (n_previous + 1), pairs % (n_previous + 1)
    iou = inter / (size_c[c] + size_p[p] - inter)
    ok = iou > min_iou
    c, p, iou = c[ok], p[ok], iou[ok]
    best_of_c = _best(c, p, iou, n_current)
    best_of_p = _best(p, c, iou, n_previous)
    mutual = (best_of_c[c] == p) & (best_of_p[p] == c)
    partner[c[mutual] - 1] = p[mutual]
    return partner


def _best(owner: np.ndarray, other: np.ndarray, iou: np.ndarray, n_owner: int) -> np.ndarray:
    """(n_owner + 1,) the ``other`` of highest ``iou`` for each ``owner`` (ties: the lowest
    ``other``; 0 for owners without a pair)."""
    best = np.zeros(n_owner + 1, np.intp)
    order = np.lexsort((other, -iou, owner))  # by owner, then IoU descending, then other ascending
    first = np.ones(order.size, bool)
    first[1:] = owner[order][1:] != owner[order][:-1]
    best[owner[order][first]] = other[order][first]
    return best
