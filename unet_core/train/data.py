"""Training and validation data for the U-Net.

Training tiles come from the augmented sets written by ``unet augment`` (the shared data
contract), or are deformed on the fly from ingested stacks (:class:`OnTheFlyTiles`)::

    AUG.zarr/      image     float32 (N, H, W)  normalised (attrs: intensity_normalisation)
                   classes   uint8   (N, H, W)  class per pixel (1 = cell interior)
                   weights   float32 (N, H, W)  loss weights w(x)
                   instances int32   (N, H, W)  (not used for training)

``H = W`` is a valid network input size; the targets and weights are cropped here to the
network's output region (``UNetSpec.context`` pixels per side), which is what the loss sees.
A 3-D network trains on (N, Z, H, W) sets (``unet augment --dims 3``), cropped by the context
of each axis (:func:`output_contexts`), and validates on whole held-out volumes.

Which tile is used at which iteration is a pure function of ``(seed, iteration)``
(:class:`IterationSampler`), so a resumed run reads exactly the tiles the uninterrupted run
would have read, whatever the number of loader workers.

Validation uses held-out slices of ingested stacks and their weights stores, predicted
slice by slice by the inference engine of ``unet predict``
(:func:`unet_core.infer.predict.network_logits`: mirrored borders, tile origins on multiples of
``UNetSpec.stride``, equal to one monolithic pass).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from unet_core.augment.elastic import DeformParams
from unet_core.augment.samples import make_sample, open_source, tile_shapes
from unet_core.common.errors import UserInputError
from unet_core.common.intensity import Normalisation, normalize
from unet_core.common.labels import area_histogram, median_area, object_areas
from unet_core.io.ngff import Stack, open_group, open_stack, recorded_intensity
from unet_core.model.decision import WeightSums
from unet_core.model.spec import UNetSpec
from unet_core.weights.maps import check_spacing

log = logging.getLogger(__name__)

TRAIN_ARRAYS = ("image", "classes", "weights")
SCAN_BLOCK = 64  # samples read at once when checking the class values of a training set


def crop_to_output(array: np.ndarray, *, context: int | Sequence[int]) -> np.ndarray:
    """Cut the network's context off each side of the spatial axes (input tile -> output region).

    Args:
        array: (..., H, W) any dtype, in the geometry of the network input (a 3-D network's:
            (..., Z, H, W)).
        context: pixels lost per side by the network (``UNetSpec.context``) on the last two
            axes, or one value per trailing axis (:func:`output_contexts`: (z, y, x) for a 3-D
            network, whose z context differs).

    Returns:
        The output region, a view.
    """
    contexts = (context, context) if isinstance(context, (int, np.integer)) else tuple(int(c) for c in context)
    if not any(contexts):
        return array
    return array[(Ellipsis, *(slice(c, -c if c else None) for c in contexts))]


def output_contexts(spec: UNetSpec) -> tuple[int, ...]:
    """Context per spatial axis of ``spec``'s tiles: (y, x), or (z, y, x) for a 3-D network."""
    return tuple(axis.context for axis in spec.axes)


def check_tile_size(size: int, *, spec: UNetSpec, where: str) -> int:
    """Output size of a square input tile, or a one-line error naming the nearest valid sizes.

    Raises:
        UserInputError: ``size`` is not a valid input size for ``spec``.
    """
    try:
        return spec.output_size(size)
    except ValueError:
        raise UserInputError(
            f"{where}: tile size {size} px is not a valid input for the model (depth {spec.depth}, "
            f"{spec.padding.value} padding); nearest valid input sizes: {spec.nearest_valid_inputs(size)} "
            f"(regenerate the set with 'unet augment --tile-out' or change the model options)"
        ) from None


