"""Loss weight map of the U-Net paper: w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 sigma**2)).

Pure kernels (NumPy/SciPy in, NumPy out) for (Y, X) slices in px and, at the end of the
module, for (Z, Y, X) volumes in µm (below); the chunked Dask layer is
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

Volumes (issue 36, the 3-D mode): the same kernels, N-D, with a voxel size
``spacing_um = (dz, dy, dx)``. :func:`class_map_3d` cuts separation surfaces at face contacts
(6-connectivity; its docstring says what stays touching and why); :func:`two_nearest_distances_3d`
measures d1, d2 in µm, each distance computed from the integer voxel offset by one formula
whichever algorithm found it (so the value never depends on where a chunk starts);
:func:`border_weight_3d` and :func:`weight_map_3d` take :class:`VolumeWeightParams` (sigma and
cutoff in µm; the 2-D :class:`WeightParams` keeps its px keys), whose
:meth:`~VolumeWeightParams.halo_voxels` is the overlap per axis that makes chunks equal the
whole volume (``unet_core.weights.blockwise.volume_weight_arrays``). The 2-D functions'
outputs are unchanged by the generalisation, byte for byte.
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


@dataclass(frozen=True)
class VolumeWeightParams:
    """Parameters of w(x) for a (Z, Y, X) volume, lengths in µm.

    :class:`WeightParams` keeps its px keys for slices. A volume's voxels are usually longer
    along z (serial sections, confocal), so the decay length and the cutoff are physical
    lengths, d1 and d2 are measured in µm with the voxel size, and the halo a chunk needs is
    a different number of voxels per axis (:meth:`halo_voxels`).

    Attributes:
        sigma_um: decay length of the border term, µm (no default: the paper's 5 px were
            pixels of its data; 5 px times the in-plane voxel size is the equivalent).
        w0: border weight at a zero-width gap (paper 10).
        tolerance: the border term is truncated where it is below this value.
        border_pixels: voxels that get the border term (``background`` as in the paper, or ``all``).
        method: d1/d2 algorithm (identical results; ``auto`` picks the cheaper).
    """

    sigma_um: float
    w0: float = WeightParams.w0
    tolerance: float = WeightParams.tolerance
    border_pixels: BorderPixels = BorderPixels.BACKGROUND
    method: DistanceMethod = DistanceMethod.AUTO

    def __post_init__(self) -> None:
        _check_parameters(self.w0, self.sigma_um, self.tolerance, sigma_name="sigma_um", unit="µm")
        object.__setattr__(self, "border_pixels", parse_choice(BorderPixels, self.border_pixels, option="border pixels"))
        object.__setattr__(self, "method", parse_choice(DistanceMethod, self.method, option="method"))

    @property
    def cutoff_um(self) -> float:
        """Distance d1 + d2 (µm) beyond which the border term is below ``tolerance``."""
        return _cutoff(self.w0, self.sigma_um, self.tolerance)

    def halo_voxels(self, spacing_um: tuple[float, float, float]) -> tuple[int, int, int]:
        """Overlap per axis (voxels per side) that makes chunked == whole volume.

        ``ceil(cutoff_um / spacing)`` voxels hold every voxel within the cutoff of the chunk's
        core (only those can change a core value); +1 gives those voxels their true class,
        since the separation rule reads one face neighbour further.
        """
        spacing = check_spacing(spacing_um)
        return tuple(int(math.ceil(self.cutoff_um / s)) + 1 for s in spacing)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["border_pixels"], d["method"] = self.border_pixels.value, self.method.value
        return d


def check_spacing(spacing_um: Any) -> tuple[float, float, float]:
    """The voxel size ``(dz, dy, dx)`` in µm as three floats.

    Raises:
        UserInputError: not three finite numbers > 0.
    """
    try:
        spacing = tuple(float(s) for s in spacing_um)
    except (TypeError, ValueError):
        spacing = ()
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise UserInputError(f"spacing_um = {spacing_um!r}: need the voxel size (dz, dy, dx) as three finite "
                             "numbers > 0 µm; give the stack's voxel size")
    return spacing  # type: ignore[return-value]


PRESETS: dict[str, dict[str, float]] = {
    "paper": {"w0": WeightParams.w0, "sigma_px": WeightParams.sigma_px},  # Ronneberger et al. 2015: the defaults
    "fiji": {"w0": 50.0, "sigma_px": 6.0},  # Falk et al. 2019, U-Net Fiji plugin
}
N_CLASSES = 2
_KD_K = 4  # neighbours asked for first; unresolved targets ask again with 4x more
# Measured cost ratio of one k-d tree query per target pixel (k = 4..8) to one EDT pixel.
_KD_COST_PER_TARGET = 25.0
# The same in 3-D (µm voxels; 32x128x128 Voronoi volumes, spacing (2, 0.5, 0.5) um, sigma 1 and
# 2.5 um): 130-190 where background is thin (touching cells), 200-2000 with gaps (a cell's
# surface holds many voxels within a distance, so the k-nearest search grows k many times).
_KD_COST_PER_TARGET_3D = 200.0


_AXES = {2: "a 2-D (Y, X) slice", 3: "a 3-D (Z, Y, X) volume"}


def _check_integer(array: np.ndarray, what: str, *, ndim: int = 2) -> np.ndarray:
    """``array`` as an ndarray; UserInputError unless it is ``ndim``-D and integer (or bool)."""
    array = np.asarray(array)
    if array.ndim != ndim:
        raise UserInputError(f"{what}: expected {_AXES[ndim]}, got shape {array.shape}")
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
    return _cutoff(w0, sigma_px, tolerance)


def _cutoff(w0: float, sigma: float, tolerance: float) -> float:
    """sigma * sqrt(2 ln(w0 / tolerance)), in the unit of sigma; 0 when w0 <= tolerance."""
    if w0 <= tolerance:
        return 0.0
    return sigma * math.sqrt(2.0 * math.log(w0 / tolerance))


#: Largest w0 and class weight: w(x) = w_c(x) + border term is stored as float32, and a sum of two
#: terms of at most half its largest value cannot overflow to Inf.
MAX_WEIGHT = float(np.finfo(np.float32).max) / 2


def check_parameters(*, w0: float, sigma_px: float, tolerance: float) -> None:
    """Raise :class:`UserInputError` for an unusable w0, sigma or tolerance."""
    _check_parameters(w0, sigma_px, tolerance, sigma_name="sigma_px", unit="px (paper: 5)")


def _check_parameters(w0: float, sigma: float, tolerance: float, *, sigma_name: str, unit: str) -> None:
    if not (math.isfinite(w0) and 0 <= w0 <= MAX_WEIGHT):
        raise UserInputError(f"w0 = {w0}: must be a finite number >= 0, at most {MAX_WEIGHT:.3g} (paper: 10)")
    if not (math.isfinite(sigma) and sigma > 0):
        raise UserInputError(f"{sigma_name} = {sigma}: must be a finite number > 0 {unit}")
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
    labels2d = _check_integer(labels2d, "labels")
    if connectivity not in (4, 8):
        raise UserInputError(f"connectivity = {connectivity}: must be 4 or 8")
    kind = parse_choice(LabelKind, kind, option="label kind")
    if kind is LabelKind.INSTANCE:
        return _instance_values(labels2d)
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


def _instance_values(labels: np.ndarray) -> np.ndarray:
    """Integer instance labels as int32; UserInputError for negative values or values beyond int32."""
    if labels.size and int(labels.min()) < 0:
        raise UserInputError(f"instance labels: negative value {int(labels.min())}; 0 = background, >0 = cells")
    if labels.size and int(labels.max()) > np.iinfo(np.int32).max:
        raise UserInputError(f"instance labels: value {int(labels.max())} does not fit int32; relabel the cells")
    return labels.astype(np.int32, copy=False)


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
    instances2d = _check_integer(instances2d, "instances")
    if not separate_touching:
        return (instances2d != 0).astype(np.uint8)
    return _separated(instances2d, _NEIGHBOURS_3X3).astype(np.uint8)


#: The 2-D separation rule's neighbourhood (3x3: faces and corners) and the 3-D one (6 faces).
_NEIGHBOURS_3X3 = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
_FACES_3D = ((-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1))


def _separated(instances: np.ndarray, offsets: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """Cell voxels (bool) that keep their label: those with no neighbour (at ``offsets``) of a
    larger nonzero label. Outside the array counts as background (no neighbour there)."""
    keep = instances != 0
    padded = np.pad(instances, 1)
    for offset in offsets:
        neighbour = padded[tuple(slice(1 + o, 1 + o + n) for o, n in zip(offset, instances.shape))]
        keep &= ~((neighbour != 0) & (neighbour > instances))
    return keep


def cells_from(instances2d: np.ndarray, classes2d: np.ndarray) -> np.ndarray:
    """The cells the border term sees: instances where the class is 1, else 0 (int32)."""
    return _cells_of_class(_check_integer(instances2d, "instances"), classes2d)


def _cells_of_class(instances: np.ndarray, classes: np.ndarray) -> np.ndarray:
    if classes.shape != instances.shape:
        raise UserInputError(f"classes {classes.shape} and instances {instances.shape} differ in shape")
    return np.where(classes == 1, instances, 0).astype(np.int32, copy=False)


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
    """Cell pixels (voxels) with a face neighbour (one step along one axis) of another label
    inside the array (bool). The nearest voxel of a cell to any voxel outside it is one of
    these under any metric with per-axis weights: from any other cell voxel, one step towards
    the target stays in the cell and comes closer."""
    edge = np.zeros(cells.shape, dtype=bool)
    for axis in range(cells.ndim):
        low = tuple(slice(None, -1) if a == axis else slice(None) for a in range(cells.ndim))
        high = tuple(slice(1, None) if a == axis else slice(None) for a in range(cells.ndim))
        differs = cells[low] != cells[high]
        edge[low] |= differs
        edge[high] |= differs
    return edge & (cells != 0)


def _distances_from_offsets(offsets: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Euclidean lengths (float64, µm) of integer voxel offsets ``(..., ndim)`` under ``spacing``.

    Canonical arithmetic, so a distance depends only on the offset, never on where a chunk
    starts or on which algorithm found the voxel: the integer squares of the axes that share a
    spacing are summed exactly first (so (3, 4) and (4, 3) and (5, 0) in-plane give one value),
    then each group is scaled by its spacing squared and the groups are added in axis order.
    """
    squares = offsets.astype(np.int64) ** 2
    total = None
    for step in dict.fromkeys(spacing):  # distinct spacings, in axis order
        axes = [a for a, s in enumerate(spacing) if s == step]
        part = squares[..., axes].sum(axis=-1).astype(np.float64) * (step * step)
        total = part if total is None else total + part
    return np.sqrt(total)


