"""Stage 1, ingest: raw TIFF stacks -> chunked, compressed OME-Zarr (NGFF 0.5).

Reads the image stack (and optionally a label stack of the same shape) one slice at a
time, checks every slice, writes the full-resolution arrays plus a 2x pyramid for
viewing, and records provenance (source path, sha256, tool version, parameters) and the
stack's intensity statistics. Peak memory is a few slices, whatever the stack size. The
store appears under its final name only when complete (see :mod:`unet_core.common.atomic`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from unet_core import __version__
from unet_core.common.atomic import atomic_output
from unet_core.common.outputs import Layout, ZarrMark, claim_outputs
from unet_core.common.errors import UserInputError, parse_choice
from unet_core.common.intensity import FLOAT32_MAX, RunningStats, slice_stats_to_attrs
from unet_core.common.labels import AUTO_KIND, LabelKind, binary_foreground
from unet_core.common.progress import progress
from unet_core.common.provenance import sha256_files
from unet_core.io.ngff import IMAGE_LABEL, LABEL_NAME, PyramidWriter, label_group
from unet_core.io.tiff import TiffStack, open_tiff_stack

log = logging.getLogger(__name__)

DEFAULT_CHUNKS = (1, 512, 512)
STACK_FORMAT = "unet-pipeline/stack/1"
#: How 'unet ingest' recognises its own stores (attrs["unet"]["stage"], :mod:`unet_core.common.outputs`):
#: the image pyramid and the ground-truth labels' pyramid, nothing else.
STACK_MARK = ZarrMark("ingest", Layout(("", "[0-9]*", "labels", f"labels/{LABEL_NAME}",
                                         f"labels/{LABEL_NAME}/[0-9]*")))


def check_image_slice(plane: np.ndarray, *, path: Path, z: int) -> None:
    """Reject NaN/Inf pixels in float images (they poison normalisation and training)."""
    if plane.dtype.kind == "f" and not np.isfinite(plane).all():
        bad = "NaN" if np.isnan(plane).any() else "Inf"
        raise UserInputError(f"{path}: slice {z} contains {bad} pixels; fix or mask them before ingesting")
    if plane.dtype.kind == "f" and plane.dtype.itemsize > 4 and plane.size:
        # every stage normalises grey values in float32: beyond its range a pixel becomes Inf there
        # (and the statistics of such values overflow float64 while they are computed)
        largest = float(np.abs(plane).max())
        if largest > FLOAT32_MAX:
            raise UserInputError(
                f"{path}: slice {z} holds values up to {largest:.3g} in magnitude, beyond the float32 range "
                f"(±{FLOAT32_MAX:.3g}) in which grey values are normalised; rescale the image (e.g. divide "
                "it by a power of ten) before ingesting")
    if plane.dtype.kind == "c":
        raise UserInputError(f"{path}: complex-valued pixels are not supported")


def check_label_slice(plane: np.ndarray, *, path: Path, z: int) -> None:
    """Labels must be non-negative integers."""
    if plane.dtype.kind not in "iub":
        raise UserInputError(
            f"{path}: labels must be integers, got dtype {plane.dtype}; save them as uint8/uint16/uint32"
        )
    if plane.dtype.kind == "i" and plane.size and plane.min() < 0:
        raise UserInputError(f"{path}: slice {z} has negative label {int(plane.min())}; labels must be >= 0")


class LabelKindTracker:
    """Decides ``binary`` vs ``instance`` from the values seen (two values -> binary)."""

    def __init__(self) -> None:
        self.values: set[int] = set()
        self.many = False

    def update(self, plane: np.ndarray) -> None:
        if self.many:
            return
        self.values.update(int(v) for v in np.unique(plane)[:3])
        self.many = len(self.values) > 2


def _choose_kind(requested: LabelKind | None, tracker: LabelKindTracker) -> LabelKind:
    if requested is not None:
        return requested
    if tracker.many:
        return LabelKind.INSTANCE
    # two distinct values: a semantic mask (e.g. ISBI: 255 = cell, 0 = membrane). A mask
    # with a single value is treated as instances (all background, or one object).
    return LabelKind.BINARY if len(tracker.values) == 2 else LabelKind.INSTANCE


def ingest(
    image: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    labels: str | os.PathLike[str] | None = None,
    slices: Sequence[int] | None = None,
    chunks: Sequence[int] = DEFAULT_CHUNKS,
    label_kind: str = "auto",
    spacing_um: Sequence[float] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Convert a TIFF image stack (and optional label stack) to an OME-Zarr store.

    Args:
        image: TIFF file or folder of single-page TIFFs, (Z, Y, X) grey values.
        out: output ``.ome.zarr`` directory (an earlier ``unet ingest`` store there is replaced
            atomically; anything else there is refused).
        labels: label stack of the same shape: instance ids (0 = background) or a binary
            mask (two values, the larger = cell interior, e.g. ISBI 2012's 255/0).
        slices: indices of the slices to keep (default: all), in output order.
        chunks: Zarr chunk shape (z, y, x) in voxels.
        label_kind: ``auto`` (two values -> binary, else instance), ``instance`` or ``binary``.
        spacing_um: voxel size (z, y, x) in µm, overriding what the file says.
        name: dataset name stored in the metadata (default: the image file's stem).

    Returns:
        The ``unet`` provenance attributes written to the store.

    Raises:
        UserInputError: any problem with the inputs (one line naming file and problem).
    """
    requested_kind = None if label_kind == AUTO_KIND else parse_choice(LabelKind, label_kind, option="--label-kind")
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) != 3 or min(chunks) < 1:
        raise UserInputError(f"chunks must be three positive integers (z, y, x), got {chunks}")
    image_path = Path(image)
    label_path = Path(labels) if labels is not None else None
    claim_outputs([(out, STACK_MARK)], [image_path, label_path])
    with open_tiff_stack(image_path) as img, (open_tiff_stack(label_path) if label_path else _null()) as lab:
        if lab is not None and lab.shape != img.shape:
            raise UserInputError(f"{label_path}: label stack shape {lab.shape} differs from image stack shape {img.shape} ({image_path})")
        if lab is not None and lab.dtype.kind not in "iub":
            raise UserInputError(f"{label_path}: labels must be integers, got dtype {lab.dtype}; save them as uint8/uint16/uint32")
        chosen = list(range(img.shape[0])) if slices is None else [int(z) for z in slices]
        bad = [z for z in chosen if not 0 <= z < img.shape[0]]
        if not chosen or bad:
            raise UserInputError(f"{image_path}: slice selection {bad or chosen} is empty or out of range for {img.shape[0]} slices")
        for stack in (img, lab):
            if stack is not None and stack.dtype.kind in "iu" and stack.dtype.itemsize == 8:
                wide = stack.dtype
                stack.narrow_integers(chosen)
                log.info("%s: %s values fit %s; stored as %s (lossless)", stack.path, wide, stack.dtype, stack.dtype)
        spacing, spacing_given = _spacing(img, spacing_um)
        with ThreadPoolExecutor(max_workers=1) as pool, atomic_output(out, own=STACK_MARK) as tmp:
            hashes: dict[str, Future[str]] = {"image": pool.submit(sha256_files, [image_path])}
            if label_path:
                hashes["labels"] = pool.submit(sha256_files, [label_path])
            attrs = _convert(img, lab, tmp, chosen=chosen, chunks=chunks, spacing=spacing, label_kind=requested_kind)
            attrs.update(
                name=name or image_path.name.split(".")[0],
                source={"image": str(image_path), "labels": str(label_path) if label_path else None},
                sha256={k: f.result() for k, f in hashes.items()},
                slices=chosen,
                tool=f"unet-pipeline {__version__}",
                stage="ingest",
                format=STACK_FORMAT,
                parameters={"chunks": list(chunks), "label_kind": label_kind},
                voxel_size_given=spacing_given,  # False: 1 µm stood in (Stack.voxel_size_given)
            )
            root = zarr.open_group(tmp, mode="r+")
            root.attrs.update({"unet": attrs})
    log.info("wrote %s: %d slices of %d x %d (%s)", out, len(chosen), *img.shape[1:], img.dtype)
    return attrs


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def voxel_size(img: TiffStack, override: Sequence[float] | None) -> tuple[tuple[float, float, float], str]:
    """The voxel size (z, y, x) µm of ``img`` and the axes it is missing for: ``override`` (the
    samples table's voxel_size_um column, ``--voxel-size-um``), else the file's; where the file says
    nothing for an axis, 1 µm stands in and the axis is named in the second value ("" = all given).
    A stack with a missing axis is recorded as having no given voxel size, which the 3-D stages
    refuse (distances in µm would be distances in voxels). Every value must be finite and > 0 (NaN
    would end up in zarr.json, which is then not valid JSON). Used by ingest and by the workflow's
    start-up check of a 3-D run (no pixels are read).

    Raises:
        UserInputError: an override or file value that is not finite and positive.
    """
    if override is not None:
        if len(override) != 3 or not all(0 < float(v) < math.inf for v in override):
            raise UserInputError(
                f"--voxel-size-um: must be three finite positive numbers (z, y, x) in µm, got {list(override)}")
        return tuple(float(v) for v in override), ""  # type: ignore[return-value]
    found = img.spacing_um
    if any(v is not None and not 0 < v < math.inf for v in found):
        raise UserInputError(
            f"{img.path}: the file gives voxel size {list(found)} µm (not finite and positive); "
            "pass --voxel-size-um z,y,x")
    z, y, x = found
    return (z or 1.0, y or 1.0, x or 1.0), "".join(axis for axis, v in zip("zyx", found, strict=True) if v is None)


