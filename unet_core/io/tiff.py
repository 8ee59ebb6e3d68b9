"""Reading TIFF stacks slice by slice: multi-page TIFF, BigTIFF, OME-TIFF, ImageJ
hyperstacks, and folders of single-page TIFFs. Never loads a whole stack.

Every problem with an input file is raised as a one-line :class:`UserInputError`
naming the file.
"""

from __future__ import annotations

import os
import re
import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from unet_core.common.errors import UserInputError

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
# axes tifffile may report for the one "stack" axis of a 2-D image sequence
STACK_AXES = set("ZTQIP")
# micrometres per unit, for the resolution units TIFF/OME/ImageJ files use
_UM_PER_UNIT = {
    "nm": 1e-3, "nanometer": 1e-3, "µm": 1.0, "um": 1.0, "micron": 1.0, "micrometer": 1.0,
    "\\u00B5m": 1.0, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4, "m": 1e6, "meter": 1e6,
}


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


@dataclass
class TiffStack:
    """A (Z, Y, X) stack on disk, read one slice at a time.

    Attributes:
        path: the file or folder.
        shape: (Z, Y, X).
        dtype: numpy dtype of the pixels.
        spacing_um: physical voxel size (z, y, x) in micrometres where the file says so,
            else None per axis.
    """

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype
    spacing_um: tuple[float | None, float | None, float | None]
    _files: list[Path] | None = None
    _tif: tifffile.TiffFile | None = None
    #: (series index, page index in that series) of every slice of a file
    _pages: list[tuple[int, int]] | None = None
    #: dtype in the file where :meth:`narrow_integers` chose a narrower :attr:`dtype`
    _file_dtype: np.dtype | None = None

    def read_slice(self, z: int) -> np.ndarray:
        """Slice ``z`` as a (Y, X) array of :attr:`dtype`."""
        try:
            if self._files is not None:
                plane = tifffile.imread(self._files[z])
                where = self._files[z]
            else:
                series, key = self._pages[z] if self._pages is not None else (0, z)
                plane = self._tif.asarray(key=key, series=series)
                where = self.path
        except (tifffile.TiffFileError, ValueError, OSError, IndexError, EOFError) as err:
            raise UserInputError(f"{self.path}: cannot read slice {z}: {_short(err)} (truncated or corrupted TIFF?)") from err
        plane = np.asarray(plane)
        if plane.ndim != 2:
            plane = np.squeeze(plane)
        if plane.shape != self.shape[1:]:
            raise UserInputError(
                f"{where}: slice {z} has shape {plane.shape}, expected {self.shape[1:]} like the first slice"
            )
        want = self._file_dtype or self.dtype
        if plane.dtype != want:
            raise UserInputError(f"{where}: slice {z} has dtype {plane.dtype}, expected {want}")
        return plane.astype(self.dtype) if self._file_dtype is not None else plane

    def narrow_integers(self, slices: list[int]) -> None:
        """Store 64-bit integer pixels in the narrowest integer type that holds every value of
        ``slices`` (uint8/16/32, or int8/16/32 where values are negative): lossless, and a type
        every later stage handles. Reads those slices once more (only for 64-bit files).

        Raises:
            UserInputError: values that do not fit 32 bits (named, with the fix).
        """
        if self.dtype.kind not in "iu" or self.dtype.itemsize < 8 or self._file_dtype is not None:
            return
        lo = hi = 0
        for z in slices:
            plane = self.read_slice(z)
            if plane.size:
                lo, hi = min(lo, int(plane.min())), max(hi, int(plane.max()))
        for name in (("uint8", "uint16", "uint32") if lo >= 0 else ("int8", "int16", "int32")):
            info = np.iinfo(name)
            if info.min <= lo and hi <= info.max:
                self._file_dtype, self.dtype = self.dtype, np.dtype(name)
                return
        raise UserInputError(
            f"{self.path}: {self.dtype} values {lo}..{hi} do not fit a 32-bit integer; rescale the image "
            "or renumber the labels to at most 32 bits"
        )

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()

    def __enter__(self) -> TiffStack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def open_tiff_stack(path: str | os.PathLike[str]) -> TiffStack:
    """Open a TIFF stack (file or folder of single-page TIFFs) without reading pixels.

    Raises:
        UserInputError: missing path, not a TIFF, no pages, unsupported axes (more than
            one non-singleton axis besides Y and X, RGB samples, several channels).
    """
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: no such file or directory")
    if path.is_dir():
        return _open_folder(path)
    try:
        tif = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, ValueError, struct.error, OSError, EOFError) as err:
        raise UserInputError(f"{path}: not a readable TIFF file ({_short(err)})") from err
    try:
        return _open_file(path, tif)
    except BaseException:
        tif.close()
        raise


def _open_file(path: Path, tif: tifffile.TiffFile) -> TiffStack:
    if not tif.series or not tif.pages:
        raise UserInputError(f"{path}: the TIFF holds no images (empty stack)")
    kept = [i for i, s in enumerate(tif.series) if not _is_reduced(s)] or [0]
    if len(kept) == 1:
        z, y, x = _series_geometry(path, tif.series[kept[0]])
        pages = None if kept[0] == 0 else [(kept[0], k) for k in range(z)]
        return TiffStack(path, (z, y, x), np.dtype(tif.series[kept[0]].dtype), _spacing_um(tif, path), _tif=tif,
                         _pages=pages)
    return _open_series(path, tif, kept)


def _is_reduced(series: tifffile.TiffPageSeries) -> bool:
    """A reduced-resolution copy (thumbnail, preview; TIFF NewSubfileType bit 0): not data."""
    keyframe = getattr(series, "keyframe", None)
    return bool(getattr(keyframe, "is_reduced", False))


