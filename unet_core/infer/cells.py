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
a compiled pass over the block's pixels); the merge's numbering round combines the rows of all
blocks, in block order, into one row per cell (:func:`combine_rows`: areas and coordinate sums
are exact integers, intensity sums float64 added in block order, so the table depends neither on
the number of pieces nor on their order); each piece then writes the CSV lines of its range of
ids (:func:`write_rows`), and the pieces are concatenated in id order. The whole text is never
held in memory; the serial round holds about 70 bytes per label row and 80 per cell.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Sequence
from typing import IO

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


def combine_rows(rows: np.ndarray, final_of_row: np.ndarray, n_cells: int) -> np.ndarray:
    """One row per cell (:data:`CELL_DTYPE`, index = final id) from the blocks' rows.

    Args:
        rows: all blocks' rows in block order (:func:`block_rows`).
        final_of_row: the final id of each row (0: background or dropped).
        n_cells: the number of final ids.
    """
    table = np.zeros(n_cells + 1, CELL_DTYPE)
    keep = final_of_row > 0
    ids, rows = final_of_row[keep].astype(np.int64), rows[keep]
    table["z"][ids] = rows["z"]
    for name in ("area", "sum_y", "sum_x"):  # exact: integer sums
        np.add.at(table[name], ids, rows[name])
    table["sum_i"] = np.bincount(ids, weights=rows["sum_i"], minlength=n_cells + 1)  # in row (block) order
    for name, reduce, start in (
        ("y0", np.minimum, np.iinfo(np.int64).max),
        ("x0", np.minimum, np.iinfo(np.int64).max),
        ("y1", np.maximum, -1),
        ("x1", np.maximum, -1),
    ):
        table[name] = start
        reduce.at(table[name], ids, rows[name])
    return table


def write_rows(fh: IO[str], table: np.ndarray, lo: int, hi: int, *, pixel_um: tuple[float, float]) -> None:
    """Write the CSV lines of ids ``lo..hi-1`` that hold pixels (no header), a block of lines at a time.

    Args:
        table: the cell rows (:data:`CELL_DTYPE`, index = final id; may be memory-mapped).
        pixel_um: (y, x) pixel size in the stack's physical unit.
    """
    writer = csv.writer(fh, lineterminator="\n")
    for start in range(lo, hi, _LINES_PER_WRITE):
        part = np.asarray(table[start : min(hi, start + _LINES_PER_WRITE)])
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
