"""Training loop of the U-Net: paper defaults, CUDA fast paths, exact resume.

Outputs in ``out_dir`` (each written atomically, so a killed run never leaves a half file)::

    state.pt          resumable state: model, optimizer, scheduler, grad scaler, every RNG
                      state, iteration, config, training-data hash, metric history
                      (unet_core.train.state)
    model.pt          the last weights, or those of the best validation point with
                      train.export_weights: best (unet_core.train.outputs)
    model.ts          TorchScript export of the same weights (CPU, float32, eval mode)
    metrics.csv       one row per validation step (unet_core.train.validation)
    curve.png         loss / pixel error / IoU against iteration
    model_card.json   config, geometry, data hash, metrics, exported weights, versions

The loop is a sequence of named steps: build the training data and the run's objects
(:func:`_session`), then for every batch one optimizer step (:func:`_step`) whose loss is summed
on the device (:class:`LossMeter`), and at log, validation and checkpoint iterations only, one
host synchronisation (:func:`_host_point`): there is no per-step ``.item()``. On CUDA state.pt is
written from a host snapshot on a background thread while the next steps run (:func:`_checkpoint`).

Divergence. A non-finite loss or non-finite weights stop the run at the next host point with one
line naming the iteration and the learning rate; no file is written with non-finite weights, so
the last state.pt written stays a good one to resume from (with a lower learning rate, in a new
output folder).

Reproducibility. The tile read at each iteration is a function of (seed, iteration) only
(:class:`unet_core.train.data.IterationSampler`), the loader draws no number from the global RNG,
and a checkpoint restores model, optimizer, scheduler, scaler and the torch/CUDA/NumPy/Python
RNG states. On the CPU deterministic algorithms are enforced, so a run killed at any
iteration (SIGKILL) and resumed with ``resume=True`` ends with weights bit-identical to an
uninterrupted run (same machine, same thread count). On CUDA, cuDNN autotuning, TF32 and
atomics in some backward kernels (e.g. max-pool, transposed convolution) make runs
reproducible only up to floating-point rounding; the data order and dropout masks are still
exactly restored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet_core.common.device import out_of_gpu_memory
from unet_core.common.errors import ConfigError, UserInputError
from unet_core.common.intensity import Normalisation
from unet_core.common.outputs import claim_outputs
from unet_core.common.progress import progress_bar
from unet_core.common.provenance import sha256_files
from unet_core.model.decision import logit_offsets
from unet_core.model.spec import UNetSpec, check_voxel_size
from unet_core.model.unet import UNet
from unet_core.train.config import ExportWeights, TrainConfig, lr_factor
from unet_core.train.data import (
    AugmentedTiles,
    IterationSampler,
    OnTheFlyTiles,
    ValidationSlice,
    load_validation,
)
from unet_core.train.outputs import (
    METRICS_FILE,
    OUT_DIR_MARK,
    RunRecord,
    decision_metadata,
    write_final_outputs,
    write_metrics_csv,
)
from unet_core.train.runtime import Runtime, batch_loss, make_optimizer, resolve_runtime
from unet_core.train.state import (
    STATE_FILE,
    BackgroundStateWriter,
    Progress,
    apply_state,
    check_finite_weights,
    cpu_weights,
    divergence,
    load_resumable,
    save_state,
    seed_everything,
    state_snapshot,
)
from unet_core.train.validation import validate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced."""

    out_dir: Path
    iterations: int
    metrics: dict[str, Any]
    device: str


@dataclass(frozen=True)
class TrainingData:
    """The training tiles, the hash that identifies them and how they were given."""

    dataset: AugmentedTiles | OnTheFlyTiles
    data_hash: str
    desc: dict[str, Any]


