"""Export one level-0 array of a merged prediction as a (Z, Y, X) TIFF (``unet merge --tiff``)."""

from __future__ import annotations

import os

import numpy as np
import tifffile
import zarr

from unet_core import __version__
from unet_core.common.atomic import atomic_output
from unet_core.common.errors import parse_choice
from unet_core.common.outputs import TiffMark
from unet_core.infer.encoding import ProbabilityEncoding
from unet_core.infer.merge_settings import TiffContent

CELL_CLASS = 1
TIFF_GENERATOR = "unet merge"
TIFF_MARK = TiffMark(TIFF_GENERATOR)


def export_tiff(
    prediction: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
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
