"""The gather: merge the part stores of all predict jobs into one OME-Zarr prediction, in pieces.

Output (``prediction.ome.zarr``, NGFF 0.5 on Zarr v3)::

    prediction.ome.zarr/       attrs["ome"]["multiscales"] (axes c, z, y, x), attrs["unet"]
      0, 1, ...                (C, Z, Y, X) class probabilities in the run's encoding (uint8 codes
                               round(255 p) by default, or float16/float32;
                               :mod:`unet_core.infer.encoding`); level k is 2**k coarser in y
                               and x (2x2 mean); chunks (1, 1, B/2**k, B/2**k)
      labels/segmentation/0..  uint8 (Z, Y, X) argmax class of the full-precision probabilities
                               (ties -> lower class index), as predict computed it
      labels/instances/0..     uint32 (Z, Y, X) cell instances per slice, 0 = not cell, ids 1..K
                               over the whole stack: 4-connected components of the argmax cell
                               class (default) or a seeded watershed within the mask of P(cell)
                               (threshold or distance seeds), merged across block faces

Parts of a 3-D network (blocks of several slices, :attr:`Tiling.volumes`) give 3-D cells: one id
per cell across its slices, the 6-connected components of the argmax cell class labelled block by
block and joined across block faces in z, y and x (the same cells as one labelling of the whole
volume); the store's layout is the same, its ``attrs["unet"]["dims"]`` is 3, and the cell table
has 3-D columns (:data:`unet_core.infer.cells.COLUMNS_3D`: volume in µm³, z centroid). The
seeded watershed of 3-D parts runs in 3-D as well (:func:`~unet_core.infer.instances.seeded_watershed_3d`,
:func:`~unet_core.infer.instances.distance_seeded_watershed_3d`: erosion, distances and h in µm,
6-connected), its seed margin and halo grown along z by the same depth in µm (:meth:`_Run.window`).

Every pass over pixels runs as K *pieces* (``MergeSettings.jobs``), piece k taking the k-th
contiguous run of blocks in C order (as predict's jobs do); between them, serial rounds of
O(ids + face strips) number the labels. The rounds, in order (:data:`STEPS`):

``start``         check the parts and the stack, create the store being built (serial, O(1))
``seeds``         watershed only: each block's seed pixels from its window grown by the seed
                  margin, labelled within the block (pieces)
``number-seeds``  join seeds across block faces, number them over the stack (serial)
``cells``         copy the probabilities and the segmentation into the store; label each block:
                  components of the cell class, or the flood of its window grown by the halo
                  from the numbered seeds, plus components of mask pixels no seed reached;
                  one row of sums per label for the cell table (pieces)
``number-cells``  join labels across faces, drop small objects, number the cells, combine the
                  rows into one per cell (serial)
``write``         the final ids into the instance pyramid; the CSV lines of the piece's ids (pieces)
``finish``        the TIFF, the cell table's pieces concatenated, the metadata, and the store put
                  in place of the output (serial; the TIFF is O(pixels) and optional)

``unet merge PARTS --stack S -o P`` runs all rounds in one process (the pieces one after the
other); ``--step STEP [--job k]`` runs one round, as the workflow's merge rules do. Provisional
ids, the numbering and the cell sums never depend on which piece did what (block_labels), so the
output is byte-identical for any K and any order of the pieces.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from scipy import ndimage

from unet_core import __version__
from unet_core.common.atomic import (
    atomic_output,
    atomic_output_with_companions,
    remove_path,
    temporary_sibling,
)
from unet_core.common.errors import UserInputError
from unet_core.common.geometry import Box
from unet_core.common.lockfile import holding
from unet_core.common.outputs import Layout, ZarrMark, claim_outputs
from unet_core.common.progress import progress
from unet_core.common.provenance import code_hash
from unet_core.infer.block_labels import (
    FACE_AXES,
    UINT32_IDS,
    PieceLabeller,
    PieceLabels,
    drop_small,
    number_labels,
)
from unet_core.infer.cells import (
    CELLS_MARK,
    COLUMNS,
    COLUMNS_3D,
    ROW_DTYPE,
    ROW_DTYPE_3D,
    CellTable,
    RowFile,
    add_areas,
    block_rows,
    concatenate_csv,
    row_chunks,
    volume_rows,
    write_cell_table,
    write_rows,
    write_volume_rows,
)
from unet_core.infer.encoding import ProbabilityEncoding
from unet_core.infer.instances import (
    VOLUME_CONNECTIVITY,
    InstanceMethod,
    SeedRule,
    adjacency_structure,
    components_3d,
    distance_seed_mask,
    flood,
    flood_height,
    label_unflooded,
    mask_distance,
    seed_mask,
)
from unet_core.infer.merge_settings import MergeSettings, WatershedSettings
from unet_core.infer.merge_work import WORK_MARK, MergeWork
from unet_core.infer.part_store import RUN_KEYS, open_parts
from unet_core.infer.tiff_export import TIFF_MARK, export_tiff
from unet_core.infer.tiling import Block, Tiling
from unet_core.io.ngff import (
    IMAGE_LABEL,
    ChunkCache,
    PyramidWriter,
    create_array,
    direct_chunk_reader,
    fast_compressor,
    label_group,
)
from unet_core.io.ngff import open_stack

log = logging.getLogger(__name__)

CELL_CLASS = 1
#: Block-grid axes whose faces join the labels of 3-D cells (z too).
VOLUME_FACE_AXES = (0, 1, 2)
PREDICTION_FORMAT = "unet-pipeline/prediction/1"
#: How 'unet merge' recognises its own outputs (:mod:`unet_core.common.outputs`): the probability
#: pyramid and the segmentation's and instances' label pyramids, nothing else.
PREDICTION_MARK = ZarrMark(
    "merge",
    Layout(
        (
            "",
            "[0-9]*",
            "labels",
            *(f"labels/{name}{level}" for name in ("segmentation", "instances") for level in ("", "/[0-9]*")),
        )
    ),
)
STEPS = ("start", "seeds", "number-seeds", "cells", "number-cells", "write", "finish")
PARALLEL_STEPS = ("seeds", "cells", "write")
__all__ = [
    "PREDICTION_MARK",
    "TIFF_MARK",
    "CELLS_MARK",
    "WORK_MARK",
    "STEPS",
    "MergeRequest",
    "merge_parts",
    "run_step",
    "steps_for",
    "export_tiff",
]


def steps_for(settings: MergeSettings) -> tuple[str, ...]:
    """The rounds a merge with ``settings`` runs, in order (components need no seeds)."""
    if settings.instances is InstanceMethod.WATERSHED:
        return STEPS
    return tuple(s for s in STEPS if s not in ("seeds", "number-seeds"))


@dataclass(frozen=True)
class MergeRequest:
    """The inputs, outputs and settings of one merge (what every step is given)."""

    parts: tuple[Path, ...]
    stack: Path
    out: Path
    tiff: Path | None = None
    cells: Path | None = None
    settings: MergeSettings = MergeSettings()

    @classmethod
    def of(
        cls,
        parts: Sequence[str | os.PathLike[str]],
        *,
        stack: str | os.PathLike[str],
        out: str | os.PathLike[str],
        tiff: str | os.PathLike[str] | None = None,
        cells: str | os.PathLike[str] | None = None,
        settings: MergeSettings = MergeSettings(),
    ) -> MergeRequest:
        return cls(
            tuple(Path(p) for p in parts),
            Path(stack),
            Path(out),
            None if tiff is None else Path(tiff),
            None if cells is None else Path(cells),
            settings,
        )

    @property
    def out_lock(self) -> Path:
        """Held by the serial steps and by a whole merge: one merge into an output at a time."""
        return self.out.with_name(f".{self.out.name}.merge-lock")

    def default_work(self) -> Path:
        return self.out.with_name(f"{self.out.name}.work")


@dataclass(frozen=True)
class MergeSummary:
    blocks: int
    instances: int
    shape: tuple[int, ...]


class _Run:
    """One merge's opened inputs and its work folder: what every round needs."""

    def __init__(self, request: MergeRequest, work_path: Path) -> None:
        if not request.parts:
            raise UserInputError(
                "no part stores given (pass the OUT_PART directories of all 'unet predict' jobs)"
            )
        claim_outputs(
            [
                (request.out, PREDICTION_MARK),
                (request.tiff, TIFF_MARK),
                (request.cells, CELLS_MARK),
                (work_path, WORK_MARK),
            ],
            [*request.parts, request.stack],
        )
        self.request = request
        self.parts, self.tiling = open_parts(request.parts)
        self.stack = open_stack(request.stack)
        ref = self.parts[0].settings
        if tuple(self.stack.shape) != self.tiling.shape:
            raise UserInputError(
                f"{request.stack}: shape {self.stack.shape} differs from the predicted stack's "
                f"{self.tiling.shape} "
                f"({ref['stack']}); pass the stack the parts were predicted from"
            )
        self.stack.check_made_from(ref.get("intensity"), result=self.parts[0].path)
        self.encoding = ProbabilityEncoding(ref["probabilities"])
        self.area = ref.get("median_object_area_px")
        self.volumes = self.tiling.volumes
        if self.volumes:
            _check_volume_settings(request.settings, where=str(request.parts[0]))
            self.stack.volume_voxel_size(needs="a merge of a 3-D network's parts (3-D cells)")
        self.settings = request.settings.resolved(
            self.area, where=str(request.parts[0]), volumes=self.volumes
        )
        self.tiling.check_jobs(self.settings.jobs, option="merge --jobs")
        jobs = self.parts[0].settings["jobs"]
        self.owner = {b.index: part for part in self.parts for b in self.tiling.job_blocks(part.job, jobs)}
        self.work = MergeWork(work_path, self._manifest())

    def _manifest(self) -> dict[str, Any]:
        r = self.request
        run_settings = {k: self.parts[0].settings.get(k) for k in RUN_KEYS if k != "jobs"}
        merge_settings = {k: v for k, v in self.settings.to_dict().items() if k != "jobs"}
        result = {
            "parts": run_settings,
            "intensity": self.stack.intensity.to_dict(),
            "settings": merge_settings,
            "cells": r.cells is not None,
            "tiff": r.tiff is not None,
            "version": __version__,
            "code": code_hash("merge"),
        }
        return {
            "out": str(r.out),
            "stack": str(r.stack),
            "jobs": self.settings.jobs,
            "result": result,
            "parts": [{"path": str(p.path), "settings": p.settings} for p in self.parts],
        }

    def finished(self) -> bool:
        """Whether the output is this merge's (its attributes record the fingerprint of these parts,
        stack, settings and code; the number of pieces aside) and every output asked for is there:
        then no step has anything to do."""
        r = self.request
        if not PREDICTION_MARK.recognises(r.out) or any(
            p is not None and not p.is_file() for p in (r.cells, r.tiff)
        ):
            return False
        try:
            attrs = zarr.open_group(r.out, mode="r").attrs.asdict()
        except Exception:  # zarr raises several types for damaged metadata: not finished
            return False
        return attrs.get("unet", {}).get("merge_fingerprint") == self.work.result_fingerprint

    def piece_blocks(self, k: int) -> list[Block]:
        if not isinstance(k, int) or not 0 <= k < self.settings.jobs:
            raise UserInputError(
                f"--job must be in [0, {self.settings.jobs}) for --jobs {self.settings.jobs}, got {k!r}"
            )
        return self.tiling.job_blocks(k, self.settings.jobs)

    @property
    def face_axes(self) -> tuple[int, ...]:
        """Block-grid axes whose faces join labels: y and x per slice, z too for 3-D cells."""
        return VOLUME_FACE_AXES if self.volumes else FACE_AXES

    @property
    def spacing_um(self) -> tuple[float, float, float]:
        """(dz, dy, dx) voxel size of the stack, in its unit (µm for stacks ingested from TIFF)."""
        return tuple(float(s) for s in self.stack.scale[-3:])

    def z_margin(self, px: int) -> int:
        """Slices as deep as ``px`` in-plane pixels (the finer of y, x), rounded up: the z part of
        a margin of ``px`` for 3-D cells (0 per slice)."""
        if not self.volumes or px <= 0:
            return 0
        dz, dy, dx = self.spacing_um
        return math.ceil(px * min(dy, dx) / dz - 1e-9)

    def window(self, block: Block, px: int) -> Box:
        """``block`` grown by a margin of ``px`` in-plane pixels (and as deep in µm along z for
        3-D cells), clipped to the stack."""
        return block.write.grow((self.z_margin(px), px, px)).intersect(Box.from_shape(self.tiling.shape))

    @property
    def row_dtype(self) -> np.dtype:
        return ROW_DTYPE_3D if self.volumes else ROW_DTYPE

    def flat(self, block: Block) -> int:
        grid = self.tiling.grid
        z, by, bx = block.index
        return (z * grid[1] + by) * grid[2] + bx

    def outputs(self, *, create: bool) -> _Outputs:
        root = zarr.open_group(self.work.store, mode="w" if create else "r+")
        return _Outputs.open(
            root,
            self.tiling,
            tuple(float(s) for s in self.stack.scale),
            self.stack.unit,
            self.encoding,
            create=create,
        )