@dataclass
class Session:
    """One run's objects, built once by :func:`_session` and advanced by the loop."""

    out_dir: Path
    config: TrainConfig
    runtime: Runtime
    record: RunRecord
    model: UNet
    forward: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    val_data: list[ValidationSlice]
    offsets: np.ndarray
    progress: Progress
    last_saved: int | None  # iteration of the state.pt on disk (None: none written by this run yet)
    writer: BackgroundStateWriter | None = None  # on CUDA: state.pt written beside the steps
    clock: float = 0.0  # wall time (perf_counter) up to which training time has been counted

    def kept(self) -> str:
        """What a diverged run leaves behind (the end of its error line). A write still in flight is
        finished by :func:`_run` before the error propagates (and logged if it fails)."""
        saved = self.last_saved
        if self.writer is not None and self.writer.submitted is not None:
            saved = self.writer.submitted
        if saved is None:
            return f"no {STATE_FILE} was written"
        path = self.out_dir / STATE_FILE
        return f"the last checkpoint with finite weights, {path} (iteration {saved}), is kept"


class LossMeter:
    """Sums of the training loss kept on the device, read by the host only at host points.

    ``sums`` = [loss, count] since the last log point, [loss, count] since the last validation,
    the first iteration with a non-finite loss (0: none) and that loss. Without a grad scaler a
    non-finite loss means the weights are now non-finite (divergence); with the fp16 scaler such
    a step is skipped by the scaler and not counted.
    """

    def __init__(self, progress: Progress, device: torch.device, *, skips_nonfinite: bool) -> None:
        h = progress.history
        self.host = [*h.window, *h.since_val]
        self.sums = torch.tensor([*self.host, 0.0, 0.0], dtype=torch.float64, device=device)
        self.skips_nonfinite = skips_nonfinite

    def add(self, loss: torch.Tensor, iteration: int) -> None:
        """Accumulate one step's loss (device operations only: no synchronisation)."""
        value = loss.detach().double()
        finite = torch.isfinite(value)
        counted = torch.where(finite, value, 0.0)
        ones = finite.double()
        self.sums[:4] += torch.stack([counted, ones, counted, ones])
        if not self.skips_nonfinite:
            first = (~finite) & (self.sums[4] == 0)
            record = torch.stack([torch.full_like(value, iteration), value])
            self.sums[4:] = torch.where(first, record, self.sums[4:])

    def fetch(self) -> tuple[int, float]:
        """Copy the sums to the host (the synchronisation); the first non-finite iteration and loss."""
        values = self.sums.tolist()
        self.host = values[:4]
        return int(values[4]), values[5]

    def take(self, part: int) -> tuple[float, float]:
        """(sum, count) of part 0 (since the log point) or 1 (since validation), then zero it."""
        total, count = self.host[2 * part : 2 * part + 2]
        self.host[2 * part : 2 * part + 2] = [0.0, 0.0]
        self.sums[2 * part : 2 * part + 2] = 0.0
        return total, count

    def store(self, progress: Progress) -> None:
        """Write the host copy into the history (what state.pt resumes from)."""
        progress.history.window = [float(v) for v in self.host[:2]]
        progress.history.since_val = [float(v) for v in self.host[2:]]


