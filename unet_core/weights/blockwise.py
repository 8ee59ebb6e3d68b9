"""Chunk-parallel weight maps with Dask: ingested stack in, ``weights.zarr`` out.

Layout written by :func:`write_weights` (Zarr v3 group, chunks = the stack's label chunks)::

    weights.zarr/
      weights     float32 (Z, Y, X)  w(x) = w_c(x) + border term
      classes     uint8   (Z, Y, X)  1 = cell interior, 0 = background / separation line
      instances   int32   (Z, Y, X)  cells after separation (0 where classes == 0)
      attrs["unet"]: w0, sigma_px, tolerance, cutoff_px, halo_px, class_weights
                     [w_background, w_cell], frequencies, connectivity, label_kind,
                     separate_touching, border_pixels, source, intensity (of the source stack), version

Every 2-D value is computed per slice by :mod:`unet_core.weights.maps`. Instance labels are
chunked as stored and processed with ``map_overlap``: depth 1 for the separation lines and
``halo_px = floor(cutoff) + 2`` for the border term (the term needs labels within the cutoff
``sigma * sqrt(2 ln(w0 / tolerance))`` only; +1 makes the halo strictly larger than the
cutoff, +1 more covers the contour/separation ring at the halo's edge). Outside the image
the halo is filled with 0 (background), which is exactly "no cell beyond the border", so
the chunked result is bit-identical to the whole-slice kernel. (The project's mirror
convention is for image context; mirroring labels would invent cells.) Binary labels need
whole-slice connected components, so they are labelled one slice per task, then rechunked.

With :class:`~unet_core.weights.maps.VolumeWeightParams` (``unet weights --dims 3``) the stack is
one (Z, Y, X) volume: the same three arrays and chunks, classes with 6-connected separation
surfaces (:func:`volume_class_array`, halo 1 voxel) and w(x) in µm with the stack's voxel size
(:func:`volume_weight_arrays`, halo ``halo_voxels`` per axis, z included), computed in blocks
of whole store chunks (:func:`volume_blocks`: a halo of 23 voxels around 64-voxel chunks would
otherwise make the work 6 times the volume's), equal to the whole-volume kernels byte for byte; ``attrs["unet"]`` then holds ``dims: 3`` and the
:class:`~unet_core.weights.recipe.VolumeWeightRecipe` (sigma_um, spacing_um, ...), cutoff_um and
halo_voxels instead of the px keys. :func:`open_volume_stack` refuses what is not a volume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from unet_core import __version__
from unet_core.common.atomic import atomic_output, atomic_output_with_companions
from unet_core.common.background import SettlingThreadPool, background_work
from unet_core.common.outputs import JsonMark, Layout, PngMark, ZarrMark, claim_outputs
from unet_core.common.errors import UserInputError, parse_choice
from unet_core.common.labels import LabelKind, split_label_id
from unet_core.common.progress import progress
from unet_core.io.ngff import Stack, create_array, open_stack
from unet_core.weights import maps as kernel
from unet_core.weights.plot import plot_weights
from unet_core.weights.recipe import VolumeWeightRecipe, WeightParams, WeightRecipe

log = logging.getLogger(__name__)

CLASS_WEIGHTS_FORMAT = "unet-pipeline/class-weights/1"
WEIGHTS_FORMAT = "unet-pipeline/weights/1"
#: How 'unet class-weights' and 'unet weights' recognise their own outputs (:mod:`unet_core.common.outputs`).
CLASS_WEIGHTS_MARK = JsonMark(CLASS_WEIGHTS_FORMAT, "a class_weights.json written by 'unet class-weights'")
WEIGHTS_MARK = ZarrMark("weights", Layout(("", "weights", "classes", "instances")))
WEIGHTS_PLOT_MARK = PngMark("weights")
#: Largest 3-D compute block (voxels, before its halo) that :func:`volume_blocks` groups store chunks into.
BLOCK_VOXELS = 2**21


@contextlib.contextmanager
def about_stack(path: str | os.PathLike[str]) -> Iterator[None]:
    """Name the stack ``path`` in a :class:`UserInputError` raised inside (e.g. by a Dask task
    computing on its labels), so the user learns which stack to fix."""
    try:
        yield
    except UserInputError as err:
        if str(path) in str(err):
            raise
        raise UserInputError(f"{path}: {err}") from err


@contextlib.contextmanager
def dask_scheduler(scheduler: str = "threads", *, workers: int | None = None) -> Iterator[None]:
    """Run the enclosed Dask computations on ``scheduler``.

    Args:
        scheduler: ``"threads"``, ``"processes"``, ``"synchronous"`` or the address of a
            ``dask.distributed`` scheduler (``tcp://host:8786``).
        workers: local workers (threads or processes); default all cores. Inside a
            Snakemake job pass the rule's ``threads``.
    """
    import dask

    n = workers or os.cpu_count() or 1
    if scheduler == "threads":
        # our own pool: when a task fails, Dask raises at once while the other tasks still run;
        # a failed output is removed only after they have ended (unet_core.common.background)
        pool = SettlingThreadPool(n, thread_name_prefix="dask")
        try:
            with background_work(pool.settle), dask.config.set(scheduler="threads", pool=pool, num_workers=n):
                yield
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return
    if scheduler in ("processes", "synchronous"):
        with dask.config.set(scheduler=scheduler, num_workers=n):
            yield
        return
    if "://" not in scheduler and ":" not in scheduler:
        raise UserInputError(
            f"scheduler {scheduler!r}: use threads, processes, synchronous or a dask.distributed address"
        )
    from distributed import Client

    try:
        client = Client(scheduler, timeout="20s")
    except OSError as err:
        raise UserInputError(f"scheduler {scheduler}: cannot connect ({err})") from err
    try:
        yield
    finally:
        client.close()


def _instances_block(block: np.ndarray, *, kind: LabelKind, connectivity: int, foreground: int | None) -> np.ndarray:
    out = np.empty(block.shape, dtype=np.int32)
    for z in range(block.shape[0]):
        out[z] = kernel.instances_from_labels(block[z], kind=kind, connectivity=connectivity, foreground=foreground)
    return out


def _classes_block(block: np.ndarray, *, separate_touching: bool) -> np.ndarray:
    out = np.empty(block.shape, dtype=np.uint8)
    for z in range(block.shape[0]):
        out[z] = kernel.class_map(block[z], separate_touching=separate_touching)
    return out


def _weights_block(block: np.ndarray, *, recipe: WeightRecipe) -> np.ndarray:
    out = np.empty(block.shape, dtype=np.float32)
    for z in range(block.shape[0]):
        out[z] = recipe.apply(block[z])[1]
    return out


def _cells_block(instances: np.ndarray, classes: np.ndarray) -> np.ndarray:
    return np.where(classes == 1, instances, 0).astype(np.int32)


def label_arrays(labels, *, kind: LabelKind | str, connectivity: int = 4, foreground: int | None = None):
    """Lazy instances and classes of a label stack.

    Args:
        labels: (Z, Y, X) integer Dask array (any chunks; z chunks of 1 keep memory low).
        kind: ``"instance"`` or ``"binary"``.
        connectivity: 4 or 8 (binary labels only).
        foreground: cell value of binary labels: the stack's record (:meth:`Stack.binary_foreground`);
            required for binary labels.

    Returns:
        ``(instances, classes)``: int32 and uint8 Dask arrays with ``labels``' chunks.
    """
    import dask.array as da

    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise UserInputError(f"labels have dtype {labels.dtype}: must be integers; re-ingest the labels")
    kind = parse_choice(LabelKind, kind, option="label kind", error=UserInputError)
    if kind is LabelKind.BINARY:
        if foreground is None:
            raise UserInputError("binary labels: give their foreground value (the stack's record, "
                                 "Stack.binary_foreground())")
        slices = labels.rechunk((1, labels.shape[1], labels.shape[2]))
        instances = slices.map_blocks(
            _instances_block, kind=kind, connectivity=connectivity, foreground=foreground, dtype=np.int32
        ).rechunk(labels.chunks)
    else:
        instances = labels.map_blocks(
            _instances_block, kind=kind, connectivity=connectivity, foreground=None, dtype=np.int32
        )
    classes = da.map_overlap(
        _classes_block, instances, depth={0: 0, 1: 1, 2: 1}, boundary=0, dtype=np.uint8,
        separate_touching=kind is LabelKind.INSTANCE, trim=True,
    )
    return instances, classes


def weight_array(instances, *, kind: LabelKind | str, class_weights: Sequence[float], params: WeightParams):
    """Lazy (Z, Y, X) float32 w(x) from lazy int32 instances (``map_overlap``, halo_px)."""
    import dask.array as da

    kind = parse_choice(LabelKind, kind, option="label kind", error=UserInputError)
    recipe = WeightRecipe(params, tuple(float(c) for c in class_weights), separate_touching=kind is LabelKind.INSTANCE)
    # a halo beyond the slice would read only the zero boundary: clip it to the slice (Dask refuses more)
    depth = {0: 0, 1: min(params.halo_px, instances.shape[1]), 2: min(params.halo_px, instances.shape[2])}
    return da.map_overlap(
        _weights_block, instances, depth=depth, boundary=0, dtype=np.float32, trim=True,
        recipe=recipe,
    )


def _classes_3d_block(block: np.ndarray, *, separate_touching: bool) -> np.ndarray:
    return kernel.class_map_3d(block, separate_touching=separate_touching)


def _weights_3d_block(block: np.ndarray, *, halo: tuple[int, int, int], separate_touching: bool,
                      class_weights: tuple[float, float], params: kernel.VolumeWeightParams,
                      spacing_um: tuple[float, float, float]) -> np.ndarray:
    """w(x) of a chunk grown by ``halo`` voxels per side; only the core (what Dask keeps) gets the term."""
    classes = kernel.class_map_3d(block, separate_touching=separate_touching)
    core = tuple(slice(h, n - h) for h, n in zip(halo, block.shape))
    return kernel.weight_map_3d(block, classes, class_weights=class_weights, params=params, spacing_um=spacing_um,
                                within=core)


def volume_weight_arrays(instances, *, class_weights: Sequence[float], params: kernel.VolumeWeightParams,
                         spacing_um: Sequence[float], separate_touching: bool = True):
    """Lazy classes and w(x) of a (Z, Y, X) instance volume, chunk by chunk in 3-D (``map_overlap``).

    Every chunk is grown along each axis by ``params.halo_voxels(spacing_um)`` =
    ``ceil(cutoff_um / spacing) + 1`` voxels: the first term holds every voxel within the
    cutoff of the chunk (no other voxel changes a value), the +1 gives those voxels their
    class (the 6-connected separation reads one face neighbour further); the classes
    alone need 1. Outside the volume the halo is 0 (background: no cell beyond the border),
    which is what the whole-volume kernels assume, so the result equals
    :func:`unet_core.weights.maps.weight_map_3d` of the whole volume bit for bit.

    Args:
        instances: (Z, Y, X) integer Dask array of instance labels, 0 = background (any chunks).
        class_weights: ``(w_background, w_cell)``.
        params: w0, sigma_um, tolerance, border voxels, d1/d2 method.
        spacing_um: voxel size (dz, dy, dx), µm.
        separate_touching: cut 6-connected separation surfaces (instance labels).

    Returns:
        ``(classes, weights)``: uint8 and float32 Dask arrays with ``instances``' chunks (a
        chunk thinner than the halo is computed merged with its neighbour, then split again).
    """
    import dask.array as da

    if instances.ndim != 3 or not (np.issubdtype(instances.dtype, np.integer) or instances.dtype == np.bool_):
        raise UserInputError(f"instances: expected a 3-D (Z, Y, X) integer volume, got shape {instances.shape} "
                             f"dtype {instances.dtype}")
    spacing = kernel.check_spacing(spacing_um)
    # a halo beyond the volume would read only the zero boundary: clip it to the volume (Dask refuses more;
    # a volume thinner than the z halo is usual)
    depth = tuple(min(h, n) for h, n in zip(params.halo_voxels(spacing), instances.shape))
    wc = tuple(float(c) for c in class_weights)
    classes = volume_class_array(instances, separate_touching=separate_touching)
    weights = da.map_overlap(_weights_3d_block, instances, depth=dict(enumerate(depth)), boundary=0,
                             dtype=np.float32, trim=True, halo=depth, separate_touching=separate_touching,
                             class_weights=wc, params=params, spacing_um=spacing)
    # Dask merges chunks thinner than the halo before growing them; give the caller its chunks back
    return classes, weights.rechunk(instances.chunks)


def volume_class_array(instances, *, separate_touching: bool = True):
    """Lazy (Z, Y, X) uint8 classes of a lazy instance volume (:func:`kernel.class_map_3d`, 6-connected
    separation surfaces), chunk by chunk with a halo of one voxel per side (the rule reads the face
    neighbours only), so chunked == whole volume."""
    import dask.array as da

    return da.map_overlap(_classes_3d_block, instances, depth=1, boundary=0, dtype=np.uint8, trim=True,
                          separate_touching=separate_touching)


def _check_ids_are_3d(stack: Stack) -> None:
    """Refuse instance labels with an id in several 6-connected pieces (:func:`split_label_id`)."""
    labels = stack.labels
    step = int(labels.chunks[0])

    def planes() -> Iterator[np.ndarray]:
        for z0 in range(0, labels.shape[0], step):
            yield from np.asarray(labels[z0:z0 + step])

    found = split_label_id(planes())
    if found is None:
        return
    label_id, pieces = found
    where = "; ".join(_slice_span(p) for p in pieces[:3]) + ("; ..." if len(pieces) > 3 else "")
    raise UserInputError(
        f"{stack.path}: label id {label_id} forms {len(pieces)} separate 6-connected pieces (slices {where}): "
        "ids restart on each slice? --dims 3 needs one id per cell across its slices; relabel in 3-D "
        "or make 2-D weights")


def _slice_span(slices: list[int]) -> str:
    return str(slices[0]) if len(slices) == 1 else f"{slices[0]}-{slices[-1]}"


def volume_blocks(chunks: Sequence[int], shape: Sequence[int], halo: Sequence[int], *,
                  max_voxels: int = BLOCK_VOXELS) -> tuple[int, int, int]:
    """The (z, y, x) blocks a volume's w(x) is computed in: groups of the store's ``chunks``.

    A block reads its halo too, and the border term near a block face is computed again by
    each neighbour, so a chunk much thinner than the halo (64 px in the plane against a 23 px
    halo: 30 s where the whole volume takes 1 s) wastes most of the work. Each axis is grown
    by whole chunks, in turn, until it is at least 4 halos (the halo then at most 1.5 times
    the work per axis) or the whole axis, while the block stays within ``max_voxels``. Whole
    chunks keep every Zarr chunk written by one block; the result does not depend on the
    blocks (equal to the whole volume).

    Args:
        chunks: the store's (z, y, x) chunk shape, voxels.
        shape: the volume's (Z, Y, X).
        halo: voxels per side per axis (:meth:`VolumeWeightParams.halo_voxels`).
        max_voxels: largest block (bounds memory; a block of at most one chunk per axis is kept).

    Returns:
        (z, y, x) block shape, voxels, a multiple of ``chunks`` per axis (or the whole axis).
    """
    block = [min(int(c), int(n)) for c, n in zip(chunks, shape)]
    grown = True
    while grown:
        grown = False
        for axis in (1, 2, 0):
            if block[axis] >= min(4 * halo[axis], shape[axis]):
                continue
            wider = block.copy()
            wider[axis] = min(block[axis] + int(chunks[axis]), int(shape[axis]))
            if math.prod(wider) <= max_voxels:
                block, grown = wider, True
    return tuple(block)  # type: ignore[return-value]


def open_volume_stack(stack_path: str | os.PathLike[str], *, plot_slice: int | None = None) -> Stack:
    """A labelled stack usable as a volume (``--dims 3``): several slices, a voxel size that was given
    at ingest (w(x) is measured in µm), instance labels, one 6-connected piece per id.

    Raises:
        UserInputError: any of these fails (one line naming the stack and what to change).
    """
    stack = _open_labelled(stack_path, plot_slice)
    stack.volume_voxel_size(needs="--dims 3")
    if _kind(stack) is not LabelKind.INSTANCE:
        raise UserInputError(f"{stack.path}: {_kind(stack).value} labels; --dims 3 needs instance labels "
                             "(one id per cell across its slices)")
    _check_ids_are_3d(stack)
    return stack


def class_counts(stack_paths: Sequence[str | os.PathLike[str]], *, connectivity: int = 4,
                 dims: int = 2) -> np.ndarray:
    """Global pixel counts [background, cell] over all slices of all stacks (Dask reduction).

    Classes are those of :func:`label_arrays` (separation lines count as background), or with
    ``dims`` 3 those of :func:`volume_class_array` (6-connected separation surfaces; the
    stacks checked by :func:`open_volume_stack`).

    Returns:
        (2,) int64 counts.
    """
    import dask.array as da

    total = np.zeros(kernel.N_CLASSES, dtype=np.int64)
    for path in stack_paths:
        with about_stack(path):
            if dims == 3:
                classes = volume_class_array(da.from_zarr(open_volume_stack(path).labels))
            else:
                stack = open_stack(path, require_labels=True)
                _, classes = label_arrays(da.from_zarr(stack.labels), kind=_kind(stack), connectivity=connectivity,
                                          foreground=stack.binary_foreground())
            cells = int(classes.astype(np.int64).sum().compute())
        total += np.array([classes.size - cells, cells], dtype=np.int64)
    return total


def _kind(stack) -> LabelKind:
    """The stack's label kind (parsed by open_stack; None: ingested without one)."""
    if stack.label_kind is None:
        raise UserInputError(f"{stack.path}: no label kind in attrs['unet']; re-ingest the labels")
    return stack.label_kind