def check_volume_tile(shape: Sequence[int], *, spec: UNetSpec, where: str) -> tuple[int, int, int]:
    """(z, y, x) output shape of a (Z, H, W) input tile of a 3-D network, or a one-line error.

    Raises:
        UserInputError: the tile is not square in the plane or an axis is not a valid input.
    """
    z, h, w = (int(v) for v in shape)
    if h != w:
        raise UserInputError(f"{where}: tiles must be square in the plane, got {h} x {w} px")
    try:
        out_z = spec.z_axis.output_size(z, what=f"U-Net of depth {spec.depth} along z")
    except ValueError as err:
        raise UserInputError(f"{where}: tile z size {z}: {err} (regenerate the set with "
                             f"'unet augment --tile-out-z' or change --pool-z/--kernel-z)") from None
    return out_z, check_tile_size(h, spec=spec, where=where), check_tile_size(w, spec=spec, where=where)


def _check_classes(classes, *, n_classes: int, where: str) -> None:
    """Raise when a classes array holds a value the model cannot predict."""
    for start in range(0, classes.shape[0], SCAN_BLOCK):
        top = int(np.max(classes[start : start + SCAN_BLOCK]))
        if top >= n_classes:
            raise UserInputError(
                f"{where}: labels hold class {top} but the model has n_classes={n_classes} "
                f"(classes 0..{n_classes - 1}); train with --n-classes {top + 1} or fix the labels"
            )