def train(
    train_sets: Sequence[str | os.PathLike[str]],
    *,
    out_dir: str | os.PathLike[str],
    spec: UNetSpec,
    config: TrainConfig,
    validation: Sequence[tuple[Path, Path]] = (),
    val_slices: Sequence[int] | None = None,
    resume: bool = False,
    restart_if_changed: bool = False,
    on_iteration: Callable[[int], None] | None = None,
    train_stacks: Sequence[tuple[Path, Path]] = (),
    train_slices: Sequence[int] | None = None,
) -> TrainResult:
    """Train a U-Net on augmented tiles; validate, checkpoint and export as configured.

    Args:
        train_sets: augmented Zarr sets from ``unet augment`` (image/classes/weights, (N, H, W));
            empty when ``train_stacks`` is used.
        out_dir: directory for state.pt, model.pt, model.ts, metrics.csv, curve.png, model_card.json.
        spec: the architecture; ``H`` of the sets must be a valid input size for it.
        config: training settings, among them the output size of on-the-fly tiles
            (``config.tile_out``) and the grey-value normalisation (``config.normalisation``) of
            those tiles and the validation slices; augmented sets must hold tiles normalised the
            same way. The normalisation is stored in model.pt: ``unet predict`` uses it.
        validation: ``(ingested stack, weights store)`` pairs for validation.
        val_slices: z indices used from every validation stack (None: all).
        resume: continue from ``out_dir/state.pt`` if it exists (exactly: same final weights).
        restart_if_changed: with ``resume``, a state written with other settings, data or
            model is discarded (logged) and training starts afresh instead of failing; the
            workflow uses this, since Snakemake reruns training only when those changed.
        on_iteration: called with the number of completed iterations after each step.
        train_stacks: instead of ``train_sets``, ``(ingested stack, weights store)`` pairs to
            deform on the fly (fresh tiles every epoch; :class:`unet_core.train.data.OnTheFlyTiles`).
        train_slices: z indices of every training stack (None: all).

    Returns:
        A :class:`TrainResult` with the last validation metrics.

    Raises:
        UserInputError: empty or invalid training sets, invalid tile size, too many classes, or
            an ``out_dir`` that is an input, holds one, or holds files other than training's own.
        CheckpointError: ``resume`` with a state that does not match the data or settings.
        ConfigError: a setting that cannot be used (device, ``export_weights: best`` without
            validation data), a diverged run (non-finite loss or weights), or a GPU out of memory
            in a training step or validation (names the setting to lower; no model.pt written).
    """
    claim_outputs([(out_dir, OUT_DIR_MARK)],
                  [*train_sets, *(p for pair in train_stacks for p in pair), *(p for pair in validation for p in pair)])
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(
            train_sets,
            out_dir=Path(out_dir),
            spec=spec,
            config=config,
            validation=validation,
            val_slices=val_slices,
            resume=resume,
            restart_if_changed=restart_if_changed,
            on_iteration=on_iteration,
            train_stacks=train_stacks,
            train_slices=train_slices,
        )
    finally:  # the CPU run switches deterministic algorithms on; leave the process as it was
        torch.use_deterministic_algorithms(deterministic)


def _train(
    train_sets: Sequence[str | os.PathLike[str]],
    *,
    out_dir: Path,
    spec: UNetSpec,
    config: TrainConfig,
    validation: Sequence[tuple[Path, Path]],
    val_slices: Sequence[int] | None,
    resume: bool,
    restart_if_changed: bool,
    on_iteration: Callable[[int], None] | None,
    train_stacks: Sequence[tuple[Path, Path]],
    train_slices: Sequence[int] | None,
) -> TrainResult:
    if config.export_weights is ExportWeights.BEST and not validation:  # the default: best where it can be
        log.warning("train.export_weights: 'best' picks the weights on validation slices, but none are given: "
                    "exporting the last weights (add --val pairs or a 'val' row in the samples table, or set 'last')")
        config = replace(config, export_weights=ExportWeights.LAST)
    normalisation = config.normalisation
    data = training_data(train_sets, train_stacks=train_stacks, train_slices=train_slices,
                         tile_out=config.tile_out, spec=spec, seed=config.seed, normalisation=normalisation)
    val_tile_out = _val_tile_out(config, spec, data.dataset)
    val_data = load_validation(validation, slices=val_slices, n_classes=spec.n_classes,
                               normalisation=normalisation, dims=spec.dims) if validation else []
    voxel_size = training_voxel_size(data.dataset, val_data)
    mean_weights = data.dataset.mean_weights() if config.weighted else np.ones(spec.n_classes)
    offsets = logit_offsets(mean_weights)
    log.info("mean loss weight per class %s -> decision logit offsets %s",
             np.round(mean_weights, 4).tolist(), np.round(offsets, 4).tolist())
    runtime = resolve_runtime(config)
    log.info("training on %s: %d tiles of %s px -> %s px output, %d iterations of batch %d",
             runtime.description, len(data.dataset), _shape_text(data.dataset, "in"), _shape_text(data.dataset, "out"),
             config.iterations, config.batch_size)
    record = RunRecord(
        spec=spec, config=config, runtime=runtime,
        tile_in=data.dataset.in_size, tile_out=data.dataset.out_size, train_tiles=len(data.dataset),
        data_hash=data.data_hash, data_desc=data.desc,
        validation=[f"{stack}:{weights}" for stack, weights in validation],
        val_slices=list(val_slices) if val_slices is not None else None,
        val_tile_out=val_tile_out, decision=decision_metadata(mean_weights, offsets),
        normalisation=normalisation, median_object_area_px=data.dataset.median_object_area(),
        voxel_size_um=voxel_size, tile_z=_tile_z(data.dataset),
        median_object_volume_um3=getattr(data.dataset, "median_object_volume_um3", lambda: None)(),
    )
    s = _session(out_dir, record, val_data, offsets, resume=resume, restart_if_changed=restart_if_changed)
    _run(s, _loader(data.dataset, config, runtime, start=s.progress.iteration), on_iteration)
    history = s.progress.history
    write_final_outputs(out_dir, model=s.model, best=s.progress.best, history=history, record=record,
                        iteration=s.progress.iteration)
    return TrainResult(out_dir, s.progress.iteration, dict(history.rows[-1] if history.rows else {}),
                       runtime.description)