def _open_series(path: Path, tif: tifffile.TiffFile, kept: list[int]) -> TiffStack:
    """A file of several series, e.g. a stack written one page per ``TiffWriter.write()`` call
    (common in acquisition software): every page is a slice, in file order, when all series
    agree in (Y, X) and dtype; otherwise one line saying how they differ. OME-TIFF and ImageJ
    files declare their images, so several series there are several images: refused."""
    series = [tif.series[i] for i in kept]
    if tif.is_ome or tif.is_imagej:
        shapes = ", ".join(f"{s.axes} {tuple(s.shape)}" for s in series[:4])
        raise UserInputError(f"{path}: holds {len(series)} images ({shapes}); save the one to segment as its own file")
    geometry = [_series_geometry(path, s) for s in series]
    kinds = {(g[1:], np.dtype(s.dtype).str) for g, s in zip(geometry, series)}
    if len(kinds) > 1:
        found = ", ".join(f"{y}x{x} {np.dtype(d)}" for (y, x), d in sorted(kinds)[:4])
        raise UserInputError(
            f"{path}: its {len(series)} page series differ in shape or dtype ({found}); every slice of a stack "
            "needs the same size and pixel type"
        )
    pages = [(i, k) for i, g in zip(kept, geometry) for k in range(g[0])]
    _, y, x = geometry[0]
    return TiffStack(path, (len(pages), y, x), np.dtype(series[0].dtype), _spacing_um(tif, path), _tif=tif,
                     _pages=pages)


def _series_geometry(path: Path, series: tifffile.TiffPageSeries) -> tuple[int, int, int]:
    """(Z, Y, X) of one series: a 2-D image or a (Z, Y, X) stack, else one line saying why not."""
    shape, axes = tuple(series.shape), series.axes
    if 0 in shape:
        raise UserInputError(f"{path}: the TIFF holds an empty stack (shape {shape})")
    kept = [(a, n) for a, n in zip(axes, shape) if n > 1 or a in "YX"]
    kept_axes = "".join(a for a, _ in kept)
    if "S" in kept_axes:
        raise UserInputError(f"{path}: RGB/multi-sample images are not supported (axes {axes}, shape {shape}); convert to greyscale")
    if "C" in kept_axes:
        raise UserInputError(f"{path}: {dict(zip(axes, shape))['C']} channels found (axes {axes}); extract one channel first")
    if kept_axes == "YX":
        z = 1
    elif len(kept_axes) == 3 and kept_axes[1:] == "YX" and kept_axes[0] in STACK_AXES:
        z = kept[0][1]
    else:
        raise UserInputError(
            f"{path}: unsupported axes {axes} with shape {shape}; expected a 2-D image or a 3-D stack (Z, Y, X)"
        )
    if len(series.pages) != z and not (z == 1 and len(series.pages) >= 1):
        raise UserInputError(f"{path}: expected one page per slice ({z}), found {len(series.pages)} (truncated or corrupted TIFF?)")
    dims = dict(kept)
    return z, dims["Y"], dims["X"]


def _open_folder(path: Path) -> TiffStack:
    files = sorted((p for p in path.iterdir() if p.suffix.lower() in TIFF_SUFFIXES and p.is_file()), key=_natural_key)
    if not files:
        raise UserInputError(f"{path}: folder holds no .tif/.tiff files (empty stack)")
    first = open_tiff_stack(files[0])
    try:
        if first.shape[0] != 1:
            raise UserInputError(f"{files[0]}: a folder stack must hold single-page TIFFs, this one has {first.shape[0]} pages")
        return TiffStack(path, (len(files), *first.shape[1:]), first.dtype, first.spacing_um, _files=files)
    finally:
        first.close()


def _spacing_um(tif: tifffile.TiffFile, path: Path) -> tuple[float | None, float | None, float | None]:
    """Voxel size (z, y, x) in µm from OME, ImageJ or baseline TIFF tags (None if absent)."""
    try:
        if tif.is_ome and tif.ome_metadata:
            root = ET.fromstring(tif.ome_metadata)
            pixels = next(el for el in root.iter() if el.tag.endswith("Pixels"))

            def size(axis: str) -> float | None:
                value = pixels.get(f"PhysicalSize{axis}")
                if value is None:
                    return None
                unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
                return float(value) * _UM_PER_UNIT.get(unit, 1.0)

            return size("Z"), size("Y"), size("X")
        page = tif.pages.first
        xy = [None, None]
        tags = page.tags
        unit_scale = None
        if tif.is_imagej and tif.imagej_metadata:
            meta = tif.imagej_metadata
            unit_scale = _UM_PER_UNIT.get(str(meta.get("unit", "")).strip(), None)
        if unit_scale is None and "ResolutionUnit" in tags:
            unit_scale = {2: 25400.0, 3: 10000.0}.get(int(tags["ResolutionUnit"].value))
        for i, name in enumerate(("YResolution", "XResolution")):
            if name in tags and unit_scale is not None:
                num, den = tags[name].value
                if num > 0 and den > 0 and not (num == 1 and den == 1):
                    xy[i] = unit_scale * den / num
        z = None
        if tif.is_imagej and tif.imagej_metadata and "spacing" in tif.imagej_metadata and unit_scale:
            z = float(tif.imagej_metadata["spacing"]) * unit_scale
        return z, xy[0], xy[1]
    except (ET.ParseError, StopIteration, KeyError, TypeError, ValueError, ZeroDivisionError):
        return None, None, None
