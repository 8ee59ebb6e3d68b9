"""Elastically deformed training sets (stored) and the same augmentation on the fly.

``unet augment`` writes K deformed samples per source slice, each sized for the network
input tile (``UNetSpec.input_size(tile_out)``)::

    AUG.zarr/   image     float32 (N, H, W)  normalised (the set's ``normalisation`` mode,
                                             :mod:`unet_core.common.intensity`), deformed,
                                             grey values varied
                classes   uint8   (N, H, W)  1 = cell interior (recomputed, see below)
                weights   float32 (N, H, W)  loss weight w(x) (recomputed, see below)
                instances int32   (N, H, W)  deformed instances, 0 = background
                source    int32   (N, 2)     (z, k): source slice and sample index
                attrs["unet"]                seed, parameters, model spec, tile sizes, normalisation,
                                             object areas of the source slices, provenance

Sample ``n = i * K + k`` comes from the ``i``-th selected slice ``z`` and draws all of its
randomness from ``SeedSequence(seed, spawn_key=(z, k))`` (:func:`unet_core.augment.elastic.rng_for`),
so the set is byte-identical whatever order or process makes the samples.

**Weights are recomputed, not warped.** The instances are deformed with nearest neighbour,
then ``classes`` and ``weights`` are recomputed from them with
:func:`unet_core.weights.maps.class_map` / :func:`unet_core.weights.maps.weight_map` and the stored
recipe of the weights stage (class weights, w0, sigma). The border term depends on distances
between cells, which the deformation changes (it stretches or squeezes gaps by up to ~10 %),
so a warped map would be the weight of a different geometry; the recomputed one is exact for
the deformed labels. The tile is the network input, so the output region the loss sees lies
``UNetSpec.context`` (92 px) inside its edge, beyond the border term's reach (about 21.5 px
for w0 = 10, sigma = 5), and the recomputed weights there are exact.

Each sample reads only the source region its sampling positions cover (plus the
interpolation support), with :func:`unet_core.common.mirror.read_mirrored`, i.e. mirrored about the
true image border: what the network sees at image borders is the same mirror convention as
in overlap-tile prediction.

**Volumes** (a 3-D network, ``unet augment --dims 3``, :func:`augment_volume`): the arrays are
(N, Z, H, W), each tile the network's (Z, H, W) input for an output of ``tile_out_z`` x
``tile_out`` x ``tile_out`` voxels (per axis: output + the axis's context on each side); sample
``k`` samples the whole volume and draws from ``SeedSequence(seed, spawn_key=(0, k))`` (volume
0 of the stack); ``source`` holds (0, k). The deformation is
:func:`unet_core.augment.elastic.draw_volume_transform` (displacements in µm with the stack's
voxel size, rotation about z), the image resampled trilinearly, the instances by nearest
neighbour, and classes and w(x) recomputed on the deformed instances in µm with the 3-D weights
store's :class:`unet_core.weights.recipe.VolumeWeightRecipe` (``unet weights --dims 3``:
6-connected separation, anisotropic d1/d2). ``attrs["unet"]`` records
``dims: 3``, (z, y, x) tile sizes and ``voxel_size_um``, which training stores in model.pt. A
single-slice stack, or one whose voxel size was not given at ingest, is refused.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from unet_core import __version__
from unet_core.augment.elastic import (
    Deformation,
    DeformParams,
    VolumeDeformation,
    check_fits,
    deform,
    draw_transform,
    draw_volume_transform,
    relative_coordinates,
    rng_for,
    upsample_matrix,
)
from unet_core.augment.plot import plot_augmentation, plot_volume_samples
from unet_core.common.atomic import atomic_output_with_companions
from unet_core.common.device import resolve_device
from unet_core.common.errors import ConfigError, UserInputError, parse_choice
from unet_core.common.geometry import Box
from unet_core.common.intensity import Normalisation, Scaling, normalize
from unet_core.common.labels import area_histogram, object_areas
from unet_core.common.mirror import mirror_index, read_mirrored
from unet_core.common.outputs import Layout, PngMark, ZarrMark, claim_outputs
from unet_core.common.progress import progress
from unet_core.common.provenance import code_hash
from unet_core.io.ngff import Stack, create_array, open_group, open_stack, recorded_intensity
from unet_core.model.spec import UNetSpec
from unet_core.weights.recipe import VolumeWeightRecipe, WeightRecipe

log = logging.getLogger(__name__)

FORMAT = "unet-pipeline/augmented/1"
#: How 'unet augment' recognises its own outputs (:mod:`unet_core.common.outputs`).
AUGMENT_MARK = ZarrMark("augment", Layout(("", "image", "classes", "weights", "instances", "source")))
AUGMENT_PLOT_MARK = PngMark("augment")
SUPPORT_PX = 3  # bicubic taps reach floor(p) - 1 .. floor(p) + 2; one more for rounding


@dataclass(frozen=True)
class Tiles:
    """Deformed training tiles, NumPy, axes (N, H, W)."""

    image: np.ndarray  # float32, normalised
    classes: np.ndarray  # uint8
    weights: np.ndarray  # float32
    instances: np.ndarray  # int32


def tile_shapes(spec: UNetSpec, tile_out: int) -> tuple[int, int]:
    """(input, output) tile size for a network output of ``tile_out`` px.

    Raises:
        UserInputError: no valid input gives that output (names the nearest valid ones).
    """
    try:
        return spec.input_size(tile_out), tile_out
    except ValueError as err:
        raise UserInputError(f"--tile-out {tile_out}: {err}") from None


def deform_tiles(
    images: np.ndarray,
    instances: np.ndarray,
    transforms: Sequence[Deformation],
    *,
    tile_shape: Sequence[int],
    recipe: WeightRecipe,
    params: DeformParams,
    device: torch.device | str = "cpu",
) -> Tiles:
    """Deform image and instances together, then recompute classes and weights.

    Args:
        images: (N, Y, X) float32 normalised source images (whole slices or mirrored regions).
        instances: (N, Y, X) int32 instance labels aligned with ``images``, 0 = background.
        transforms: one per source (:func:`unet_core.augment.elastic.draw_transform`), origins in
            the coordinates of these arrays.
        tile_shape: (H, W) of the output tiles, pixels.
        recipe: how to recompute classes and w(x) from the deformed instances.
        params: the augmentation settings (interpolation).
        device: torch device for the warp (``cuda`` when available; CPU otherwise).

    Returns:
        :class:`Tiles` with (N, H, W) arrays.
    """
    img = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None].to(device)
    lab = torch.from_numpy(np.ascontiguousarray(instances, dtype=np.int32)).to(device)
    warped, labels = deform(img, lab, transforms, tile_shape=tile_shape, interpolation=params.interpolation)
    image_np = warped[:, 0].cpu().numpy().astype(np.float32, copy=False)
    if not np.isfinite(image_np).all():  # e.g. a brightness offset beyond float32
        raise ConfigError(f"augmentation settings ({params.describe()}) give grey values of NaN or Inf; "
                          "use smaller augment.brightness, contrast or sigma_px")
    inst_np = labels.cpu().numpy().astype(np.int32, copy=False)
    classes = np.empty(inst_np.shape, np.uint8)
    weights = np.empty(inst_np.shape, np.float32)
    for i, inst in enumerate(inst_np):
        classes[i], weights[i] = recipe.apply(inst)
    return Tiles(image_np, classes, weights, inst_np)


def source_region(transform: Deformation, tile_shape: Sequence[int]) -> Box:
    """Box of source pixels that sampling ``transform`` can touch (with interpolation support).

    Exact for the rotation/flip/shift part; the displacement is bounded by the largest
    coarse vector times the upsampling matrices' largest absolute row sums.
    """
    th, tw = (int(v) for v in tile_shape)
    g = transform.coarse.shape[-1]
    lebesgue = np.abs(upsample_matrix(th, g)).sum(1).max() * np.abs(upsample_matrix(tw, g)).sum(1).max()
    reach = float(np.abs(transform.coarse).max()) * lebesgue if transform.coarse.size else 0.0
    cy, cx = (th - 1) / 2.0, (tw - 1) / 2.0
    corners = np.array([[-cy, -cx], [-cy, cx], [cy, -cx], [cy, cx]]) @ transform.matrix().T
    lo = corners.min(0) + np.array([cy, cx]) + np.array(transform.origin) - reach - SUPPORT_PX
    hi = corners.max(0) + np.array([cy, cx]) + np.array(transform.origin) + reach + SUPPORT_PX
    if not np.abs([lo, hi]).max() < 2**31:  # beyond any image's size (and NaN): no box to read
        raise ConfigError(f"augment.sigma_px: displacements of {reach:g} px reach beyond any image; use a "
                          "displacement of the order of the cell size (paper: 10 px)")
    start = np.floor(lo).astype(int)
    stop = np.ceil(hi).astype(int) + 1
    return Box(tuple(start), tuple(stop - start))


@dataclass(frozen=True)
class Source:
    """One training stack with its weights store, opened for reading, and how its slices are
    normalised (``scaling(z)``)."""

    stack: Stack
    instances: zarr.Array
    recipe: WeightRecipe | VolumeWeightRecipe
    weights_path: Path
    normalisation: Normalisation
    scaling: Callable[[int], Scaling]


def open_source(stack_path: str | os.PathLike[str], weights_path: str | os.PathLike[str], *,
                normalisation: Normalisation = Normalisation.STACK_ZSCORE, dims: int = 2) -> Source:
    """Open a stack and the weights store made from it, to be normalised by ``normalisation``.

    ``dims`` 3: the store must be a volume's (``unet weights --dims 3``, :class:`VolumeWeightRecipe`);
    2: a store of slices (:class:`WeightRecipe`). Each recipe refuses the other mode's store.

    Raises:
        UserInputError: missing arrays or attributes, shapes that do not match, a store of the
            other mode, or a per-slice normalisation on a stack ingested without per-slice statistics.
    """
    stack = open_stack(stack_path)  # ``normalisation`` was parsed where it entered (augment(), TrainConfig)
    scaling = stack.scaler(normalisation)
    weights_path = Path(weights_path)
    group = open_group(weights_path, hint="run 'unet weights' first")
    if "instances" not in group:
        raise UserInputError(f"{weights_path}: has no 'instances' array; regenerate it with 'unet weights'")
    instances = group["instances"]
    if tuple(instances.shape) != stack.shape:
        raise UserInputError(
            f"{weights_path}: instances shape {tuple(instances.shape)} does not match stack "
            f"{stack.path} shape {stack.shape}; pass the weights store made from this stack"
        )
    stack.check_made_from(recorded_intensity(group.attrs), result=weights_path)
    kind = VolumeWeightRecipe if dims == 3 else WeightRecipe
    recipe = kind.from_attrs(dict(group.attrs).get("unet", {}), where=str(weights_path))
    return Source(stack, instances, recipe, weights_path, normalisation, scaling)


def make_sample(
    source: Source,
    z: int,
    k: int,
    *,
    seed: int,
    params: DeformParams,
    tile_in: int,
    tile_out: int,
    device: torch.device | str = "cpu",
) -> Tiles:
    """Sample ``k`` of slice ``z``: a pure function of (stack, weights, seed, z, k, settings).

    Returns:
        :class:`Tiles` with N = 1.
    """
    _, sy, sx = source.stack.shape
    tile = (tile_in, tile_in)
    transform = draw_transform(rng_for(seed, z, k), params=params, source_shape=(sy, sx), tile_shape=tile,
                               out_shape=(tile_out, tile_out))
    region = source_region(transform, tile)
    start, stop = (z, *region.offset), (z + 1, *region.end)
    image = normalize(read_mirrored(source.stack.image, start, stop), source.scaling(z))
    instances = read_mirrored(source.instances, start, stop).astype(np.int32, copy=False)
    local = replace(transform, origin=tuple(o - r for o, r in zip(transform.origin, region.offset)))
    return deform_tiles(image, instances, [local], tile_shape=tile, recipe=source.recipe, params=params,
                        device=device)


def augment(
    stack_path: str | os.PathLike[str],
    weights_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    samples_per_slice: int,
    tile_out: int,
    seed: int,
    spec: UNetSpec,
    params: DeformParams = DeformParams(),
    slices: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    plot: str | os.PathLike[str] | None = None,
    plot_samples: int = 4,
    workers: int = 1,
    normalisation: Normalisation | str = Normalisation.STACK_ZSCORE,
    tile_out_z: int | None = None,
    sigma_um: float | None = None,
) -> Path:
    """Write the deformed training set of one stack (see the module docstring), atomically.

    Args:
        stack_path: stack written by ``unet ingest``.
        weights_path: weights store written by ``unet weights`` from that stack.
        out_path: the ``.zarr`` directory to write.
        samples_per_slice: K deformed samples per source slice, >= 1.
        tile_out: network output size of a sample, pixels; the stored tile is the input
            size ``spec.input_size(tile_out)``.
        seed: global seed, >= 0.
        spec: the network the set is for.
        params: augmentation settings.
        slices: source slices (default: all).
        device: torch device for the warp: ``cpu`` (the reference bytes), ``cuda[:N]`` or
            ``auto``.
        plot: optional PNG: originals vs deformed samples for the first ``plot_samples``
            samples (:func:`unet_core.augment.plot.plot_augmentation`).
        plot_samples: rows of that figure.
        workers: samples made at once in threads (the weight maps dominate; the bytes do not
            depend on it).
        normalisation: grey-value normalisation of the stored tiles
            (:class:`unet_core.common.intensity.Normalisation`); recorded in the attributes,
            and training must use the same.
        tile_out_z, sigma_um: a 3-D ``spec`` only (``samples_per_slice`` then counts samples of
            the whole volume): :func:`augment_volume`.

    Returns:
        ``out_path``.

    Raises:
        UserInputError: unusable inputs or settings (one line naming what to change).
    """
    claim_outputs([(out_path, AUGMENT_MARK), (plot, AUGMENT_PLOT_MARK)],
                  [stack_path, weights_path])
    _check_counts(samples_per_slice, seed)
    device = resolve_device(device)
    source = open_source(stack_path, weights_path,
                         normalisation=parse_choice(Normalisation, normalisation, option="--normalisation"),
                         dims=spec.dims)
    if spec.dims == 3:
        if slices is not None:
            raise UserInputError("--slices: not available with --dims 3 (a 3-D set samples the whole volume); "
                                 "leave it out")
        return augment_volume(source, out_path, samples=samples_per_slice, tile_out=tile_out,
                              tile_out_z=tile_out_z, seed=seed, spec=spec, params=params, device=device,
                              workers=workers, sigma_um=sigma_um, plot=plot, plot_samples=plot_samples)
    return _augment_slices(source, out_path, samples_per_slice=samples_per_slice, tile_out=tile_out, seed=seed,
                           spec=spec, params=params, slices=slices, device=device, plot=plot,
                           plot_samples=plot_samples, workers=workers)


def _augment_slices(
    source: Source, out_path: str | os.PathLike[str], *, samples_per_slice: int, tile_out: int, seed: int,
    spec: UNetSpec, params: DeformParams, slices: Sequence[int] | None, device: torch.device | str,
    plot: str | os.PathLike[str] | None, plot_samples: int, workers: int,
) -> Path:
    """The 2-D set of :func:`augment` (which has claimed the outputs and opened the source)."""
    n_z, sy, sx = source.stack.shape
    slices = _checked_slices(slices, n_z)
    tile_in, tile_out = tile_shapes(spec, tile_out)
    check_fits((sy, sx), (tile_in, tile_in), params=params)
    jobs = [(i * samples_per_slice + k, z, k) for i, z in enumerate(slices) for k in range(samples_per_slice)]
    log.info("%d samples (%d slices x %d) of %d px (output %d px) from %s", len(jobs), len(slices),
             samples_per_slice, tile_in, tile_out, source.stack.path)

    def make(job: tuple[int, int, int]) -> Tiles:
        return make_sample(source, job[1], job[2], seed=seed, params=params, tile_in=tile_in,
                           tile_out=tile_out, device=device)

    out_path = Path(out_path)
    # the figure is drawn before the set is put in place: a run that fails on either leaves neither
    with atomic_output_with_companions(out_path, own=AUGMENT_MARK) as (tmp, written):
        root = zarr.open_group(tmp, mode="w")
        _write_samples(root, jobs, ordered_map(make, jobs, workers=workers), tile_in=tile_in)
        root.attrs.update({"unet": provenance(
            source, seed=seed, params=params, spec=spec, tile_in=tile_in, tile_out=tile_out,
            samples_per_slice=samples_per_slice, slices=slices,
        )})
        if plot is not None:
            rows = preview_rows(source, [(z, k) for _, z, k in jobs[:plot_samples]], seed=seed,
                                params=params, tile_in=tile_in, tile_out=tile_out)
            plot_augmentation(plot, rows, title=f"{source.stack.name}: seed {seed}, {params.describe()}")
            written.append(Path(plot))
    return out_path


def _check_counts(samples_per_slice: int, seed: int) -> None:
    """One-line errors for a sample count below 1 or a negative seed."""
    if samples_per_slice < 1:
        raise UserInputError(f"--samples-per-slice must be >= 1, got {samples_per_slice}")
    if seed < 0:
        raise UserInputError(f"--seed must be >= 0, got {seed}")


def _checked_slices(slices: Sequence[int] | None, n_z: int) -> list[int]:
    """The source slices (default all): distinct and in range, else a one-line error."""
    slices = list(range(n_z)) if slices is None else [int(z) for z in slices]
    if not slices:
        raise UserInputError("--slices: no source slice selected")
    if len(set(slices)) != len(slices) or not all(0 <= z < n_z for z in slices):
        raise UserInputError(f"--slices: {slices} must be distinct slices in 0..{n_z - 1}")
    return slices


def _write_samples(root: zarr.Group, jobs: list[tuple[int, int, int]], samples: Iterator[Tiles], *,
                   tile_in: int | tuple[int, int, int]) -> None:
    """Create the set's arrays in ``root`` and write sample ``n`` of each job ``(n, z, k)`` (a volume
    set: ``(n, volume, k)``, ``tile_in`` its (Z, H, W) tile)."""
    n = len(jobs)
    tile = (tile_in, tile_in) if isinstance(tile_in, int) else tuple(tile_in)
    shape, chunks = (n, *tile), (1, *tile)
    names = ("n", "y", "x") if len(tile) == 2 else ("n", "z", "y", "x")
    arrays = {
        name: create_array(root, name, shape=shape, dtype=dtype, chunks=chunks, dimension_names=names)
        for name, dtype in (("image", np.float32), ("classes", np.uint8), ("weights", np.float32),
                            ("instances", np.int32))
    }
    source_arr = create_array(root, "source", shape=(n, 2), dtype=np.int32, chunks=(n, 2), dimension_names=("n", "zk"))
    source_arr[:] = np.array([(z, k) for _, z, k in jobs], np.int32).reshape(n, 2)
    for (index, _, _), tiles in zip(jobs, progress(samples, desc="augment", total=n, unit="sample"), strict=True):
        for name, arr in arrays.items():
            arr[index] = getattr(tiles, name)[0]


@dataclass(frozen=True)
class PreviewRow:
    """One sample for the figure: the undeformed tile at the same origin and the deformed one.

    Attributes:
        name: "z=.. k=..".
        original: (H, W) float32 normalised tile at the sample's origin, no transform.
        original_instances: (H, W) int32.
        deformed: (H, W) float32 deformed tile (as stored).
        deformed_instances: (H, W) int32.
        coords: (2, H, W) float64 source position of every deformed pixel, in the original
            tile's pixel coordinates (y, x).
        knots: (2, G, G) float64 knot positions (y, x) in the deformed tile, pixels.
        knot_sources: (2, G, G) float64 where the knots would sample from without the
            elastic displacement (rotation/flip only), original-tile pixels; adding
            ``transform.coarse`` gives where they do sample from.
        transform: the sample's transform.
    """

    name: str
    original: np.ndarray
    original_instances: np.ndarray
    deformed: np.ndarray
    deformed_instances: np.ndarray
    coords: np.ndarray
    knots: np.ndarray
    knot_sources: np.ndarray
    transform: Deformation


def preview_rows(
    source: Source, samples: Sequence[tuple[int, int]], *, seed: int, params: DeformParams, tile_in: int,
    tile_out: int,
) -> list[PreviewRow]:
    """Recompute samples (z, k) and their undeformed originals for the figure."""
    _, sy, sx = source.stack.shape
    tile = (tile_in, tile_in)
    transforms = drawn_transforms((sy, sx), samples, seed=seed, params=params, tile_in=tile_in, tile_out=tile_out)
    rows = []
    for (z, k), tr in zip(samples, transforms):
        start, stop = (z, *tr.origin), (z + 1, tr.origin[0] + tile_in, tr.origin[1] + tile_in)
        original = normalize(read_mirrored(source.stack.image, start, stop)[0], source.scaling(z))
        original_inst = read_mirrored(source.instances, start, stop)[0].astype(np.int32)
        tiles = make_sample(source, z, k, seed=seed, params=params, tile_in=tile_in, tile_out=tile_out)
        coords = relative_coordinates([tr], tile)[0]
        g = tr.coarse.shape[-1]
        pos = np.linspace(0.0, tile_in - 1.0, g)
        knots = np.stack(np.meshgrid(pos, pos, indexing="ij"))  # (2, G, G) (y, x)
        centre = (tile_in - 1) / 2.0
        rigid = centre + np.einsum("ab,bij->aij", tr.matrix(), knots - centre)
        rows.append(PreviewRow(f"z={z} k={k}", original, original_inst, tiles.image[0], tiles.instances[0],
                               coords, knots, rigid, tr))
    return rows


def ordered_map(fn, items: Sequence, *, workers: int) -> Iterator:
    """``map(fn, items)`` on ``workers`` threads, results in input order, at most
    ``2 * workers`` results held at once."""
    workers = max(1, int(workers))
    if workers == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def provenance(
    source: Source, *, seed: int, params: DeformParams, spec: UNetSpec, tile_in: int, tile_out: int,
    samples_per_slice: int, slices: Sequence[int],
) -> dict[str, Any]:
    """``attrs["unet"]`` of an augmented set (no timestamps: same inputs, same bytes). ``object_areas``
    counts the objects of the undeformed source slices by area (:func:`unet_core.common.labels.area_histogram`):
    training stores their median with the model."""
    return {
        "format": FORMAT,
        "stage": "augment",
        "version": __version__,
        "code_hash": code_hash("augment"),
        "seed": int(seed),
        "rng": "numpy PCG64(SeedSequence(seed, spawn_key=(z, k)))",
        "samples_per_slice": int(samples_per_slice),
        "slices": [int(z) for z in slices],
        "tile_in": int(tile_in),
        "tile_out": int(tile_out),
        "context": int(spec.context),
        "model": spec.to_dict(),
        "deformation": params.to_dict(),
        "displacement_upsampling": "Keys cubic convolution a=-0.5, quadratic end extrapolation",
        "border": "mirror about the border pixel centre (numpy 'reflect')",
        "weights": "recomputed from the deformed instances (unet_core.weights.maps.class_map/weight_map)",
        "weight_recipe": source.recipe.to_dict(),
        "intensity_normalisation": source.normalisation.value,
        "intensity": source.stack.intensity.to_dict(),
        "object_areas": area_histogram(np.concatenate(
            [object_areas(np.asarray(source.instances[z])) for z in slices] or [np.zeros(0, np.int64)])),
        "source": {"stack": str(source.stack.path), "weights": str(source.weights_path),
                   "stack_attrs": {k: source.stack.attrs[k] for k in ("name", "sha256") if k in source.stack.attrs}},
    }


def drawn_transforms(
    source_shape: Sequence[int], samples: Sequence[tuple[int, int]], *, seed: int, params: DeformParams,
    tile_in: int, tile_out: int,
) -> list[Deformation]:
    """The transforms of samples (z, k), exactly as :func:`augment` draws them."""
    return [
        draw_transform(rng_for(seed, z, k), params=params, source_shape=source_shape,
                       tile_shape=(tile_in, tile_in), out_shape=(tile_out, tile_out))
        for z, k in samples
    ]


# --------------------------------------------------------------------------------------
# volumes (a 3-D network, issue 36)
# --------------------------------------------------------------------------------------
#: Default network output extent along z of a 3-D sample, slices (rounded up to a valid size).
TILE_OUT_Z = 8
#: Spawn key of a stack's volume in :func:`rng_for`: sample k of a 3-D set draws from (seed, 0, k).
VOLUME_KEY = 0
#: Trilinear taps reach floor(p) .. floor(p) + 1; one more for rounding.
VOLUME_SUPPORT = 2


def volume_tile_shapes(spec: UNetSpec, tile_out: int, tile_out_z: int | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input, output) (Z, H, W) tile of a 3-D network for an output of ``tile_out_z`` x ``tile_out``
    x ``tile_out`` voxels (``tile_out_z`` None: the smallest valid z output >= :data:`TILE_OUT_Z`).

    Raises:
        UserInputError: no valid input gives that output (names the nearest valid ones).
    """
    axis = spec.z_axis
    out_z = axis.valid_output_size_at_least(TILE_OUT_Z) if tile_out_z is None else int(tile_out_z)
    try:
        in_z = axis.input_size(out_z, what=f"U-Net of depth {spec.depth} along z")
    except ValueError as err:
        raise UserInputError(f"--tile-out-z {out_z}: {err}") from None
    tile_in, tile_out = tile_shapes(spec, tile_out)
    return (in_z, tile_in, tile_in), (out_z, tile_out, tile_out)