def training_data(
    train_sets: Sequence[str | os.PathLike[str]],
    *,
    train_stacks: Sequence[tuple[Path, Path]],
    train_slices: Sequence[int] | None,
    tile_out: int | None,
    spec: UNetSpec,
    seed: int,
    normalisation: Normalisation = Normalisation.STACK_ZSCORE,
) -> TrainingData:
    """Stored augmented sets, or stacks deformed on the fly, with the hash that identifies them.

    Raises:
        ConfigError: both kinds given, or on-the-fly tiles without an output tile size.
        UserInputError: unusable sets or stacks.
    """
    if train_stacks and train_sets:
        raise ConfigError(
            "train: give augmented sets (--train) or stacks to deform on the fly (--train-stacks), not both"
        )
    if train_stacks and spec.dims == 3:
        raise ConfigError("--train-stacks: volumes are not deformed on the fly in this version; make the training "
                          "set with 'unet augment --dims 3' and pass it with --train")
    if not train_stacks:
        return TrainingData(AugmentedTiles(train_sets, spec=spec, normalisation=normalisation), sha256_files(train_sets),
                            {"train_sets": [str(p) for p in train_sets]})
    if tile_out is None:
        raise ConfigError("train.tile_out: on-the-fly augmentation needs the output tile size (--tile-out)")
    dataset = OnTheFlyTiles(train_stacks, slices=train_slices, spec=spec, tile_out=tile_out, seed=seed,
                            normalisation=normalisation)
    stores = [p for pair in train_stacks for p in pair]
    digest = hashlib.sha256((sha256_files(stores) + json.dumps(dataset.describe())).encode()).hexdigest()
    return TrainingData(dataset, digest, {"on_the_fly": dataset.describe()})


def _shape_text(dataset: AugmentedTiles | OnTheFlyTiles, which: str) -> str:
    """The training tile's input or output size for the log: ``508`` or (3-D) ``20x84x84``."""
    shape = getattr(dataset, f"{which}_shape", None)
    return "x".join(map(str, shape)) if shape is not None and len(shape) == 3 else str(getattr(dataset, f"{which}_size"))


def _tile_z(dataset: AugmentedTiles | OnTheFlyTiles) -> tuple[int, int] | None:
    """(input, output) z extent of 3-D training tiles, slices; None for slice tiles."""
    shape_in, shape_out = getattr(dataset, "in_shape", ()), getattr(dataset, "out_shape", ())
    return (int(shape_in[0]), int(shape_out[0])) if len(shape_in) == 3 else None


def training_voxel_size(
    dataset: AugmentedTiles | OnTheFlyTiles, val_data: Sequence[ValidationSlice]
) -> tuple[float, float, float] | None:
    """The voxel size (dz, dy, dx), µm, a 3-D network is trained at (None for 2-D): the training
    sets', which every validation volume must share (:func:`unet_core.model.spec.check_voxel_size`,
    the tolerance a model also has at prediction).

    Raises:
        ConfigError: a validation volume of another voxel size.
    """
    size = getattr(dataset, "voxel_size_um", None)
    for item in val_data:
        if item.voxel_size_um is not None:
            check_voxel_size(size, tuple(item.voxel_size_um), where=f"--val {item.source} (the training sets' voxel size)")
    return size


