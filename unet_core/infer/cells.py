"""The table of cells: one row per instance, computed block by block for any stack size.

``unet merge --cells cells.csv`` writes, for every instance of ``labels/instances`` (ids are
unique over the stack and each lies in one slice)::

    id, z, area_px, area_um2, centroid_y_px, centroid_x_px, centroid_y_um, centroid_x_um,
    bbox_y0, bbox_x0, bbox_y1, bbox_x1, mean_intensity

and for the 3-D cells of a 3-D network's parts (an instance spans slices; :data:`COLUMNS_3D`)::

    id, volume_vox, volume_um3, centroid_z_px, centroid_y_px, centroid_x_px, centroid_z_um,
    centroid_y_um, centroid_x_um, bbox_z0, bbox_y0, bbox_x0, bbox_z1, bbox_y1, bbox_x1,
    mean_intensity

Centroids are the mean pixel coordinates (pixel centres at integer positions); the bounding box
is half-open in pixels; physical units come from the stack's voxel size (``unit`` per the
stack's metadata, micrometres for stacks ingested from TIFF); the mean intensity is that of the
raw grey values of the stack.

How it scales: each block gives one row of sums per label value it holds (:func:`block_rows`,
a compiled pass over the block's pixels); a piece appends its blocks' rows to a file as it goes
(:class:`RowFile`). The merge's numbering round reads those files a chunk of rows at a time
(:func:`row_chunks`) and combines them, in block order, into one row per cell, a range of ids at
a time (:func:`write_cell_table`: areas and coordinate sums are exact integers, intensity sums
float64 added in row order, so the table depends neither on the number of pieces nor on their
order); each piece then writes the CSV lines of its range of ids (:func:`write_rows`, reading the
table a block of rows at a time), and the pieces are concatenated in id order. Neither the rows,
nor the table, nor the text is ever held whole in memory: the serial round holds about 21 bytes
per cell (the areas and the uint32 id lookups; measured, benchmarks/bench_merge_serial.py), the
table of one range of ids (:data:`IDS_PER_PASS` rows) and one chunk of rows.
"""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, BinaryIO

import numpy as np

from unet_core.common.atomic import atomic_output
from unet_core.common.outputs import CsvMark

COLUMNS = (
    "id",
    "z",
    "area_px",
    "area_um2",
    "centroid_y_px",
    "centroid_x_px",
    "centroid_y_um",
    "centroid_x_um",
    "bbox_y0",
    "bbox_x0",
    "bbox_y1",
    "bbox_x1",
    "mean_intensity",
)
#: The columns of a table of 3-D cells (volumes in voxels and in the stack's unit cubed, µm³).
COLUMNS_3D = (
    "id",
    "volume_vox",
    "volume_um3",
    "centroid_z_px",
    "centroid_y_px",
    "centroid_x_px",
    "centroid_z_um",
    "centroid_y_um",
    "centroid_x_um",
    "bbox_z0",
    "bbox_y0",
    "bbox_x0",
    "bbox_z1",
    "bbox_y1",
    "bbox_x1",
    "mean_intensity",
)


@dataclass(frozen=True)
class _CellTableMark(CsvMark):
    """A cell table of either layout: 2-D (``header``) or 3-D (``header_3d``)."""

    header_3d: str = ""

    def _carries_mark(self, path: Path) -> bool:
        return super()._carries_mark(path) or CsvMark(self.header_3d, self.description)._carries_mark(path)