def volume_source_region(transform: VolumeDeformation, tile_shape: Sequence[int]) -> Box:
    """(Z, Y, X) box of source voxels that sampling ``transform`` touches, with the trilinear support."""
    coords = relative_coordinates([transform], tile_shape)[0]  # (3, Z, H, W), voxels from the origin
    axes = tuple(range(1, coords.ndim))
    lo = coords.min(axis=axes) + np.asarray(transform.origin) - VOLUME_SUPPORT
    hi = coords.max(axis=axes) + np.asarray(transform.origin) + VOLUME_SUPPORT
    if not np.abs([lo, hi]).max() < 2**31:
        raise ConfigError("augment sigma: displacements reach beyond any volume; use a displacement of the order "
                          "of the cell size")
    start = np.floor(lo).astype(int)
    stop = np.ceil(hi).astype(int) + 1
    return Box(tuple(int(v) for v in start), tuple(int(v) for v in stop - start))


def normalised_region(source: Source, region: Box) -> np.ndarray:
    """(Z, Y, X) float32 of ``region`` (mirrored beyond the stack), each slice normalised with the
    scaling of the slice it mirrors (as the engine normalises a 3-D block)."""
    raw = read_mirrored(source.stack.image, region.offset, region.end)
    slices = mirror_index(np.arange(region.offset[0], region.end[0]), source.stack.shape[0])
    return np.stack([normalize(plane, source.scaling(int(z))) for plane, z in zip(raw, slices)])


