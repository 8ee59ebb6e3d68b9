"""The synthetic stack as TIFF files: the I/O adapter of ``unet synth``.

:func:`write_synth_tiffs` streams the slices of :func:`unet_core.synth.scene.iter_synth_slices`,
page by page (never the whole stack in memory), into raw multi-page TIFF files, image and labels
separately, exactly as a microscope user would bring them; both are written atomically and marked
as this stage's own (:data:`SYNTH_TIFF_MARK`). Each file's first ImageDescription holds the
generation parameters (:func:`provenance`), which :func:`read_provenance` reads back.
:func:`write_synth_volume_tiffs` writes one 3-D volume of :mod:`unet_core.synth.volume` the same
way, with its voxel size recorded where ingest reads it (an ImageJ description and the
resolution tags).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from unet_core import __version__
from unet_core.common.atomic import atomic_output
from unet_core.common.errors import UserInputError
from unet_core.common.outputs import TiffMark, claim_outputs
from unet_core.common.progress import progress
from unet_core.synth.scene import SynthParams, iter_synth_slices
from unet_core.synth.volume import VolumeParams, synth_volume

log = logging.getLogger(__name__)

#: Files larger than this are written as BigTIFF (classic TIFF offsets are 32-bit).
BIGTIFF_THRESHOLD = 2 * 1024**3
#: Largest file tifffile writes as classic TIFF (32-bit offsets, room for the tags).
CLASSIC_TIFF_LIMIT = 2**32 - 2**25


@dataclass(frozen=True)
class SynthResult:
    """What :func:`write_synth_tiffs` wrote."""

    image_path: Path
    labels_path: Path | None
    shape: tuple[int, int, int]
    image_dtype: str
    label_dtype: str
    bigtiff: bool
    cells: int
    bytes_written: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        """Throughput in MB/s (10**6 bytes) of the image + label bytes written."""
        return self.bytes_written / 1e6 / max(self.seconds, 1e-9)


#: How 'unet synth' recognises its own TIFFs: the "generator" of the first ImageDescription.
SYNTH_TIFF_MARK = TiffMark("unet synth")


def stack_nbytes(params: SynthParams, slices: int) -> tuple[int, int]:
    """Raw bytes of the image stack and of the label stack."""
    px = slices * params.height * params.width
    return px * np.dtype(params.dtype).itemsize, px * params.label_dtype.itemsize


def provenance(
    params: SynthParams | VolumeParams, *, seed: int, slices: int, kind: str, volume: int | None = None
) -> dict[str, Any]:
    """Metadata written into each TIFF's ImageDescription (tifffile 'shaped' JSON).

    ``volume`` is the index of a 3-D volume (``params`` a :class:`VolumeParams`); None for a
    stack of independent 2-D slices.
    """
    meta: dict[str, Any] = {
        "generator": "unet synth",
        "version": __version__,
        "content": kind,
        "seed": int(seed),
        "slices": int(slices),
        "rng": "numpy SeedSequence(seed, spawn_key=(slice,))",
        "params": params.to_dict(),
    }
    if volume is not None:
        meta.update(dims=3, volume=int(volume), rng="numpy SeedSequence(seed, spawn_key=(volume,))",
                    voxel_size_um=list(params.spacing_um))
    if kind == "labels":
        meta["label_kind"] = "instance"
    return meta


def _use_bigtiff(nbytes: int, bigtiff: bool | None, path: Path) -> bool:
    if bigtiff is None:
        return nbytes > BIGTIFF_THRESHOLD
    if not bigtiff and nbytes > CLASSIC_TIFF_LIMIT:
        raise UserInputError(
            f"{path}: {nbytes / 2**30:.1f} GiB does not fit a classic TIFF (4 GiB offsets); allow BigTIFF"
        )
    return bigtiff


def write_synth_tiffs(
    image_path: str | Path,
    labels_path: str | Path | None,
    params: SynthParams,
    *,
    seed: int,
    slices: int,
    bigtiff: bool | None = None,
    workers: int = 1,
) -> SynthResult:
    """Generate a stack and stream it into multi-page TIFF files, atomically.

    Pages are written one by one as they are rendered (never the whole stack in memory),
    to temporary siblings that are renamed into place only when every file is complete.
    Each file's first ImageDescription holds the generation parameters (:func:`provenance`).

    Args:
        image_path: output image TIFF: (Z, Y, X) ``params.dtype`` raw grey values.
        labels_path: output label TIFF: (Z, Y, X) ``params.label_dtype`` instance ids,
            0 = background; None writes the image only.
        params: slice parameters.
        seed: stack seed, >= 0.
        slices: number of slices Z, >= 1.
        bigtiff: force BigTIFF (True) or classic TIFF (False); None = BigTIFF for a file
            larger than 2 GiB.
        workers: processes rendering slices in parallel (the output does not depend on it).

    Returns:
        A :class:`SynthResult` (paths, shape, dtypes, cell count, bytes and seconds).

    Raises:
        UserInputError: bad sizes, the two paths are the same, something other than an earlier
            'unet synth' TIFF stands at either path, or classic TIFF was forced for a file that
            needs BigTIFF.
    """
    image_path = Path(image_path)
    labels_path = None if labels_path is None else Path(labels_path)
    if labels_path is not None and image_path.resolve() == labels_path.resolve():
        raise UserInputError(f"{image_path}: image and labels must be written to different files")
    claim_outputs([(image_path, SYNTH_TIFF_MARK), (labels_path, SYNTH_TIFF_MARK)])
    if slices < 1:
        raise UserInputError(f"slices: {slices} must be at least 1")
    if seed < 0:
        raise UserInputError(f"seed: {seed} must be a non-negative integer")
    img_bytes, lab_bytes = stack_nbytes(params, slices)
    big_img = _use_bigtiff(img_bytes, bigtiff, image_path)
    big_lab = labels_path is not None and _use_bigtiff(lab_bytes, bigtiff, labels_path)
    shape = (slices, params.height, params.width)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmp_img = stack.enter_context(atomic_output(image_path, own=SYNTH_TIFF_MARK))
        tmp_lab = None if labels_path is None else stack.enter_context(atomic_output(labels_path, own=SYNTH_TIFF_MARK))
        cells = _stream_pages(params, seed=seed, slices=slices, workers=workers, image=(tmp_img, big_img),
                              labels=None if tmp_lab is None else (tmp_lab, big_lab))
    seconds = time.perf_counter() - t0
    written = img_bytes + (lab_bytes if labels_path is not None else 0)
    result = SynthResult(
        image_path=image_path, labels_path=labels_path, shape=shape, image_dtype=params.dtype,
        label_dtype=str(params.label_dtype), bigtiff=big_img or big_lab, cells=cells,
        bytes_written=written, seconds=seconds,
    )
    log.info(
        "wrote %s%s: %d x %d x %d px, %d cells, %.1f MB in %.1f s (%.1f MB/s)",
        image_path, f" and {labels_path}" if labels_path else "", *shape, cells,
        written / 1e6, seconds, result.mb_per_s,
    )
    return result


def _stream_pages(params: SynthParams, *, seed: int, slices: int, workers: int, image: tuple[Path, bool],
                  labels: tuple[Path, bool] | None) -> int:
    """Render the slices and write them page by page to the (path, bigtiff) files; returns the cell count."""
    cells = 0
    with contextlib.ExitStack() as files:
        tw_img = files.enter_context(tifffile.TiffWriter(image[0], bigtiff=image[1]))
        tw_lab = None if labels is None else files.enter_context(tifffile.TiffWriter(labels[0], bigtiff=labels[1]))
        pages = iter_synth_slices(params, seed=seed, slices=slices, workers=workers)
        meta_img = provenance(params, seed=seed, slices=slices, kind="image")
        meta_lab = provenance(params, seed=seed, slices=slices, kind="labels")
        for image_plane, label_plane in progress(pages, desc="synth", total=slices, unit="slice"):
            # the metadata goes into the first page only (tifffile updates its shape)
            tw_img.write(image_plane, contiguous=True, photometric="minisblack", metadata=meta_img)
            if tw_lab is not None:
                tw_lab.write(label_plane, contiguous=True, photometric="minisblack", metadata=meta_lab)
            meta_img = meta_lab = None
            cells += int(label_plane.max())
    return cells


def write_synth_volume_tiffs(
    image_path: str | Path,
    labels_path: str | Path | None,
    params: VolumeParams,
    *,
    seed: int,
    index: int = 0,
    bigtiff: bool | None = None,
) -> SynthResult:
    """Generate volume ``index`` of :func:`unet_core.synth.volume.synth_volume` and write it as
    multi-page TIFF files (one page per z slice), atomically, with its voxel size.

    The voxel size is written where :func:`unet_core.io.tiff.open_tiff_stack` (and so ``unet
    ingest``) reads it: X/YResolution in pixels per µm and an ImageJ description (``unit=micron``,
    ``spacing`` = the z step). The first ImageDescription stays this stage's JSON
    (:func:`provenance`, the mark and :func:`read_provenance`), the ImageJ one comes second
    (:func:`_swap_descriptions`). The volume is generated whole (it is small: 2 MB at the defaults).

    Args:
        image_path: output image TIFF: (Z, Y, X) ``params.dtype`` raw grey values.
        labels_path: output label TIFF: (Z, Y, X) ``params.label_dtype`` 3-D instance ids,
            0 = background; None writes the image only.
        params: volume parameters.
        seed: seed, >= 0.
        index: volume index, >= 0; the volume depends only on (seed, index).
        bigtiff: as for :func:`write_synth_tiffs`.

    Returns:
        A :class:`SynthResult` (``cells`` = the number of 3-D objects).

    Raises:
        UserInputError: as for :func:`write_synth_tiffs`, or a negative index.
    """
    image_path = Path(image_path)
    labels_path = None if labels_path is None else Path(labels_path)
    if labels_path is not None and image_path.resolve() == labels_path.resolve():
        raise UserInputError(f"{image_path}: image and labels must be written to different files")
    claim_outputs([(image_path, SYNTH_TIFF_MARK), (labels_path, SYNTH_TIFF_MARK)])
    if seed < 0 or index < 0:
        raise UserInputError(f"seed {seed} / index {index}: must be non-negative integers")
    t0 = time.perf_counter()
    image, labels = synth_volume(params, seed=seed, index=index)
    arrays = [(image_path, image, "image")]
    if labels_path is not None:
        arrays.append((labels_path, labels, "labels"))
    with contextlib.ExitStack() as stack:
        for path, array, kind in arrays:
            tmp = stack.enter_context(atomic_output(path, own=SYNTH_TIFF_MARK))
            meta = provenance(params, seed=seed, slices=params.depth, kind=kind, volume=index)
            big = _use_bigtiff(array.nbytes, bigtiff, path)
            _write_volume(tmp, array, meta, params.spacing_um, bigtiff=big)
    seconds = time.perf_counter() - t0
    written = sum(a.nbytes for _, a, _ in arrays)
    result = SynthResult(
        image_path=image_path, labels_path=labels_path, shape=params.shape, image_dtype=params.dtype,
        label_dtype=str(params.label_dtype),
        bigtiff=any(_use_bigtiff(a.nbytes, bigtiff, p) for p, a, _ in arrays),
        cells=int(labels.max()), bytes_written=written, seconds=seconds,
    )
    log.info("wrote %s%s: %d x %d x %d voxels of %s µm, %d nuclei in %.1f s", image_path,
             f" and {labels_path}" if labels_path else "", *params.shape,
             " x ".join(f"{s:g}" for s in params.spacing_um), result.cells, seconds)
    return result


def _write_volume(path: Path, array: np.ndarray, meta: dict[str, Any], spacing_um: tuple[float, float, float],
                  *, bigtiff: bool) -> None:
    """(Z, Y, X) ``array`` as one page per slice, with the voxel size ``spacing_um`` (z, y, x) µm."""
    dz, dy, dx = spacing_um
    z_n = array.shape[0]
    imagej = f"ImageJ=1.11a\nimages={z_n}\nslices={z_n}\nunit=micron\nspacing={dz!r}\nloop=false\n"
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        for z, plane in enumerate(array):
            first = z == 0  # descriptions go with the first page (tifffile updates the shape)
            tw.write(plane, contiguous=True, photometric="minisblack", metadata=meta if first else None,
                     description=imagej if first else None, resolution=(1.0 / dx, 1.0 / dy),
                     resolutionunit="NONE")
    _swap_descriptions(path)


def _swap_descriptions(path: Path) -> None:
    """Swap the first page's two ImageDescription tags in place.

    tifffile writes a given ``description`` before the JSON of ``metadata`` and refuses both an
    ImageJ file with a description and a description as an extra tag; the JSON must come first
    (:data:`SYNTH_TIFF_MARK` and :func:`read_provenance` read the first), and the ImageJ
    description is found in either of the first two (tifffile's ``imagej_description``).
    """
    with tifffile.TiffFile(path, mode="r+b") as tif:
        first, second = tif.pages.first.tags.getall(270)
        text_first, text_second = first.value, second.value
        first.overwrite(text_second)
        second.overwrite(text_first)


def read_provenance(path: str | Path) -> dict[str, Any]:
    """The generation parameters stored in a synthetic TIFF's first ImageDescription."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        meta = tif.shaped_metadata
    if not meta or meta[0].get("generator") != "unet synth":
        raise UserInputError(f"{path}: no 'unet synth' parameters in the TIFF ImageDescription")
    return dict(meta[0])