#: A cell table is recognised (and may be replaced by the next merge) by its header row.
CELLS_MARK = _CellTableMark(
    ",".join(COLUMNS), "a cell table written by 'unet merge --cells'", header_3d=",".join(COLUMNS_3D)
)
#: One row of sums per (block, label value); ``flat`` is the block's index in C order.
ROW_DTYPE = np.dtype(
    [
        ("flat", "<i8"),
        ("value", "<i8"),
        ("z", "<i8"),
        ("area", "<i8"),
        ("sum_y", "<i8"),
        ("sum_x", "<i8"),
        ("sum_i", "<f8"),
        ("y0", "<i8"),
        ("x0", "<i8"),
        ("y1", "<i8"),
        ("x1", "<i8"),
    ]
)
#: The rows of 3-D cells: those fields (``z`` the block's first slice) and the sum of z and the
#: half-open z bounds (a 2-D merge's rows stay 88 bytes).
ROW_DTYPE_3D = np.dtype(ROW_DTYPE.descr + [("sum_z", "<i8"), ("z0", "<i8"), ("z1", "<i8")])
#: One row per cell (index = final id; row 0 unused): the row fields without the block and value.
CELL_DTYPE = np.dtype([(name, ROW_DTYPE[name]) for name in ROW_DTYPE.names if name not in ("flat", "value")])
CELL_DTYPE_3D = np.dtype(
    [(name, ROW_DTYPE_3D[name]) for name in ROW_DTYPE_3D.names if name not in ("flat", "value")]
)
_LINES_PER_WRITE = 65536
#: Rows read from a piece's row file at a time (88 bytes each; 112 for 3-D cells).
ROWS_PER_READ = 1 << 20
#: Cell ids combined per pass over the rows (the table of one pass: 72 bytes per id; 96 in 3-D).
IDS_PER_PASS = 1 << 21


def block_rows(
    flat: int,
    z: int,
    offset: Sequence[int],
    labels: np.ndarray,
    image: np.ndarray | None,
    *,
    n_fixed: int,
    slots: np.ndarray,
) -> np.ndarray:
    """Rows of sums (:data:`ROW_DTYPE`) of every label value of one (Y, X) block.

    Args:
        flat, z: the block's flat index and slice.
        offset: (y, x) of the block's first pixel in the slice, px.
        labels: (Y, X) label values (0 = background; ``<= n_fixed``: global ids, else the block's own).
        image: (Y, X) raw grey values of the same pixels, or None (intensity sums 0).
        slots: int64 scratch of at least ``n_fixed + 1`` entries, all -1 (left so on return).

    Returns:
        One row per value present: global ids in order of first appearance (raster order), then
        the block's own values in increasing order.
    """
    lab = np.ascontiguousarray(labels)
    img = np.zeros((1, 1), np.float64) if image is None else np.ascontiguousarray(image)
    values, ints, sum_i = _label_sums(lab, img, image is not None, int(n_fixed), slots)
    rows = np.zeros(len(values), ROW_DTYPE)
    rows["flat"], rows["value"], rows["z"], rows["sum_i"] = flat, values, z, sum_i
    for k, name in enumerate(("area", "sum_y", "sum_x", "y0", "x0", "y1", "x1")):
        rows[name] = ints[:, k]
    for k, name in enumerate(("sum_y", "sum_x")):
        rows[name] += rows["area"] * int(offset[k])
    for k, name in enumerate(("y0", "x0", "y1", "x1")):
        rows[name] += int(offset[k % 2])
    return rows


def volume_rows(
    flat: int,
    offset: Sequence[int],
    labels: np.ndarray,
    image: np.ndarray | None,
    *,
    n_fixed: int,
    slots: np.ndarray,
) -> np.ndarray:
    """Rows of sums (:data:`ROW_DTYPE_3D`), one per label value, of a (Z, Y, X) block of 3-D labels.

    Each slice's rows (:func:`block_rows`) combined by value: areas, coordinate sums and the
    z, y, x bounds exact integers; intensity sums added in slice order (the same bits whatever
    the pieces). ``z`` holds the block's first slice (3-D cells use ``sum_z``, ``z0``, ``z1``).

    Args:
        flat: the block's flat index.
        offset: (z, y, x) of the block's first voxel in the stack.
        labels: (Z, Y, X) label values (0 = background; ``<= n_fixed``: global ids).
        image: (Z, Y, X) raw grey values of the same voxels, or None.
        slots: as :func:`block_rows`.

    Returns:
        One row per value present, in increasing value order.
    """
    z0 = int(offset[0])
    per_slice = [
        block_rows(flat, z0 + dz, offset[1:], labels[dz], None if image is None else image[dz],
                   n_fixed=n_fixed, slots=slots)
        for dz in range(labels.shape[0])
    ]
    rows = np.concatenate(per_slice) if per_slice else np.zeros(0, ROW_DTYPE)
    values, inverse = np.unique(rows["value"], return_inverse=True)
    out = np.zeros(len(values), ROW_DTYPE_3D)
    out["flat"], out["value"], out["z"] = flat, values, z0
    np.add.at(out["sum_z"], inverse, rows["area"] * rows["z"])
    for name in ("area", "sum_y", "sum_x", "sum_i"):
        np.add.at(out[name], inverse, rows[name])
    rows = _with_z_bounds(rows)
    for name in ("y0", "x0", "z0"):
        out[name] = np.iinfo(np.int64).max
        np.minimum.at(out[name], inverse, rows[name])
    for name in ("y1", "x1", "z1"):
        np.maximum.at(out[name], inverse, rows[name])
    return out