# -- the rounds --------------------------------------------------------------------------------
def _start(run: _Run) -> None:
    """Create the store being built and the manifest (kept as it is when this run started it)."""
    if run.work.started():
        log.info("%s: this merge was started already; its finished pieces are kept", run.work.path)
        run.work.mark_done("start.done", {})
        return
    remove_path(run.work.path)  # another run's work folder (its mark was checked), or nothing
    run.work.path.mkdir(parents=True)
    outputs = run.outputs(create=True)
    outputs.finish()
    scratch = zarr.open_group(run.work.store, mode="r+").require_group("_scratch")
    for name in ("seeds", "labels"):  # read once, by the next round: the fast compressor
        create_array(
            scratch,
            name,
            shape=run.tiling.shape,
            dtype=np.uint32,
            chunks=(run.tiling.block_z, run.tiling.block_px, run.tiling.block_px),
            compressors=fast_compressor(),
        )
    run.work.write_manifest()
    run.work.mark_done("start.done", {})


def _seeds(run: _Run, k: int) -> None:
    """Piece k: each block's seed pixels, labelled within the block (4-connected; 3-D cells:
    6-connected in the volume)."""
    rule = _SeedRule.of(run.settings.watershed, run)
    blocks = run.piece_blocks(k)
    cells = _CellProbability(run)
    scratch = zarr.open_array(run.work.store / "_scratch" / "seeds", mode="r+")
    labeller = PieceLabeller(run.tiling.grid, [run.flat(b) for b in blocks], 0, run.face_axes)
    margin = run.settings.watershed.margin_px
    for block in progress(blocks, desc=f"merge: seeds, piece {k}/{run.settings.jobs}", unit="block"):
        window = run.window(block, margin)
        if run.volumes:
            seeds = rule.seed_pixels(cells.volume(window))[block.write.relative_to(window).to_slices()]
            local, n = ndimage.label(seeds, structure=adjacency_structure(3, VOLUME_CONNECTIVITY))
        else:
            seeds = rule.seed_pixels(cells[_at(window)])[block.write.relative_to(window).to_slices()[1:]]
            local, n = ndimage.label(seeds)
            local = local[None]
        scratch[block.write.to_slices()] = local.astype(np.uint32)
        labeller.add(block.index, local, n)
    run.work.save(f"seeds-{k}.npz", labeller.record.to_arrays(""))


