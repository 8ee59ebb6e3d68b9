"""Training loop of the U-Net: paper defaults, CUDA fast paths, exact resume.

Outputs in ``out_dir`` (each written atomically, so a killed run never leaves a half file)::

    state.pt          resumable state: model, optimizer, scheduler, grad scaler, every RNG
                      state, iteration, config, training-data hash, metric history
    model.pt          final weights (unet_core.model.checkpoint.save_model; weights_only loading)
    model.ts          TorchScript export (CPU, float32, eval mode)
    metrics.csv       one row per validation step
    curve.png         loss / pixel error / IoU against iteration
    model_card.json   config, geometry, data hash, metrics, versions

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

import csv
import hashlib
import io
import json
import logging
import math
import os
import platform
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet_core import __version__
from unet_core.common.atomic import atomic_output
from unet_core.common.device import resolve_device
from unet_core.common.errors import CheckpointError, ConfigError, UserInputError, check_known_keys
from unet_core.common.outputs import CsvMark, FolderMark, JsonMark, PngMark, claim_outputs
from unet_core.common.precision import Precision, resolve_precision
from unet_core.common.progress import progress_bar
from unet_core.common.provenance import sha256_files
from unet_core.infer.predict import plane_logits
from unet_core.model.checkpoint import (
    MODEL_MARK,
    STATE_FORMAT,
    STATE_MARK,
    TORCHSCRIPT_MARK,
    safe_load,
    save_model,
    write_torch_file,
)
from unet_core.model.decision import correct, logit_offsets
from unet_core.model.loss import weighted_cross_entropy
from unet_core.model.spec import UNetSpec
from unet_core.model.unet import UNet
from unet_core.train.data import (
    AugmentedTiles,
    IterationSampler,
    OnTheFlyTiles,
    ValidationSlice,
    load_validation,
)
from unet_core.train.plot import plot_training_curve

log = logging.getLogger(__name__)

STATE_FILE, MODEL_FILE, SCRIPT_FILE = "state.pt", "model.pt", "model.ts"
METRICS_FILE, CURVE_FILE, CARD_FILE = "metrics.csv", "curve.png", "model_card.json"
METRIC_COLUMNS = (
    "iteration",
    "lr",
    "train_loss",
    "val_loss",
    "val_pixel_error",
    "val_iou",
    "train_seconds",
    "tiles_per_s",
)
CARD_FORMAT = "unet-pipeline/model-card/1"
#: How ``unet train`` recognises its own output folder: it holds only these files, each with
#: its mark (:mod:`unet_core.common.outputs`); anything else there is refused, never replaced.
OUT_DIR_MARK = FolderMark(
    {
        STATE_FILE: STATE_MARK,
        MODEL_FILE: MODEL_MARK,
        SCRIPT_FILE: TORCHSCRIPT_MARK,
        METRICS_FILE: CsvMark(",".join(METRIC_COLUMNS), "a metrics table written by 'unet train'"),
        CURVE_FILE: PngMark("train"),
        CARD_FILE: JsonMark(CARD_FORMAT, "a model card written by 'unet train'"),
    },
    "an output folder of 'unet train' (state.pt, model.pt, model.ts, metrics.csv, curve.png, model_card.json)",
)
# wall-clock columns: kept out of model.pt so a resumed or repeated run writes the same bytes
TIMING_COLUMNS = ("train_seconds", "tiles_per_s")


class OptimizerKind(str, Enum):
    """``sgd`` with momentum (the paper) or ``adam``."""

    SGD = "sgd"
    ADAM = "adam"


class Schedule(str, Enum):
    """Learning-rate schedule after the linear warm-up."""

    CONSTANT = "constant"
    STEP = "step"  # multiply by lr_gamma every lr_step_iterations
    COSINE = "cosine"  # cosine decay to 0 at the last iteration
    POLY = "poly"  # (1 - t/T)**0.9, as in DeepLab/nnU-Net


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (defaults: the paper's SGD, momentum 0.99, one large tile per step).

    Attributes:
        iterations: optimizer steps in total.
        batch_size: tiles per step (paper: 1).
        optimizer: ``sgd`` (momentum, paper) or ``adam``.
        lr: peak learning rate. SGD with momentum 0.99 on ISBI 2012 with w(x) diverged at
            0.01 (NaN by iteration 20) and trained at 0.001 (loss 2.75 -> 0.71 in 40 steps).
        momentum: SGD momentum (paper: 0.99); Adam's beta1.
        weight_decay: L2 penalty (0 in the paper).
        schedule: learning-rate schedule after warm-up.
        warmup_iterations: linear warm-up from lr/100... lr over this many steps (0 = none).
        lr_step_iterations: period of the ``step`` schedule, iterations.
        lr_gamma: factor of the ``step`` schedule.
        weighted: use w(x) from the weights stage (True) or the plain cross-entropy.
        seed: seeds model initialisation, tile order and dropout.
        checkpoint_every: write state.pt every this many iterations.
        validate_every: validate (and write metrics.csv) every this many iterations.
        log_every: update the progress bar / training-loss curve every this many iterations.
        val_tile_out: output tile size for validation, pixels (None: the training output size).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: autocast precision on CUDA (the CPU always trains in float32).
        channels_last: channels-last memory format on CUDA.
        compile: wrap the model in ``torch.compile``.
        workers: data-loader worker processes.
    """

    iterations: int = 20000
    batch_size: int = 1
    optimizer: OptimizerKind = OptimizerKind.SGD
    lr: float = 0.001
    momentum: float = 0.99
    weight_decay: float = 0.0
    schedule: Schedule = Schedule.CONSTANT
    warmup_iterations: int = 0
    lr_step_iterations: int = 10000
    lr_gamma: float = 0.1
    weighted: bool = True
    seed: int = 0
    checkpoint_every: int = 500
    validate_every: int = 500
    log_every: int = 10
    val_tile_out: int | None = None
    device: str = "auto"
    precision: Precision = Precision.AUTO
    channels_last: bool = True
    compile: bool = False
    workers: int = 2

    # keys that change the sequence of weights; a resumed run must use the same values
    TRAJECTORY = (
        "iterations",
        "batch_size",
        "optimizer",
        "lr",
        "momentum",
        "weight_decay",
        "schedule",
        "warmup_iterations",
        "lr_step_iterations",
        "lr_gamma",
        "weighted",
        "seed",
    )

    def __post_init__(self) -> None:
        for name, kind in (("optimizer", OptimizerKind), ("schedule", Schedule), ("precision", Precision)):
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                raise ConfigError(
                    f"train.{name}: {getattr(self, name)!r} is not one of {[k.value for k in kind]}"
                ) from None
        for name in (
            "iterations",
            "batch_size",
            "checkpoint_every",
            "validate_every",
            "log_every",
            "lr_step_iterations",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"train.{name} must be a positive integer, got {value!r}")
        for name in ("warmup_iterations", "workers", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"train.{name} must be an integer >= 0, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"train.lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"train.momentum must be in [0, 1), got {self.momentum!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 < self.lr_gamma <= 1:
            raise ConfigError(f"train.lr_gamma must be in (0, 1], got {self.lr_gamma!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("optimizer", "schedule", "precision"):
            d[name] = getattr(self, name).value
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        check_known_keys(data, (f.name for f in fields(cls)), section="train")
        return cls(**data)


def lr_factor(iteration: int, *, config: TrainConfig) -> float:
    """Multiplier of ``config.lr`` for the step taken after ``iteration`` completed steps."""
    warm = config.warmup_iterations
    if warm and iteration < warm:
        return 0.01 + 0.99 * iteration / warm
    t, total = iteration - warm, max(1, config.iterations - warm)
    if config.schedule is Schedule.STEP:
        return config.lr_gamma ** (t // config.lr_step_iterations)
    if config.schedule is Schedule.COSINE:
        return 0.5 * (1 + math.cos(math.pi * min(t, total) / total))
    if config.schedule is Schedule.POLY:
        return max(0.0, 1 - t / total) ** 0.9
    return 1.0


@dataclass
class Runtime:
    """Where and how the loop runs (resolved from the config and the machine)."""

    device: torch.device
    precision: Precision
    channels_last: bool
    description: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return self.precision.autocast_dtype


def resolve_runtime(config: TrainConfig) -> Runtime:
    """Pick the device and precision; enable TF32/cuDNN autotune on CUDA, determinism on CPU.

    Raises:
        ConfigError: CUDA requested but not available, or an unknown device string.
    """
    try:
        device = resolve_device(config.device, option="train.device")
    except UserInputError as err:
        raise ConfigError(str(err)) from None
    precision = resolve_precision(config.precision, device, option="train.precision")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        desc = f"{device} ({torch.cuda.get_device_name(device)}), {precision.value} autocast, TF32 on"
        return Runtime(device, precision, config.channels_last, desc)
    torch.use_deterministic_algorithms(True)
    return Runtime(device, Precision.FP32, False, f"cpu ({torch.get_num_threads()} threads), float32, deterministic")


# -- RNG and checkpoint state ---------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """All RNG states as plain data/tensors (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@dataclass
class History:
    """Metrics so far: validation rows (metrics.csv) and the smoothed training loss."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    train_log: list[list[float]] = field(default_factory=list)  # [iteration, mean loss of the window]
    window: list[float] = field(default_factory=lambda: [0.0, 0.0])  # since the last log point: sum, count
    since_val: list[float] = field(default_factory=lambda: [0.0, 0.0])  # since the last validation
    train_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_resume(
    state: dict[str, Any], *, path: Path, spec: UNetSpec, config: TrainConfig, data_hash: str
) -> None:
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a training state file (format {state.get('format')!r})")
    if state.get("spec") != spec.to_dict():
        raise CheckpointError(
            f"{path}: model options differ from the checkpoint's {state.get('spec')}; "
            "use the same model options or start without --resume in a new --out-dir"
        )
    saved = state.get("config", {})
    now = config.to_dict()
    diff = [
        f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}"
        for k in TrainConfig.TRAJECTORY
        if saved.get(k) != now[k]
    ]
    if diff:
        raise CheckpointError(
            f"{path}: cannot resume exactly with changed settings ({'; '.join(diff)}); "
            "restore them or use a new --out-dir"
        )
    if state.get("data_hash") != data_hash:
        raise CheckpointError(
            f"{path}: the training sets changed since the checkpoint (data hash differs); "
            "resume with the same --train sets or use a new --out-dir"
        )


# -- validation -------------------------------------------------------------------------------
def pixel_metrics(
    logits: np.ndarray, classes: np.ndarray, weights: np.ndarray | None, offsets: np.ndarray | None = None
) -> dict[str, float]:
    """Sums for loss, pixel error and per-class IoU of one slice.

    Args:
        logits: (C, Y, X) float32.
        classes: (Y, X) integer targets.
        weights: (Y, X) float32 w(x), or None (unweighted loss).
        offsets: (C,) logit offsets of the decision rule (:mod:`unet_core.model.decision`); the
            loss is always that of the raw logits (the training objective).

    Returns:
        ``loss_sum``, ``errors``, ``pixels`` and per foreground class c ``inter_c``/``union_c``.
    """
    logits_t = torch.from_numpy(logits)[None]
    target = torch.from_numpy(classes.astype(np.int64))[None]
    w = None if weights is None else torch.from_numpy(weights)[None]
    loss = float(weighted_cross_entropy(logits_t, target, w)) * classes.size
    pred = correct(logits, offsets).argmax(axis=0)
    out = {
        "loss_sum": loss,
        "errors": float(np.count_nonzero(pred != classes)),
        "pixels": float(classes.size),
    }
    for c in range(1, logits.shape[0]):
        p, g = pred == c, classes == c
        out[f"inter_{c}"] = float(np.count_nonzero(p & g))
        out[f"union_{c}"] = float(np.count_nonzero(p | g))
    return out


def validate(
    model: UNet,
    slices: Sequence[ValidationSlice],
    *,
    tile_out: int,
    runtime: Runtime,
    weighted: bool,
    offsets: np.ndarray | None = None,
) -> dict[str, float]:
    """Loss, pixel error and mean foreground IoU over all validation pixels.

    The decision is the argmax of the logits plus ``offsets`` (the weight-prior correction
    that ``unet predict`` applies; None: plain argmax).
    """
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    try:
        for item in slices:
            logits = plane_logits(model, item.image, tile_out=tile_out, device=runtime.device,
                                  precision=runtime.precision, channels_last=runtime.channels_last)
            metrics = pixel_metrics(logits, item.classes, item.weights if weighted else None, offsets)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v
    finally:
        model.train(was_training)
    ious = [
        totals[f"inter_{c}"] / totals[f"union_{c}"]
        for c in range(1, model.spec.n_classes)
        if totals[f"union_{c}"] > 0
    ]
    return {
        "val_loss": totals["loss_sum"] / totals["pixels"],
        "val_pixel_error": totals["errors"] / totals["pixels"],
        "val_iou": float(np.mean(ious)) if ious else float("nan"),
    }


# -- outputs ----------------------------------------------------------------------------------
def decision_metadata(mean_weights: np.ndarray, offsets: np.ndarray) -> dict[str, Any]:
    """How ``unet predict`` turns this model's logits into classes (stored in the model file)."""
    return {
        "rule": "argmax of logits + logit_offsets (weight-prior correction, unet_core/model/decision.py)",
        "mean_weight_per_class": [float(v) for v in mean_weights],
        "logit_offsets": [float(v) for v in offsets],
    }


def write_metrics_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_COLUMNS})
    with atomic_output(path, own=OUT_DIR_MARK.files[METRICS_FILE]) as tmp:
        tmp.write_text(buffer.getvalue())


def export_torchscript(model: UNet, path: Path) -> None:
    """Script a CPU float32 eval-mode copy of ``model`` with its spec as an extra file."""
    clone = UNet(model.spec)
    clone.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    clone.eval()
    with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; the issue asks for it
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(clone)
        write_torch_file(path, scripted, own=TORCHSCRIPT_MARK, torchscript=True, extra_files={"unet_spec.json": model.spec.fingerprint()})


def versions() -> dict[str, str]:
    return {
        "unet_pipeline": __version__,
        "torch": str(torch.__version__),
        "numpy": str(np.__version__),
        "python": platform.python_version(),
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "platform": platform.platform(),
    }


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced."""

    out_dir: Path
    iterations: int
    metrics: dict[str, Any]
    device: str


def _save_state(
    path: Path,
    *,
    model: UNet,
    optimizer,
    scheduler,
    scaler,
    iteration: int,
    config: TrainConfig,
    data_hash: str,
    history: History,
) -> None:
    state = {
        "format": STATE_FORMAT,
        "spec": model.spec.to_dict(),
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "iteration": iteration,
        "config": config.to_dict(),
        "data_hash": data_hash,
        "history": history.to_dict(),
        "versions": versions(),
    }
    write_torch_file(path, state, own=STATE_MARK)


def _make_optimizer(model: UNet, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer is OptimizerKind.ADAM:
        return torch.optim.Adam(
            model.parameters(), lr=config.lr, betas=(config.momentum, 0.999), weight_decay=config.weight_decay
        )
    return torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


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
    tile_out: int | None = None,
) -> TrainResult:
    """Train a U-Net on augmented tiles; validate, checkpoint and export as configured.

    Args:
        train_sets: augmented Zarr sets from ``unet augment`` (image/classes/weights, (N, H, W));
            empty when ``train_stacks`` is used.
        out_dir: directory for state.pt, model.pt, model.ts, metrics.csv, curve.png, model_card.json.
        spec: the architecture; ``H`` of the sets must be a valid input size for it.
        config: training settings.
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
        tile_out: network output size of the on-the-fly tiles, pixels.

    Returns:
        A :class:`TrainResult` with the last validation metrics.

    Raises:
        UserInputError: empty or invalid training sets, invalid tile size, too many classes, or
            an ``out_dir`` that is an input, holds one, or holds files other than training's own.
        CheckpointError: ``resume`` with a state that does not match the data or settings.
        ConfigError: a setting that cannot be used (device, non-finite loss).
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
            tile_out=tile_out,
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
    tile_out: int | None,
) -> TrainResult:
    if train_stacks and train_sets:
        raise ConfigError(
            "train: give augmented sets (--train) or stacks to deform on the fly (--train-stacks), not both"
        )
    if train_stacks:
        if tile_out is None:
            raise ConfigError(
                "train.tile_out: on-the-fly augmentation needs the output tile size (--tile-out)"
            )
        dataset = OnTheFlyTiles(
            train_stacks, slices=train_slices, spec=spec, tile_out=tile_out, seed=config.seed
        )
        stores = [p for pair in train_stacks for p in pair]
        data_hash = hashlib.sha256(
            (sha256_files(stores) + json.dumps(dataset.describe())).encode()
        ).hexdigest()
        data_desc: dict[str, Any] = {"on_the_fly": dataset.describe()}
    else:
        dataset = AugmentedTiles(train_sets, spec=spec)
        data_hash = sha256_files(train_sets)
        data_desc = {"train_sets": [str(p) for p in train_sets]}
    val_tile_out = config.val_tile_out or dataset.out_size
    try:
        spec.input_size(val_tile_out)
    except ValueError as err:
        raise ConfigError(f"train.val_tile_out: {err}") from None
    val_data = load_validation(validation, slices=val_slices, n_classes=spec.n_classes) if validation else []
    mean_weights = dataset.mean_weights() if config.weighted else np.ones(spec.n_classes)
    offsets = logit_offsets(mean_weights)
    log.info("mean loss weight per class %s -> decision logit offsets %s",
             np.round(mean_weights, 4).tolist(), np.round(offsets, 4).tolist())
    runtime = resolve_runtime(config)
    log.info(
        "training on %s: %d tiles of %d px -> %d px output, %d iterations of batch %d",
        runtime.description,
        len(dataset),
        dataset.in_size,
        dataset.out_size,
        config.iterations,
        config.batch_size,
    )

    seed_everything(config.seed)
    model = UNet(spec).to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, config=config))
    scaler = torch.amp.GradScaler("cuda") if runtime.autocast_dtype is torch.float16 else None
    history, start = History(), 0
    state_path = out_dir / STATE_FILE
    state = safe_load(state_path) if resume and state_path.is_file() else None
    if state is not None and restart_if_changed:
        try:
            _check_resume(state, path=state_path, spec=spec, config=config, data_hash=data_hash)
        except CheckpointError as err:
            log.warning("%s: not resuming, starting afresh (%s)", state_path, str(err).split(": ", 1)[-1])
            state = None
    if state is not None:
        _check_resume(state, path=state_path, spec=spec, config=config, data_hash=data_hash)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        history = History(**state["history"])
        start = int(state["iteration"])
        log.info("resumed from %s at iteration %d", state_path, start)
    elif resume and not state_path.is_file():
        log.info("no %s yet: starting from scratch", state_path)
    out_dir.mkdir(parents=True, exist_ok=True)

    forward = torch.compile(model) if config.compile else model
    loader = torch.utils.data.DataLoader(
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
        num_workers=config.workers,
        pin_memory=runtime.device.type == "cuda",
        generator=torch.Generator().manual_seed(config.seed),  # keeps the global RNG untouched
        persistent_workers=False,
        prefetch_factor=4 if config.workers else None,
    )
    model.train()
    bar = progress_bar(loader, desc="train", total=config.iterations, unit="it")
    bar.update(start)
    iteration = start
    window = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    window += torch.tensor(history.window, dtype=torch.float64, device=runtime.device)
    since_val = torch.tensor(history.since_val, dtype=torch.float64, device=runtime.device)
    clock = time.perf_counter()
    metrics: dict[str, Any] = history.rows[-1] if history.rows else {}

    def sync_history() -> None:
        history.window = [float(v) for v in window.tolist()]
        history.since_val = [float(v) for v in since_val.tolist()]

    for image, classes, weights in bar:
        image = image.to(runtime.device, non_blocking=True)
        if runtime.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        classes = classes.to(runtime.device, non_blocking=True)
        weights = weights.to(runtime.device, non_blocking=True) if config.weighted else None
        with torch.autocast(
            runtime.device.type,
            dtype=runtime.autocast_dtype or torch.float32,
            enabled=runtime.autocast_dtype is not None,
        ):
            logits = forward(image)
        loss = weighted_cross_entropy(logits, classes, weights)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        iteration += 1
        # fp16 + GradScaler skips steps with overflowing logits; count only finite losses then
        value = loss.detach().double()
        finite = (
            torch.isfinite(value)
            if scaler is not None
            else torch.ones((), dtype=torch.bool, device=value.device)
        )
        step = torch.stack([torch.where(finite, value, 0.0), finite.double()])
        window += step
        since_val += step

        if iteration % config.log_every == 0 or iteration == config.iterations:
            total, count = window.tolist()
            mean = total / count if count else float("nan")
            if not math.isfinite(mean):
                raise ConfigError(
                    f"train: the loss became {mean} by iteration {iteration}; lower train.lr "
                    f"(--lr, now {config.lr}) or add a warm-up (--warmup-iterations)"
                )
            history.train_log.append([iteration, mean])
            window.zero_()
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
        now = time.perf_counter()
        history.train_seconds += now - clock
        clock = now
        if iteration % config.validate_every == 0 or iteration == config.iterations:
            total, count = since_val.tolist()
            since_val.zero_()
            prev = history.rows[-1] if history.rows else {"iteration": 0, "train_seconds": 0.0}
            seconds = history.train_seconds - float(prev["train_seconds"])
            row: dict[str, Any] = {
                "iteration": iteration,
                "lr": scheduler.get_last_lr()[0],
                "train_loss": total / max(count, 1.0),
                "train_seconds": round(history.train_seconds, 3),
                "tiles_per_s": (iteration - int(prev["iteration"])) * config.batch_size / seconds
                if seconds > 0
                else None,
            }
            if val_data:
                row.update(
                    validate(
                        model, val_data, tile_out=val_tile_out, runtime=runtime, weighted=config.weighted,
                        offsets=offsets,
                    )
                )
                log.info(
                    "iteration %d: val loss %.4f, pixel error %.4f, IoU %.4f",
                    iteration,
                    row["val_loss"],
                    row["val_pixel_error"],
                    row["val_iou"],
                )
            history.rows.append(row)
            metrics = row
            write_metrics_csv(out_dir / METRICS_FILE, history.rows)
            clock = time.perf_counter()  # validation time is not training time
        if iteration % config.checkpoint_every == 0 or iteration == config.iterations:
            sync_history()
            _save_state(
                state_path,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                iteration=iteration,
                config=config,
                data_hash=data_hash,
                history=history,
            )
            clock = time.perf_counter()
        if on_iteration is not None:
            on_iteration(iteration)
    bar.close()

    _write_final_outputs(
        out_dir,
        model=model,
        spec=spec,
        config=config,
        dataset=dataset,
        data_hash=data_hash,
        history=history,
        runtime=runtime,
        data_desc=data_desc,
        validation=validation,
        val_slices=val_slices,
        val_tile_out=val_tile_out,
        iteration=iteration,
        decision=decision_metadata(mean_weights, offsets),
    )
    return TrainResult(out_dir, iteration, dict(metrics), runtime.description)


