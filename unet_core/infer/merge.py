"""The gather: merge the part stores of all predict jobs into one OME-Zarr prediction.

Output (``prediction.ome.zarr``, NGFF 0.5 on Zarr v3)::

    prediction.ome.zarr/       attrs["ome"]["multiscales"] (axes c, z, y, x), attrs["unet"]
      0, 1, ...                float32 (C, Z, Y, X) class probabilities; level k is 2**k
                               coarser in y and x (2x2 mean); chunks (1, 1, B/2**k, B/2**k)
      labels/segmentation/0..  uint8 (Z, Y, X) argmax class (ties -> lower class index)
      labels/instances/0..     uint32 (Z, Y, X) cell instances per slice, 0 = not cell, ids 1..K
                               over the whole stack: a seeded watershed of P(cell) (``instances="watershed"``;
                               :func:`watershed_blockwise`) or 4-connected components of the
                               argmax cell class merged across block borders (default)

Everything is processed one block at a time (memory bounded by the block size plus halo):
pass 1 copies probabilities and writes the segmentation (and, for components, *provisional*
ids of each block labelled on its own, recording which ids touch across block faces; a
union-find over those pairs gives the final ids). The watershed runs block by block over the
written probabilities (see :func:`watershed_blockwise`). The last pass relabels and writes the
pyramid. The result depends only on the blocks, never on how many jobs computed them or in
which order, so 1 job and K jobs give byte-identical stores.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from scipy import ndimage

from unet_core import __version__
from unet_core.common.atomic import atomic_output
from unet_core.common.errors import UserInputError
from unet_core.infer.instances import MASK_THRESHOLD, SEED_EROSION_PX, SEED_THRESHOLD, WATERSHED_HALO_PX, flood, seed_mask
from unet_core.common.progress import progress
from unet_core.infer.tiling import Block, Tiling

log = logging.getLogger(__name__)

CELL_CLASS = 1
SEGMENTATION_RULE = "segmentation = argmax of the class probabilities (ties -> lower class index)"
INSTANCE_RULES = {
    "watershed": (
        "instances = seeded watershed of P(class 1) per slice (seeds: P > {seed_threshold} eroded by "
        "{seed_erosion_px} px; mask: P > {mask_threshold}; block-wise with a {halo_px} px halo)"
    ),
    "components": "instances = 4-connected components of class 1 (cell interior) per slice, merged across block borders",
}
INSTANCE_METHODS = tuple(INSTANCE_RULES)
TIFF_CONTENTS = ("segmentation", "instances", "cell-probability")


# -- core: labels ----------------------------------------------------------------------------
def segment(probs: np.ndarray) -> np.ndarray:
    """Argmax decision: (C, ...) float probabilities -> (...) uint8 class index."""
    if probs.shape[0] > 256:
        raise ValueError(f"{probs.shape[0]} classes do not fit uint8")
    return np.argmax(probs, axis=0).astype(np.uint8)


class UnionFind:
    """Disjoint sets over ids 0..n-1 (growable); the root of a set is its smallest id."""

    def __init__(self) -> None:
        self.parent: list[int] = [0]  # id 0 = background, never joined

    def add(self, n: int) -> int:
        """Append ``n`` singleton sets; returns the first new id."""
        first = len(self.parent)
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
    the final ones. Memory: one row of block edges per slice.
    """

    def __init__(self) -> None:
        self.sets = UnionFind()
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
        return ids

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