def _val_tile_out(config: TrainConfig, spec: UNetSpec, dataset: AugmentedTiles | OnTheFlyTiles) -> int:
    """Validation output tile size, px (default: the training output size), checked against the model."""
    size = config.val_tile_out or dataset.out_size
    try:
        spec.input_size(size)
    except ValueError as err:
        raise ConfigError(f"train.val_tile_out: {err}") from None
    return size


#: Float32 copies of every parameter training holds: weights, gradients, two Adam moments.
TRAINING_COPIES = 4


def check_model_fits_memory(spec: UNetSpec) -> None:
    """Raise where the network's training state alone exceeds this machine's memory.

    Counted on the meta device (no memory), so an oversized ``model`` section (e.g. a typo in
    ``base_channels``) is one line instead of an allocation failure or the OOM killer.

    Raises:
        ConfigError: the parameters times :data:`TRAINING_COPIES` exceed the physical memory.
    """
    try:
        with torch.device("meta"):
            n = sum(p.numel() for p in UNet(spec).parameters())
    except RuntimeError:  # sizes beyond what any tensor can hold
        n = float("inf")
    need = TRAINING_COPIES * 4 * n
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > total:
        raise ConfigError(
            f"model: a network of depth {spec.depth} and base_channels {spec.base_channels} has {n:.3g} "
            f"parameters; training them needs {need / 2**30:.3g} GiB, more than this machine's "
            f"{total / 2**30:.3g} GiB: choose a smaller model.base_channels or model.depth")


def _session(
    out_dir: Path,
    record: RunRecord,
    val_data: list[ValidationSlice],
    offsets: np.ndarray,
    *,
    resume: bool,
    restart_if_changed: bool,
) -> Session:
    """Seed, build the network, optimizer, schedule and scaler; load state.pt when resuming."""
    config, runtime, spec = record.config, record.runtime, record.spec
    seed_everything(config.seed)
    check_model_fits_memory(spec)
    model = UNet(spec).to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=memory_format(spec))
    optimizer = make_optimizer(model, config, runtime)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, config=config))
    scaler = torch.amp.GradScaler("cuda") if runtime.autocast_dtype is torch.float16 else None
    state = load_resumable(out_dir, resume=resume, restart_if_changed=restart_if_changed, spec=spec,
                           config=config, data_hash=record.data_hash)
    progress = Progress()
    if state is not None:
        progress = apply_state(state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                               config=config)
        log.info("resumed from %s at iteration %d", out_dir / STATE_FILE, progress.iteration)
    out_dir.mkdir(parents=True, exist_ok=True)
    forward = torch.compile(model) if config.compile else model
    writer = BackgroundStateWriter(out_dir / STATE_FILE) if background_checkpoints(runtime) else None
    return Session(out_dir, config, runtime, record, model, forward, optimizer, scheduler, scaler, val_data,
                   offsets, progress, progress.iteration if state is not None else None, writer)


def memory_format(spec: UNetSpec) -> torch.memory_format:
    """The channels-last layout of ``spec``'s tensors: 4-D (N, H, W, C) for 2-D, 5-D for a 3-D network."""
    return torch.channels_last_3d if spec.dims == 3 else torch.channels_last


def background_checkpoints(runtime: Runtime) -> bool:
    """Whether state.pt is written on a background thread: on CUDA only.

    On a GPU the step waits for the device, so a host thread serialising and writing the state
    (0.37-0.5 GB for the paper net) runs beside it. On the CPU the steps use every core and the
    write would only compete with them; it stays synchronous there and is not training time.
    """
    return runtime.device.type == "cuda"