def _two_nearest_kdtree(cells: np.ndarray, target: np.ndarray, cutoff: float,
                        spacing: tuple[float, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """d1, d2 (float64; inf when beyond the cutoff) at the ``target`` voxels, k-d tree.

    ``spacing`` None: px on the integer grid (the tree's own distances are exact); else voxel
    sizes, and the distances of the voxels found are recomputed canonically
    (:func:`_distances_from_offsets`) and each row re-sorted by them.
    """
    from scipy.spatial import cKDTree

    n_targets = int(target.sum())
    d1 = np.full(n_targets, np.inf)
    d2 = np.full(n_targets, np.inf)
    contour = _contour(cells)
    points = np.argwhere(contour)
    if len(points) == 0 or n_targets == 0:
        return d1, d2
    point_label = np.append(cells[contour], 0)  # index len(points) = "no neighbour"
    scale = np.ones(cells.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    # unbalanced, uncompacted: builds ~2x faster on contour pixels, queries as fast
    tree = cKDTree(points * scale, balanced_tree=False, compact_nodes=False)
    # include pairs at exactly the cutoff (µm coordinates round: a relative slack, cut below)
    bound = math.nextafter(cutoff if spacing is None else cutoff * (1 + 1e-9), math.inf)
    coords = np.argwhere(target)
    own = cells[target]  # a target inside a cell has d1 = 0 to its own cell
    inside = own != 0
    d1[inside] = 0.0
    todo = np.arange(n_targets)
    k = _KD_K
    while todo.size:
        k_now = min(k, len(points))
        dist, index = tree.query(coords[todo] * scale, k=k_now, distance_upper_bound=bound)
        dist, index = dist.reshape(len(todo), k_now), index.reshape(len(todo), k_now)
        if spacing is not None:
            dist, index = _canonical_rows(dist, index, points, coords[todo], spacing)
        label = point_label[index]
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


def _canonical_rows(dist: np.ndarray, index: np.ndarray, points: np.ndarray, coords: np.ndarray,
                    spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The k-d tree's answers with canonical distances, each row sorted by them (stable)."""
    hit = np.isfinite(dist)
    exact = np.full(dist.shape, np.inf)
    rows, cols = np.nonzero(hit)
    exact[rows, cols] = _distances_from_offsets(points[index[rows, cols]] - coords[rows], spacing)
    order = np.argsort(exact, axis=1, kind="stable")
    return np.take_along_axis(exact, order, axis=1), np.take_along_axis(index, order, axis=1)


def _margins(cutoff: float, shape_ndim: int, spacing: tuple[float, ...] | None) -> tuple[int, ...]:
    """Voxels per axis that hold every voxel within ``cutoff`` of a box, plus one."""
    steps = spacing if spacing is not None else (1.0,) * shape_ndim
    return tuple(int(math.floor(cutoff / s)) + 1 for s in steps)


def _distance_to(outside: np.ndarray, spacing: tuple[float, ...] | None) -> np.ndarray:
    """EDT of ``outside`` (True off the cell): px, or canonical µm from the feature transform."""
    if spacing is None:
        return ndi.distance_transform_edt(outside)
    nearest = ndi.distance_transform_edt(outside, sampling=spacing, return_distances=False, return_indices=True)
    offsets = np.moveaxis(nearest - np.indices(outside.shape, dtype=nearest.dtype), 0, -1)
    return _distances_from_offsets(offsets, spacing)


def _two_nearest_bbox(cells: np.ndarray, target: np.ndarray, cutoff: float,
                      spacing: tuple[float, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """d1, d2 at the ``target`` voxels by per-cell EDTs in boxes grown by the cutoff."""
    margins = _margins(cutoff, cells.ndim, spacing)
    m1 = np.full(cells.shape, np.inf)
    m2 = np.full(cells.shape, np.inf)
    for label, box in enumerate(ndi.find_objects(cells), start=1):
        if box is None:
            continue
        window = tuple(slice(max(b.start - m, 0), min(b.stop + m, n)) for b, m, n in zip(box, margins, cells.shape))
        if not target[window].any():  # e.g. a cell deep in a chunk's halo: nothing to measure
            continue
        dist = _distance_to(cells[window] != label, spacing)
        a = m1[window]
        b = m2[window]
        np.minimum(b, np.maximum(a, dist), out=b)
        np.minimum(a, dist, out=a)
    d1 = m1[target]
    d2 = m2[target]
    d1[d1 > cutoff] = np.inf
    d2[d2 > cutoff] = np.inf
    return d1, d2


def _pick_method(cells: np.ndarray, target: np.ndarray, cutoff: float,
                 spacing: tuple[float, ...] | None = None) -> DistanceMethod:
    margins = [2 * m for m in _margins(cutoff, cells.ndim, spacing)]
    area = 0
    for box in ndi.find_objects(cells):
        if box is not None:
            area += math.prod(b.stop - b.start + m for b, m in zip(box, margins))
    per_target = _KD_COST_PER_TARGET if cells.ndim == 2 else _KD_COST_PER_TARGET_3D
    return DistanceMethod.KDTREE if per_target * int(target.sum()) < area else DistanceMethod.BBOX


def _two_nearest(cells: np.ndarray, *, cutoff: float, spacing: tuple[float, ...] | None, pixels: BorderPixels | str,
                 method: DistanceMethod | str, within: tuple[slice, ...] | None = None,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(target, d1, d2) of :func:`two_nearest_distances` for a slice or a volume; ``within``
    limits the targets to a box (a chunk's core), None = everywhere."""
    pixels = parse_choice(BorderPixels, pixels, option="border pixels")
    method = parse_choice(DistanceMethod, method, option="method")
    target = (cells == 0) if pixels is BorderPixels.BACKGROUND else np.ones(cells.shape, dtype=bool)
    if within is not None:
        box = np.zeros(cells.shape, dtype=bool)
        box[within] = True
        target &= box
    if method is DistanceMethod.AUTO:
        method = _pick_method(cells, target, cutoff, spacing)
    nearest = _two_nearest_kdtree if method is DistanceMethod.KDTREE else _two_nearest_bbox
    d1, d2 = nearest(cells, target, cutoff, spacing)
    return target, d1, d2


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
    cells2d = _check_integer(cells2d, "cells").astype(np.int32, copy=False)
    return _two_nearest(cells2d, cutoff=cutoff, spacing=None, pixels=pixels, method=method)


def _term(d1: np.ndarray, d2: np.ndarray, *, w0: float, sigma: float, cutoff: float) -> np.ndarray:
    """w0 exp(-(d1 + d2)^2 / (2 sigma^2)) where d1 + d2 <= cutoff, else 0 (float64; any one unit)."""
    total = d1 + d2
    near = total <= cutoff
    out = np.zeros(total.shape, dtype=np.float64)
    out[near] = w0 * np.exp(-(total[near] ** 2) / (2.0 * sigma**2))
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
    out[target] = _term(d1, d2, w0=params.w0, sigma=params.sigma_px, cutoff=cutoff)
    return out


def _class_weight_array(class_weights: tuple[float, float] | np.ndarray) -> np.ndarray:
    """(w_background, w_cell) as float32 (UserInputError unless two finite numbers >= 0)."""
    wc = np.asarray(class_weights, dtype=np.float32)
    if wc.shape != (N_CLASSES,) or not np.all(np.isfinite(wc)) or np.any(wc < 0):
        raise UserInputError(f"class_weights {np.asarray(class_weights).tolist()}: need two finite numbers >= 0")
    return wc


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
    wc = _class_weight_array(class_weights)
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
    cells = _check_integer(instances2d, "cells")
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


# --- volumes: (Z, Y, X) with an anisotropic voxel size, lengths in µm ------------------------


def _volume_labels(labels: np.ndarray, what: str) -> np.ndarray:
    """(Z, Y, X) integer instance labels as int32 (UserInputError otherwise, one line)."""
    return _instance_values(_check_integer(labels, what, ndim=3))


def class_map_3d(instances3d: np.ndarray, *, separate_touching: bool) -> np.ndarray:
    """Classes of a volume: 1 = cell interior, 0 = background (and separation surfaces).

    With ``separate_touching``, on every contact across a face (6-connectivity: the neighbours
    one voxel away along z, y or x) between two different cells, the voxel of the smaller
    label becomes background: a separation surface one voxel thick, along z as in the plane.

    What remains touching: no two voxels of different cells share a face afterwards (of a
    face-adjacent pair, the smaller label's voxel had a larger nonzero face neighbour and was
    removed). Two cells may still meet along a voxel edge (one step in two axes) or at a
    corner (one step in all three axes), which the 2-D rule's 3x3 neighbourhood would have
    cut. Why 6: it is the thinnest surface that leaves the cells 6-separated, so a
    6-connected labelling of the class map (``scipy.ndimage.label``'s default in 3-D) never
    joins two cells (and the issue asks for it). A 26-neighbourhood (the 2-D rule's 3x3 made
    3x3x3) would also cut at edge and corner contacts, making the surface up to one voxel
    thicker wherever a contact is oblique to an axis; along z that voxel is dz µm, several
    in-plane voxels of the smaller cell in an anisotropic volume. Like the 2-D rule it
    depends only on label values and a symmetric neighbourhood, so it commutes with flips
    and translations; outside the volume counts as background.

    Args:
        instances3d: (Z, Y, X) integer instances, 0 = background.
        separate_touching: cut the separation surfaces (instance labels); False keeps every
            cell voxel.

    Returns:
        (Z, Y, X) uint8.

    Raises:
        UserInputError: not 3-D, not integer, negative or beyond int32.
    """
    instances3d = _volume_labels(instances3d, "instances")
    if not separate_touching:
        return (instances3d != 0).astype(np.uint8)
    return _separated(instances3d, _FACES_3D).astype(np.uint8)


def two_nearest_distances_3d(
    cells3d: np.ndarray,
    *,
    spacing_um: tuple[float, float, float],
    cutoff_um: float,
    pixels: BorderPixels | str = BorderPixels.BACKGROUND,
    method: DistanceMethod | str = DistanceMethod.AUTO,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distances (µm) to the nearest and second-nearest cell of a volume, exact up to the cutoff.

    The distance between voxel centres is ``sqrt((nz dz)^2 + (ny dy)^2 + (nx dx)^2)`` for
    integer offsets (nz, ny, nx), computed by one canonical formula
    (:func:`_distances_from_offsets`) whichever algorithm finds the voxel, so chunks and the
    whole volume agree bit for bit. The one case left: two voxels at the same real distance
    through offsets along axes of different spacings (e.g. 1 step in z = 4 steps in y) round
    differently unless those spacings are powers of two apart, and which of them a search
    meets first is not specified: a value may then differ by 1 ulp (float64).

    Args:
        cells3d: (Z, Y, X) integer cells, 0 = background (already separated).
        spacing_um: voxel size (dz, dy, dx), µm.
        cutoff_um: distances (µm) beyond which values may be reported as inf; a pair with
            d1 + d2 <= cutoff is always exact.
        pixels: ``"background"`` (targets = voxels with label 0) or ``"all"``.
        method: ``"kdtree"``, ``"bbox"`` or ``"auto"`` (as in 2-D: see the module docstring).

    Returns:
        ``(target, d1, d2)``: (Z, Y, X) bool target mask and float64 distances (µm) at the
        target voxels in raster order; inf where no (second) cell lies within the cutoff.
    """
    cells3d = _volume_labels(cells3d, "cells")
    spacing = check_spacing(spacing_um)
    return _two_nearest(cells3d, cutoff=cutoff_um, spacing=spacing, pixels=pixels, method=method)


def border_weight_3d(cells3d: np.ndarray, params: VolumeWeightParams, *,
                     spacing_um: tuple[float, float, float]) -> np.ndarray:
    """Separation term w0 * exp(-(d1 + d2)**2 / (2 sigma_um**2)) of a volume, d1, d2 in µm.

    Set to 0 where d1 + d2 > ``params.cutoff_um`` (below ``params.tolerance`` there), so a
    value needs the cells within the cutoff only: :meth:`VolumeWeightParams.halo_voxels`.

    Args:
        cells3d: (Z, Y, X) integer cells, 0 = background (already separated).
        params: w0, sigma_um, truncation tolerance, border voxels, d1/d2 algorithm.
        spacing_um: voxel size (dz, dy, dx), µm.

    Returns:
        (Z, Y, X) float32; 0 where fewer than two cells lie within the cutoff.
    """
    cells3d = _volume_labels(cells3d, "cells")
    return _volume_term(cells3d, params, check_spacing(spacing_um))


def _volume_term(cells: np.ndarray, params: VolumeWeightParams, spacing: tuple[float, float, float],
                 within: tuple[slice, ...] | None = None) -> np.ndarray:
    """The border term (float32) at the target voxels inside ``within`` (None: everywhere), else 0."""
    cutoff = params.cutoff_um
    target, d1, d2 = _two_nearest(cells, cutoff=cutoff, spacing=spacing, pixels=params.border_pixels,
                                  method=params.method, within=within)
    out = np.zeros(target.shape, dtype=np.float32)
    out[target] = _term(d1, d2, w0=params.w0, sigma=params.sigma_um, cutoff=cutoff)
    return out


def weight_map_3d(
    instances3d: np.ndarray,
    classes3d: np.ndarray,
    *,
    class_weights: tuple[float, float] | np.ndarray,
    params: VolumeWeightParams,
    spacing_um: tuple[float, float, float],
    within: tuple[slice, ...] | None = None,
) -> np.ndarray:
    """Loss weight w(x) = w_c(x) + border term of a volume (the conventions of :func:`weight_map`).

    Args:
        instances3d: (Z, Y, X) integer instances, 0 = background.
        classes3d: (Z, Y, X) uint8 classes from :func:`class_map_3d` (1 = cell interior).
        class_weights: ``(w_background, w_cell)`` from :func:`class_weights_from_counts`.
        params: the border term's parameters (:class:`VolumeWeightParams`).
        spacing_um: voxel size (dz, dy, dx), µm.
        within: a box (one slice per axis) whose voxels get the border term, the rest w_c
            alone: a chunk's core, the rest of the array being its halo (saves computing
            values that are cut away). None: every voxel.

    Returns:
        (Z, Y, X) float32 weights, finite everywhere (an empty volume gives w_background).
    """
    wc = _class_weight_array(class_weights)
    classes3d = np.asarray(classes3d)
    cells = _cells_of_class(_volume_labels(instances3d, "instances"), classes3d)
    term = _volume_term(cells, params, check_spacing(spacing_um), within)
    return wc[(classes3d == 1).astype(np.intp)] + term
