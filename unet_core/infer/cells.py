"""The table of cells: one row per instance, computed block by block for any stack size.

``unet merge --cells cells.csv`` writes, for every instance of ``labels/instances`` (ids are
unique over the stack and each lies in one slice)::

    id, z, area_px, area_um2, centroid_y_px, centroid_x_px, centroid_y_um, centroid_x_um,
    bbox_y0, bbox_x0, bbox_y1, bbox_x1, mean_intensity

Centroids are the mean pixel coordinates (pixel centres at integer positions); the bounding box
is half-open in pixels; physical units come from the stack's voxel size (``unit`` per the
stack's metadata, micrometres for stacks ingested from TIFF); the mean intensity is that of the
raw grey values of the stack. Statistics are sums over blocks, so the table does not depend on
the block size. Memory: about 100 bytes per cell (10 million cells: 1 GB).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence

import numpy as np

from unet_core.common.atomic import atomic_output
from unet_core.common.outputs import CsvMark

COLUMNS = ("id", "z", "area_px", "area_um2", "centroid_y_px", "centroid_x_px", "centroid_y_um", "centroid_x_um",
           "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1", "mean_intensity")
#: A cell table is recognised (and may be replaced by the next merge) by its header row.
CELLS_MARK = CsvMark(",".join(COLUMNS), "a cell table written by 'unet merge --cells'")


class CellTable:
    """Per-instance sums of ``n_cells`` instances (ids 1..n_cells), fed one block at a time."""

    def __init__(self, n_cells: int) -> None:
        self.n_cells = int(n_cells)
        n = self.n_cells + 1
        self.z = np.full(n, -1, np.int64)
        self.area = np.zeros(n, np.int64)
        self.sum_y, self.sum_x, self.sum_i = (np.zeros(n, np.float64) for _ in range(3))
        big = np.iinfo(np.int64).max
        self.y0, self.x0 = np.full(n, big, np.int64), np.full(n, big, np.int64)
        self.y1, self.x1 = np.full(n, -1, np.int64), np.full(n, -1, np.int64)

    def add_block(self, z: int, offset: Sequence[int], ids: np.ndarray, image: np.ndarray) -> None:
        """Add one block of a slice.

        Args:
            z: the slice.
            offset: (y, x) of the block's first pixel in the slice, px.
            ids: (Y, X) final instance ids, 0 = background.
            image: (Y, X) raw grey values of the same pixels.
        """
        cells = ids > 0
        if not cells.any():
            return
        yy, xx = np.nonzero(cells)
        who = ids[cells].astype(np.int64)
        uniq, inverse = np.unique(who, return_inverse=True)
        self.z[uniq] = z
        self.area[uniq] += np.bincount(inverse)
        self.sum_y[uniq] += np.bincount(inverse, weights=yy + offset[0])
        self.sum_x[uniq] += np.bincount(inverse, weights=xx + offset[1])
        self.sum_i[uniq] += np.bincount(inverse, weights=np.asarray(image, np.float64)[cells])
        for lo, hi, coord in ((self.y0, self.y1, yy + offset[0]), (self.x0, self.x1, xx + offset[1])):
            np.minimum.at(lo, who, coord)
            np.maximum.at(hi, who, coord + 1)

    def csv_text(self, *, pixel_um: tuple[float, float]) -> str:
        """The table as CSV text, one row per cell with a pixel, in id order.

        Args:
            pixel_um: (y, x) pixel size in the stack's physical unit.
        """
        ids = np.flatnonzero(self.area)
        area = self.area[ids]
        cy, cx = self.sum_y[ids] / area, self.sum_x[ids] / area
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(COLUMNS)
        for k, i in enumerate(ids):
            writer.writerow([
                int(i), int(self.z[i]), int(area[k]), f"{area[k] * pixel_um[0] * pixel_um[1]:.6g}",
                f"{cy[k]:.3f}", f"{cx[k]:.3f}", f"{cy[k] * pixel_um[0]:.6g}", f"{cx[k] * pixel_um[1]:.6g}",
                int(self.y0[i]), int(self.x0[i]), int(self.y1[i]), int(self.x1[i]),
                f"{self.sum_i[i] / area[k]:.6g}",
            ])
        return buf.getvalue()


def write_cells_csv(path: str | os.PathLike[str], table: CellTable, *, pixel_um: tuple[float, float]) -> None:
    """Write ``table`` to ``path`` atomically (replacing only an earlier cell table: :data:`CELLS_MARK`)."""
    with atomic_output(path, own=CELLS_MARK) as tmp:
        tmp.write_text(table.csv_text(pixel_um=pixel_um))
