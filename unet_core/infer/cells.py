"""The table of cells: one row per instance, computed block by block for any stack size.

``unet merge --cells cells.csv`` writes, for every instance of ``labels/instances`` (ids are
unique over the stack and each lies in one slice)::

    id, z, area_px, area_um2, centroid_y_px, centroid_x_px, centroid_y_um, centroid_x_um,
    bbox_y0, bbox_x0, bbox_y1, bbox_x1, mean_intensity

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
#: A cell table is recognised (and may be replaced by the next merge) by its header row.
CELLS_MARK = CsvMark(",".join(COLUMNS), "a cell table written by 'unet merge --cells'")
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
#: One row per cell (index = final id; row 0 unused): the row fields without the block and value.
CELL_DTYPE = np.dtype([(name, ROW_DTYPE[name]) for name in ROW_DTYPE.names if name not in ("flat", "value")])
_LINES_PER_WRITE = 65536
#: Rows read from a piece's row file at a time (88 bytes each).
ROWS_PER_READ = 1 << 20
#: Cell ids combined per pass over the rows (the table of one pass: 72 bytes per id).
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
    """The rows of one piece, appended block by block to an open binary file (raw
    :data:`ROW_DTYPE` records, in block order); ``count`` rows so far."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.count = fh, 0

    def append(self, rows: np.ndarray) -> None:
        self.fh.write(np.ascontiguousarray(rows, ROW_DTYPE).tobytes())
        self.count += len(rows)


def row_chunks(files: Sequence[tuple[Path, int]]) -> Iterator[np.ndarray]:
    """The rows of ``(path, count)`` row files, in the order given, :data:`ROWS_PER_READ` at a time.

    Raises:
        ValueError: a file whose size is not ``count`` rows (damaged or of another run).
    """
    for path, count in files:
        if path.stat().st_size != count * ROW_DTYPE.itemsize:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, not the {count} rows its record names")
        with open(path, "rb") as fh:
            for start in range(0, count, ROWS_PER_READ):
                yield np.fromfile(fh, ROW_DTYPE, min(ROWS_PER_READ, count - start))


def add_areas(areas: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> None:
    """``areas[ids[r]] += rows[r]["area"]`` for every row (int64, exact)."""
    _add_areas(areas, np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(rows["area"]))


def write_cell_table(
    fh: BinaryIO, chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], n_cells: int
) -> None:
    """Write the table of cells (``.npy`` of :data:`CELL_DTYPE`, index = final id, row 0 unused)
    to ``fh``, combining the rows :data:`IDS_PER_PASS` ids at a time.

    Args:
        chunks: a new iterator, on each call, over ``(rows, ids)``: all blocks' rows in block
            order (:func:`block_rows`) and the final id of each row (0: background or dropped).
        n_cells: the number of final ids.
    """
    n = n_cells + 1
    descr = {"descr": np.lib.format.dtype_to_descr(CELL_DTYPE), "fortran_order": False, "shape": (n,)}
    np.lib.format.write_array_header_1_0(fh, descr)
    for lo in range(0, n, IDS_PER_PASS):
        table = np.zeros(min(IDS_PER_PASS, n - lo), CELL_DTYPE)
        table["y0"], table["x0"], table["y1"], table["x1"] = _BIG, _BIG, -1, -1  # min y0, x0; max y1, x1
        fields = tuple(table[name] for name in _SUMMED)
        for rows, ids in chunks():
            _accumulate(
                *fields, np.ascontiguousarray(ids, np.int64), lo,
                *(np.ascontiguousarray(rows[name]) for name in _SUMMED),
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
        if dtype != CELL_DTYPE or len(shape) != 1:
            raise ValueError(f"{self.path}: not a table of cells ({dtype}, shape {shape})")
        self.size = int(shape[0])

    def __len__(self) -> int:
        return self.size

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo..hi-1`` (:data:`CELL_DTYPE`)."""
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + lo * CELL_DTYPE.itemsize)
            return np.fromfile(fh, CELL_DTYPE, max(0, min(hi, self.size) - lo))


#: The fields a cell's rows are combined in, in the order of :func:`_accumulate`'s arguments.
_SUMMED = ("z", "area", "sum_y", "sum_x", "y0", "x0", "y1", "x1", "sum_i")
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


def concatenate_csv(path: str | os.PathLike[str], pieces: Sequence[str | os.PathLike[str]]) -> None:
    """Write the header and the pieces' lines, in the order given, to ``path`` atomically
    (replacing only an earlier cell table: :data:`CELLS_MARK`); streams, never holds the text."""
    with atomic_output(path, own=CELLS_MARK) as tmp, open(tmp, "w") as out:
        out.write(",".join(COLUMNS) + "\n")
        for piece in pieces:
            with open(piece) as fh:
                shutil.copyfileobj(fh, out, 1 << 20)
