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
    check_fits,
    deform,
    draw_transform,
    relative_coordinates,
    rng_for,
    upsample_matrix,
)
from unet_core.augment.plot import plot_augmentation
from unet_core.common.atomic import atomic_output_with_companions
from unet_core.common.device import resolve_device
from unet_core.common.errors import ConfigError, UserInputError, parse_choice
from unet_core.common.geometry import Box
from unet_core.common.intensity import Normalisation, Scaling, normalize
from unet_core.common.labels import area_histogram, object_areas
from unet_core.common.mirror import read_mirrored
from unet_core.common.outputs import Layout, PngMark, ZarrMark, claim_outputs
from unet_core.common.progress import progress
from unet_core.common.provenance import code_hash
from unet_core.io.ngff import Stack, create_array, open_group, open_stack, recorded_intensity
from unet_core.model.spec import UNetSpec
from unet_core.weights.recipe import WeightRecipe

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
    recipe: WeightRecipe
    weights_path: Path
    normalisation: Normalisation
    scaling: Callable[[int], Scaling]


def open_source(stack_path: str | os.PathLike[str], weights_path: str | os.PathLike[str], *,
                normalisation: Normalisation = Normalisation.STACK_ZSCORE) -> Source:
    """Open a stack and the weights store made from it, to be normalised by ``normalisation``.

    Raises:
        UserInputError: missing arrays or attributes, shapes that do not match, or a per-slice
            normalisation on a stack ingested without per-slice statistics.
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
    recipe = WeightRecipe.from_attrs(dict(group.attrs).get("unet", {}), where=str(weights_path))
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
                         normalisation=parse_choice(Normalisation, normalisation, option="--normalisation"))
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
                   tile_in: int) -> None:
    """Create the set's arrays in ``root`` and write sample ``n`` of each job ``(n, z, k)``."""
    n = len(jobs)
    shape, chunks = (n, tile_in, tile_in), (1, tile_in, tile_in)
    arrays = {
        name: create_array(root, name, shape=shape, dtype=dtype, chunks=chunks, dimension_names=("n", "y", "x"))
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