def draw_volume_sample(source: Source, k: int, *, seed: int, params: DeformParams, tile_in: Sequence[int],
                       tile_out: Sequence[int], sigma_um: float | None = None) -> VolumeDeformation:
    """The transform of sample ``k`` of the stack's volume: drawn from ``rng_for(seed, VOLUME_KEY, k)``
    with the stack's voxel size."""
    return draw_volume_transform(rng_for(seed, VOLUME_KEY, k), params=params, spacing_um=source.stack.scale,
                                 source_shape=source.stack.shape, tile_shape=tile_in, out_shape=tile_out,
                                 sigma_um=sigma_um)


def make_volume_sample(
    source: Source,
    k: int,
    *,
    seed: int,
    params: DeformParams,
    tile_in: Sequence[int],
    tile_out: Sequence[int],
    sigma_um: float | None = None,
    device: torch.device | str = "cpu",
) -> Tiles:
    """Sample ``k`` of the stack's volume: a pure function of (stack, weights, seed, k, settings).

    The image is resampled trilinearly, the instances by nearest neighbour with the same grid
    (:func:`unet_core.augment.elastic.deform`), from the mirrored source region the sample reads;
    classes and w(x) are recomputed from the deformed instances with the store's
    :class:`unet_core.weights.recipe.VolumeWeightRecipe` (6-connected separation, d1/d2 in µm).

    Returns:
        :class:`Tiles` with (1, Z, H, W) arrays.
    """
    transform = draw_volume_sample(source, k, seed=seed, params=params, tile_in=tile_in,
                                   tile_out=tile_out, sigma_um=sigma_um)
    region = volume_source_region(transform, tile_in)
    image = normalised_region(source, region)
    instances = read_mirrored(source.instances, region.offset, region.end).astype(np.int32, copy=False)
    local = replace(transform, origin=tuple(o - r for o, r in zip(transform.origin, region.offset)))
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    lab = torch.from_numpy(np.ascontiguousarray(instances))[None].to(device)
    warped, labels = deform(img, lab, [local], tile_shape=tuple(tile_in))
    image_np = warped[:, 0].cpu().numpy().astype(np.float32, copy=False)
    if not np.isfinite(image_np).all():
        raise ConfigError(f"augmentation settings ({params.describe()}) give grey values of NaN or Inf; "
                          "use smaller augment.brightness, contrast or sigma")
    inst_np = labels.cpu().numpy().astype(np.int32, copy=False)
    classes, weights = source.recipe.apply(inst_np[0])
    return Tiles(image_np, classes.astype(np.uint8, copy=False)[None], weights[None], inst_np)


