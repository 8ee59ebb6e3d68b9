"""Label images: what their integers mean, and pixel adjacency.

Ingest decides a stack's :class:`LabelKind` and stores it; the weights, training targets
and evaluation read it. Connected components everywhere use :func:`connectivity_structure`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from enum import Enum

import numpy as np


class LabelKind(str, Enum):
    """What the integers of a label stack mean (decided at ingest, stored with the stack)."""

    INSTANCE = "instance"  # 0 = background, every other value one cell
    BINARY = "binary"  # two values: the larger is cell interior, the other background/membrane


#: Ingest's ``--label-kind`` default: decide from the values (two values -> binary, else instance).
AUTO_KIND = "auto"


def binary_foreground(values: Iterable[int]) -> int:
    """The value meaning cell interior in binary labels with these (at most two) values: the larger
    one; 1 where the only value is 0 (no cell anywhere). The one rule: ingest records it
    (``foreground_value``), and the weights and the evaluation read the record.

    Raises:
        ValueError: more than two values (not binary labels).
    """
    seen = sorted({int(v) for v in values})
    if len(seen) > 2:
        raise ValueError(f"binary labels hold more than two values ({seen[:5]} ...)")
    top = seen[-1] if seen else 0
    return top if top > 0 else 1


def connectivity_structure(connectivity: int) -> np.ndarray:
    """scipy.ndimage structuring element of 4- or 8-connectivity in 2-D.

    Raises:
        ValueError: ``connectivity`` is neither 4 nor 8.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    # imported here: every 'unet' command imports this module (its CLI parser names LabelKind), and
    # scipy.ndimage takes 0.15-0.3 CPU-s to import, a third of 'unet predict''s start-up
    from scipy import ndimage as ndi

    return ndi.generate_binary_structure(2, 1 if connectivity == 4 else 2)


def object_areas(instances: np.ndarray) -> np.ndarray:
    """Pixel counts (int64, ascending id order) of the objects of an instance array, 0 = background.

    Ids that do not occur are left out, so any numbering works (ids unique per slice or per stack).
    """
    counts = np.bincount(np.asarray(instances).ravel().astype(np.int64, copy=False))
    counts = counts[1:]
    return counts[counts > 0]


def area_histogram(areas: np.ndarray) -> dict[str, list[int]]:
    """Object areas as ``{"area_px": distinct areas, ascending, "objects": how many objects have each}``:
    a compact, exactly mergeable record of a labelled set's object sizes (stored in attributes)."""
    values, counts = np.unique(np.asarray(areas, dtype=np.int64), return_counts=True)
    return {"area_px": values.tolist(), "objects": counts.tolist()}


def median_area(histograms: list[dict[str, list[int]]]) -> float | None:
    """Median object area, px, of the objects of several :func:`area_histogram` records together
    (numpy's median: the mean of the two middle areas for an even count); None for no objects."""
    values = np.concatenate([np.asarray(h["area_px"], np.int64) for h in histograms] or [np.zeros(0, np.int64)])
    counts = np.concatenate([np.asarray(h["objects"], np.int64) for h in histograms] or [np.zeros(0, np.int64)])
    n = int(counts.sum())
    if n == 0:
        return None
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(counts[order])
    lo = values[order][np.searchsorted(cum, (n - 1) // 2, side="right")]
    hi = values[order][np.searchsorted(cum, n // 2, side="right")]
    return (float(lo) + float(hi)) / 2.0


def split_label_id(planes: Iterator[np.ndarray]) -> tuple[int, list[list[int]]] | None:
    """The smallest label id whose voxels form more than one 6-connected piece, and its pieces' slices.

    In 3-D an id is one object; labels made slice by slice (every slice numbered 1..n) reuse an
    id for different cells, which then lie apart in the volume. Streams the volume a slice at a
    time: pieces of equal id in each slice (4-connected in the plane), joined where the same id
    covers the same pixel in the slice before (the z faces), so memory is two slices and a
    graph of pieces.

    Args:
        planes: the (Y, X) integer instance slices in z order (0 = background).

    Returns:
        None where every id is one piece; else ``(id, slices)`` with the sorted slice indices
        of each piece (pieces in order of their first slice).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from skimage.measure import label as same_value_pieces

    ids, zs, edges = [], [], []
    previous, previous_pieces, count = None, None, 0
    for z, plane in enumerate(planes):
        pieces = same_value_pieces(plane, background=0, connectivity=1).astype(np.int64)
        n = int(pieces.max())
        value = np.zeros(n + 1, dtype=np.int64)
        value[pieces.ravel()] = plane.ravel()
        ids.append(value[1:])
        zs.append(np.full(n, z, dtype=np.int64))
        pieces[pieces > 0] += count
        if previous is not None:
            joined = (plane == previous) & (plane != 0)
            edges.append(np.unique(np.stack([previous_pieces[joined], pieces[joined]]), axis=1) - 1)
        previous, previous_pieces, count = plane, pieces, count + n
    if count == 0:
        return None
    pairs = np.concatenate(edges, axis=1) if edges else np.zeros((2, 0), dtype=np.int64)
    graph = coo_matrix((np.ones(pairs.shape[1]), (pairs[0], pairs[1])), shape=(count, count))
    _, component = connected_components(graph, directed=False)
    piece_id, piece_z = np.concatenate(ids), np.concatenate(zs)
    distinct = np.unique(np.stack([piece_id, component]), axis=1)
    ids_, per_id = np.unique(distinct[0], return_counts=True)
    if not np.any(per_id > 1):
        return None
    first = int(ids_[per_id > 1][0])
    mine = piece_id == first
    slices = [sorted({int(z) for z in piece_z[mine & (component == c)]}) for c in np.unique(component[mine])]
    return first, sorted(slices)