def _number_seeds(run: _Run) -> None:
    """Join the seeds across block faces; number them over the stack."""
    pieces = [
        PieceLabels.from_arrays(
            run.work.load(f"seeds-{k}.npz", made_by=f"unet merge --step seeds --job {k}"), ""
        )
        for k in range(run.settings.jobs)
    ]
    numbering = number_labels(pieces, run.tiling.grid, 0, what="seeds", face_axes=run.face_axes)
    log.info("merge: %d seeds", numbering.n_final)
    run.work.save("seed-ids.npz", {"final": numbering.final, "offsets": numbering.offsets})


def _cells(run: _Run, k: int) -> None:
    """Piece k: copy its blocks' probabilities and segmentation; label its blocks; sum each label."""
    blocks = run.piece_blocks(k)
    watershed = run.settings.instances is InstanceMethod.WATERSHED
    seeds = run.work.load("seed-ids.npz", made_by="unet merge --step number-seeds") if watershed else None
    n_fixed = int(seeds["final"].max(initial=0)) if seeds is not None else 0
    labeller = PieceLabeller(run.tiling.grid, [run.flat(b) for b in blocks], n_fixed, run.face_axes)
    outputs = run.outputs(create=False)
    labels_out = zarr.open_array(run.work.store / "_scratch" / "labels", mode="r+")
    flooder = _Flooder(run, seeds) if watershed else None
    image = ChunkCache(run.stack.image, _chunks_per_block(run) * 2) if run.request.cells is not None else None
    slots = np.full(n_fixed + 1, -1, np.int64)
    rows_path = run.work.record_path(f"cells-{k}.rows")
    try:
        with atomic_output(rows_path, own=None) as tmp, open(tmp, "wb") as fh:
            rows = RowFile(fh, run.row_dtype)
            for block in progress(blocks, desc=f"merge: cells, piece {k}/{run.settings.jobs}", unit="block"):
                seg = _copy_block(run, outputs, block)
                labels, n = _block_labels(run, block, seg, flooder)
                if not labels.any():  # nothing to store (the scratch reads as 0) or to sum
                    labeller.add(block.index, labels, 0)
                    continue
                pixels = None if image is None else image[block.write.to_slices()]
                block_sums = _block_sums(run, block, labels, pixels, n_fixed=n_fixed, slots=slots)
                labels, block_sums, n = _without_specks(
                    labels, block_sums, n_fixed, n, int(run.settings.min_object_px), run.face_axes
                )
                labeller.add(block.index, labels, n)
                labels_out[block.write.to_slices()] = labels
                rows.append(block_sums)
        outputs.flush()
    finally:
        outputs.close()
    run.work.save(
        f"cells-{k}.npz",
        {**labeller.record.to_arrays(""), "n_rows": np.asarray(rows.count), "n_fixed": np.asarray(n_fixed)},
    )