class AugmentedTiles(torch.utils.data.Dataset):
    """Training tiles of one or more augmented sets, cropped to the network output.

    Item ``i`` is a tuple of tensors: image ``(1, H, W)`` float32, classes ``(h, w)`` as stored
    (uint8; widened to int64 on the training device: 8x fewer bytes through the loader and the upload)
    and weights ``(h, w)`` float32 with ``h = spec.output_size(H)``. For a 3-D network the sets
    hold (N, Z, H, W) tiles (``unet augment --dims 3``) and the items are ``(1, Z, H, W)``,
    ``(z, h, w)``, ``(z, h, w)``, cropped by the context of each axis. Zarr arrays are opened
    lazily in each process, so the dataset can be used by forked loader workers. Every set must
    hold tiles normalised by ``normalisation`` (its attributes say which).

    Attributes:
        in_size, out_size: in-plane input and output tile edge, px.
        in_shape, out_shape: the tile's spatial shape, (H, W) or (Z, H, W).
        voxel_size_um: (dz, dy, dx) the 3-D sets were made at (their attrs), µm; None in 2-D.
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]], *, spec: UNetSpec,
                 normalisation: Normalisation = Normalisation.STACK_ZSCORE) -> None:
        self.paths = [Path(p) for p in paths]
        self.spec = spec
        self.area_records: list[dict] = []
        self.voxel_size_um: tuple[float, float, float] | None = None
        self.volume_records: list[dict] = []
        if not self.paths:
            raise UserInputError(
                "--train: no training set given (pass one or more AUG.zarr from 'unet augment')"
            )
        self.lengths: list[int] = []
        tile = None
        for path in self.paths:
            group = open_group(path, hint="an augmented training set from 'unet augment' expected")
            missing = [name for name in TRAIN_ARRAYS if name not in group]
            if missing:
                raise UserInputError(f"{path}: not an augmented training set (missing arrays {missing})")
            shapes = {name: tuple(group[name].shape) for name in TRAIN_ARRAYS}
            shape = self._tile_shape(path, shapes)
            if tile is not None and shape != tile:
                raise UserInputError(
                    f"{path}: tile size {'x'.join(map(str, shape))} differs from "
                    f"{'x'.join(map(str, tile))} of {self.paths[0]}; use one size"
                )
            tile = shape
            attrs = dict(group.attrs).get("unet", {})
            self._check_set_attrs(path, attrs, normalisation)
            _check_classes(group["classes"], n_classes=spec.n_classes, where=f"{path}/classes")
            self.lengths.append(shapes["image"][0])
        if sum(self.lengths) == 0:
            raise UserInputError(f"--train: the training sets {[str(p) for p in self.paths]} hold no tiles")
        self.in_shape = tuple(int(v) for v in tile)
        self.out_shape = (check_volume_tile(tile, spec=spec, where=str(self.paths[0])) if spec.dims == 3
                          else tuple(spec.output_size(v) for v in tile))
        self.in_size, self.out_size = self.in_shape[-1], self.out_shape[-1]
        self.offsets = np.cumsum([0, *self.lengths])
        self._arrays: list[dict[str, zarr.Array]] | None = None
        self._pid = -1

    def _tile_shape(self, path: Path, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        """The spatial tile shape of one set, checked against the model: (H, W) or, for a 3-D network, (Z, H, W)."""
        dims = self.spec.dims
        if len(set(shapes.values())) != 1 or len(shapes["image"]) not in (3, 4):
            raise UserInputError(
                f"{path}: arrays image/classes/weights must share one (N, H, W) (3-D: (N, Z, H, W)) shape, got {shapes}"
            )
        if len(shapes["image"]) != dims + 1:
            kind = "(N, Z, H, W) volume tiles" if dims == 2 else "(N, H, W) slice tiles"
            raise UserInputError(
                f"{path}: holds {kind} but the model has --dims {dims}; train with --dims {5 - dims} or "
                f"regenerate the set with 'unet augment --dims {dims}'"
            )
        shape = shapes["image"][1:]
        if dims == 3:
            check_volume_tile(shape, spec=self.spec, where=str(path))
            return shape
        h, w = shape
        if h != w:
            raise UserInputError(f"{path}: tiles must be square, got {h} x {w} px")
        check_tile_size(h, spec=self.spec, where=str(path))
        return shape

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _check_set_attrs(self, path: Path, attrs: dict, normalisation: Normalisation) -> None:
        """Refuse a set normalised otherwise; keep its object-area record (sets of older versions have none)."""
        stored = Normalisation.of_metadata(attrs.get("intensity_normalisation"))
        if stored is not normalisation:
            raise UserInputError(
                f"{path}: tiles normalised with {stored.value} (attribute intensity_normalisation), but training "
                f"uses {normalisation.value} (--normalisation, config normalisation); regenerate "
                f"the set with 'unet augment --normalisation {normalisation.value}'")
        if "object_areas" in attrs:
            self.area_records.append(attrs["object_areas"])
        if self.spec.dims == 3:
            self._check_voxel_size(path, attrs.get("voxel_size_um"))
            if "object_volumes" in attrs:
                self.volume_records.append(attrs["object_volumes"])

    def _check_voxel_size(self, path: Path, recorded: Any) -> None:
        """Keep the voxel size of a 3-D set; every set must share it (within 1e-6 relative)."""
        try:
            size = check_spacing(recorded)
        except UserInputError:
            raise UserInputError(f"{path}: records no voxel size (attrs unet.voxel_size_um = {recorded!r}); "
                                 "regenerate it with 'unet augment --dims 3'") from None
        if self.voxel_size_um is not None and not np.allclose(size, self.voxel_size_um, rtol=1e-6, atol=0):
            raise UserInputError(f"{path}: voxel size {size} µm differs from {self.voxel_size_um} µm of "
                                 f"{self.paths[0]}; train on sets of one voxel size")
        self.voxel_size_um = self.voxel_size_um or size  # type: ignore[assignment]

    def median_object_area(self) -> float | None:
        """Median area, px, of the objects of the sets' undeformed source slices (None: not recorded)."""
        if len(self.area_records) != len(self.paths):
            return None
        return median_area(self.area_records)

    def median_object_volume_um3(self) -> float | None:
        """Median volume, µm³, of the 3-D objects of the sets' undeformed source volumes (None: 2-D
        sets, or not recorded)."""
        if self.voxel_size_um is None or len(self.volume_records) != len(self.paths):
            return None
        voxels = median_area(self.volume_records)
        return None if voxels is None else voxels * float(np.prod(self.voxel_size_um))

    def mean_weights(self) -> np.ndarray:
        """Mean loss weight per class over the output region of every tile (the pixels the loss sees)."""
        sums = WeightSums(self.spec.n_classes)
        context = output_contexts(self.spec)
        for arrays in self._open():
            for start in range(0, arrays["classes"].shape[0], SCAN_BLOCK):
                part = slice(start, start + SCAN_BLOCK)
                sums.add(
                    crop_to_output(np.asarray(arrays["classes"][part]), context=context),
                    crop_to_output(np.asarray(arrays["weights"][part]), context=context),
                )
        return sums.means()

    def _open(self) -> list[dict[str, zarr.Array]]:
        if self._arrays is None or self._pid != os.getpid():
            groups = [zarr.open_group(p, mode="r") for p in self.paths]
            self._arrays = [{name: g[name] for name in TRAIN_ARRAYS} for g in groups]
            self._pid = os.getpid()
        return self._arrays

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        which = int(np.searchsorted(self.offsets, index, side="right") - 1)
        local = index - int(self.offsets[which])
        arrays = self._open()[which]
        context = output_contexts(self.spec)
        image = np.asarray(arrays["image"][local], dtype=np.float32)
        classes = crop_to_output(np.asarray(arrays["classes"][local]), context=context)  # stored dtype (uint8)
        weights = crop_to_output(np.asarray(arrays["weights"][local], dtype=np.float32), context=context)
        return (
            torch.from_numpy(np.ascontiguousarray(image[None])),
            torch.from_numpy(np.ascontiguousarray(classes)),
            torch.from_numpy(np.ascontiguousarray(weights)),
        )