def compute_class_weights(
    stack_paths: Sequence[str | os.PathLike[str]], *, connectivity: int = 4, dims: int = 2
) -> dict[str, Any]:
    """Class weights from the global class frequencies of the training stacks.

    Args:
        stack_paths: ingested stacks with labels.
        connectivity: 4 or 8, binary masks' components (2-D).
        dims: 2 (classes slice by slice) or 3 (classes of the volumes: :func:`class_counts`).

    Returns:
        JSON-ready dict: ``class_weights`` [w_background, w_cell], ``frequencies``,
        ``counts``, ``formula``, ``connectivity`` (2-D) or ``dims`` 3, ``stacks``, ``version``.
    """
    counts = class_counts(stack_paths, connectivity=connectivity, dims=dims)
    # a 2-D file keeps its keys (and bytes); a 3-D one says so, and 'unet weights' matches it to its mode
    return _class_weights_record(counts, stack_paths, {"connectivity": connectivity} if dims == 2 else {"dims": 3})


def _class_weights_record(counts: np.ndarray, stack_paths: Sequence[str | os.PathLike[str]],
                          mode: dict[str, int]) -> dict[str, Any]:
    """What :func:`compute_class_weights` returns, from the class counts."""
    with about_stack(", ".join(map(str, stack_paths))):
        weights = kernel.class_weights_from_counts(counts)
    return {
        "class_weights": [float(w) for w in weights],
        "frequencies": [float(c / counts.sum()) for c in counts],
        "counts": [int(c) for c in counts],
        "formula": "w_c = 1 / (K * f_c), K = 2 classes (mean weight over the training pixels = 1)",
        **mode,
        "stacks": [str(p) for p in stack_paths],
        "version": __version__,
        "format": CLASS_WEIGHTS_FORMAT,
    }


