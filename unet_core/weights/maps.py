"""Loss weight map of the U-Net paper: w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 sigma**2)).

Pure 2-D kernels (NumPy/SciPy in, NumPy out); the chunked Dask layer is
:mod:`unet_core.weights.blockwise`.

Pipeline for one (Y, X) slice:

1. :func:`instances_from_labels`: instance labels are used as they are; binary masks
   (ISBI style, the larger value = cell interior) become instances by connected components
   of the foreground (4- or 8-connectivity, default 4).
2. :func:`class_map`: 1 = cell interior, 0 = background. For instance labels
   (``separate_touching=True``) the pixel of the *smaller* label on every contact between
   two different cells (3x3 neighbourhood) becomes background: the paper's morphological
   separation line, 1 px wide on straight contacts, and the remaining cells no longer touch
   even under 8-connectivity. The rule depends only on label values and a symmetric
   neighbourhood, so it commutes with flips, rotations by 90 degrees and translations.
3. :func:`class_weights_from_counts`: w_c = 1 / (K * f_c) for K classes with global pixel
   frequencies f_c, i.e. inverse frequency normalised so the mean weight over the training
   set is exactly 1 (sum_c f_c * w_c = 1).
4. :func:`border_weight`: the separation term. d1, d2 = Euclidean distances (px) to the
   nearest pixel of the nearest and of the second-nearest cell (cells = the instances left
   after step 2). By default it is evaluated on background pixels only, as in the paper
   (``pixels="all"`` also gives cell pixels a term, with d1 = 0 inside a cell).

Truncation (documented tolerance): the term is set to 0 where d1 + d2 > cutoff, with
``cutoff = sigma * sqrt(2 ln(w0 / tolerance))`` (21.46 px for w0 = 10, sigma = 5,
tolerance = 1e-3), where the exact term is below ``tolerance``. So
``|border_weight - exact| < tolerance`` everywhere, and every value depends only on labels
within ``cutoff`` px: that is what lets :mod:`unet_core.weights.blockwise` compute it in chunks
with a finite halo and get bit-identical results.

Special cases: a slice without cells gets no border term (w = w_c(background) everywhere);
a slice with one cell has no second-nearest cell, d2 = inf, so again no border term
(w = w_c); a slice that is all one cell is all class 1 (w = w_c(cell)).

Algorithms for d1/d2 (both exact within the cutoff, chosen by measurement, see
``benchmarks/bench_weights.py``):

* ``"kdtree"``: one k-d tree over the cells' contour pixels (the nearest pixel of a cell
  to any pixel outside it is always a contour pixel, one with a 4-neighbour of another
  label); k-nearest queries from the target pixels only, with distances bounded by the
  cutoff. Cost grows with the number of target pixels, so it wins when background is
  thin (touching cells, the paper's use case).
* ``"bbox"``: one SciPy EDT per cell, restricted to the cell's bounding box grown by the
  cutoff; cost grows with the summed box area, so it wins for wide background.
* ``"auto"`` (default) picks by the estimated cost of each.

Both give identical float64 distances (square roots of the same integer squared
distances), hence identical weights.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from unet_core.common.errors import UserInputError, parse_choice
from unet_core.common.labels import LabelKind, binary_foreground, connectivity_structure

log = logging.getLogger(__name__)



class BorderPixels(str, Enum):
    """Which pixels get the border term: background only (the paper) or all."""

    BACKGROUND = "background"
    ALL = "all"


class DistanceMethod(str, Enum):
    """Algorithm for d1/d2 (identical results; see the module docstring)."""

    AUTO = "auto"
    KDTREE = "kdtree"
    BBOX = "bbox"

@dataclass(frozen=True)
class WeightParams:
    """Parameters of w(x) = w_c(x) + w0·exp(−(d1+d2)²/2σ²); every default written here once.

    Attributes:
        w0: border weight at a zero-width gap (paper 10).
        sigma_px: decay length of the border term, px (paper 5).
        tolerance: the border term is truncated where it is below this value.
        connectivity: 4 or 8, adjacency for turning binary masks into cells.
        border_pixels: pixels that get the border term (``background`` as in the paper, or ``all``).
        method: d1/d2 algorithm (identical results; ``auto`` picks the cheaper).
    """

    w0: float = 10.0
    sigma_px: float = 5.0
    tolerance: float = 1e-3
    connectivity: int = 4
    border_pixels: BorderPixels = BorderPixels.BACKGROUND
    method: DistanceMethod = DistanceMethod.AUTO

    def __post_init__(self) -> None:
        check_parameters(w0=self.w0, sigma_px=self.sigma_px, tolerance=self.tolerance)
        if self.connectivity not in (4, 8):
            raise UserInputError(f"connectivity = {self.connectivity}: must be 4 or 8")
        object.__setattr__(self, "border_pixels", parse_choice(BorderPixels, self.border_pixels, option="border pixels"))
        object.__setattr__(self, "method", parse_choice(DistanceMethod, self.method, option="method"))

    @property
    def cutoff_px(self) -> float:
        """Distance d1 + d2 beyond which the border term is below ``tolerance``, px."""
        return cutoff_px(w0=self.w0, sigma_px=self.sigma_px, tolerance=self.tolerance)

    @property
    def halo_px(self) -> int:
        """Overlap (px per side) that makes chunked == whole-slice: floor(cutoff) + 2."""
        return int(math.floor(self.cutoff_px)) + 2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["border_pixels"], d["method"] = self.border_pixels.value, self.method.value
        return d


PRESETS: dict[str, dict[str, float]] = {
    "paper": {"w0": WeightParams.w0, "sigma_px": WeightParams.sigma_px},  # Ronneberger et al. 2015: the defaults
    "fiji": {"w0": 50.0, "sigma_px": 6.0},  # Falk et al. 2019, U-Net Fiji plugin
}
N_CLASSES = 2
_KD_K = 4  # neighbours asked for first; unresolved targets ask again with 4x more
# Measured cost ratio of one k-d tree query per target pixel (k = 4..8) to one EDT pixel.
_KD_COST_PER_TARGET = 25.0


def _check_2d_integer(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise UserInputError(f"{what}: expected a 2-D (Y, X) slice, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise UserInputError(
            f"{what}: labels must be integers, got dtype {array.dtype}; re-ingest the labels as an integer image"
        )
    return array


def cutoff_px(*, w0: float, sigma_px: float, tolerance: float) -> float:
    """Distance d1 + d2 (px) beyond which the border term is below ``tolerance``.

    Args:
        w0: weight at a zero-width gap between two cells.
        sigma_px: decay length, pixels.
        tolerance: absolute error allowed in the weight (same units as ``w0``).

    Returns:
        ``sigma * sqrt(2 ln(w0 / tolerance))`` in pixels; 0 when ``w0 <= tolerance``.
    """
    check_parameters(w0=w0, sigma_px=sigma_px, tolerance=tolerance)
    if w0 <= tolerance:
        return 0.0
    return sigma_px * math.sqrt(2.0 * math.log(w0 / tolerance))


#: Largest w0 and class weight: w(x) = w_c(x) + border term is stored as float32, and a sum of two
#: terms of at most half its largest value cannot overflow to Inf.
MAX_WEIGHT = float(np.finfo(np.float32).max) / 2


def check_parameters(*, w0: float, sigma_px: float, tolerance: float) -> None:
    """Raise :class:`UserInputError` for an unusable w0, sigma or tolerance."""
    if not (math.isfinite(w0) and 0 <= w0 <= MAX_WEIGHT):
        raise UserInputError(f"w0 = {w0}: must be a finite number >= 0, at most {MAX_WEIGHT:.3g} (paper: 10)")
    if not (math.isfinite(sigma_px) and sigma_px > 0):
        raise UserInputError(f"sigma_px = {sigma_px}: must be a finite number > 0 px (paper: 5)")
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise UserInputError(f"tolerance = {tolerance}: must be a finite number > 0 (default 1e-3)")


def instances_from_labels(
    labels2d: np.ndarray,
    *,
    kind: LabelKind | str,
    connectivity: int = 4,
    foreground: int | None = None,
) -> np.ndarray:
    """Instance labels of one slice.

    Args:
        labels2d: (Y, X) integer ground truth.
        kind: ``"instance"`` (0 = background, every other value one cell; used as is) or
            ``"binary"`` (at most two values; ``foreground`` is cell interior, everything
            else background/membrane).
        connectivity: 4 or 8, neighbourhood of the connected components for binary labels.
        foreground: value of cell interior for binary labels: pass the stack's record
            (:meth:`unet_core.io.ngff.Stack.binary_foreground`); None: the same rule
            (:func:`unet_core.common.labels.binary_foreground`) on this slice alone.

    Returns:
        (Y, X) int32 instances, 0 = background; binary components are numbered 1..n in
        raster order.

    Raises:
        UserInputError: non-integer or negative labels, labels beyond int32, more than two
            values in a binary slice, unknown kind or connectivity.
    """
    labels2d = _check_2d_integer(labels2d, "labels")
    if connectivity not in (4, 8):
        raise UserInputError(f"connectivity = {connectivity}: must be 4 or 8")
    kind = parse_choice(LabelKind, kind, option="label kind")
    if kind is LabelKind.INSTANCE:
        if labels2d.size and int(labels2d.min()) < 0:
            raise UserInputError(f"instance labels: negative value {int(labels2d.min())}; 0 = background, >0 = cells")
        if labels2d.size and int(labels2d.max()) > np.iinfo(np.int32).max:
            raise UserInputError(f"instance labels: value {int(labels2d.max())} does not fit int32; relabel the cells")
        return labels2d.astype(np.int32, copy=False)
    if foreground is None:
        foreground = binary_foreground(np.unique(labels2d)[-1:])
    fg = labels2d == foreground
    rest = labels2d[~fg]
    if rest.size and rest.min() != rest.max():
        raise UserInputError(
            f"binary labels: more than two values in a slice (foreground {foreground}, others "
            f"{int(rest.min())}..{int(rest.max())}); use label kind 'instance' for instance labels"
        )
    instances, _ = ndi.label(fg, structure=connectivity_structure(connectivity), output=np.int32)
    return instances


def class_map(instances2d: np.ndarray, *, separate_touching: bool) -> np.ndarray:
    """Classes of one slice: 1 = cell interior, 0 = background (and separation lines).

    Args:
        instances2d: (Y, X) integer instances, 0 = background.
        separate_touching: mark the pixel of the smaller label on every contact between
            two different cells (3x3 neighbourhood) as background (instance labels); False
            keeps every cell pixel (binary labels, whose components never touch).

    Returns:
        (Y, X) uint8.
    """
    instances2d = _check_2d_integer(instances2d, "instances")
    cells = instances2d != 0
    if not separate_touching:
        return cells.astype(np.uint8)
    keep = cells.copy()
    padded = np.pad(instances2d, 1)  # 0 outside the image: no neighbour there
    height, width = instances2d.shape
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            neighbour = padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
            keep &= ~((neighbour != 0) & (neighbour > instances2d))
    return keep.astype(np.uint8)


def cells_from(instances2d: np.ndarray, classes2d: np.ndarray) -> np.ndarray:
    """The cells the border term sees: instances where the class is 1, else 0 (int32)."""
    instances2d = _check_2d_integer(instances2d, "instances")
    if classes2d.shape != instances2d.shape:
        raise UserInputError(f"classes {classes2d.shape} and instances {instances2d.shape} differ in shape")
    return np.where(classes2d == 1, instances2d, 0).astype(np.int32, copy=False)


def class_weights_from_counts(counts: np.ndarray) -> np.ndarray:
    """Class weights w_c = 1 / (K f_c) from pixel counts per class (mean weight 1).

    Args:
        counts: (K,) pixel counts per class over the whole training set (class 0 =
            background, 1 = cell).

    Returns:
        (K,) float64 weights with ``sum(f * w) == 1`` for frequencies ``f = counts / sum``.

    Raises:
        UserInputError: a class never occurs (its weight would be infinite).
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size < 2:
        raise UserInputError(f"class counts: expected one count per class, got {counts.tolist()}")
    if np.any(counts <= 0):
        missing = [i for i, c in enumerate(counts) if c <= 0]
        raise UserInputError(
            f"class counts {counts.astype(int).tolist()}: class(es) {missing} never occur in the training "
            "labels; check the label kind (binary/instance) and the stacks given"
        )
    freq = counts / counts.sum()
    return 1.0 / (counts.size * freq)


