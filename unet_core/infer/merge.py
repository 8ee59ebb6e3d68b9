"""The gather: merge the part stores of all predict jobs into one OME-Zarr prediction.

Output (``prediction.ome.zarr``, NGFF 0.5 on Zarr v3)::

    prediction.ome.zarr/       attrs["ome"]["multiscales"] (axes c, z, y, x), attrs["unet"]
      0, 1, ...                (C, Z, Y, X) class probabilities in the run's encoding (uint8 codes
                               round(255 p) by default, or float16/float32;
                               :mod:`unet_core.infer.encoding`); level k is 2**k coarser in y
                               and x (2x2 mean); chunks (1, 1, B/2**k, B/2**k)
      labels/segmentation/0..  uint8 (Z, Y, X) argmax class of the full-precision probabilities
                               (ties -> lower class index), as predict computed it
      labels/instances/0..     uint32 (Z, Y, X) cell instances per slice, 0 = not cell, ids 1..K
                               over the whole stack: a seeded watershed within the mask of P(cell)
                               (``instances="watershed"``, threshold or distance seeds;
                               :func:`watershed_blockwise`) or 4-connected components of the
                               argmax cell class merged across block borders (default)

Everything is processed one block at a time (memory bounded by the block size plus halo):
pass 1 copies probabilities and segmentation (and, for components, writes *provisional*
ids of each block labelled on its own, recording which ids touch across block faces; a
union-find over those pairs gives the final ids). The watershed runs block by block over the
written probabilities (see :func:`watershed_blockwise`), also with provisional ids. The last pass
relabels level 0 to the final ids while writing the instance pyramid: level 0 is written once
more, never read and rewritten twice. The result depends only on the blocks, never on how many jobs computed them or in
which order, so 1 job and K jobs give byte-identical stores.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr
from scipy import ndimage

from unet_core import __version__
from unet_core.common.atomic import atomic_output, atomic_output_with_companions
from unet_core.common.errors import UserInputError, parse_choice
from unet_core.common.geometry import Box, chunk_grid
from unet_core.common.outputs import Layout, TiffMark, ZarrMark, claim_outputs
from unet_core.common.progress import progress
from unet_core.infer.cells import CELLS_MARK, CellTable, write_cells_csv
from unet_core.infer.encoding import ProbabilityEncoding
from unet_core.infer.instances import (
    AUTO,
    MASK_THRESHOLD,
    SEED_EROSION_PX,
    SEED_THRESHOLD,
    WATERSHED_HALO_PX,
    InstanceMethod,
    SeedRule,
    auto_h_px,
    auto_min_object_px,
    distance_seed_mask,
    flood,
    flood_height,
    label_unflooded,
    mask_distance,
    seed_mask,
)
from unet_core.infer.part_store import Part, open_parts
from unet_core.infer.tiling import Tiling
from unet_core.io.ngff import IMAGE_LABEL, PyramidWriter, create_array, label_group, open_stack

log = logging.getLogger(__name__)

CELL_CLASS = 1
PREDICTION_FORMAT = "unet-pipeline/prediction/1"
TIFF_GENERATOR = "unet merge"
#: How 'unet merge' recognises its own outputs (:mod:`unet_core.common.outputs`): the probability
#: pyramid and the segmentation's and instances' label pyramids, nothing else.
PREDICTION_MARK = ZarrMark("merge", Layout(("", "[0-9]*", "labels", *(f"labels/{name}{level}" for name in (
    "segmentation", "instances") for level in ("", "/[0-9]*")))))
TIFF_MARK = TiffMark(TIFF_GENERATOR)
SEGMENTATION_RULE = "segmentation = argmax of the class probabilities (ties -> lower class index)"
INSTANCE_RULES = {
    (InstanceMethod.WATERSHED, SeedRule.THRESHOLD): (
        "instances = seeded watershed of P(class 1) per slice (seeds: P > {seed_threshold} eroded by "
        "{seed_erosion_px} px; mask: P > {mask_threshold}; block-wise with a {halo_px} px halo)"
    ),
    (InstanceMethod.WATERSHED, SeedRule.DISTANCE): (
        "instances = seeded watershed of the distance transform of the mask P(class 1) > {mask_threshold} per "
        "slice (seeds: its h-maxima of depth h = {h_px:.3f} px after Gaussian smoothing; flooding in order of "
        "decreasing distance; block-wise with a {halo_px} px halo)"
    ),
    InstanceMethod.COMPONENTS: (
        "instances = 4-connected components of class 1 (cell interior) per slice, merged across block borders"
    ),
}


def instance_rule(instances: InstanceMethod, watershed: WatershedSettings) -> str:
    """The sentence that says how a prediction's cells were made (stored in its attributes)."""
    if instances is InstanceMethod.COMPONENTS:
        return INSTANCE_RULES[instances]
    return INSTANCE_RULES[(instances, watershed.seeds)].format(**asdict(watershed))