def check_volume_source(source: Source, tile_out: Sequence[int]) -> tuple[float, float, float]:
    """The source stack's voxel size (:meth:`Stack.volume_voxel_size`), and its volume holds the (z, y, x)
    output window.

    Raises:
        UserInputError: as :meth:`Stack.volume_voxel_size`, or a volume smaller than the output window.
    """
    spacing = source.stack.volume_voxel_size(needs="--dims 3 (stack)")
    stack = source.stack
    made_at = tuple(source.recipe.spacing_um)
    if not np.allclose(made_at, spacing, rtol=1e-6, atol=0):
        raise UserInputError(f"{source.weights_path}: w(x) made for voxels of {made_at} µm, but {stack.path} has "
                             f"{spacing} µm; make the weights again with 'unet weights --dims 3'")
    if any(o > n for o, n in zip(tile_out, stack.shape)):
        raise UserInputError(f"--tile-out/--tile-out-z: the {'x'.join(map(str, tile_out))} output window (z, y, x) "
                             f"is larger than the {'x'.join(map(str, stack.shape))} volume {stack.path}; "
                             "choose smaller output tiles")
    return spacing


def augment_volume(
    source: Source,
    out_path: str | os.PathLike[str],
    *,
    samples: int,
    tile_out: int,
    tile_out_z: int | None,
    seed: int,
    spec: UNetSpec,
    params: DeformParams,
    device: torch.device | str = "cpu",
    workers: int = 1,
    sigma_um: float | None = None,
    plot: str | os.PathLike[str] | None = None,
    plot_samples: int = 4,
) -> Path:
    """Write ``samples`` deformed (Z, H, W) tiles of one stack's volume for a 3-D ``spec``, atomically,
    and with ``plot`` a PNG of the first ``plot_samples`` of them as stored
    (:func:`unet_core.augment.plot.plot_volume_samples`).

    The set's layout is the module docstring's with a z axis: image/classes/weights/instances
    (N, Z, H, W), ``source`` (N, 2) = (volume 0, k); ``attrs["unet"]`` adds ``dims: 3``,
    ``tile_in``/``tile_out`` as (z, y, x) lists and ``voxel_size_um``, which training stores in
    model.pt. Sample k depends only on (seed, k) and the inputs, not on ``workers``.
    (Called by :func:`augment`, which has claimed the outputs and checked the counts.)
    """
    tile_in, tile_out_zyx = volume_tile_shapes(spec, tile_out, tile_out_z)
    spacing = check_volume_source(source, tile_out_zyx)
    jobs = [(k, VOLUME_KEY, k) for k in range(samples)]
    log.info("%d samples of %s voxels (output %s) from %s at %s µm", samples, "x".join(map(str, tile_in)),
             "x".join(map(str, tile_out_zyx)), source.stack.path, spacing)

    def make(job: tuple[int, int, int]) -> Tiles:
        return make_volume_sample(source, job[2], seed=seed, params=params, tile_in=tile_in,
                                  tile_out=tile_out_zyx, sigma_um=sigma_um, device=device)

    out_path = Path(out_path)
    with atomic_output_with_companions(out_path, own=AUGMENT_MARK) as (tmp, written):
        root = zarr.open_group(tmp, mode="w")
        _write_samples(root, jobs, ordered_map(make, jobs, workers=workers), tile_in=tile_in)
        made = volume_provenance(source, seed=seed, params=params, spec=spec, tile_in=tile_in, tile_out=tile_out_zyx,
                                 samples=samples, spacing_um=spacing, sigma_um=sigma_um)
        root.attrs.update({"unet": made})
        if plot is not None:  # drawn before the set is put in place: a run that fails on either leaves neither
            shown = [(f"sample k={k}", *(np.asarray(root[a][k]) for a in ("image", "instances", "weights")))
                     for k in range(min(plot_samples, samples))]
            plot_volume_samples(plot, shown, spacing_um=spacing, title=(
                f"{source.stack.name}: seed {seed}, tiles of {'x'.join(map(str, tile_in))} voxels; displacements "
                f"sigma {made['sigma_um']:.3g} um on a coarse grid (<= {params.grid} knots per axis), rotation about "
                f"z; {made['interpolation']}; brightness {params.brightness:g}, contrast {params.contrast:g}"))
            written.append(Path(plot))
    return out_path