def _with_z_bounds(rows: np.ndarray) -> dict[str, np.ndarray]:
    """The fields of one-slice rows with their z bounds ``z0 = z``, ``z1 = z + 1``."""
    fields = {name: rows[name] for name in rows.dtype.names}
    return {**fields, "z0": rows["z"], "z1": rows["z"] + 1}


def _compiled(fn):  # numba is imported on first use only (a dry run of the workflow needs none of it)
    compiled = None

    def call(*args):
        nonlocal compiled
        if compiled is None:
            import numba

            compiled = numba.njit(cache=True, nogil=True)(fn)
        return compiled(*args)

    return call


@_compiled
def _label_sums(labels, image, has_image, n_fixed, slots):  # pragma: no cover - compiled by numba
    """Per label value of a block: its value, (area, sum y, sum x, y0, x0, y1 + 1, x1 + 1) in
    block coordinates, and the sum of the image; see :func:`block_rows`."""
    h, w = labels.shape
    n_seen, max_own = 0, 0
    for y in range(h):
        for x in range(w):
            v = labels[y, x]
            if v == 0:
                continue
            if v <= n_fixed:
                if slots[v] < 0:
                    slots[v] = n_seen
                    n_seen += 1
            elif v - n_fixed > max_own:
                max_own = v - n_fixed
    n = n_seen + max_own
    values = np.zeros(n, np.int64)
    ints = np.zeros((n, 7), np.int64)
    sum_i = np.zeros(n, np.float64)
    for k in range(n):
        ints[k, 3], ints[k, 4] = h, w
    for y in range(h):
        for x in range(w):
            v = labels[y, x]
            if v == 0:
                continue
            k = slots[v] if v <= n_fixed else n_seen + v - n_fixed - 1
            values[k] = v
            ints[k, 0] += 1
            ints[k, 1] += y
            ints[k, 2] += x
            ints[k, 3] = min(ints[k, 3], y)
            ints[k, 4] = min(ints[k, 4], x)
            ints[k, 5] = max(ints[k, 5], y + 1)
            ints[k, 6] = max(ints[k, 6], x + 1)
            if has_image:
                sum_i[k] += image[y, x]
    for k in range(n_seen):
        slots[values[k]] = -1
    keep = ints[:, 0] > 0
    return values[keep], ints[keep], sum_i[keep]


class RowFile:
    """The rows of one piece, appended block by block to an open binary file (raw ``dtype``
    records: :data:`ROW_DTYPE`, or :data:`ROW_DTYPE_3D` for 3-D cells, in block order);
    ``count`` rows so far."""

    def __init__(self, fh: BinaryIO, dtype: np.dtype = ROW_DTYPE) -> None:
        self.fh, self.count, self.dtype = fh, 0, dtype

    def append(self, rows: np.ndarray) -> None:
        self.fh.write(np.ascontiguousarray(rows, self.dtype).tobytes())
        self.count += len(rows)


def row_chunks(files: Sequence[tuple[Path, int]], dtype: np.dtype = ROW_DTYPE) -> Iterator[np.ndarray]:
    """The rows (``dtype``) of ``(path, count)`` row files, in the order given,
    :data:`ROWS_PER_READ` at a time.

    Raises:
        ValueError: a file whose size is not ``count`` rows (damaged or of another run).
    """
    for path, count in files:
        if path.stat().st_size != count * dtype.itemsize:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, not the {count} rows its record names")
        with open(path, "rb") as fh:
            for start in range(0, count, ROWS_PER_READ):
                yield np.fromfile(fh, dtype, min(ROWS_PER_READ, count - start))