class IterationSampler(torch.utils.data.Sampler[int]):
    """Sample indices for iterations ``[start, stop)``, ``batch_size`` per iteration.

    The dataset is visited in epochs; epoch ``e`` is the permutation drawn by
    ``numpy.random.default_rng([seed, e])``, so the index used at any (iteration, slot) is
    fixed by the seed alone and a run resumed at ``start`` sees the same tiles. With
    ``with_epoch`` the sampler yields ``index + e * n_samples`` (for :class:`OnTheFlyTiles`,
    which draws a fresh deformation per epoch).
    """

    def __init__(
        self, n_samples: int, *, batch_size: int, start: int, stop: int, seed: int, with_epoch: bool = False
    ) -> None:
        self.n_samples, self.batch_size = int(n_samples), int(batch_size)
        self.start, self.stop, self.seed = int(start), int(stop), int(seed)
        self.with_epoch = with_epoch

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        epoch, order = -1, np.empty(0, dtype=np.int64)
        for position in range(self.start * self.batch_size, self.stop * self.batch_size):
            e, k = divmod(position, self.n_samples)
            if e != epoch:
                epoch, order = e, np.random.default_rng([self.seed, e]).permutation(self.n_samples)
            yield int(order[k]) + (e * self.n_samples if self.with_epoch else 0)