def volume_provenance(
    source: Source, *, seed: int, params: DeformParams, spec: UNetSpec, tile_in: Sequence[int],
    tile_out: Sequence[int], samples: int, spacing_um: Sequence[float], sigma_um: float | None,
) -> dict[str, Any]:
    """``attrs["unet"]`` of a 3-D set (no timestamps: same inputs, same bytes)."""
    return {
        "format": FORMAT,
        "stage": "augment",
        "version": __version__,
        "code_hash": code_hash("augment"),
        "dims": 3,
        "seed": int(seed),
        "rng": f"numpy PCG64(SeedSequence(seed, spawn_key=({VOLUME_KEY}, k)))",
        "samples_per_volume": int(samples),
        "tile_in": [int(v) for v in tile_in],
        "tile_out": [int(v) for v in tile_out],
        "context": [int(a.context) for a in spec.axes],
        "voxel_size_um": [float(v) for v in spacing_um],
        "model": spec.to_dict(),
        "deformation": params.to_dict(),
        "sigma_um": float(params.sigma_px * min(spacing_um[1:]) if sigma_um is None else sigma_um),
        "displacement_upsampling": "Keys cubic convolution a=-0.5 per axis, on a coarse grid in µm",
        "interpolation": "trilinear (image), nearest neighbour (labels)",
        "border": "mirror about the border voxel centre (numpy 'reflect')",
        "weights": "recomputed from the deformed instances (unet_core.weights.maps.class_map_3d/weight_map_3d)",
        "weight_recipe": source.recipe.to_dict(),
        "intensity_normalisation": source.normalisation.value,
        "intensity": source.stack.intensity.to_dict(),
        # 3-D objects of the undeformed volume by voxel count (area_histogram's format, "area_px" = voxels):
        # training stores their median volume in µm³ with the model
        "object_volumes": area_histogram(object_areas(np.asarray(source.instances[:]))),
        "source": {"stack": str(source.stack.path), "weights": str(source.weights_path),
                   "stack_attrs": {k: source.stack.attrs[k] for k in ("name", "sha256") if k in source.stack.attrs}},
    }