def add_areas(areas: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> None:
    """``areas[ids[r]] += rows[r]["area"]`` for every row (int64, exact)."""
    _add_areas(areas, np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(rows["area"]))


def write_cell_table(
    fh: BinaryIO,
    chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    n_cells: int,
    *,
    volumes: bool = False,
) -> None:
    """Write the table of cells (``.npy`` of :data:`CELL_DTYPE`, index = final id, row 0 unused)
    to ``fh``, combining the rows :data:`IDS_PER_PASS` ids at a time.

    Args:
        chunks: a new iterator, on each call, over ``(rows, ids)``: all blocks' rows in block
            order (:func:`block_rows`) and the final id of each row (0: background or dropped).
        n_cells: the number of final ids.
        volumes: 3-D cells (rows of :data:`ROW_DTYPE_3D`, a table of :data:`CELL_DTYPE_3D`).
    """
    n = n_cells + 1
    dtype = CELL_DTYPE_3D if volumes else CELL_DTYPE
    descr = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)}
    np.lib.format.write_array_header_1_0(fh, descr)
    for lo in range(0, n, IDS_PER_PASS):
        table = np.zeros(min(IDS_PER_PASS, n - lo), dtype)
        table["y0"], table["x0"], table["y1"], table["x1"] = _BIG, _BIG, -1, -1  # min y0, x0; max y1, x1
        fields = tuple(table[name] for name in _SUMMED)
        if volumes:
            table["z0"], table["z1"] = _BIG, -1
        for rows, ids in chunks():
            ids = np.ascontiguousarray(ids, np.int64)
            _accumulate(*fields, ids, lo, *(np.ascontiguousarray(rows[name]) for name in _SUMMED))
            if volumes:
                _accumulate_z(
                    *(table[name] for name in _SUMMED_3D), ids, lo,
                    *(np.ascontiguousarray(rows[name]) for name in _SUMMED_3D),
                )
        fh.write(table.tobytes())


class CellTable:
    """The table of cells written by :func:`write_cell_table`, read a range of ids at a time."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            np.lib.format.read_magic(fh)
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            self.offset = fh.tell()
        if dtype not in (CELL_DTYPE, CELL_DTYPE_3D) or len(shape) != 1:
            raise ValueError(f"{self.path}: not a table of cells ({dtype}, shape {shape})")
        self.size, self.dtype = int(shape[0]), np.dtype(dtype)

    def __len__(self) -> int:
        return self.size

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo..hi-1`` (:data:`CELL_DTYPE`, or :data:`CELL_DTYPE_3D` for 3-D cells)."""
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + lo * self.dtype.itemsize)
            return np.fromfile(fh, self.dtype, max(0, min(hi, self.size) - lo))


#: The fields a cell's rows are combined in, in the order of :func:`_accumulate`'s arguments.
_SUMMED = ("z", "area", "sum_y", "sum_x", "y0", "x0", "y1", "x1", "sum_i")
#: Those 3-D cells add, in the order of :func:`_accumulate_z`'s arguments.
_SUMMED_3D = ("sum_z", "z0", "z1")
_BIG = np.iinfo(np.int64).max


@_compiled
def _add_areas(areas, ids, area):  # pragma: no cover - compiled by numba
    for r in range(ids.shape[0]):
        areas[ids[r]] += area[r]


@_compiled
def _accumulate(
    z, area, sum_y, sum_x, y0, x0, y1, x1, sum_i, ids, lo, rz, rarea, rsum_y, rsum_x, ry0, rx0, ry1, rx1, rsum_i
):  # pragma: no cover - compiled by numba
    """Add the rows whose id lies in ``lo .. lo + len(z) - 1`` to the range's fields (views of
    the table), in row order (the float64 intensity sums are added in that order: the same bits
    for any split into pieces)."""
    for r in range(ids.shape[0]):
        k = ids[r] - lo
        if ids[r] == 0 or k < 0 or k >= z.shape[0]:
            continue
        z[k] = rz[r]
        area[k] += rarea[r]
        sum_y[k] += rsum_y[r]
        sum_x[k] += rsum_x[r]
        y0[k] = min(y0[k], ry0[r])
        x0[k] = min(x0[k], rx0[r])
        y1[k] = max(y1[k], ry1[r])
        x1[k] = max(x1[k], rx1[r])
        sum_i[k] += rsum_i[r]


