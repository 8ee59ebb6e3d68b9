"""Resumable training state (state.pt): RNG states, metric history, save, resume checks, guards.

state.pt holds the model, optimizer, scheduler and grad-scaler states, every RNG state, the
iteration, the settings, the training-data hash, the metric history and, with
``train.export_weights: best``, the weights of the best validation point. It is written only
with finite weights (:func:`check_finite_weights`), atomically, so the last one written is
always a good one to resume from, whatever happens after it. On a GPU it is written from a host
snapshot on a background thread (:class:`BackgroundStateWriter`), beside the next steps.
"""

from __future__ import annotations

import copy
import logging
import random
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet_core.common.errors import CheckpointError, ConfigError
from unet_core.model.checkpoint import STATE_FORMAT, STATE_MARK, safe_load, write_torch_file
from unet_core.model.spec import UNetSpec
from unet_core.model.unet import UNet
from unet_core.train.config import ExportWeights, TrainConfig
from unet_core.train.runtime import versions

log = logging.getLogger(__name__)

#: The file of the resumable state in a training's output folder.
STATE_FILE = "state.pt"


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
    """Seed Python's, NumPy's and torch's global RNGs (every CUDA device too)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


@dataclass
class Progress:
    """Everything a resumed run continues from besides the network and optimizer states.

    Attributes:
        iteration: optimizer steps completed.
        history: the metrics so far.
        best: ``{"iteration": int, "model": CPU state dict}`` of the validation point with the
            lowest pixel error so far (tracked with ``export_weights: best``), or None.
    """

    iteration: int = 0
    history: History = field(default_factory=History)
    best: dict[str, Any] | None = None


def cpu_weights(model: UNet) -> dict[str, torch.Tensor]:
    """A CPU copy of ``model``'s state dict (a snapshot that later steps do not change)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def check_finite_weights(model: UNet, *, iteration: int, config: TrainConfig, kept: str) -> None:
    """Stop, naming the iteration and learning rate, if any weight is NaN or infinite.

    One device reduction and one host synchronisation: called only where a file is written.

    Raises:
        ConfigError: a non-finite weight (the run diverged); nothing is written after this.
    """
    floats = [v for v in model.state_dict().values() if v.is_floating_point()]
    finite = torch.stack([torch.isfinite(v).all() for v in floats]).all()
    if not bool(finite):
        raise divergence("the weights became non-finite", iteration=iteration, config=config, kept=kept)


def divergence(what: str, *, iteration: int, config: TrainConfig, kept: str) -> ConfigError:
    """The one-line error of a diverged run: what, at which iteration, at which learning rate."""
    return ConfigError(
        f"train: {what} at iteration {iteration} (learning rate {config.lr_at(iteration):.3g}); lower "
        f"train.lr (--lr, now {config.lr}) or add a warm-up (--warmup-iterations); {kept}"
    )