def _write_final_outputs(
    out_dir: Path,
    *,
    model: UNet,
    spec: UNetSpec,
    config: TrainConfig,
    dataset: AugmentedTiles | OnTheFlyTiles,
    data_hash: str,
    history: History,
    runtime: Runtime,
    data_desc: dict[str, Any],
    validation: Sequence[tuple[Path, Path]],
    val_slices: Sequence[int] | None,
    val_tile_out: int,
    iteration: int,
    decision: dict[str, Any],
) -> None:
    final = history.rows[-1] if history.rows else {}
    metadata = {
        "intensity_normalisation": "stack z-score",
        "train_config": config.to_dict(),
        "iterations": iteration,
        "tile_in": dataset.in_size,
        "tile_out": dataset.out_size,
        "training_data_sha256": data_hash,
        "final_metrics": {k: v for k, v in final.items() if k not in TIMING_COLUMNS},
        "decision": decision,
    }
    model_path = out_dir / MODEL_FILE
    save_model(model_path, model, metadata=metadata)
    export_torchscript(model, out_dir / SCRIPT_FILE)
    write_metrics_csv(out_dir / METRICS_FILE, history.rows)
    plot_training_curve(history.train_log, history.rows, out_dir / CURVE_FILE)
    best = min(
        (r for r in history.rows if r.get("val_pixel_error") is not None),
        key=lambda r: r["val_pixel_error"],
        default=None,
    )
    card = {
        "format": CARD_FORMAT,
        "model": spec.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "geometry": {
            "context_px": spec.context,
            "stride_px": spec.stride,
            "min_input_px": spec.min_input_size,
            "train_tile_in_px": dataset.in_size,
            "train_tile_out_px": dataset.out_size,
            "val_tile_out_px": val_tile_out,
            "valid_inputs": f"{spec.min_input_size} + {spec.stride}*k",
        },
        "intensity_normalisation": "stack z-score",
        "training": {
            "config": config.to_dict(),
            "iterations_done": iteration,
            "device": runtime.description,
            "train_seconds": round(history.train_seconds, 3),
            "determinism": (
                "bit-exact resume (deterministic CPU algorithms)"
                if runtime.device.type == "cpu"
                else "data order and RNG exact; CUDA kernels reproducible up to rounding"
            ),
        },
        "data": {
            **data_desc,
            "train_tiles": len(dataset),
            "train_sha256": data_hash,
            "validation": [f"{s}:{w}" for s, w in validation],
            "val_slices": list(val_slices) if val_slices is not None else "all",
        },
        "metrics": {"final": final, "best_pixel_error": best, "decision_rule": decision["rule"]},
        "decision": decision,
        "files": {MODEL_FILE: sha256_files([model_path]), SCRIPT_FILE: sha256_files([out_dir / SCRIPT_FILE])},
        "versions": versions(),
    }
    with atomic_output(out_dir / CARD_FILE, own=OUT_DIR_MARK.files[CARD_FILE]) as tmp:
        tmp.write_text(json.dumps(card, indent=2, default=str) + "\n")
    log.info(
        "wrote %s, %s, %s, %s, %s in %s",
        MODEL_FILE,
        SCRIPT_FILE,
        METRICS_FILE,
        CURVE_FILE,
        CARD_FILE,
        out_dir,
    )