class TiffContent(str, Enum):
    """What ``unet merge --tiff`` exports."""

    SEGMENTATION = "segmentation"  # uint8 argmax class
    INSTANCES = "instances"  # uint32 instance ids
    CELL_PROBABILITY = "cell-probability"  # float32 P(cell)


# -- core: labels ----------------------------------------------------------------------------
class UnionFind:
    """Disjoint sets over ids 0..n-1 (growable); the root of a set is its smallest id."""

    def __init__(self) -> None:
        self.parent: list[int] = [0]  # id 0 = background, never joined

    @property
    def next_id(self) -> int:
        """The id the next :meth:`add` returns first."""
        return len(self.parent)

    def add(self, n: int) -> int:
        """Append ``n`` singleton sets; returns the first new id."""
        first = self.next_id
        self.parent.extend(range(first, first + n))
        return first

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def final_ids(self) -> np.ndarray:
        """uint32 map of each id to 1..K (0 -> 0), numbering sets in order of their smallest id."""
        roots = np.asarray(self.parent, dtype=np.int64)
        for i in np.flatnonzero(roots != np.arange(len(roots))):  # parent < i: ascending pass resolves
            roots[i] = roots[roots[i]]
        is_root = roots == np.arange(len(roots))
        is_root[0] = False
        out = np.cumsum(is_root)[roots]
        out[0] = 0
        if out.max() >= 2**32:
            raise ValueError("more than 2**32 - 1 instances")
        return out.astype(np.uint32)


class InstanceMerger:
    """Blockwise connected components with union-find over block faces.

    Feed blocks of each slice in raster order of ``(by, bx)`` with :meth:`add_block`; it
    returns provisional ids. After the last block, :meth:`final_ids` maps provisional ids to
    the final ones. Pixel counts of the provisional ids are kept on the way, so final object
    areas need no further pass over the pixels. Memory: one row of block edges per slice plus
    one count per provisional id.
    """

    def __init__(self) -> None:
        self.sets = UnionFind()
        self.areas = np.zeros(1, np.int64)  # pixels per provisional id
        self._below: dict[int, np.ndarray] = {}  # bx -> last row of the block above
        self._right: np.ndarray | None = None  # last column of the block to the left
        self._z: int | None = None

    def add_block(self, index: tuple[int, int, int], mask: np.ndarray) -> np.ndarray:
        """Label one block.

        Args:
            index: ``(z, by, bx)`` of the block; blocks of a slice in raster order.
            mask: (Y, X) bool, True = cell.

        Returns:
            (Y, X) int64 provisional ids (0 = not cell).
        """
        local, n = ndimage.label(mask)
        first = self.sets.add(n)
        ids = np.where(local > 0, local.astype(np.int64) + (first - 1), 0)
        self.join_faces(index, ids)
        self.count(ids)
        return ids

    def count(self, ids: np.ndarray) -> None:
        """Add the pixels of each provisional id in ``ids`` (0 ignored) to its area."""
        counts = np.bincount(ids.ravel())
        if counts.size > self.areas.size:
            self.areas = np.concatenate([self.areas, np.zeros(counts.size - self.areas.size, np.int64)])
        self.areas[: counts.size] += counts

    def final_areas(self, final: np.ndarray) -> np.ndarray:
        """Pixels of each final id (index = final id) for the lookup table ``final``."""
        areas = np.zeros(final.size, np.int64)
        areas[: self.areas.size] = self.areas[: final.size]
        return np.bincount(final, weights=areas, minlength=int(final.max(initial=0)) + 1).astype(np.int64)

    def join_faces(self, index: tuple[int, int, int], ids: np.ndarray, *, fixed_below: int = 0) -> None:
        """Union the ids of ``ids`` with those they touch across the faces of earlier blocks.

        Pairs of two ids both ``<= fixed_below`` (sets that must stay apart) are not joined.
        """
        z, by, bx = index
        if z != self._z:
            self._z, self._below = z, {}
        if bx == 0:
            self._right = None
        above = self._below.get(bx) if by > 0 else None
        for edge, mine in ((above, ids[0, :]), (self._right, ids[:, 0])):
            if edge is None:
                continue
            both = (edge > 0) & (mine > 0) & ((edge > fixed_below) | (mine > fixed_below))
            for a, b in set(zip(edge[both].tolist(), mine[both].tolist())):
                self.sets.union(a, b)
        self._below[bx] = ids[-1, :].copy()
        self._right = ids[:, -1].copy()

    def final_ids(self) -> np.ndarray:
        """uint32 lookup table: provisional id -> final id."""
        return self.sets.final_ids()