def _block_labels(
    run: _Run, block: Block, seg: np.ndarray, flooder: _Flooder | None
) -> tuple[np.ndarray, int]:
    """(Z, Y, X) uint32 labels of one block (Z = 1 per slice) and its number of own labels: the
    flood of the watershed, or the components of the cell class (4-connected in the slice; for
    3-D cells 6-connected in the block)."""
    if flooder is not None:
        labels, n = flooder.block(block)
    elif run.volumes:
        labels = components_3d(seg == CELL_CLASS)
        n = int(labels.max(initial=0))
    else:
        labels, n = ndimage.label(seg[0] == CELL_CLASS)
        labels = labels[None]
    return _as_uint32(labels), n


def _block_sums(
    run: _Run, block: Block, labels: np.ndarray, pixels: np.ndarray | None, *, n_fixed: int, slots: np.ndarray
) -> np.ndarray:
    """One row of sums per label value of a block's (Z, Y, X) labels (:mod:`unet_core.infer.cells`)."""
    if run.volumes:
        return volume_rows(run.flat(block), block.write.offset, labels, pixels, n_fixed=n_fixed, slots=slots)
    return block_rows(
        run.flat(block),
        block.write.offset[0],
        block.plane.offset,
        labels[0],
        None if pixels is None else pixels[0],
        n_fixed=n_fixed,
        slots=slots,
    )