@_compiled
def _accumulate_z(sum_z, z0, z1, ids, lo, rsum_z, rz0, rz1):  # pragma: no cover - compiled by numba
    """The z fields of 3-D cells, as :func:`_accumulate` (exact integers)."""
    for r in range(ids.shape[0]):
        k = ids[r] - lo
        if ids[r] == 0 or k < 0 or k >= sum_z.shape[0]:
            continue
        sum_z[k] += rsum_z[r]
        z0[k] = min(z0[k], rz0[r])
        z1[k] = max(z1[k], rz1[r])


def write_rows(fh: IO[str], table: CellTable, lo: int, hi: int, *, pixel_um: tuple[float, float]) -> None:
    """Write the CSV lines of ids ``lo..hi-1`` that hold pixels (no header), a block of lines at a time.

    Args:
        table: the table of cells (index = final id).
        pixel_um: (y, x) pixel size in the stack's physical unit.
    """
    writer = csv.writer(fh, lineterminator="\n")
    for start in range(lo, hi, _LINES_PER_WRITE):
        part = table.read(start, min(hi, start + _LINES_PER_WRITE))
        ids = np.flatnonzero(part["area"]) + start
        part = part[part["area"] > 0]
        area = part["area"]
        cy, cx = part["sum_y"] / area, part["sum_x"] / area
        mean = part["sum_i"] / area
        writer.writerows(
            [
                int(i),
                int(r["z"]),
                int(a),
                f"{a * pixel_um[0] * pixel_um[1]:.6g}",
                f"{y:.3f}",
                f"{x:.3f}",
                f"{y * pixel_um[0]:.6g}",
                f"{x * pixel_um[1]:.6g}",
                int(r["y0"]),
                int(r["x0"]),
                int(r["y1"]),
                int(r["x1"]),
                f"{m:.6g}",
            ]
            for i, r, a, y, x, m in zip(
                ids.tolist(), part, area.tolist(), cy.tolist(), cx.tolist(), mean.tolist()
            )
        )


def write_volume_rows(
    fh: IO[str], table: CellTable, lo: int, hi: int, *, voxel_um: tuple[float, float, float]
) -> None:
    """Write the CSV lines (:data:`COLUMNS_3D`) of the 3-D cells ``lo..hi-1`` that hold voxels.

    Args:
        table: the table of cells (index = final id).
        voxel_um: (z, y, x) voxel size in the stack's physical unit (volume in that unit cubed).
    """
    writer = csv.writer(fh, lineterminator="\n")
    vz, vy, vx = (float(v) for v in voxel_um)
    for start in range(lo, hi, _LINES_PER_WRITE):
        part = table.read(start, min(hi, start + _LINES_PER_WRITE))
        ids = np.flatnonzero(part["area"]) + start
        part = part[part["area"] > 0]
        area = part["area"]
        cz, cy, cx = part["sum_z"] / area, part["sum_y"] / area, part["sum_x"] / area
        mean = part["sum_i"] / area
        writer.writerows(
            [
                int(i), int(a), f"{a * vz * vy * vx:.6g}",
                f"{z:.3f}", f"{y:.3f}", f"{x:.3f}",
                f"{z * vz:.6g}", f"{y * vy:.6g}", f"{x * vx:.6g}",
                int(r["z0"]), int(r["y0"]), int(r["x0"]), int(r["z1"]), int(r["y1"]), int(r["x1"]),
                f"{m:.6g}",
            ]
            for i, r, a, z, y, x, m in zip(
                ids.tolist(), part, area.tolist(), cz.tolist(), cy.tolist(), cx.tolist(), mean.tolist()
            )
        )


def concatenate_csv(
    path: str | os.PathLike[str], pieces: Sequence[str | os.PathLike[str]], *, columns: Sequence[str] = COLUMNS
) -> None:
    """Write the header (``columns``: :data:`COLUMNS`, or :data:`COLUMNS_3D` for 3-D cells) and the
    pieces' lines, in the order given, to ``path`` atomically (replacing only an earlier cell table:
    :data:`CELLS_MARK`); streams, never holds the text."""
    with atomic_output(path, own=CELLS_MARK) as tmp, open(tmp, "w") as out:
        out.write(",".join(columns) + "\n")
        for piece in pieces:
            with open(piece) as fh:
                shutil.copyfileobj(fh, out, 1 << 20)