def _contour(cells: np.ndarray) -> np.ndarray:
    """Cell pixels with a 4-neighbour of another label inside the image (bool)."""
    edge = np.zeros(cells.shape, dtype=bool)
    vert = cells[:-1] != cells[1:]
    horiz = cells[:, :-1] != cells[:, 1:]
    edge[:-1] |= vert
    edge[1:] |= vert
    edge[:, :-1] |= horiz
    edge[:, 1:] |= horiz
    return edge & (cells != 0)


def _two_nearest_kdtree(cells: np.ndarray, target: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """d1, d2 (float64, px; inf when beyond the cutoff) at the ``target`` pixels, k-d tree."""
    from scipy.spatial import cKDTree

    n_targets = int(target.sum())
    d1 = np.full(n_targets, np.inf)
    d2 = np.full(n_targets, np.inf)
    contour = _contour(cells)
    points = np.argwhere(contour)
    if len(points) == 0 or n_targets == 0:
        return d1, d2
    point_label = np.append(cells[contour], 0)  # index len(points) = "no neighbour"
    # unbalanced, uncompacted: builds ~2x faster on contour pixels, queries as fast
    tree = cKDTree(points, balanced_tree=False, compact_nodes=False)
    bound = math.nextafter(cutoff, math.inf)  # include pairs at exactly the cutoff
    coords = np.argwhere(target)
    own = cells[target]  # a target inside a cell has d1 = 0 to its own cell
    inside = own != 0
    d1[inside] = 0.0
    todo = np.arange(n_targets)
    k = _KD_K
    while todo.size:
        k_now = min(k, len(points))
        dist, index = tree.query(coords[todo], k=k_now, distance_upper_bound=bound)
        dist = dist.reshape(len(todo), k_now)
        label = point_label[index.reshape(len(todo), k_now)]
        first_label = np.where(inside[todo], own[todo], label[:, 0])
        outside = ~inside[todo]
        d1[todo[outside]] = dist[outside, 0]
        other = (label != first_label[:, None]) & (label != 0)
        found = other.any(axis=1)
        pick = np.argmax(other, axis=1)
        d2[todo[found]] = dist[np.flatnonzero(found), pick[found]]
        # Unresolved: every neighbour returned is the nearest cell and the k-th is still
        # close enough that a second cell could matter.
        more = ~found & np.isfinite(dist[:, -1]) & (dist[:, -1] + d1[todo] <= cutoff) & (k_now < len(points))
        todo = todo[more]
        k *= 4
    d1[d1 > cutoff] = np.inf
    d2[d2 > cutoff] = np.inf
    return d1, d2


def _two_nearest_bbox(cells: np.ndarray, target: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """d1, d2 at the ``target`` pixels by per-cell EDTs in boxes grown by the cutoff."""
    height, width = cells.shape
    margin = int(math.floor(cutoff)) + 1
    m1 = np.full(cells.shape, np.inf)
    m2 = np.full(cells.shape, np.inf)
    for label, box in enumerate(ndi.find_objects(cells), start=1):
        if box is None:
            continue
        y0, y1 = max(box[0].start - margin, 0), min(box[0].stop + margin, height)
        x0, x1 = max(box[1].start - margin, 0), min(box[1].stop + margin, width)
        dist = ndi.distance_transform_edt(cells[y0:y1, x0:x1] != label)
        a = m1[y0:y1, x0:x1]
        b = m2[y0:y1, x0:x1]
        np.minimum(b, np.maximum(a, dist), out=b)
        np.minimum(a, dist, out=a)
    d1 = m1[target]
    d2 = m2[target]
    d1[d1 > cutoff] = np.inf
    d2[d2 > cutoff] = np.inf
    return d1, d2


def _pick_method(cells: np.ndarray, target: np.ndarray, cutoff: float) -> DistanceMethod:
    margin = 2 * (int(math.floor(cutoff)) + 1)
    area = 0
    for box in ndi.find_objects(cells):
        if box is not None:
            area += (box[0].stop - box[0].start + margin) * (box[1].stop - box[1].start + margin)
    return DistanceMethod.KDTREE if _KD_COST_PER_TARGET * int(target.sum()) < area else DistanceMethod.BBOX


def two_nearest_distances(
    cells2d: np.ndarray,
    *,
    cutoff: float,
    pixels: BorderPixels | str = BorderPixels.BACKGROUND,
    method: DistanceMethod | str = DistanceMethod.AUTO,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distances to the nearest and second-nearest cell, exact up to ``cutoff``.

    Args:
        cells2d: (Y, X) integer cells, 0 = background.
        cutoff: distances (px) beyond which values may be reported as inf; a pair with
            d1 + d2 <= cutoff is always exact.
        pixels: ``"background"`` (targets = pixels with label 0) or ``"all"``.
        method: ``"kdtree"``, ``"bbox"`` or ``"auto"`` (see the module docstring).

    Returns:
        ``(target, d1, d2)``: (Y, X) bool target mask and float64 distances (px) at the
        target pixels in raster order; inf where no (second) cell lies within ``cutoff``.
    """
    cells2d = _check_2d_integer(cells2d, "cells")
    cells2d = cells2d.astype(np.int32, copy=False)
    pixels = parse_choice(BorderPixels, pixels, option="border pixels")
    method = parse_choice(DistanceMethod, method, option="method")
    target = (cells2d == 0) if pixels is BorderPixels.BACKGROUND else np.ones(cells2d.shape, dtype=bool)
    if method is DistanceMethod.AUTO:
        method = _pick_method(cells2d, target, cutoff)
    nearest = _two_nearest_kdtree if method is DistanceMethod.KDTREE else _two_nearest_bbox
    d1, d2 = nearest(cells2d, target, cutoff)
    return target, d1, d2


def _term(d1: np.ndarray, d2: np.ndarray, *, w0: float, sigma_px: float, cutoff: float) -> np.ndarray:
    total = d1 + d2
    near = total <= cutoff
    out = np.zeros(total.shape, dtype=np.float64)
    out[near] = w0 * np.exp(-(total[near] ** 2) / (2.0 * sigma_px**2))
    return out


def border_weight(instances2d: np.ndarray, params: WeightParams = WeightParams()) -> np.ndarray:
    """Separation term w0 * exp(-(d1 + d2)**2 / (2 sigma**2)) of the loss weight.

    Needs labels within ``params.cutoff_px`` px of a pixel only (the Dask halo): the term is set
    to 0 where d1 + d2 exceeds the cutoff.

    Args:
        instances2d: (Y, X) integer cells, 0 = background (already separated: pass
            :func:`cells_from` output for instance labels).
        params: w0, sigma, truncation tolerance, which pixels get the term (``background`` as in
            the paper, or ``all``) and the d1/d2 algorithm (:class:`WeightParams`).

    Returns:
        (Y, X) float32; 0 where fewer than two cells are within the cutoff.

    Raises:
        UserInputError: non-2-D or non-integer labels, bad parameters.
    """
    cutoff = params.cutoff_px
    target, d1, d2 = two_nearest_distances(instances2d, cutoff=cutoff, pixels=params.border_pixels,
                                           method=params.method)
    out = np.zeros(target.shape, dtype=np.float32)
    out[target] = _term(d1, d2, w0=params.w0, sigma_px=params.sigma_px, cutoff=cutoff)
    return out


def weight_map(
    instances2d: np.ndarray,
    classes2d: np.ndarray,
    *,
    class_weights: tuple[float, float] | np.ndarray,
    params: WeightParams = WeightParams(),
) -> np.ndarray:
    """Loss weight w(x) = w_c(x) + border term for one slice.

    Args:
        instances2d: (Y, X) integer instances, 0 = background.
        classes2d: (Y, X) uint8 classes from :func:`class_map` (1 = cell interior).
        class_weights: ``(w_background, w_cell)`` from :func:`class_weights_from_counts`.
        params: the border term's parameters, as in :func:`border_weight`.

    Returns:
        (Y, X) float32 weights, finite everywhere (an empty slice gives w_background).
    """
    wc = np.asarray(class_weights, dtype=np.float32)
    if wc.shape != (N_CLASSES,) or not np.all(np.isfinite(wc)) or np.any(wc < 0):
        raise UserInputError(f"class_weights {np.asarray(class_weights).tolist()}: need two finite numbers >= 0")
    cells = cells_from(instances2d, classes2d)
    term = border_weight(cells, params)
    return wc[(classes2d == 1).astype(np.intp)] + term


def border_weight_reference(instances2d: np.ndarray, params: WeightParams = WeightParams()) -> np.ndarray:
    """Exact, untruncated, slow reference: one whole-image EDT per cell (tests, benchmark).

    O(cells x pixels) time; memory two (Y, X) float64 arrays (running two smallest).

    Args:
        instances2d: (Y, X) integer cells, 0 = background.
        params: w0, sigma and the pixels that get the term (no truncation: ``tolerance`` and
            ``method`` are not used).

    Returns:
        (Y, X) float64 border term; 0 where fewer than two cells exist.
    """
    cells = _check_2d_integer(instances2d, "cells")
    m1 = np.full(cells.shape, np.inf)
    m2 = np.full(cells.shape, np.inf)
    for label in np.unique(cells):
        if label == 0:
            continue
        dist = ndi.distance_transform_edt(cells != label)
        np.minimum(m2, np.maximum(m1, dist), out=m2)
        np.minimum(m1, dist, out=m1)
    out = params.w0 * np.exp(-((m1 + m2) ** 2) / (2.0 * params.sigma_px**2))
    out[~np.isfinite(m2)] = 0.0
    if params.border_pixels is BorderPixels.BACKGROUND:
        out[cells != 0] = 0.0
    return out