def label_blockwise(mask: np.ndarray, *, block_px: int) -> np.ndarray:
    """4-connected components of a (Z, Y, X) or (Y, X) bool mask per slice, computed block by block.

    Equals ``scipy.ndimage.label`` per slice up to the numbering; exists to test the merge.

    Returns:
        uint32 labels, same shape; ids unique over the whole array.
    """
    vol = mask[None] if mask.ndim == 2 else mask
    merger = InstanceMerger()
    out = np.zeros(vol.shape, np.int64)
    for z in range(vol.shape[0]):
        for by in range(0, vol.shape[1], block_px):
            for bx in range(0, vol.shape[2], block_px):
                sl = (z, slice(by, by + block_px), slice(bx, bx + block_px))
                out[sl] = merger.add_block((z, by // block_px, bx // block_px), vol[sl])
    out = merger.final_ids()[out]
    return out[0] if mask.ndim == 2 else out


def _raster_blocks(shape: tuple[int, int, int], block_px: int) -> Iterator[tuple[tuple[int, int, int], tuple[slice, slice]]]:
    """``((z, by, bx), (ys, xs))`` of a regular block grid, slices in raster order."""
    n_z, n_y, n_x = shape
    for z in range(n_z):
        for by, y0 in enumerate(range(0, n_y, block_px)):
            for bx, x0 in enumerate(range(0, n_x, block_px)):
                yield (z, by, bx), (slice(y0, min(y0 + block_px, n_y)), slice(x0, min(x0 + block_px, n_x)))


def _grow(ys: slice, xs: slice, halo: int, shape: tuple[int, int, int]) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """The window ``(ys, xs)`` grown by ``halo`` px (clipped to the plane) and the block inside it."""
    wy = slice(max(0, ys.start - halo), min(shape[1], ys.stop + halo))
    wx = slice(max(0, xs.start - halo), min(shape[2], xs.stop + halo))
    core = (slice(ys.start - wy.start, ys.stop - wy.start), slice(xs.start - wx.start, xs.stop - wx.start))
    return (wy, wx), core


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
    desc: str = "merge: instances",
) -> int:
    """Seeded-watershed instances of every slice, one block (plus halo) at a time.

    The block-wise form of :func:`unet_core.infer.instances.seeded_watershed`:

    1. Seeds: each block's seed pixels from its window grown by ``seed_erosion_px`` (exactly
       the whole slice's seeds), numbered as 4-connected components across block faces.
    2. Flooding: each block is flooded within its window grown by ``halo_px`` from the seeds
       in that window. A pixel gets the whole slice's label whenever the flood that reaches it
       in the whole slice stays inside the window, i.e. when cells are smaller than the halo.
    3. Mask pixels no seed reached become components of their own, joined across block faces
       to each other and to a seeded region they touch (as flooding the whole slice would).

    Args:
        prob: ``prob[z, ys, xs]`` -> (Y, X) P(cell) (a NumPy or Zarr view).
        out: ``out[z, ys, xs]`` read/write uint32 labels, 0 = background; the result.
        scratch: like ``out``, for the provisional seed ids.
        shape: (Z, Y, X).
        block_px: block edge, px.
        halo_px: flooding context around each block, px.

    Returns:
        The number of instances; ids are 1..K over the whole stack (seeds in raster order of
        their first block, then the unseeded components).
    """
    seeds = InstanceMerger()
    for index, (ys, xs) in progress(list(_raster_blocks(shape, block_px)), desc=f"{desc} (seeds)", unit="block"):
        (wy, wx), core = _grow(ys, xs, seed_erosion_px, shape)
        mask = seed_mask(np.asarray(prob[index[0], wy, wx]), seed_threshold=seed_threshold,
                         seed_erosion_px=seed_erosion_px, mask_threshold=mask_threshold)[core]
        scratch[index[0], ys, xs] = _as_uint32(seeds.add_block(index, mask))
    seed_ids = seeds.final_ids()
    n_seeds = int(seed_ids.max(initial=0))

    faces = InstanceMerger()
    faces.sets.add(n_seeds)  # ids 1..n_seeds are the seeds, never joined to each other
    for index, (ys, xs) in progress(list(_raster_blocks(shape, block_px)), desc=f"{desc} (flood)", unit="block"):
        z = index[0]
        (wy, wx), core = _grow(ys, xs, halo_px, shape)
        p = np.asarray(prob[z, wy, wx], dtype=np.float32)
        labels = flood(p, seed_ids[np.asarray(scratch[z, wy, wx])], mask_threshold=mask_threshold)[core].astype(np.int64)
        orphans, n = ndimage.label((p[core] > mask_threshold) & (labels == 0))
        first = faces.sets.add(n)
        labels = np.where(orphans > 0, orphans.astype(np.int64) + (first - 1), labels)
        faces.join_faces(index, labels, fixed_below=n_seeds)
        out[z, ys, xs] = _as_uint32(labels)
    final = faces.final_ids()
    for index, (ys, xs) in _raster_blocks(shape, block_px):
        out[index[0], ys, xs] = final[np.asarray(out[index[0], ys, xs])]
    return int(final.max(initial=0))


def _as_uint32(ids: np.ndarray) -> np.ndarray:
    if ids.size and ids.max() >= 2**32:
        raise ValueError("more than 2**32 - 1 provisional instance ids")
    return ids.astype(np.uint32)


# -- I/O ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """A finished part store of one predict job."""

    path: Path
    settings: dict[str, Any]
    done: frozenset[str]

    @property
    def probabilities(self) -> zarr.Array:
        return zarr.open_array(self.path / "probabilities", mode="r")


def open_parts(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[Part], Tiling]:
    """Open and cross-check part stores: complete, same run settings, jobs 0..N-1 each once.

    Raises:
        UserInputError: a missing or unfinished part, parts of different runs, a missing job.
    """
    from unet_core.infer.predict import PART_FORMAT, iter_done_blocks

    if not paths:
        raise UserInputError(
            "no part stores given (pass the OUT_PART directories of all 'unet predict' jobs)"
        )
    parts = []
    for p in map(Path, paths):
        manifest = p / "part.json"
        if not manifest.is_file():
            raise UserInputError(f"{p}: not a 'unet predict' part store (no part.json)")
        settings = json.loads(manifest.read_text())
        if settings.get("format") != PART_FORMAT:
            raise UserInputError(f"{p}: unknown part format {settings.get('format')!r}")
        if not (p / "COMPLETE").is_file():
            raise UserInputError(f"{p}: job {settings['job']} did not finish; rerun 'unet predict' for it")
        parts.append(Part(p, settings, frozenset(iter_done_blocks(p))))
    run_keys = ("stack", "shape", "model_sha256", "tiling", "jobs", "tta", "precision", "intensity",
                "logit_offsets")
    ref = parts[0].settings
    for part in parts[1:]:
        diff = [k for k in run_keys if part.settings.get(k) != ref.get(k)]
        if diff:
            raise UserInputError(
                f"{part.path}: from another run than {parts[0].path} (differs in {', '.join(diff)})"
            )
    jobs = ref["jobs"]
    seen = sorted(part.settings["job"] for part in parts)
    if seen != list(range(jobs)):
        missing = sorted(set(range(jobs)) - set(seen))
        dup = sorted({j for j in seen if seen.count(j) > 1})
        problems = [f"missing job(s) {missing}"] if missing else []
        problems += [f"job(s) {dup} given twice"] if dup else []
        raise UserInputError(f"parts of a {jobs}-job run: {'; '.join(problems)}; pass each job's part once")
    parts.sort(key=lambda part: part.settings["job"])
    tiling = Tiling.from_dict(ref["tiling"])
    for part in parts:
        want = {b.name for b in tiling.job_blocks(part.settings["job"], jobs)}
        if missing := sorted(want - part.done):
            raise UserInputError(
                f"{part.path}: {len(missing)} block(s) not finished (e.g. {missing[0]}); rerun its job"
            )
    return parts, tiling


def _level_count(tiling: Tiling) -> int:
    from unet_core.io.ngff import pyramid_levels

    b, k = tiling.block_px, 0
    while b % 2 == 0:
        b, k = b // 2, k + 1
    return max(1, min(pyramid_levels(tiling.shape), k + 1))


class _Pyramid:
    """Level arrays of one multiscale image, written block by block (block-aligned chunks)."""

    def __init__(
        self, group: zarr.Group, shape, dtype, tiling: Tiling, levels: int, *, labels: bool, axes: str
    ) -> None:
        from unet_core.io.ngff import create_array

        self.group, self.labels, self.axes, self.levels = group, labels, axes, levels
        self.arrays = []
        shape = list(shape)
        lead = len(shape) - 2
        for level in range(levels):
            edge = tiling.block_px >> level
            chunks = (1,) * lead + (edge, edge)
            self.arrays.append(create_array(group, str(level), shape=shape, dtype=dtype, chunks=chunks,
                                            dimension_names=list(axes)))
            shape[-2] //= 2
            shape[-1] //= 2

    def write(self, lead: tuple, block: Block, data: np.ndarray, *, from_level: int = 0) -> None:
        """Write (..., y, x) ``data`` of ``block`` at level ``from_level`` and all coarser levels."""
        from unet_core.io.ngff import downsample_plane

        (y0, x0) = block.plane.offset
        for level in range(from_level, self.levels):
            if level > from_level:
                data = downsample_plane(data, labels=self.labels)
            arr = self.arrays[level]
            oy, ox = y0 >> level, x0 >> level
            arr[(*lead, slice(oy, oy + data.shape[-2]), slice(ox, ox + data.shape[-1]))] = data

    def finish(self, scale, unit, name: str, extra: dict | None = None) -> None:
        from unet_core.io.ngff import NGFF_VERSION, multiscales_metadata

        ome = {"version": NGFF_VERSION,
               "multiscales": [multiscales_metadata(self.axes, scale, self.levels, unit=unit, name=name)]}
        ome.update(extra or {})
        self.group.attrs.update({"ome": ome})


@dataclass(frozen=True)
class MergeSummary:
    blocks: int
    instances: int
    shape: tuple[int, ...]


def merge_parts(
    parts: Sequence[str | os.PathLike[str]],
    *,
    stack: str | os.PathLike[str],
    out: str | os.PathLike[str],
    tiff: str | os.PathLike[str] | None = None,
    tiff_content: str = "segmentation",
    instances: str = "components",
    seed_threshold: float = SEED_THRESHOLD,
    seed_erosion_px: int = SEED_EROSION_PX,
    halo_px: int = WATERSHED_HALO_PX,
) -> MergeSummary:
    """Merge the part stores of all jobs of one ``unet predict`` run into ``out``.

    Args:
        parts: the part stores of jobs 0..N-1 (any order).
        stack: the predicted stack (for scale, unit and a consistency check).
        out: the prediction ``.ome.zarr`` (written atomically; replaces an old one).
        tiff: optional TIFF file to export, (Z, Y, X), written atomically.
        tiff_content: ``segmentation`` (uint8 classes), ``instances`` (uint32) or
            ``cell-probability`` (float32 probability of class 1).
        instances: ``watershed`` (seeded watershed of P(cell), :func:`watershed_blockwise`)
            or ``components`` (connected components of the argmax cell class).
        seed_threshold, seed_erosion_px, halo_px: the watershed's seeds and block halo.

    Raises:
        UserInputError: bad parts (see :func:`open_parts`), a stack they were not made from,
            or bad instance settings.
    """
    from unet_core.io.ngff import IMAGE_LABEL, label_group, open_stack

    if tiff is not None and tiff_content not in TIFF_CONTENTS:
        raise UserInputError(f"--tiff-content {tiff_content!r}: use one of {', '.join(TIFF_CONTENTS)}")
    if instances not in INSTANCE_METHODS:
        raise UserInputError(f"--instances {instances!r}: use one of {', '.join(INSTANCE_METHODS)}")
    if not 0.0 <= seed_threshold < 1.0 or seed_erosion_px < 0 or halo_px < 0:
        raise UserInputError(
            f"watershed settings: need 0 <= seed threshold < 1 and erosion, halo >= 0 px "
            f"(got {seed_threshold}, {seed_erosion_px}, {halo_px})"
        )
    ws = dict(seed_threshold=seed_threshold, seed_erosion_px=seed_erosion_px,
              mask_threshold=MASK_THRESHOLD, halo_px=halo_px)
    part_list, tiling = open_parts(parts)
    st = open_stack(stack)
    if tuple(st.shape) != tiling.shape:
        raise UserInputError(
            f"{stack}: shape {st.shape} differs from the predicted stack's {tiling.shape} "
            f"({part_list[0].settings['stack']}); pass the stack the parts were predicted from"
        )
    owner = {}
    for part in part_list:
        for block in tiling.job_blocks(part.settings["job"], part.settings["jobs"]):
            owner[block.index] = part
    ref = part_list[0].settings
    n_classes = tiling.spec.n_classes
    levels = _level_count(tiling)
    blocks = list(tiling.blocks())
    merger = InstanceMerger()
    with atomic_output(out) as tmp:
        root = zarr.open_group(tmp, mode="w")
        probs_pyr = _Pyramid(root, (n_classes, *tiling.shape), np.float32, tiling, levels,
                             labels=False, axes="czyx")
        seg_pyr = _Pyramid(label_group(root, "segmentation"), tiling.shape, np.uint8, tiling, levels,
                           labels=True, axes="zyx")
        inst_pyr = _Pyramid(label_group(root, "instances"), tiling.shape, np.uint32, tiling, levels,
                            labels=True, axes="zyx")
        arrays = {id(p): p.probabilities for p in part_list}
        for block in progress(blocks, desc="merge: probabilities", unit="block"):
            src = arrays[id(owner[block.index])]
            z = block.write.offset[0]
            probs = np.asarray(src[(slice(None), *block.write.to_slices())])[:, 0]
            probs_pyr.write((slice(None), z), block, probs)
            seg = segment(probs)
            seg_pyr.write((z,), block, seg)
            if instances == "components":
                ids = merger.add_block(block.index, seg == CELL_CLASS)
                inst_pyr.arrays[0][(z, *block.plane.to_slices())] = ids.astype(np.uint32)
        if instances == "components":
            final = merger.final_ids()
            n_instances = int(final.max(initial=0))
        else:
            final = None
            n_instances = _watershed_store(tmp, probs_pyr.arrays[0], inst_pyr.arrays[0], tiling, ws)
        for block in progress(blocks, desc="merge: instance pyramid", unit="block"):
            z = block.write.offset[0]
            ids = inst_pyr.arrays[0][(z, *block.plane.to_slices())]
            inst_pyr.write((z,), block, ids if final is None else final[ids])
        scale = tuple(float(s) for s in st.scale)
        probs_pyr.finish((1.0, *scale), st.unit, "probabilities")
        for name, pyr in (("segmentation", seg_pyr), ("instances", inst_pyr)):
            pyr.finish(scale, st.unit, name, IMAGE_LABEL)
        root.attrs.update({"unet": {
            "stage": "merge", "version": __version__, "source": ref["stack"],
            "model_sha256": ref["model_sha256"], "tiling": ref["tiling"], "tta": ref["tta"],
            "precision": ref["precision"], "logit_offsets": ref.get("logit_offsets"),
            "devices": sorted({p.settings["device"] for p in part_list}),
            "intensity": ref["intensity"], "intensity_normalisation": ref["intensity_normalisation"],
            "decision_rule": f"{SEGMENTATION_RULE}; {INSTANCE_RULES[instances].format(**ws)}",
            "cell_class": CELL_CLASS, "instances": n_instances,
            "instance_method": instances, "watershed": ws if instances == "watershed" else None,
            "probability_axes": "czyx",
        }})
    if tiff is not None:
        export_tiff(out, tiff, content=tiff_content)
    summary = MergeSummary(len(blocks), n_instances, tiling.shape)
    log.info("merged %d parts, %d blocks into %s: %d instances",
             len(part_list), len(blocks), out, summary.instances)
    return summary


class _CellView:
    """``view[z, ys, xs]`` -> P(cell) of a (C, Z, Y, X) probability array."""

    def __init__(self, probabilities: zarr.Array) -> None:
        self.probabilities = probabilities

    def __getitem__(self, key: tuple) -> np.ndarray:
        return np.asarray(self.probabilities[(CELL_CLASS, *key)])


def _watershed_store(tmp: Path, probabilities: zarr.Array, labels: zarr.Array, tiling: Tiling, ws: dict) -> int:
    """Run :func:`watershed_blockwise` from the written probabilities into ``labels`` (level 0)."""
    import shutil

    from unet_core.io.ngff import create_array

    scratch_group = zarr.open_group(Path(tmp) / "_scratch", mode="w")  # inside the atomic temporary
    try:
        scratch = create_array(scratch_group, "seeds", shape=tiling.shape, dtype=np.uint32,
                               chunks=(1, tiling.block_px, tiling.block_px))
        return watershed_blockwise(
            _CellView(probabilities), labels, scratch, shape=tiling.shape, block_px=tiling.block_px,
            halo_px=ws["halo_px"], seed_threshold=ws["seed_threshold"],
            seed_erosion_px=ws["seed_erosion_px"], mask_threshold=ws["mask_threshold"],
        )
    finally:
        shutil.rmtree(Path(tmp) / "_scratch", ignore_errors=True)


def export_tiff(
    prediction: str | os.PathLike[str], path: str | os.PathLike[str], *, content: str = "segmentation"
) -> None:
    """Write one level-0 array of a merged prediction as a (Z, Y, X) TIFF, one slice at a time.

    Args:
        prediction: the merged ``.ome.zarr``.
        path: the TIFF file (written atomically).
        content: ``segmentation``, ``instances`` or ``cell-probability``.
    """
    import tifffile

    if content not in TIFF_CONTENTS:
        raise UserInputError(f"--tiff-content {content!r}: use one of {', '.join(TIFF_CONTENTS)}")
    root = zarr.open_group(prediction, mode="r")
    if content == "cell-probability":
        arr, pick = root["0"], lambda z: root["0"][CELL_CLASS, z]
    else:
        arr = root["labels"][content]["0"]
        pick = lambda z: arr[z]  # noqa: E731
    n_z = arr.shape[-3]
    with atomic_output(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for z in range(n_z):
            tif.write(np.asarray(pick(z)), contiguous=True, compression=None)