def _without_specks(
    labels: np.ndarray,
    rows: np.ndarray,
    n_fixed: int,
    n_own: int,
    min_px: int,
    face_axes: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """A block's labels ((Y, X), or (Z, Y, X)) and rows without its specks, and its number of own
    labels left.

    A block's own label (above ``n_fixed``) that touches no face of the block (along
    ``face_axes``; default the last two axes, y and x: 3-D cells give all three) is a whole object
    already (own labels join others only across faces); one smaller than ``min_px`` would be
    dropped by the numbering anyway, so it is dropped here: set to 0, its row left out, and the
    own labels left renumbered ``n_fixed + 1 ..`` in their order. Final ids are numbered in the
    order of the provisional ids, which this keeps, so the output is the same; the serial round
    then holds ids and rows of objects and of labels on block faces only, not of every speck of
    an unsure mask (on the benchmark stack, ten times as many).
    """
    if min_px <= 0 or not n_own:
        return labels, rows, n_own
    axes = range(labels.ndim - 2, labels.ndim) if face_axes is None else face_axes
    edges = np.unique(np.concatenate([np.take(labels, i, axis=a).ravel() for a in axes for i in (0, -1)]))
    own = rows["value"] > n_fixed
    keep = ~own | (rows["area"] >= min_px) | np.isin(rows["value"], edges)
    if keep.all():
        return labels, rows, n_own
    kept_own = np.sort(rows["value"][own & keep]) - n_fixed
    renumber = np.zeros(n_own + 1, np.uint32)  # old own index -> new own index (0: dropped)
    renumber[kept_own] = np.arange(1, len(kept_own) + 1, dtype=np.uint32)
    is_own = labels > n_fixed
    new = renumber[labels[is_own] - n_fixed]
    labels = labels.copy()
    labels[is_own] = np.where(new > 0, new + np.uint32(n_fixed), 0)
    rows = rows[keep]
    own = rows["value"] > n_fixed
    rows["value"][own] = n_fixed + renumber[rows["value"][own] - n_fixed].astype(np.int64)
    return labels, rows, len(kept_own)


def _number_cells(run: _Run) -> None:
    """Join the labels across faces, drop small objects, number the cells, one row of sums per cell."""
    records = [
        run.work.load(f"cells-{k}.npz", made_by=f"unet merge --step cells --job {k}")
        for k in range(run.settings.jobs)
    ]
    n_fixed = int(records[0]["n_fixed"])
    numbering = number_labels(
        [PieceLabels.from_arrays(r, "") for r in records],
        run.tiling.grid,
        n_fixed,
        what="cells",
        face_axes=run.face_axes,
    )
    files = [(run.work.record_path(f"cells-{k}.rows"), int(r["n_rows"])) for k, r in enumerate(records)]

    def rows_with(lookup: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All pieces' rows in block order, a chunk at a time, with the id ``lookup`` gives each."""
        try:
            for chunk in row_chunks(files, run.row_dtype):
                yield chunk, lookup[numbering.provisional(chunk["flat"], chunk["value"])]
        except (OSError, ValueError) as err:
            raise UserInputError(
                f"damaged record of the cells round ({err}); rerun 'unet merge --step cells' for its piece"
            ) from None

    areas = np.zeros(numbering.n_final + 1, np.int64)
    for chunk, ids in rows_with(numbering.final):
        add_areas(areas, ids, chunk)
    final = drop_small(numbering.final, areas, min_px=int(run.settings.min_object_px))
    del areas
    n_cells = int(final.max(initial=0))
    log.info("merge: %d cells (%d provisional labels)", n_cells, len(final) - 1)
    if run.request.cells is not None:
        with atomic_output(run.work.record_path("cell-table.npy"), own=None) as tmp, open(tmp, "wb") as fh:
            write_cell_table(fh, lambda: rows_with(final), n_cells, volumes=run.volumes)
    run.work.save(
        "cell-ids.npz",
        {
            "final": final,
            "offsets": numbering.offsets,
            "n_fixed": np.asarray(n_fixed),
            "n_cells": np.asarray(n_cells),
        },
    )


def _write(run: _Run, k: int) -> None:
    """Piece k: the final ids of its blocks into the instance pyramid; the CSV lines of its ids."""
    ids = run.work.load("cell-ids.npz", made_by="unet merge --step number-cells")
    final, offsets, n_fixed = ids["final"], ids["offsets"], int(ids["n_fixed"])
    labels = ChunkCache(zarr.open_array(run.work.store / "_scratch" / "labels", mode="r"), 1)
    outputs = run.outputs(create=False)
    try:
        for block in progress(
            run.piece_blocks(k), desc=f"merge: write, piece {k}/{run.settings.jobs}", unit="block"
        ):
            values = labels[block.write.to_slices()].astype(np.int64)
            if not values.any():  # a block without cells: its chunks stay unwritten (they read as 0)
                continue
            values += np.where(values > n_fixed, offsets[run.flat(block)], 0)
            for dz, plane in enumerate(values):
                if plane.any() or not run.volumes:
                    outputs.instances.write_block((block.write.offset[0] + dz,), block.plane.offset, final[plane])
        outputs.instances.flush()
    finally:
        outputs.close()
    if run.request.cells is not None:
        table = CellTable(run.work.record_path("cell-table.npy"))
        n = len(table) - 1
        lo, hi = 1 + k * n // run.settings.jobs, 1 + (k + 1) * n // run.settings.jobs
        with atomic_output(run.work.record_path(f"write-{k}.csv"), own=None) as tmp, open(tmp, "w") as fh:
            if run.volumes:
                write_volume_rows(fh, table, lo, hi, voxel_um=tuple(float(s) for s in run.stack.scale[-3:]))
            else:
                write_rows(fh, table, lo, hi, pixel_um=(float(run.stack.scale[-2]), float(run.stack.scale[-1])))
    run.work.mark_done(f"write-{k}.done", {"piece": k})


def _finish(run: _Run) -> MergeSummary:
    """Metadata, TIFF and cell table; the store put in place of the output; the work folder removed."""
    for k in range(run.settings.jobs):
        if not run.work.has_record(f"write-{k}.done"):
            raise UserInputError(
                f"{run.work.record_path(f'write-{k}.done')}: missing; run 'unet merge --step write "
                f"--job {k}' (with the same arguments) first"
            )
    ids = run.work.load("cell-ids.npz", made_by="unet merge --step number-cells", keys=("n_cells",))
    n_cells = int(ids["n_cells"])
    request = run.request
    if not (run.work.store / "zarr.json").is_file():
        raise UserInputError(
            f"{run.work.store}: the store being built is missing (a finish killed half-way?); run "
            "the merge again from --step start"
        )
    with atomic_output_with_companions(request.out, own=PREDICTION_MARK) as (tmp, written):
        os.replace(run.work.store, tmp)
        try:
            if request.tiff is not None:
                export_tiff(tmp, request.tiff, content=run.settings.tiff_content)
                written.append(request.tiff)
            if request.cells is not None:
                concatenate_csv(
                    request.cells,
                    [run.work.record_path(f"write-{k}.csv") for k in range(run.settings.jobs)],
                    columns=COLUMNS_3D if run.volumes else COLUMNS,
                )
                written.append(request.cells)
            shutil.rmtree(tmp / "_scratch")
            root = zarr.open_group(tmp, mode="r+")
            root.attrs.update({"unet": _provenance(run, n_cells)})
        except BaseException:
            if tmp.exists() and (tmp / "_scratch").exists():
                os.replace(tmp, run.work.store)  # keep the built store: a rerun of finish needs only itself
            raise
    remove_path(run.work.path)
    summary = MergeSummary(run.tiling.n_blocks, n_cells, run.tiling.shape)
    log.info(
        "merged %d parts, %d blocks into %s: %d instances",
        len(run.parts),
        summary.blocks,
        request.out,
        n_cells,
    )
    return summary


#: The rounds by step name: those run once per piece, and the serial ones between them.
_PIECE_ROUNDS = {"seeds": _seeds, "cells": _cells, "write": _write}
_SERIAL_ROUNDS = {"number-seeds": _number_seeds, "number-cells": _number_cells}


# -- entry points ------------------------------------------------------------------------------
def run_step(
    request: MergeRequest, step: str, *, job: int | None = None, work: str | os.PathLike[str] | None = None
) -> MergeSummary | None:
    """Run one round of a merge in pieces (see the module docstring).

    Args:
        request: the merge (every step of one merge gets the same).
        step: one of :data:`STEPS`; ``seeds``, ``cells`` and ``write`` need ``job``.
        job: the piece, 0 <= job < ``request.settings.jobs``.
        work: the work folder (default ``<out>.work``).

    Raises:
        UserInputError: bad inputs, a step out of order, records of another run, a piece held by
            another process, or a step that the instance method does not have.
    """
    work_path = Path(work) if work is not None else request.default_work()
    run = _Run(request, work_path)
    if step not in steps_for(run.settings):
        raise UserInputError(
            f"--step {step}: not a step of a merge with --instances {run.settings.instances.value} "
            f"(steps: {', '.join(steps_for(run.settings))})"
        )
    if (
        step == "finish" and run.finished()
    ):  # (earlier rounds always leave their record: the workflow tracks them)
        log.info("%s: merged already by a run with these inputs and settings; nothing to do", request.out)
        if run.work.holds_manifest():  # a finish killed before its cleanup
            remove_path(run.work.path)
        return None
    if step in PARALLEL_STEPS:
        if job is None:
            raise UserInputError(f"--step {step} runs one piece: give --job k (0 <= k < {run.settings.jobs})")
        run.piece_blocks(job)
        run.work.check_started(step)
        name = {"seeds": f"seeds-{job}.npz", "cells": f"cells-{job}.npz", "write": f"write-{job}.done"}[step]
        if run.work.has_record(name):
            log.info("%s: piece %d of step %s is done already; nothing to do", run.work.path, job, step)
            return None
        with run.work.piece_lock(job, request.out_lock, request.out):
            _PIECE_ROUNDS[step](run, job)
        return None
    with holding(request.out_lock, owner=request.out, who="'unet merge'", what="writing this output"):
        if step == "start":
            _start(run)
            return None
        run.work.check_started(step)
        if step == "finish":
            return _finish(run)
        _SERIAL_ROUNDS[step](run)
    return None


def merge_parts(
    parts: Sequence[str | os.PathLike[str]],
    *,
    stack: str | os.PathLike[str],
    out: str | os.PathLike[str],
    tiff: str | os.PathLike[str] | None = None,
    cells: str | os.PathLike[str] | None = None,
    settings: MergeSettings = MergeSettings(),
) -> MergeSummary:
    """Merge the part stores of all jobs of one ``unet predict`` run into ``out``: every round in
    this process (the K pieces of ``settings.jobs`` one after another), in a temporary work folder
    removed on success and on failure.

    Args:
        parts: the part stores of jobs 0..N-1 (any order).
        stack: the predicted stack (for scale, unit, the raw grey values and a consistency check).
        out: the prediction ``.ome.zarr`` (written atomically; replaces an old one).
        tiff: optional TIFF file to export, (Z, Y, X), of ``settings.tiff_content``.
        cells: optional CSV file for the table of cells (:mod:`unet_core.infer.cells`).
        settings: instances, smallest object, watershed, TIFF content, pieces.

    Raises:
        UserInputError: bad parts (see :func:`unet_core.infer.part_store.open_parts`), a stack
            they were not made from, bad instance settings, or another merge writing ``out``.
    """
    request = MergeRequest.of(parts, stack=stack, out=out, tiff=tiff, cells=cells, settings=settings)
    work_path = temporary_sibling(request.out)
    with holding(request.out_lock, owner=request.out, who="'unet merge'", what="writing this output"):
        try:
            run = _Run(request, work_path)
            if run.finished():
                log.info(
                    "%s: merged already by a run with these inputs and settings; nothing to do", request.out
                )
                return MergeSummary(
                    run.tiling.n_blocks,
                    int(zarr.open_group(request.out, mode="r").attrs["unet"]["instances"]),
                    run.tiling.shape,
                )
            _start(run)
            for step in steps_for(run.settings)[1:-1]:
                if step in PARALLEL_STEPS:
                    for k in range(run.settings.jobs):
                        _PIECE_ROUNDS[step](run, k)
                else:
                    _SERIAL_ROUNDS[step](run)
            return _finish(run)
        finally:
            remove_path(work_path)


# -- per block ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _SeedRule:
    """One seed rule with its numbers, applied to a window of P(cell)."""

    settings: WatershedSettings
    spacing_um: tuple[float, float, float] | None = None  # 3-D cells: (dz, dy, dx) µm

    @classmethod
    def of(cls, settings: WatershedSettings, run: _Run) -> _SeedRule:
        if settings.seeds is SeedRule.DISTANCE and not (
            isinstance(settings.h_px, int | float) and settings.h_px > 0
        ) and not run.volumes:
            raise UserInputError(f"watershed seeds 'distance' need a depth h > 0 px, got {settings.h_px}")
        return cls(settings, run.spacing_um if run.volumes else None)

    def seed_pixels(self, p: np.ndarray) -> np.ndarray:
        """(Y, X) bool seed pixels of a window of P(cell) ((Z, Y, X) for 3-D cells: erosion and
        distances in µm, h = ``h_um``, as :func:`~unet_core.infer.instances.distance_seeded_watershed_3d`)."""
        s = self.settings
        if s.seeds is SeedRule.THRESHOLD:
            return seed_mask(
                p,
                seed_threshold=s.seed_threshold,
                seed_erosion_px=s.seed_erosion_px,
                mask_threshold=s.mask_threshold,
                spacing_um=self.spacing_um,
            )
        mask = p > s.mask_threshold
        h = float(s.h_um) if self.spacing_um is not None else float(s.h_px)
        return distance_seed_mask(mask_distance(mask, spacing_um=self.spacing_um), mask, h_px=h)

    def flood(self, p: np.ndarray, markers: np.ndarray) -> np.ndarray:
        """(Y, X) ((Z, Y, X), 6-connected) int32 labels of a window flooded from ``markers`` within the mask."""
        s = self.settings
        connectivity = 4 if self.spacing_um is None else VOLUME_CONNECTIVITY
        if s.seeds is SeedRule.THRESHOLD:
            return flood(p, markers, mask_threshold=s.mask_threshold, connectivity=connectivity)
        mask = p > s.mask_threshold
        distance = mask_distance(mask, spacing_um=self.spacing_um)
        return flood_height(distance, markers, mask=mask, connectivity=connectivity)


class _Flooder:
    """The ``cells`` round of the watershed: flood each block's window from the numbered seeds."""

    def __init__(self, run: _Run, seeds: dict[str, np.ndarray]) -> None:
        self.run, self.rule = run, _SeedRule.of(run.settings.watershed, run)
        self.final, self.offsets = seeds["final"], seeds["offsets"]
        self.n_seeds = int(self.final.max(initial=0))
        self.cells = _CellProbability(run)
        # 3-D: a window's seed labels are read one chunk at a time. Keeping the neighbours' whole
        # uint32 blocks (8 MiB each at 32 x 256 x 256) for the thin slab of each a window needs
        # cost hundreds of MiB per piece, more on wider stacks; seed chunks are mostly zeros, so
        # decoding one again costs little next to the flood
        self.scratch = ChunkCache(
            zarr.open_array(run.work.store / "_scratch" / "seeds", mode="r"),
            1 if run.volumes else run.tiling.grid[2] + 4,
        )

    def block(self, block: Block) -> tuple[np.ndarray, int]:
        """(Z, Y, X) labels of ``block`` (Z = 1 per slice; seed ids, then n_seeds + 1.. for
        unseeded components) and the number of unseeded components."""
        window = self.run.window(block, self.run.settings.watershed.halo_px)
        if self.run.volumes:
            core = block.write.relative_to(window).to_slices()
            p = self.cells.volume(window)
            markers = self._markers(window)
        else:
            core = block.write.relative_to(window).to_slices()[1:]
            p = self.cells[_at(window)]
            markers = self._markers(window)[0]
        labels = self.rule.flood(p, markers)[core].astype(np.int64)
        n = label_unflooded(
            labels,
            p[core] > self.run.settings.watershed.mask_threshold,
            first_id=self.n_seeds + 1,
            connectivity=VOLUME_CONNECTIVITY if self.run.volumes else 4,
        )
        return (labels if self.run.volumes else labels[None]), n

    def _markers(self, window: Box) -> np.ndarray:
        """(Z, Y, X) int32 global seed ids over ``window`` (0 = no seed), from the blocks' own seed
        labels (seed pixels are few: only they are looked up)."""
        local = self.scratch[window.to_slices()]
        markers = np.zeros(local.shape, np.int32 if self.n_seeds < 2**31 else np.int64)
        sizes = (self.run.tiling.block_z, self.run.tiling.block_px, self.run.tiling.block_px)
        ranges = [range(o // s, (e - 1) // s + 1) for o, e, s in zip(window.offset, window.end, sizes)]
        for index in itertools.product(*ranges):
            block = self.run.tiling.block(index)
            sl = block.write.intersect(window).relative_to(window).to_slices()
            values = local[sl]
            at = np.nonzero(values)
            markers[sl][at] = self.final[values[at].astype(np.int64) + self.offsets[self.run.flat(block)]]
        return markers


class _CellProbability:
    """``view[z, ys, xs]`` -> float32 P(cell) of any window, read from the parts' chunks (one
    chunk per block, decoded once while it stays in a small cache of recent blocks)."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.owner = run.owner
        self.readers = {
            p.job: direct_chunk_reader(p.store.probabilities()) or _zarr_reader(p.store.probabilities())
            for p in run.parts
        }
        self.cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        # 2-D: the windows of a block row and the rows beside it. 3-D: the blocks one window
        # touches (3 x 3 x 3 where the halo is at most a block deep), so memory is bounded by the
        # block and halo sizes, not by the stack's; in raster order a block's window finds the 18
        # it shares with the previous one (each block is decoded about 9 times per pass)
        self.max = _window_blocks(run) if run.volumes else 3 * run.tiling.grid[2] + 9

    def plane(self, index: tuple[int, int, int]) -> np.ndarray:
        """The block's stored P(cell) values (codes, as stored: a quarter of floats for uint8),
        (Y, X) per slice, (Z, Y, X) for 3-D parts."""
        hit = self.cache.pop(index, None)
        if hit is None:
            block = self.run.tiling.block(index)
            d, h, w = block.write.shape
            chunk = self.readers[self.owner[index].job]((0, *index))
            values = chunk[CELL_CLASS, :d, :h, :w] if self.run.volumes else chunk[CELL_CLASS, 0, :h, :w]
            hit = np.ascontiguousarray(values)
        self.cache[index] = hit
        while len(self.cache) > self.max:
            self.cache.popitem(last=False)
        return hit

    def volume(self, window: Box) -> np.ndarray:
        """float32 P(cell) over a (Z, Y, X) ``window`` of 3-D parts."""
        out = np.empty(window.shape, self.run.encoding.dtype)
        sizes = (self.run.tiling.block_z, self.run.tiling.block_px, self.run.tiling.block_px)
        ranges = [range(o // s, (e - 1) // s + 1) for o, e, s in zip(window.offset, window.end, sizes)]
        for index in itertools.product(*ranges):
            block = self.run.tiling.block(index)
            part = block.write.intersect(window)
            values = self.plane(block.index)[part.relative_to(block.write).to_slices()]
            out[part.relative_to(window).to_slices()] = values
        return self.run.encoding.decode(out)

    def __getitem__(self, key: tuple) -> np.ndarray:
        z, ys, xs = key
        out = np.empty((ys.stop - ys.start, xs.stop - xs.start), self.run.encoding.dtype)
        window = Box((z, ys.start, xs.start), (1, ys.stop - ys.start, xs.stop - xs.start))
        b = self.run.tiling.block_px
        for by in range(ys.start // b, (ys.stop - 1) // b + 1):
            for bx in range(xs.start // b, (xs.stop - 1) // b + 1):
                block = self.run.tiling.block((z, by, bx))
                part = block.write.intersect(window)
                out[part.relative_to(window).to_slices()[1:]] = self.plane(block.index)[
                    part.relative_to(block.write).to_slices()[1:]
                ]
        return self.run.encoding.decode(out)


def _window_blocks(run: _Run) -> int:
    """The most blocks one window of 3-D parts touches: per axis 1 + 2 x (blocks its deepest
    margin, the seed margin or the halo, reaches into), clipped to the block grid."""
    px = max(run.settings.watershed.halo_px, run.settings.watershed.margin_px)
    margin = (run.z_margin(px), px, px)
    sizes = (run.tiling.block_z, run.tiling.block_px, run.tiling.block_px)
    return math.prod(min(n, 1 + 2 * -(-m // s)) for m, s, n in zip(margin, sizes, run.tiling.grid))


def _zarr_reader(array: zarr.Array):
    def read(key: tuple[int, ...]) -> np.ndarray:
        box = Box(tuple(k * c for k, c in zip(key, array.chunks)), tuple(array.chunks))
        return np.asarray(array[box.intersect(Box.from_shape(array.shape)).to_slices()])

    return read


def _copy_block(run: _Run, outputs: _Outputs, block: Block) -> np.ndarray:
    """Copy one block's probabilities and segmentation from its part into the store (slice by
    slice: the store's chunks are one slice deep); returns the (Z, Y, X) segmentation."""
    part = run.owner[block.index]
    z = block.write.offset[0]
    probabilities = np.asarray(part.store.probabilities()[(slice(None), *block.write.to_slices())])
    seg = np.asarray(part.store.segmentation()[block.write.to_slices()])
    for dz in range(seg.shape[0]):
        outputs.probabilities.write_block((slice(None), z + dz), block.plane.offset, probabilities[:, dz])
        outputs.segmentation.write_block((z + dz,), block.plane.offset, seg[dz])
    return seg


def _chunks_per_block(run: _Run) -> int:
    chunks = run.stack.image.chunks
    b = run.tiling.block_px
    return max(1, -(-run.tiling.block_z // chunks[-3]) * -(-b // chunks[-2]) * -(-b // chunks[-1]))


def _at(box: Box) -> tuple:
    """Index of a (1, Y, X) box's plane in a (Z, Y, X) array: ``(z, ys, xs)``."""
    zs, ys, xs = box.to_slices()
    return (zs.start, ys, xs)


def _as_uint32(ids: np.ndarray) -> np.ndarray:
    if ids.size and ids.max() > UINT32_IDS:
        raise UserInputError(
            f"{int(ids.max())} labels in one block: more than 2**32 - 1, the most uint32 labels "
            "hold; split the stack into several samples"
        )
    return ids.astype(np.uint32)


@dataclass
class _Outputs:
    """The three multiscale images of a prediction store, each written block by block."""

    probabilities: PyramidWriter
    segmentation: PyramidWriter
    instances: PyramidWriter

    @classmethod
    def open(
        cls,
        root: zarr.Group,
        tiling: Tiling,
        scale: tuple[float, ...],
        unit: str | None,
        encoding: ProbabilityEncoding,
        *,
        create: bool,
    ) -> _Outputs:
        b, shape = tiling.block_px, tiling.shape

        def pyramid(group: zarr.Group, dtype, name: str, *, labels: bool) -> PyramidWriter:
            axes, lead = ("czyx", (tiling.spec.n_classes,)) if name == "probabilities" else ("zyx", ())
            return PyramidWriter(
                group,
                (*lead, *shape),
                dtype,
                (*(1,) * len(lead), 1, b, b),
                ((1.0,) * len(lead)) + scale,
                unit=unit,
                axes=axes,
                labels=labels,
                name=name,
                downscale_chunks=True,
                create=create,
            )

        def labels_group(name: str) -> zarr.Group:
            return label_group(root, name) if create else root["labels"][name]

        return cls(
            pyramid(root, encoding.dtype, "probabilities", labels=False),
            pyramid(labels_group("segmentation"), np.uint8, "segmentation", labels=True),
            pyramid(labels_group("instances"), np.uint32, "instances", labels=True),
        )

    def flush(self) -> None:
        for pyr in (self.probabilities, self.segmentation, self.instances):
            pyr.flush()

    def finish(self) -> None:
        """Store the NGFF metadata (at creation: the pieces then write chunks only)."""
        self.probabilities.finish()
        for pyr in (self.segmentation, self.instances):
            pyr.finish(IMAGE_LABEL)

    def close(self) -> None:
        for pyr in (self.probabilities, self.segmentation, self.instances):
            pyr.close()


def _provenance(run: _Run, n_instances: int) -> dict[str, Any]:
    """``attrs["unet"]`` of a prediction store."""
    ref, settings = run.parts[0].settings, run.settings
    ws = settings.watershed.to_dict()
    if settings.instances is InstanceMethod.WATERSHED:
        ws["as_stored"] = {"mask": run.encoding.code_threshold(settings.watershed.mask_threshold)}
        if settings.watershed.seeds is SeedRule.THRESHOLD:
            ws["as_stored"]["seed"] = run.encoding.code_threshold(settings.watershed.seed_threshold)
    return {
        "stage": "merge",
        "format": PREDICTION_FORMAT,
        "version": __version__,
        "source": ref["stack"],
        "model_sha256": ref["model_sha256"],
        "tiling": ref["tiling"],
        "tta": ref["tta"],
        "precision": ref["precision"],
        "logit_offsets": ref.get("logit_offsets"),
        "devices": sorted({p.settings["device"] for p in run.parts}),
        "intensity": ref["intensity"],
        "intensity_normalisation": ref["intensity_normalisation"],
        "decision_rule": settings.rule_text(volumes=run.volumes),
        "cell_class": CELL_CLASS,
        "instances": n_instances,
        "instance_method": settings.instances.value,
        "watershed": ws if settings.instances is InstanceMethod.WATERSHED else None,
        "probability_axes": "czyx",
        "probabilities": run.encoding.value,
        "probability_encoding": run.encoding.description,
        "min_object_px": settings.min_object_px,
        "median_object_area_px": run.area,
        "merge_fingerprint": run.work.result_fingerprint,
        **({"dims": 3, "voxel_size": [float(s) for s in run.stack.scale[-3:]]} if run.volumes else {}),
    }


def _check_volume_settings(settings: MergeSettings, *, where: str) -> None:
    """Refuse, in one line, what a merge of 3-D parts does not do.

    Raises:
        UserInputError: distance seeds without ``h_um`` (their depth in µm), or
            ``--min-object-px auto`` (a fraction of the median object area in px, a 2-D measure).
    """
    ws = settings.watershed
    if settings.instances is InstanceMethod.WATERSHED and ws.seeds is SeedRule.DISTANCE and ws.h_um is None:
        raise UserInputError(
            f"{where}: parts of a 3-D network: distance seeds need --seed-h-um (the depth h of the distance "
            "maxima in µm, e.g. 0.15 x the median cell radius; --seed-h-px is for slices)"
        )
    if settings.min_object_px == "auto":
        raise UserInputError(
            f"{where}: parts of a 3-D network: --min-object-px auto is 5 % of a median area in px (2-D); "
            "give a number of voxels"
        )