def _loader(
    dataset: AugmentedTiles | OnTheFlyTiles, config: TrainConfig, runtime: Runtime, *, start: int
) -> torch.utils.data.DataLoader:
    """Batches for iterations ``start`` ... ``config.iterations`` in the seed's fixed order.

    Pinned host memory on CUDA (asynchronous uploads), ``4 x workers`` batches read ahead.
    The loader is iterated exactly once per run (validation does not use it), so
    ``persistent_workers`` would keep nothing alive between epochs: it stays off. At most one
    worker per CPU core: each is a fork of this process (``train.workers: 100000`` would fork
    them all at once), and the batches do not depend on the count.
    """
    workers = min(config.workers, os.cpu_count() or 1)
    if workers < config.workers:
        log.warning("train.workers %d: using %d loader processes, one per CPU core", config.workers, workers)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=IterationSampler(
            len(dataset),
            batch_size=config.batch_size,
            start=start,
            stop=config.iterations,
            seed=config.seed,
            with_epoch=isinstance(dataset, OnTheFlyTiles),
        ),
        num_workers=workers,
        pin_memory=runtime.device.type == "cuda",
        generator=torch.Generator().manual_seed(config.seed),  # keeps the global RNG untouched
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def _run(s: Session, loader: torch.utils.data.DataLoader, on_iteration: Callable[[int], None] | None) -> None:
    """The loop: one optimizer step per batch, host work only at log/validation/checkpoint points."""
    meter = LossMeter(s.progress, s.runtime.device, skips_nonfinite=s.scaler is not None)
    s.model.train()
    bar = progress_bar(loader, desc="train", total=s.config.iterations, unit="it",
                       initial=s.progress.iteration)
    s.clock = time.perf_counter()
    where = f"training on {s.runtime.device} (batch {s.config.batch_size} of {s.record.tile_in}-px tiles)"
    try:
        with out_of_gpu_memory(where, "lower train.batch_size, then train.tile_out", error=ConfigError):
            for batch in bar:
                loss = _step(s, batch)
                s.progress.iteration += 1
                meter.add(loss, s.progress.iteration)
                _host_point(s, meter, bar)
                if on_iteration is not None:
                    on_iteration(s.progress.iteration)
        if s.writer is not None:  # the last state.pt is in place before model.pt (a write's error raised)
            s.writer.wait()
    finally:  # whatever stopped the run, a state.pt write in flight is finished, not cut off
        if s.writer is not None:
            s.writer.close()
    bar.close()