class OnTheFlyTiles(torch.utils.data.Dataset):
    """Freshly deformed tiles drawn from ingested stacks and their weights stores.

    Uses the augment stage's code (:func:`unet_core.augment.samples.make_sample`, paper defaults of
    :class:`unet_core.augment.elastic.DeformParams`): draw ``index + epoch * len(self)`` (what
    :class:`IterationSampler` yields with ``with_epoch=True``) is sample ``k = epoch`` of the
    ``index``-th (stack, slice), a pure function of ``(seed, z, k)``, so a resumed run redraws
    identical tiles. Items are shaped as in :class:`AugmentedTiles`.

    Tiles are deformed on the CPU (in the loader workers) whatever the training device: the loss
    weights are recomputed on the host from the deformed instances and cost most of a tile (about
    75 of 90 ms for a 572-px tile with 300 cells, the warp < 10 ms), and forked workers cannot use
    CUDA; README, "On-the-fly augmentation on a GPU".
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        *,
        slices: Sequence[int] | None,
        spec: UNetSpec,
        tile_out: int,
        seed: int,
        normalisation: Normalisation = Normalisation.STACK_ZSCORE,
    ) -> None:
        if not pairs:
            raise UserInputError("--train-stacks: no training stack given (pass STACK:WEIGHTS.zarr pairs)")
        self.pairs = [(Path(a), Path(b)) for a, b in pairs]
        self.spec, self.seed = spec, int(seed)
        self.normalisation = normalisation  # parsed where it entered (TrainConfig)
        self.in_size, self.out_size = tile_shapes(spec, tile_out)
        self.params = DeformParams()
        self.items: list[tuple[int, int]] = []
        for i, (stack, weights) in enumerate(self.pairs):
            n_z = open_source(stack, weights, normalisation=self.normalisation).stack.shape[0]
            chosen = range(n_z) if slices is None else slices
            bad = [z for z in chosen if not 0 <= z < n_z]
            if bad:
                raise UserInputError(
                    f"--train-slices: slice(s) {bad[:5]} out of range for {stack} ({n_z} slices)"
                )
            self.items.extend((i, z) for z in chosen)
        if not self.items:
            raise UserInputError(
                f"--train-stacks: no training slices selected from {[str(a) for a, _ in self.pairs]}"
            )
        self._sources: list | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.items)

    def describe(self) -> dict:
        """Settings that define the drawn tiles (for the data hash and the model card)."""
        return {
            "pairs": [f"{a}:{b}" for a, b in self.pairs],
            "items": self.items,
            "tile_out": self.out_size,
            "seed": self.seed,
            "deform": {k: str(v) for k, v in vars(self.params).items()},
            "normalisation": self.normalisation.value,
        }

    def median_object_area(self) -> float | None:
        """Median area, px, of the objects of the chosen source slices (None: no object)."""
        stores = [zarr.open_group(w, mode="r") for _, w in self.pairs]
        areas = [object_areas(np.asarray(stores[which]["instances"][z])) for which, z in self.items]
        return median_area([area_histogram(np.concatenate(areas))])

    def mean_weights(self) -> np.ndarray:
        """Mean loss weight per class over the chosen source slices (before deformation).

        Deformation moves pixels but hardly changes the share of each class or its weights,
        so the undeformed slices stand in for the endless stream of drawn tiles.
        """
        sums = WeightSums(self.spec.n_classes)
        stores = [zarr.open_group(w, mode="r") for _, w in self.pairs]
        for which, z in self.items:
            sums.add(stores[which]["classes"][z], stores[which]["weights"][z])
        return sums.means()

    def _source(self, which: int):
        if self._sources is None or self._pid != os.getpid():
            self._sources = [open_source(a, b, normalisation=self.normalisation) for a, b in self.pairs]
            self._pid = os.getpid()
        return self._sources[which]

    def __getitem__(self, draw: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, index = divmod(int(draw), len(self.items))
        which, z = self.items[index]
        tiles = make_sample(
            self._source(which),
            z,
            epoch,
            seed=self.seed,
            params=self.params,
            tile_in=self.in_size,
            tile_out=self.out_size,
            device="cpu",
        )
        context = self.spec.context
        return (
            torch.from_numpy(np.ascontiguousarray(tiles.image[0][None], dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(crop_to_output(tiles.classes[0], context=context))),
            torch.from_numpy(np.ascontiguousarray(crop_to_output(tiles.weights[0], context=context))),
        )


@dataclass(frozen=True)
class ValidationSlice:
    """One held-out slice (for a 3-D network: one held-out volume): normalised image, target
    classes and loss weights.

    Attributes:
        source: ``"STACK:z"`` (a volume: ``"STACK"``) for logs.
        image: (Y, X) (volume: (Z, Y, X)) float32 normalised grey values (a volume's slices each
            with their own scaling, as the engine normalises them).
        classes: (Y, X) (volume: (Z, Y, X)) uint8 target classes.
        weights: (Y, X) (volume: (Z, Y, X)) float32 loss weights w(x).
        voxel_size_um: (dz, dy, dx) of the volume's stack, µm; None for a slice.
    """

    source: str
    image: np.ndarray
    classes: np.ndarray
    weights: np.ndarray
    voxel_size_um: tuple[float, float, float] | None = None


def parse_validation_pair(text: str, *, what: str = "--val") -> tuple[Path, Path]:
    """Split ``STACK:WEIGHTS.zarr`` (the ``--val``/``--train-stacks`` syntax) into two paths."""
    stack, sep, weights = str(text).rpartition(":")
    if not sep or not stack or not weights:
        raise UserInputError(
            f"{what} {text!r}: expected STACK:WEIGHTS.zarr (an ingested stack and its weights store)"
        )
    return Path(stack), Path(weights)


def load_validation(
    pairs: Sequence[tuple[Path, Path]], *, slices: Sequence[int] | None, n_classes: int,
    normalisation: Normalisation = Normalisation.STACK_ZSCORE, dims: int = 2,
) -> list[ValidationSlice]:
    """Read held-out slices (a 3-D network: whole volumes) of ingested stacks with their weights stores.

    Args:
        pairs: ``(stack, weights store)`` paths.
        slices: z indices to use from every stack, or None for all slices (must be None with
            ``dims`` 3: a volume is validated whole).
        n_classes: classes of the model (targets must be below it).
        normalisation: how the images are normalised (as ``unet predict`` will with this model).
        dims: 2 (one item per slice) or 3 (one (Z, Y, X) item per stack).

    Returns:
        One :class:`ValidationSlice` per (stack, z), or per stack for ``dims`` 3.

    Raises:
        UserInputError: unreadable stores, mismatched shapes, out-of-range slices or classes,
            an empty selection (training would silently run without validation), or for
            ``dims`` 3 a slice selection, a single-slice stack or one without a given voxel size.
    """
    if slices is not None and not len(slices):
        raise UserInputError("--val-slices: the selection holds no slice; give at least one or leave it out")
    if dims == 3 and slices is not None:
        raise UserInputError("--val-slices: a 3-D network is validated on whole volumes; leave --val-slices out")
    out: list[ValidationSlice] = []
    for stack_path, weights_path in pairs:
        stack = open_stack(stack_path)
        scaling = stack.scaler(normalisation)
        group = _validation_group(stack, weights_path, dims=dims)
        if dims == 3:
            spacing = stack.volume_voxel_size(needs="--dims 3 (--val)")
            classes = np.asarray(group["classes"][:], dtype=np.uint8)
            _check_classes(classes, n_classes=n_classes, where=f"{weights_path}/classes")
            image = np.stack([normalize(np.asarray(stack.image[z]), scaling(z)) for z in range(stack.shape[0])])
            out.append(ValidationSlice(str(stack_path), image, classes,
                                       np.asarray(group["weights"][:], dtype=np.float32), spacing))
            continue
        chosen = range(stack.shape[0]) if slices is None else slices
        for z in chosen:
            if not 0 <= z < stack.shape[0]:
                raise UserInputError(
                    f"--val-slices: slice {z} out of range for {stack_path} ({stack.shape[0]} slices)"
                )
            classes = np.asarray(group["classes"][z], dtype=np.uint8)
            _check_classes(classes[None], n_classes=n_classes, where=f"{weights_path}/classes")
            out.append(
                ValidationSlice(
                    source=f"{stack_path}:{z}",
                    image=normalize(np.asarray(stack.image[z]), scaling(z)),
                    classes=classes,
                    weights=np.asarray(group["weights"][z], dtype=np.float32),
                )
            )
    return out


def _validation_group(stack: Stack, weights_path: Path, *, dims: int) -> zarr.Group:
    """The weights store of a validation stack, checked: its arrays, shape, source stack and mode (a 3-D
    network's targets are the volume's classes, 'unet weights --dims 3'; a 2-D one's those of slices)."""
    group = open_group(weights_path, hint="a weights store from 'unet weights' expected")
    made = dict(group.attrs).get("unet", {}).get("dims", 2)
    if made != dims:
        raise UserInputError(f"--val {weights_path}: a {made}-D weights store, but the model has --dims {dims}; "
                             f"make its weights with 'unet weights --dims {dims}'")
    missing = [name for name in ("weights", "classes") if name not in group]
    if missing:
        raise UserInputError(f"{weights_path}: not a weights store (missing arrays {missing})")
    if tuple(group["classes"].shape) != stack.shape or tuple(group["weights"].shape) != stack.shape:
        raise UserInputError(
            f"{weights_path}: shape {tuple(group['classes'].shape)} does not match "
            f"stack {stack.path} {stack.shape}"
        )
    stack.check_made_from(recorded_intensity(group.attrs), result=weights_path)
    return group