def _host_copy(obj: Any) -> Any:
    """A copy of ``obj`` that later steps cannot change: tensors copied to host memory, lists, tuples and
    dicts rebuilt, anything else deep-copied (an optimizer's state tensors are updated in place)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: _host_copy(value) for key, value in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_host_copy(value) for value in obj)
    return copy.deepcopy(obj)


def state_snapshot(
    *,
    model: UNet,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    config: TrainConfig,
    data_hash: str,
    progress: Progress,
    host_copy: bool = False,
) -> dict[str, Any]:
    """The resumable state as state.pt holds it.

    Args:
        host_copy: copy every tensor to host memory and every container, so that the next steps
            cannot change the snapshot while a background thread writes it. Without it the
            optimizer's and scheduler's entries are their live state (written at once, as before).
    """
    keep = _host_copy if host_copy else (lambda value: value)
    return {
        "format": STATE_FORMAT,
        "spec": model.spec.to_dict(),
        "model": cpu_weights(model),
        "optimizer": keep(optimizer.state_dict()),
        "scheduler": keep(scheduler.state_dict()),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "iteration": progress.iteration,
        "config": config.to_dict(),
        "data_hash": data_hash,
        "history": progress.history.to_dict(),
        "best": dict(progress.best) if progress.best is not None else None,  # its tensors are never changed
        "versions": versions(),
    }


def save_state(path: Path, **snapshot: Any) -> None:
    """Write the resumable state atomically (check the weights with :func:`check_finite_weights` first).

    Args:
        path: the state.pt to write.
        snapshot: the keyword arguments of :func:`state_snapshot`.
    """
    write_torch_file(path, state_snapshot(**snapshot), own=STATE_MARK)


class BackgroundStateWriter:
    """Writes state.pt snapshots on one background thread, one write at a time.

    Why: on a GPU the paper net's state is 0.37-0.5 GB; serialising and writing it stalled the step
    loop every ``checkpoint_every`` iterations. The caller takes the snapshot between two steps
    (:func:`state_snapshot` with ``host_copy``), so it is the state of that iteration whatever the
    next steps do; the write itself is :func:`unet_core.model.checkpoint.write_torch_file`, atomic
    as the synchronous one, so a run killed during it keeps the previous state.pt. A write's error
    is raised in the caller's thread at the next :meth:`submit` or :meth:`wait`.

    Attributes:
        path: the state.pt written.
        saved: iteration of the last snapshot this writer put in place (None: none yet).
        submitted: iteration of the last snapshot handed to it (in flight or in place; None: none).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.saved: int | None = None
        self.submitted: int | None = None
        self._pool: ThreadPoolExecutor | None = None  # started at the first write
        self._pending: tuple[int, Future] | None = None

    def submit(self, snapshot: dict[str, Any], iteration: int) -> None:
        """Start writing ``snapshot`` (the state after ``iteration``) once the previous write is done."""
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state.pt")
        self._pending = (iteration, self._pool.submit(write_torch_file, self.path, snapshot, own=STATE_MARK))
        self.submitted = iteration

    def wait(self) -> int | None:
        """Block until the pending write is in place (raising its error); returns :attr:`saved`."""
        if self._pending is not None:
            iteration, future = self._pending
            self._pending = None
            future.result()
            self.saved = iteration
        return self.saved

    def close(self) -> None:
        """Finish the pending write and stop the thread; a write's error is logged, not raised
        (called while another error propagates, or after :meth:`wait` has raised it)."""
        try:
            self.wait()
        except Exception as err:  # noqa: BLE001 (the error being raised matters more)
            log.error("%s: the last state.pt write failed: %s", self.path, err)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


def check_resume(
    state: dict[str, Any], *, path: Path, spec: UNetSpec, config: TrainConfig, data_hash: str
) -> None:
    """Refuse a state that the run cannot continue exactly (format, model, settings, data, best weights).

    Raises:
        CheckpointError: naming what differs and what to do.
    """
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
    validated = any(r.get("val_pixel_error") is not None for r in state.get("history", {}).get("rows", []))
    if config.export_weights is ExportWeights.BEST and validated and state.get("best") is None:
        raise CheckpointError(
            f"{path}: train.export_weights is now 'best' but the checkpoint was written with 'last' and "
            "did not keep the best validation weights; use export_weights 'last' or a new --out-dir"
        )


def load_resumable(
    out_dir: Path,
    *,
    resume: bool,
    restart_if_changed: bool,
    spec: UNetSpec,
    config: TrainConfig,
    data_hash: str,
) -> dict[str, Any] | None:
    """The checked state to resume from, or None to start afresh.

    Raises:
        CheckpointError: a state that does not fit (unless ``restart_if_changed``: then None).
    """
    path = out_dir / STATE_FILE
    if not resume:
        return None
    if not path.is_file():
        log.info("no %s yet: starting from scratch", path)
        return None
    state = safe_load(path)
    try:
        check_resume(state, path=path, spec=spec, config=config, data_hash=data_hash)
    except CheckpointError as err:
        if not restart_if_changed:
            raise
        log.warning("%s: not resuming, starting afresh (%s)", path, str(err).split(": ", 1)[-1])
        return None
    return state


def apply_state(
    state: dict[str, Any],
    *,
    model: UNet,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    config: TrainConfig,
) -> Progress:
    """Load a checked state into the model, optimizer, scheduler, scaler and the RNGs."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    best = state.get("best") if config.export_weights is ExportWeights.BEST else None
    return Progress(int(state["iteration"]), History(**state["history"]), best)