def _step(s: Session, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """One optimizer step on one batch; returns the (unsynchronised) loss."""
    image, classes, weights = batch
    device = s.runtime.device
    image = image.to(device, non_blocking=True)
    if s.runtime.channels_last:
        image = image.contiguous(memory_format=memory_format(s.record.spec))
    classes = classes.to(device, non_blocking=True).long()  # uploaded as uint8, widened on the device
    weights = weights.to(device, non_blocking=True) if s.config.weighted else None
    loss = batch_loss(s.forward, image, classes, weights, runtime=s.runtime)
    s.optimizer.zero_grad(set_to_none=True)
    if s.scaler is not None:
        s.scaler.scale(loss).backward()
        s.scaler.step(s.optimizer)
        s.scaler.update()
    else:
        loss.backward()
        s.optimizer.step()
    s.scheduler.step()
    return loss.detach()


def _host_point(s: Session, meter: LossMeter, bar: Any) -> None:
    """At log, validation and checkpoint iterations: synchronise once, check, log, validate, save.

    Training time is counted up to the synchronisation (so it includes the device's queued
    work); validation time is not training time, nor a synchronous checkpoint (see :func:`_checkpoint`).
    """
    it, config = s.progress.iteration, s.config
    last = it == config.iterations
    periods = (config.log_every, config.validate_every, config.checkpoint_every)
    due = [last or it % every == 0 for every in periods]
    if not any(due):
        return
    first_bad, bad_loss = meter.fetch()
    now = time.perf_counter()
    s.progress.history.train_seconds += now - s.clock
    s.clock = now
    if first_bad:
        raise divergence(f"the loss became {bad_loss}", iteration=first_bad, config=config, kept=s.kept())
    if due[0]:
        _log_point(s, meter, bar)
    if due[1]:
        _validation_point(s, meter)
        s.clock = time.perf_counter()
    if due[2]:
        check_finite_weights(s.model, iteration=it, config=config, kept=s.kept())
        meter.store(s.progress)
        _checkpoint(s)


def _checkpoint(s: Session) -> None:
    """Write state.pt: synchronously (the CPU), or from a host snapshot on a background thread (CUDA).

    The synchronous write is not training time. The snapshot (the device state copied to host
    memory) stalls the steps, so it is training time; the background write runs beside the next
    steps, which it slows by what it takes from them, and a write still in flight at the next
    checkpoint is waited for there.
    """
    state = {"model": s.model, "optimizer": s.optimizer, "scheduler": s.scheduler, "scaler": s.scaler,
             "config": s.config, "data_hash": s.record.data_hash, "progress": s.progress}
    if s.writer is None:
        save_state(s.out_dir / STATE_FILE, **state)
        s.last_saved = s.progress.iteration
        s.clock = time.perf_counter()
    else:
        s.writer.submit(state_snapshot(**state, host_copy=True), s.progress.iteration)


def _log_point(s: Session, meter: LossMeter, bar: Any) -> None:
    """Append the window's mean loss to the training-loss curve and the progress bar."""
    it = s.progress.iteration
    total, count = meter.take(0)
    if not count:  # only with the fp16 grad scaler: every step of the window was skipped
        raise divergence("the loss was non-finite at every step of the last log window", iteration=it,
                         config=s.config, kept=s.kept())
    mean = total / count
    s.progress.history.train_log.append([it, mean])
    bar.set_postfix(loss=f"{mean:.4f}", lr=f"{s.scheduler.get_last_lr()[0]:.2e}", refresh=False)


def _validation_point(s: Session, meter: LossMeter) -> None:
    """A metrics.csv row: learning rate, training loss and speed since the last row, validation scores."""
    it, history = s.progress.iteration, s.progress.history
    total, count = meter.take(1)
    prev = history.rows[-1] if history.rows else {"iteration": 0, "train_seconds": 0.0}
    seconds = history.train_seconds - float(prev["train_seconds"])
    row: dict[str, Any] = {
        "iteration": it,
        "lr": s.scheduler.get_last_lr()[0],
        "train_loss": total / max(count, 1.0),
        "train_seconds": round(history.train_seconds, 3),
        "tiles_per_s": (it - int(prev["iteration"])) * s.config.batch_size / seconds if seconds > 0 else None,
    }
    if s.val_data:
        check_finite_weights(s.model, iteration=it, config=s.config, kept=s.kept())
        with out_of_gpu_memory(f"validating on {s.runtime.device} ({s.record.val_tile_out}-px tiles)",
                               "lower train.val_tile_out", error=ConfigError):
            row.update(validate(s.model, s.val_data, tile_out=s.record.val_tile_out, runtime=s.runtime,
                                weighted=s.config.weighted, offsets=s.offsets,
                                tile_z=s.record.tile_z[1] if s.record.tile_z else None))
        log.info("iteration %d: val loss %.4f, pixel error %.4f, IoU %.4f",
                 it, row["val_loss"], row["val_pixel_error"], row["val_iou"])
        _keep_if_best(s, row)
    history.rows.append(row)
    write_metrics_csv(s.out_dir / METRICS_FILE, history.rows)


def _keep_if_best(s: Session, row: dict[str, Any]) -> None:
    """With ``export_weights: best``, snapshot the weights if the validation pixel error is the lowest yet."""
    if s.config.export_weights is not ExportWeights.BEST:
        return
    best = s.progress.best
    if best is not None:
        rows = s.progress.history.rows
        best_error = next(r["val_pixel_error"] for r in rows if r["iteration"] == best["iteration"])
        if not row["val_pixel_error"] < best_error:
            return
    s.progress.best = {"iteration": row["iteration"], "model": cpu_weights(s.model)}