def _spacing(img: TiffStack, override: Sequence[float] | None) -> tuple[tuple[float, float, float], bool]:
    """:func:`voxel_size`, warning where the file gives none for an axis; and whether it was given."""
    spacing, missing = voxel_size(img, override)
    if missing:
        log.warning("%s: the file gives no voxel size for axis %s; using 1 µm there (areas and centroids "
                    "in µm are then in pixels, and the stack is recorded as having no given voxel size, which "
                    "the 3-D mode refuses): pass --voxel-size-um z,y,x (workflow: the samples "
                    "table's voxel_size_um column)", img.path, ", ".join(missing))
    return spacing, not missing


def _convert(
    img: TiffStack,
    lab: TiffStack | None,
    tmp: Path,
    *,
    chosen: list[int],
    chunks: tuple[int, ...],
    spacing: tuple[float, float, float],
    label_kind: LabelKind | None,
) -> dict[str, Any]:
    shape = (len(chosen), *img.shape[1:])
    root = zarr.open_group(tmp, mode="w")
    image_writer = PyramidWriter(root, shape, img.dtype, chunks, spacing, unit="micrometer", name="image")
    label_writer = None
    if lab is not None:
        group = label_group(root, LABEL_NAME)
        label_writer = PyramidWriter(group, shape, lab.dtype, chunks, spacing, unit="micrometer", labels=True, name=LABEL_NAME)
    stats, kinds = RunningStats(), LabelKindTracker()
    writers = [w for w in (image_writer, label_writer) if w is not None]
    try:
        for out_z, z in enumerate(progress(chosen, desc="ingest", unit="slice")):
            plane = img.read_slice(z)
            check_image_slice(plane, path=img.path, z=z)
            stats.update(plane)
            image_writer.write_plane(out_z, plane)
            if label_writer is not None:
                lplane = lab.read_slice(z)
                check_label_slice(lplane, path=lab.path, z=z)
                kinds.update(lplane)
                label_writer.write_plane(out_z, lplane)
    except BaseException:
        for writer in writers:
            writer.close()
        raise
    image_writer.finish()
    attrs: dict[str, Any] = {"intensity": stats.result().to_dict(), "slice_intensity": slice_stats_to_attrs(stats.slices),
                             "dtype": str(img.dtype), "shape": list(shape)}
    if label_writer is not None:
        label_writer.finish(IMAGE_LABEL)
        kind = _choose_kind(label_kind, kinds)
        attrs["label_kind"] = kind.value
        attrs["label_values_seen"] = sorted(kinds.values)[:3] if not kinds.many else None
        if kind is LabelKind.BINARY and not kinds.many:  # decided once, here; the stages read it
            attrs["foreground_value"] = binary_foreground(kinds.values)
    return attrs