def watershed_blockwise(
    prob: Any,
    out: Any,
    scratch: Any,
    *,
    shape: tuple[int, int, int],
    block_px: int,
    halo_px: int = WATERSHED_HALO_PX,
    seed_threshold: float = SEED_THRESHOLD,
    seed_erosion_px: int = SEED_EROSION_PX,
    mask_threshold: float = MASK_THRESHOLD,
    seeds: SeedRule | str = SeedRule.THRESHOLD,
    h_px: float | None = None,
    desc: str = "merge: instances",
) -> tuple[np.ndarray, InstanceMerger]:
    """Seeded-watershed instances of every slice, one block (plus halo) at a time.

    The block-wise form of :func:`unet_core.infer.instances.seeded_watershed` (``seeds``
    ``threshold``) and :func:`unet_core.infer.instances.distance_seeded_watershed` (``distance``):

    1. Seeds: each block's seed pixels from its window grown by ``seed_erosion_px`` (threshold:
       exactly the whole slice's seeds) or by ``halo_px`` (distance: the whole slice's seeds on
       every object smaller than the halo), numbered as 4-connected components across block faces.
    2. Flooding: each block is flooded within its window grown by ``halo_px`` from the seeds
       in that window (in order of decreasing P, or of decreasing distance to the mask's edge). A
       pixel gets the whole slice's label whenever the flood that reaches it in the whole slice
       stays inside the window, i.e. when cells are smaller than the halo.
    3. Mask pixels no seed reached become components of their own, joined across block faces
       to each other and to a seeded region they touch (as flooding the whole slice would).

    The final numbering is left to the caller (merge applies it while writing the pyramid, so
    level 0 is not read and written twice): ``out`` holds provisional ids.

    Args:
        prob: ``prob[z, ys, xs]`` -> (Y, X) P(cell) (a NumPy or Zarr view).
        out: ``out[z, ys, xs]`` read/write uint32 provisional labels, 0 = background.
        scratch: like ``out``, for the provisional seed ids.
        shape: (Z, Y, X).
        block_px: block edge, px.
        halo_px: flooding (and distance-seed) context around each block, px.
        seeds: the seed rule (:class:`unet_core.infer.instances.SeedRule`).
        h_px: depth of the distance seeds, px (``seeds`` ``distance`` only).

    Returns:
        ``(final, merger)``: the uint32 lookup table provisional id -> final id (ids 1..K over the
        whole stack: seeds in raster order of their first block, then the unseeded components;
        0 -> 0), and the merger that counted the provisional areas.
    """
    rule = _SeedRuleSettings(SeedRule(seeds), seed_threshold, seed_erosion_px, mask_threshold, h_px)
    whole = Box.from_shape(shape)
    grid = [((b.offset[0], b.offset[1] // block_px, b.offset[2] // block_px), b)
            for b in chunk_grid(shape, (1, block_px, block_px))]
    seed_sets = InstanceMerger()
    margin = halo_px if rule.seeds is SeedRule.DISTANCE else seed_erosion_px
    for index, block in progress(grid, desc=f"{desc} (seeds)", unit="block"):
        window = block.grow((0, margin, margin)).intersect(whole)
        core = _plane(block.relative_to(window))
        mask = rule.seed_pixels(np.asarray(prob[_at(window)], dtype=np.float32))[core]
        scratch[_at(block)] = _as_uint32(seed_sets.add_block(index, mask))
    seed_ids = seed_sets.final_ids()
    n_seeds = int(seed_ids.max(initial=0))

    faces = InstanceMerger()
    faces.sets.add(n_seeds)  # ids 1..n_seeds are the seeds, never joined to each other
    for index, block in progress(grid, desc=f"{desc} (flood)", unit="block"):
        window = block.grow((0, halo_px, halo_px)).intersect(whole)
        core = _plane(block.relative_to(window))
        p = np.asarray(prob[_at(window)], dtype=np.float32)
        labels = rule.flood(p, seed_ids[np.asarray(scratch[_at(window)])])[core].astype(np.int64)
        # the unseeded components take the next free ids, then get their sets
        faces.sets.add(label_unflooded(labels, p[core] > mask_threshold, first_id=faces.sets.next_id))
        faces.join_faces(index, labels, fixed_below=n_seeds)
        faces.count(labels)
        out[_at(block)] = _as_uint32(labels)
    return faces.final_ids(), faces


@dataclass(frozen=True)
class _SeedRuleSettings:
    """One seed rule with its numbers, applied to a window of P(cell)."""

    seeds: SeedRule
    seed_threshold: float
    seed_erosion_px: int
    mask_threshold: float
    h_px: float | None

    def __post_init__(self) -> None:
        if self.seeds is SeedRule.DISTANCE and not (self.h_px is not None and self.h_px > 0):
            raise UserInputError(f"watershed seeds 'distance' need a depth h > 0 px, got {self.h_px}")

    def seed_pixels(self, p: np.ndarray) -> np.ndarray:
        """(Y, X) bool seed pixels of a window of P(cell)."""
        if self.seeds is SeedRule.THRESHOLD:
            return seed_mask(p, seed_threshold=self.seed_threshold, seed_erosion_px=self.seed_erosion_px,
                             mask_threshold=self.mask_threshold)
        mask = p > self.mask_threshold
        return distance_seed_mask(mask_distance(mask), mask, h_px=self.h_px)

    def flood(self, p: np.ndarray, markers: np.ndarray) -> np.ndarray:
        """(Y, X) int32 labels of a window flooded from ``markers`` within the mask."""
        if self.seeds is SeedRule.THRESHOLD:
            return flood(p, markers, mask_threshold=self.mask_threshold)
        mask = p > self.mask_threshold
        return flood_height(mask_distance(mask), markers, mask=mask)


def _at(box: Box) -> tuple:
    """Index of a (1, Y, X) box's plane in a (Z, Y, X) array: ``(z, ys, xs)``."""
    zs, ys, xs = box.to_slices()
    return (zs.start, ys, xs)


def _plane(box: Box) -> tuple[slice, slice]:
    """The (Y, X) slices of a (1, Y, X) box."""
    return box.to_slices()[1:]


def drop_small(final: np.ndarray, areas: np.ndarray, *, min_px: int) -> np.ndarray:
    """The lookup table ``final`` with objects of fewer than ``min_px`` pixels sent to background
    and the rest renumbered 1..K' in their order (``min_px`` 0: unchanged)."""
    if min_px <= 0:
        return final
    keep = areas >= min_px
    keep[0] = False
    renumber = np.cumsum(keep).astype(np.uint32) * keep
    return renumber[final]


def _as_uint32(ids: np.ndarray) -> np.ndarray:
    if ids.size and ids.max() >= 2**32:
        raise ValueError("more than 2**32 - 1 provisional instance ids")
    return ids.astype(np.uint32)


# -- I/O ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergeSummary:
    blocks: int
    instances: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class WatershedSettings:
    """Seed rule, seeds, mask and block halo of the seeded watershed (see :mod:`unet_core.infer.instances`).

    Attributes:
        seeds: ``threshold`` (P > ``seed_threshold`` eroded by ``seed_erosion_px``) or
            ``distance`` (h-maxima of depth ``h_px`` of the mask's smoothed distance transform).
        h_px: depth of the distance seeds, px, or ``"auto"`` (0.15 x the median object radius of
            the model's training labels, resolved by :meth:`resolved`).
    """

    seed_threshold: float = SEED_THRESHOLD
    seed_erosion_px: int = SEED_EROSION_PX
    mask_threshold: float = MASK_THRESHOLD
    halo_px: int = WATERSHED_HALO_PX
    seeds: SeedRule = SeedRule.THRESHOLD
    h_px: float | str = AUTO

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", parse_choice(SeedRule, self.seeds, option="--seeds"))
        if not 0.0 <= self.seed_threshold < 1.0 or self.seed_erosion_px < 0 or self.halo_px < 0:
            raise UserInputError(
                f"watershed settings: need 0 <= seed threshold < 1 and erosion, halo >= 0 px "
                f"(got {self.seed_threshold}, {self.seed_erosion_px}, {self.halo_px})"
            )
        if self.h_px != AUTO and not (isinstance(self.h_px, int | float) and 0 < self.h_px < float("inf")):
            raise UserInputError(f"--seed-h-px {self.h_px!r}: must be a number of px > 0 or 'auto'")

    def resolved(self, median_area_px: float | None, *, where: str) -> WatershedSettings:
        """The settings with ``h_px: auto`` replaced by its value where the distance rule needs it.

        Raises:
            UserInputError: ``auto`` needed without a median object area (names ``where``).
        """
        if self.seeds is not SeedRule.DISTANCE or self.h_px != AUTO:
            return self
        return replace(self, h_px=auto_h_px(_need_area(median_area_px, "--seed-h-px", where)))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seeds": self.seeds.value}


def _need_area(median_area_px: float | None, option: str, where: str) -> float:
    """The model's median object area, or a one-line error for ``option auto`` without one."""
    if median_area_px is None:
        raise UserInputError(
            f"{where}: {option} auto scales with the median object area of the model's training labels, but "
            "the model that predicted these parts does not store one (trained before it was measured); "
            f"give {option} a number or retrain the model")
    return float(median_area_px)


def resolve_min_object_px(min_object_px: int | str, median_area_px: float | None, *, where: str) -> int:
    """``min_object_px`` as a number of px: ``auto`` is 5 % of the model's median object area."""
    if min_object_px == AUTO:
        return auto_min_object_px(_need_area(median_area_px, "--min-object-px", where))
    if isinstance(min_object_px, bool) or not isinstance(min_object_px, int) or min_object_px < 0:
        raise UserInputError(f"--min-object-px {min_object_px!r}: must be an integer >= 0 or 'auto'")
    return min_object_px


@dataclass
class _Outputs:
    """The three multiscale images of a prediction store, each written block by block."""

    probabilities: PyramidWriter
    segmentation: PyramidWriter
    instances: PyramidWriter

    @classmethod
    def create(cls, root: zarr.Group, tiling: Tiling, scale: tuple[float, ...], unit: str | None,
               encoding: ProbabilityEncoding) -> _Outputs:
        b, shape = tiling.block_px, tiling.shape

        def pyramid(group: zarr.Group, dtype, name: str, *, labels: bool) -> PyramidWriter:
            axes, lead = ("czyx", (tiling.spec.n_classes,)) if name == "probabilities" else ("zyx", ())
            return PyramidWriter(group, (*lead, *shape), dtype, (*(1,) * len(lead), 1, b, b),
                                 ((1.0,) * len(lead)) + scale, unit=unit, axes=axes, labels=labels, name=name,
                                 downscale_chunks=True)

        return cls(pyramid(root, encoding.dtype, "probabilities", labels=False),
                   pyramid(label_group(root, "segmentation"), np.uint8, "segmentation", labels=True),
                   pyramid(label_group(root, "instances"), np.uint32, "instances", labels=True))

    def finish(self) -> None:
        self.probabilities.finish()
        for pyr in (self.segmentation, self.instances):
            pyr.finish(IMAGE_LABEL)

    def close(self) -> None:
        for pyr in (self.probabilities, self.segmentation, self.instances):
            pyr.close()


def merge_parts(
    parts: Sequence[str | os.PathLike[str]],
    *,
    stack: str | os.PathLike[str],
    out: str | os.PathLike[str],
    tiff: str | os.PathLike[str] | None = None,
    tiff_content: TiffContent | str = TiffContent.SEGMENTATION,
    instances: InstanceMethod | str = InstanceMethod.COMPONENTS,
    watershed: WatershedSettings = WatershedSettings(),
    cells: str | os.PathLike[str] | None = None,
    min_object_px: int | str = 0,
) -> MergeSummary:
    """Merge the part stores of all jobs of one ``unet predict`` run into ``out``.

    Args:
        parts: the part stores of jobs 0..N-1 (any order).
        stack: the predicted stack (for scale, unit and a consistency check).
        out: the prediction ``.ome.zarr`` (written atomically; replaces an old one).
        tiff: optional TIFF file to export, (Z, Y, X), written atomically.
        tiff_content: what the TIFF holds (:class:`TiffContent`).
        instances: ``watershed`` (seeded watershed of P(cell), :func:`watershed_blockwise`)
            or ``components`` (connected components of the argmax cell class).
        watershed: the watershed's seed rule, seeds, mask and block halo (``h_px: auto`` is
            resolved from the median object area the parts' model stores).
        cells: optional CSV file for the table of cells (:mod:`unet_core.infer.cells`).
        min_object_px: instances of fewer pixels (after merging across blocks) become
            background: specks the network leaves at membranes and image borders. ``auto``:
            5 % of the median object area of the model's training labels.

    Raises:
        UserInputError: bad parts (see :func:`unet_core.infer.part_store.open_parts`), a stack
            they were not made from, or bad instance settings.
    """
    tiff_content = parse_choice(TiffContent, tiff_content, option="--tiff-content")
    instances = parse_choice(InstanceMethod, instances, option="--instances")
    claim_outputs([(out, PREDICTION_MARK), (tiff, TIFF_MARK), (cells, CELLS_MARK)], [*parts, stack])
    part_list, tiling = open_parts(parts)
    st = open_stack(stack)
    if tuple(st.shape) != tiling.shape:
        raise UserInputError(
            f"{stack}: shape {st.shape} differs from the predicted stack's {tiling.shape} "
            f"({part_list[0].settings['stack']}); pass the stack the parts were predicted from"
        )
    st.check_made_from(part_list[0].settings.get("intensity"), result=part_list[0].path)
    encoding = ProbabilityEncoding(part_list[0].settings["probabilities"])
    area = part_list[0].settings.get("median_object_area_px")
    min_object_px = resolve_min_object_px(min_object_px, area, where=str(parts[0]))
    if instances is InstanceMethod.WATERSHED:
        watershed = watershed.resolved(area, where=str(parts[0]))
    # the TIFF and the cell table are written from the finished temporary store, before it is put
    # in place: a run that fails on any of them (a full disk) leaves none of its outputs
    with atomic_output_with_companions(out, own=PREDICTION_MARK) as (tmp, written):
        root = zarr.open_group(tmp, mode="w")
        outputs = _Outputs.create(root, tiling, tuple(float(s) for s in st.scale), st.unit, encoding)
        try:
            table = _write_levels(outputs, part_list, tiling, tmp, instances=instances,
                                  watershed=watershed, encoding=encoding, min_object_px=min_object_px,
                                  image=st.image if cells is not None else None)
        except BaseException:
            outputs.close()
            raise
        outputs.finish()
        n_instances = table.n_cells
        root.attrs.update({"unet": {**_provenance(part_list, instances, watershed, n_instances, encoding),
                                    "min_object_px": min_object_px, "median_object_area_px": area}})
        if tiff is not None:
            export_tiff(tmp, tiff, content=tiff_content)
            written.append(Path(tiff))
        if cells is not None:
            write_cells_csv(cells, table, pixel_um=(float(st.scale[-2]), float(st.scale[-1])))
            written.append(Path(cells))
    summary = MergeSummary(tiling.n_blocks, n_instances, tiling.shape)
    log.info("merged %d parts, %d blocks into %s: %d instances", len(part_list), summary.blocks, out, n_instances)
    return summary


def _write_levels(outputs: _Outputs, parts: list[Part], tiling: Tiling, tmp: Path, *,
                  instances: InstanceMethod, watershed: WatershedSettings, encoding: ProbabilityEncoding,
                  image: zarr.Array | None, min_object_px: int) -> CellTable:
    """Pass 1: copy probabilities and segmentation, write provisional instance ids (components, or
    the block-wise watershed afterwards); pass 2: the final ids into the instance pyramid, and
    the cell statistics where ``image`` (the stack's raw level 0) is given.

    Returns:
        The cell table (its ``n_cells`` is the number of instances; empty without ``image``).
    """
    owner = {block.index: part for part in parts for block in tiling.job_blocks(part.job, part.settings["jobs"])}
    sources = {part.job: (part.store.probabilities(), part.store.segmentation()) for part in parts}
    merger = InstanceMerger()
    level0 = outputs.instances.arrays[0]
    blocks = list(tiling.blocks())
    for block in progress(blocks, desc="merge: probabilities", unit="block"):
        z = block.write.offset[0]
        probabilities, segmentation = sources[owner[block.index].job]
        outputs.probabilities.write_block((slice(None), z), block.plane.offset,
                                          np.asarray(probabilities[(slice(None), *block.write.to_slices())])[:, 0])
        seg = np.asarray(segmentation[block.write.to_slices()])[0]
        outputs.segmentation.write_block((z,), block.plane.offset, seg)
        if instances is InstanceMethod.COMPONENTS:
            level0[(z, *block.plane.to_slices())] = merger.add_block(block.index, seg == CELL_CLASS).astype(np.uint32)
    outputs.probabilities.flush()
    if instances is InstanceMethod.COMPONENTS:
        final = merger.final_ids()
    else:
        cells = _CellView(outputs.probabilities.arrays[0], encoding)
        final, merger = _watershed_store(tmp, cells, level0, tiling, watershed)
    final = drop_small(final, merger.final_areas(final), min_px=min_object_px)
    table = CellTable(int(final.max(initial=0)))
    for block in progress(blocks, desc="merge: instance pyramid", unit="block"):
        z = block.write.offset[0]
        ids = final[level0[(z, *block.plane.to_slices())]]
        outputs.instances.write_block((z,), block.plane.offset, ids)
        if image is not None:
            table.add_block(z, block.plane.offset, ids, np.asarray(image[block.write.to_slices()])[0])
    return table


def _provenance(parts: list[Part], instances: InstanceMethod, watershed: WatershedSettings,
                n_instances: int, encoding: ProbabilityEncoding) -> dict[str, Any]:
    """``attrs["unet"]`` of a prediction store."""
    ref = parts[0].settings
    ws = watershed.to_dict()
    if instances is InstanceMethod.WATERSHED:
        ws["as_stored"] = {"mask": encoding.code_threshold(watershed.mask_threshold)}
        if watershed.seeds is SeedRule.THRESHOLD:
            ws["as_stored"]["seed"] = encoding.code_threshold(watershed.seed_threshold)
    return {
        "stage": "merge", "format": PREDICTION_FORMAT, "version": __version__, "source": ref["stack"],
        "model_sha256": ref["model_sha256"], "tiling": ref["tiling"], "tta": ref["tta"],
        "precision": ref["precision"], "logit_offsets": ref.get("logit_offsets"),
        "devices": sorted({p.settings["device"] for p in parts}),
        "intensity": ref["intensity"], "intensity_normalisation": ref["intensity_normalisation"],
        "decision_rule": f"{SEGMENTATION_RULE}; {instance_rule(instances, watershed)}",
        "cell_class": CELL_CLASS, "instances": n_instances,
        "instance_method": instances.value, "watershed": ws if instances is InstanceMethod.WATERSHED else None,
        "probability_axes": "czyx", "probabilities": encoding.value,
        "probability_encoding": encoding.description,
    }


class _CellView:
    """``view[z, ys, xs]`` -> float32 P(cell), decoded from a stored (C, Z, Y, X) probability array."""

    def __init__(self, probabilities: zarr.Array, encoding: ProbabilityEncoding) -> None:
        self.probabilities, self.encoding = probabilities, encoding

    def __getitem__(self, key: tuple) -> np.ndarray:
        return self.encoding.decode(np.asarray(self.probabilities[(CELL_CLASS, *key)]))


def _watershed_store(tmp: Path, cells: _CellView, labels: zarr.Array, tiling: Tiling,
                     ws: WatershedSettings) -> tuple[np.ndarray, InstanceMerger]:
    """Run :func:`watershed_blockwise` from the written probabilities into ``labels`` (level 0,
    provisional ids); returns its final-id lookup table."""
    scratch_group = zarr.open_group(Path(tmp) / "_scratch", mode="w")  # inside the atomic temporary
    try:
        scratch = create_array(scratch_group, "seeds", shape=tiling.shape, dtype=np.uint32,
                               chunks=(1, tiling.block_px, tiling.block_px))
        return watershed_blockwise(
            cells, labels, scratch, shape=tiling.shape, block_px=tiling.block_px,
            halo_px=ws.halo_px, seed_threshold=ws.seed_threshold,
            seed_erosion_px=ws.seed_erosion_px, mask_threshold=ws.mask_threshold, seeds=ws.seeds,
            h_px=ws.h_px if ws.seeds is SeedRule.DISTANCE else None,
        )
    finally:
        shutil.rmtree(Path(tmp) / "_scratch", ignore_errors=True)


def export_tiff(
    prediction: str | os.PathLike[str], path: str | os.PathLike[str], *,
    content: TiffContent | str = TiffContent.SEGMENTATION,
) -> None:
    """Write one level-0 array of a merged prediction as a (Z, Y, X) TIFF, one slice at a time.

    Args:
        prediction: the merged ``.ome.zarr``.
        path: the TIFF file (written atomically; an earlier ``unet merge`` TIFF there is
            replaced, anything else refused). Its first ImageDescription is JSON with
            ``generator`` = ``unet merge`` (the mark, :mod:`unet_core.common.outputs`).
        content: what to write (:class:`TiffContent`).
    """
    content = parse_choice(TiffContent, content, option="--tiff-content")
    root = zarr.open_group(prediction, mode="r")
    if content is TiffContent.CELL_PROBABILITY:
        arr = root["0"]
        encoding = ProbabilityEncoding.of(arr.dtype)

        def pick(z: int) -> np.ndarray:
            return encoding.decode(np.asarray(arr[CELL_CLASS, z]))
    else:
        arr = root["labels"][content.value]["0"]

        def pick(z: int) -> np.ndarray:
            return np.asarray(arr[z])
    meta = {"generator": TIFF_GENERATOR, "version": __version__, "content": content.value}
    with atomic_output(path, own=TIFF_MARK) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for z in range(arr.shape[-3]):
            # the mark goes into the first page's description (tifffile keeps its shape current)
            tif.write(pick(z), contiguous=True, compression=None, photometric="minisblack", metadata=meta)
            meta = None
