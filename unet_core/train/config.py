"""Training settings: :class:`TrainConfig`, its closed sets of choices, the learning-rate schedule.

Free of torch, so the settings can be checked (and listed by command-line parsers) cheaply.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

from unet_core.common.errors import ConfigError, check_known_keys
from unet_core.common.intensity import DEFAULT_NORMALISATION, Normalisation
from unet_core.common.precision import Precision


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


class ExportWeights(str, Enum):
    """Which weights ``model.pt`` (and ``model.ts``) hold at the end of a run.

    ``last``: those after the final iteration. ``best``: those of the validation point with the
    lowest validation pixel error (the earliest on ties); needs validation data. Checkpoint
    selection on held-out slices, which must then not be the slices the model is scored on.
    """

    LAST = "last"
    BEST = "best"


#: Output tile of the training samples, px (``train.tile_out``: ``unet augment --tile-out``, and
#: ``unet train --tile-out`` with ``--train-stacks``); 508 px input tiles for a depth-4 valid U-Net.
TILE_OUT = 324

#: Choice-valued settings and the enum each is parsed into.
CHOICES: dict[str, type[Enum]] = {
    "optimizer": OptimizerKind,
    "schedule": Schedule,
    "precision": Precision,
    "export_weights": ExportWeights,
    "normalisation": Normalisation,
}
POSITIVE_INTS = (
    "iterations", "batch_size", "checkpoint_every", "validate_every", "log_every", "lr_step_iterations", "tile_out",
)
NONNEGATIVE_INTS = ("warmup_iterations", "workers", "seed")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; every default is written here once (the workflow's schema, ``unet train`` and
    ``unet augment`` agree with it: tests/unit/test_settings_agreement.py).

    The defaults are the recipe that config/isbi2012_cpu.yaml trains with and benchmarks/RESULTS.md
    measured on real data (ISBI 2012, validation pixel error 0.084 on slices 16-19): Adam at 1e-3 with
    a 50-step warm-up and a cosine decay over 6000 steps, one large tile per step (the paper's batch),
    output tiles of 324 px (508 px input, 41 % of it output), validation every 1000 steps and the
    exported weights those of the validation point with the lowest pixel error. Every setting that
    changes the sequence of weights or the exported model is that profile's, so the profile with its
    train keys removed trains the same model. The paper's SGD with momentum 0.99 stays available
    (``optimizer: sgd``) but is no default: at lr 0.01 it diverged on ISBI 2012 with w(x) (NaN by
    iteration 20), and at 0.001 it needs the paper's far longer runs. Settings of the machine only
    (device, precision, workers, checkpoint_every; the workflow's threads and runtime) do not change
    the model on a CPU and are chosen for it: ``auto`` device and precision, no loader worker
    processes (the workflow reserves ``threads`` cores for the rule; extra processes would
    oversubscribe them), a checkpoint every 500 steps.

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
        log_every: update the progress bar / training-loss curve every this many iterations
            (also how often the host waits for the device: there is no per-step synchronisation).
        val_tile_out: output tile size for validation, pixels (None: the training output size).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: autocast precision on CUDA; on the CPU float32, or bf16 where the CPU has it natively.
        channels_last: channels-last memory format on CUDA (and with bf16 on the CPU).
        compile: wrap the model in ``torch.compile``.
        workers: data-loader worker processes.
        export_weights: ``best`` (lowest validation pixel error; the last weights, with a warning,
            where no validation slices are given) or ``last`` weights in model.pt.
        tile_out: network output size of the training tiles, px: of the tiles deformed on the fly
            (``--train-stacks``); stored sets (``unet augment``, whose ``--tile-out`` has the same
            default) carry their own size, which training then uses.
        normalisation: grey-value normalisation of the on-the-fly tiles and the validation slices
            (stored sets must hold tiles normalised the same way); stored in model.pt, which
            ``unet predict`` then uses.
    """

    iterations: int = 6000
    batch_size: int = 1
    optimizer: OptimizerKind = OptimizerKind.ADAM
    lr: float = 0.001
    momentum: float = 0.99
    weight_decay: float = 0.0
    schedule: Schedule = Schedule.COSINE
    warmup_iterations: int = 50
    lr_step_iterations: int = 10000
    lr_gamma: float = 0.1
    weighted: bool = True
    seed: int = 0
    checkpoint_every: int = 500
    validate_every: int = 1000
    log_every: int = 10
    val_tile_out: int | None = None
    device: str = "auto"
    precision: Precision = Precision.AUTO
    channels_last: bool = True
    compile: bool = False
    workers: int = 0
    export_weights: ExportWeights = ExportWeights.BEST
    tile_out: int = TILE_OUT
    normalisation: Normalisation = DEFAULT_NORMALISATION

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
        for name, kind in CHOICES.items():
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                raise ConfigError(
                    f"train.{name}: {getattr(self, name)!r} is not one of {[k.value for k in kind]}"
                ) from None
        integer_rules = ((POSITIVE_INTS, 1, "a positive integer"), (NONNEGATIVE_INTS, 0, "an integer >= 0"))
        for names, low, what in integer_rules:
            for name in names:
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool) or value < low:
                    raise ConfigError(f"train.{name} must be {what}, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"train.lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"train.momentum must be in [0, 1), got {self.momentum!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 < self.lr_gamma <= 1:
            raise ConfigError(f"train.lr_gamma must be in (0, 1], got {self.lr_gamma!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (enums as their values), as stored in state.pt, model.pt and the model card."""
        d = asdict(self)
        for name in CHOICES:
            d[name] = getattr(self, name).value
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Settings from a ``train`` section (unknown keys are refused, naming them)."""
        check_known_keys(data, (f.name for f in fields(cls)), section="train")
        return cls(**data)

    def lr_at(self, iteration: int) -> float:
        """Learning rate of step number ``iteration`` (1-based: the step that completes it)."""
        return self.lr * lr_factor(iteration - 1, config=self)


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