def write_class_weights(stack_paths: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                        connectivity: int = 4, dims: int = 2) -> dict[str, Any]:
    """Compute :func:`compute_class_weights` and write it atomically as JSON to ``out``.

    Raises:
        UserInputError: unusable stacks (the message names the stack), or something other than
            an earlier ``class_weights.json`` at ``out`` (:mod:`unet_core.common.outputs`).
    """
    claim_outputs([(out, CLASS_WEIGHTS_MARK)], stack_paths)
    result = compute_class_weights(stack_paths, connectivity=connectivity, dims=dims)
    with atomic_output(out, own=CLASS_WEIGHTS_MARK) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    log.info("class weights %s (frequencies %s) -> %s", result["class_weights"], result["frequencies"], out)
    return result


def read_class_weights(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``class_weights.json`` written by :func:`write_class_weights`.

    Returns:
        Its content, plus ``path``: the file it was read from.
    """
    try:
        data = json.loads(Path(path).read_text())
        weights = [float(w) for w in data["class_weights"]]
        data["path"] = str(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserInputError(f"{path}: not a class_weights.json from 'unet class-weights' ({err})") from err
    usable = all(math.isfinite(w) and 0 <= w <= kernel.MAX_WEIGHT for w in weights)
    if len(weights) != kernel.N_CLASSES or not usable:
        raise UserInputError(f"{path}: class_weights {weights} must be two finite numbers >= 0, at most "
                             f"{kernel.MAX_WEIGHT:.3g} (the weight maps are float32)")
    return data


def write_weights(
    stack_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    params: WeightParams | kernel.VolumeWeightParams = WeightParams(),
    class_weights: dict[str, Any] | None = None,
    plot_slice: int | None = 0,
    batch_slices: int = 8,
    block_voxels: int = BLOCK_VOXELS,
) -> dict[str, Any]:
    """Compute instances, classes and w(x) of a stack and write ``out`` (a Zarr group).

    Runs on the current Dask scheduler (see :func:`dask_scheduler`). The store is written
    atomically; a PNG (labels | w_c | border term | w) of ``plot_slice`` is written next to
    it as ``<out without .zarr>.png`` (None: no plot).

    Args:
        stack_path: ingested stack (``unet_core.io.ngff.open_stack``) with labels.
        out: output ``.zarr`` directory.
        params: :class:`WeightParams` (w0, sigma in px, tolerance, connectivity, border pixels,
            d1/d2 method): every slice on its own, as in the paper; or
            :class:`~unet_core.weights.maps.VolumeWeightParams` (sigma in µm): the stack as one
            (Z, Y, X) volume with its voxel size (6-connected separation surfaces, d1/d2 in µm;
            the stack checked by :func:`open_volume_stack`), attrs ``dims: 3`` and the
            :class:`VolumeWeightRecipe`.
        class_weights: dict from :func:`compute_class_weights`/:func:`read_class_weights`,
            counted in the same mode (2-D or 3-D); None computes the frequencies from this
            stack alone.
        plot_slice: slice index of the figure.
        batch_slices: slices computed per Dask call (bounds memory; a progress step each).
        block_voxels: 3-D: the largest compute block, voxels (:func:`volume_blocks`; the store
            keeps the stack's chunks).

    Returns:
        The ``attrs["unet"]`` written.
    """
    out = Path(out)
    png = _plot_path(out) if plot_slice is not None else None
    claim_outputs([(out, WEIGHTS_MARK), (png, WEIGHTS_PLOT_MARK)],
                  [stack_path, class_weights.get("path") if class_weights else None])
    _check_class_weights_mode(class_weights, dims=3 if isinstance(params, kernel.VolumeWeightParams) else 2)
    with about_stack(stack_path):
        return _write_weights(stack_path, out, png, params=params, class_weights=class_weights,
                              plot_slice=plot_slice, batch_slices=batch_slices, block_voxels=block_voxels)


def _check_class_weights_mode(class_weights: dict[str, Any] | None, *, dims: int) -> None:
    """Refuse class weights counted in the other mode (a 3-D file has ``dims: 3``; a 2-D one no key)."""
    counted = 2 if class_weights is None else class_weights.get("dims", 2)
    if class_weights is not None and counted != dims:
        raise UserInputError(
            f"{class_weights.get('path', 'class weights')}: counted in {counted}-D, the weights are made in "
            f"{dims}-D; count them with 'unet class-weights{' --dims 3' if dims == 3 else ''}'")


def _plot_path(out: Path) -> Path:
    """Where :func:`write_weights` puts its figure: next to the store, ``.zarr`` -> ``.png``."""
    return out.with_suffix(".png") if out.suffix == ".zarr" else out.with_name(out.name + ".png")


def _slice_plan(stack: Stack, params: WeightParams, class_weights: dict[str, Any] | None):
    """The lazy arrays, the mode's leading attributes and the class weights, slice by slice (2-D)."""
    import dask.array as da

    kind = _kind(stack)
    if class_weights is None:
        log.info("no --class-weights given: class frequencies from %s alone", stack.path)
        class_weights = compute_class_weights([stack.path], connectivity=params.connectivity)
    wc = [float(w) for w in class_weights["class_weights"]]
    instances, classes = label_arrays(da.from_zarr(stack.labels), kind=kind, connectivity=params.connectivity,
                                      foreground=stack.binary_foreground())
    arrays = {
        "weights": weight_array(instances, kind=kind, class_weights=wc, params=params),
        "classes": classes,
        "instances": da.map_blocks(_cells_block, instances, classes, dtype=np.int32),
    }
    head = {**params.to_dict(), "cutoff_px": params.cutoff_px, "halo_px": params.halo_px}
    return arrays, head, class_weights, f"sigma={params.sigma_px:g} px", f"{params.halo_px} px"


def _volume_plan(stack: Stack, params: kernel.VolumeWeightParams, class_weights: dict[str, Any] | None,
                 block_voxels: int):
    """The lazy arrays, the mode's leading attributes and the class weights of the stack as a volume (3-D)."""
    import dask.array as da

    halo = params.halo_voxels(stack.scale)  # type: ignore[arg-type]
    block = volume_blocks(stack.labels.chunks, stack.shape, halo, max_voxels=block_voxels)
    instances = da.from_zarr(stack.labels).rechunk(block)
    classes = volume_class_array(instances)
    if class_weights is None:
        log.info("no --class-weights given: class frequencies of %s alone (3-D classes)", stack.path)
        cells = int(classes.astype(np.int64).sum().compute())
        counts = np.array([classes.size - cells, cells], dtype=np.int64)
        class_weights = _class_weights_record(counts, [stack.path], {"dims": 3})
    wc = [float(w) for w in class_weights["class_weights"]]
    recipe = VolumeWeightRecipe(params, (wc[0], wc[1]), tuple(stack.scale))  # type: ignore[arg-type]
    _, weights = volume_weight_arrays(instances, class_weights=wc, params=params, spacing_um=recipe.spacing_um)
    arrays = {
        "weights": weights,
        "classes": classes,
        "instances": da.map_blocks(_cells_block, instances, classes, dtype=np.int32),
    }
    head = {**recipe.to_dict(), "cutoff_um": params.cutoff_um, "halo_voxels": list(halo)}
    return arrays, head, class_weights, f"sigma={params.sigma_um:g} µm (3-D)", f"{halo} voxels, blocks {block}"


def _write_weights(stack_path: str | os.PathLike[str], out: Path, png: Path | None, *,
                   params: WeightParams | kernel.VolumeWeightParams, class_weights: dict[str, Any] | None,
                   plot_slice: int | None, batch_slices: int, block_voxels: int) -> dict[str, Any]:
    if isinstance(params, kernel.VolumeWeightParams):
        stack = open_volume_stack(stack_path, plot_slice=plot_slice)
        arrays, head, class_weights, sigma, halo = _volume_plan(stack, params, class_weights, block_voxels)
    else:
        stack = _open_labelled(stack_path, plot_slice)
        arrays, head, class_weights, sigma, halo = _slice_plan(stack, params, class_weights)
    kind = _kind(stack)
    wc = [float(w) for w in class_weights["class_weights"]]
    attrs = {
        **head,
        "class_weights": wc,
        "frequencies": class_weights.get("frequencies"),
        "class_weights_source": class_weights.get("stacks"),
        "class_weights_file": class_weights.get("path"),
        "label_kind": kind.value,
        "separate_touching": kind is LabelKind.INSTANCE,
        "source": str(stack.path),
        "intensity": stack.intensity.to_dict(),  # which stack it was made from (Stack.check_made_from)
        "version": __version__,
        "stage": "weights",
        "format": WEIGHTS_FORMAT,
    }
    # the figure is drawn from the finished temporary store, before the store is put in place: a
    # run that fails on either (a full disk) leaves neither
    with atomic_output_with_companions(out, own=WEIGHTS_MARK) as (tmp, written):
        root = zarr.open_group(tmp, mode="w")
        _store_in_batches(root, arrays, chunks=tuple(int(c) for c in stack.labels.chunks),
                          batch_slices=batch_slices, halo=halo)
        root.attrs.update({"unet": attrs})
        if png is not None:
            plot_weights(
                np.asarray(stack.labels[plot_slice]), np.asarray(root["classes"][plot_slice]),
                np.asarray(root["weights"][plot_slice]), class_weights=wc, path=png,
                title=f"{stack.name} z={plot_slice}: w0={params.w0:g}, {sigma}",
            )
            written.append(Path(png))
    return attrs


def _open_labelled(stack_path: str | os.PathLike[str], plot_slice: int | None) -> Stack:
    """The stack, with labels the shape of its image and ``plot_slice`` in range."""
    stack = open_stack(stack_path, require_labels=True)
    if tuple(stack.labels.shape) != tuple(stack.image.shape):
        raise UserInputError(
            f"{stack.path}: labels {tuple(stack.labels.shape)} and image {tuple(stack.image.shape)} differ in "
            "shape; re-ingest with matching stacks"
        )
    if plot_slice is not None and not 0 <= plot_slice < stack.labels.shape[0]:
        raise UserInputError(f"{stack.path}: plot slice {plot_slice} is out of range for its {stack.labels.shape[0]} slices")
    return stack


_DTYPES = {"weights": np.float32, "classes": np.uint8, "instances": np.int32}


def _store_in_batches(root: zarr.Group, arrays: dict[str, Any], *, chunks: tuple[int, ...], batch_slices: int,
                      halo: str) -> None:
    """Compute the lazy (Z, Y, X) ``arrays`` into new Zarr arrays of ``root``, a batch of slices per
    Dask call (bounds memory; one progress step each)."""
    import dask.array as da

    shape = tuple(arrays["weights"].shape)
    targets = [create_array(root, name, shape=shape, dtype=_DTYPES[name], chunks=chunks, dimension_names="zyx")
               for name in arrays]
    log.info("weights of %s slices of %s px, chunks %s, halo %s", shape[0], shape[1:], chunks, halo)
    block_z = int(arrays["weights"].chunks[0][0])  # the compute blocks (2-D: the chunks), z
    step = max(1, batch_slices // block_z) * block_z
    for z0 in progress(range(0, shape[0], step), desc="weights", total=-(-shape[0] // step), unit="batch"):
        z1 = min(z0 + step, shape[0])
        da.store([a[z0:z1] for a in arrays.values()], targets, lock=False, regions=[(slice(z0, z1),)] * len(targets))
