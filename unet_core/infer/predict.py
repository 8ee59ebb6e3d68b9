"""Overlap-tile inference, one job of a scatter: predict some blocks of a stack into a part store.

A 2-D model predicts (1, B, B) blocks, slice by slice; a 3-D model (model.dims 3) predicts (Bz, B, B)
blocks of several slices with their z halo (:func:`z_blocking` decides Bz).

:func:`predict_job` reads only its blocks plus halo from the stack's Zarr array and writes
them to its own *part store* (:mod:`unet_core.infer.part_store`), so jobs never write the same
file; :func:`predict_plane` predicts an array in memory (notebooks, benchmarks, tests). Both
run :class:`unet_core.infer.engine.Engine`, which does all per-pixel work on the device.

Peak memory per job is a few blocks' read boxes and results plus ``batch`` network tiles
(the blocks being computed: those whose tiles wait for a full pass, at most a few per tile
shape; the next ones being read, the previous ones being written), independent of the stack size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet_core import __version__
from unet_core.common.device import resolve_device
from unet_core.common.errors import UserInputError, parse_choice
from unet_core.common.intensity import IntensityStats, Normalisation, Scaling
from unet_core.common.outputs import claim_outputs
from unet_core.common.precision import Precision, resolve_precision
from unet_core.common.provenance import code_hash
from unet_core.infer.encoding import ProbabilityEncoding
from unet_core.infer.engine import BlockResult, Engine, run_blocks
from unet_core.infer.part_store import PART_FORMAT, PART_MARK, PartStore
from unet_core.infer.predict_settings import OPTIONS, Backend, PredictSettings
from unet_core.infer.tiling import (
    BLOCK_PX,
    TILE_OUT,
    TTA,
    Tiling,
    check_multiple_of_stride,
    default_block_z,
    round_up,
)
from unet_core.io.ngff import Stack, open_stack
from unet_core.model.checkpoint import ModelExpectation, load_model
from unet_core.model.decision import Decision
from unet_core.model.package import PackageNetwork, is_package, load_predict_model
from unet_core.model.spec import UNetSpec, check_voxel_size

log = logging.getLogger(__name__)

#: Threads writing (compressing) results, per device type: a GPU outpaces one compressor.
WRITERS = {"cpu": 1, "cuda": 4}


def predict_plane(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    stats: IntensityStats | Scaling | Callable[[int], Scaling],
    block_px: int = BLOCK_PX,
    tile_out: int = TILE_OUT,
    device: str | torch.device = "cpu",
    precision: Precision | str = Precision.FP32,
    batch: int = 1,
    tta: TTA | str = TTA.NONE,
    offsets: np.ndarray | None = None,
    compile: bool = False,
    block_z: int | None = None,
    tile_z: int | None = None,
) -> np.ndarray:
    """Tiled prediction of a whole (Y, X) or (Z, Y, X) array in memory (for notebooks, benchmarks).

    Args:
        model: a U-Net with a ``spec``.
        image: raw grey values, any numeric dtype.
        stats: how to normalise: the statistics to z-score with (those of the stack it comes
            from), a :class:`Scaling`, or a function ``z -> Scaling`` (per-slice modes).
        offsets: (C,) decision logit offsets (:mod:`unet_core.model.decision`), or None.
        compile: run the network through ``torch.compile`` (see :class:`Engine`).
        block_z, tile_z: a 3-D model's block and tile extents along z, slices (multiples of its z
            stride); None: the whole depth (rounded up to the z stride) in one block, tiles of the
            block's depth. A 2-D model takes None only (one slice at a time).

    Returns:
        (n_classes, Z, Y, X) float32 probabilities (Z = 1 for a 2-D input).
    """
    vol = image[None] if image.ndim == 2 else image
    if model.spec.dims == 3 and block_z is None:
        block_z = round_up(vol.shape[0], model.spec.z_axis.stride)
    tiling = Tiling(vol.shape, model.spec, block_px, tile_out, 1 if block_z is None else block_z, tile_z)
    dev = resolve_device(device)
    engine = Engine(model, tiling, stats=stats, device=dev, precision=resolve_precision(precision, dev),
                    batch=batch, tta=tta, offsets=offsets, encoding=ProbabilityEncoding.FLOAT32, compile=compile)
    out = np.zeros((model.spec.n_classes, *vol.shape), np.float32)

    def write(result: BlockResult) -> None:
        out[(slice(None), *result.block.write.to_slices())] = result.probabilities

    run_blocks(engine, vol, list(tiling.blocks()), write, desc="predict")
    return out


def network_logits(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    tile_out: int,
    tile_z: int = 1,
    device: torch.device,
    precision: Precision = Precision.FP32,
    channels_last: bool = False,
) -> np.ndarray:
    """Raw float32 logits of one normalised (Y, X) slice, or of a (Z, Y, X) volume for a 3-D network,
    through the engine (training's validation).

    No decision offsets, no softmax, no test-time augmentation, no rounding: what the weighted
    validation loss needs. ``model`` is used as it is (device, mode and memory layout). One block
    holds the whole slice (a volume: all its slices, ``block_z`` = Z rounded up to the z stride).

    Args:
        image: (Y, X) float32, already normalised; (Z, Y, X) for a 3-D network (slice by slice where
            the mode says so).
        tile_out: in-plane output tile edge, px; rounded down to a multiple of 2**depth (tile origins
            must be aligned for the result to equal one pass over the whole slice).
        tile_z: 3-D only: output tile extent along z, slices; rounded down to the z stride.

    Returns:
        (C, Y, X) (3-D: (C, Z, Y, X)) float32 logits.
    """
    spec = model.spec
    tile = max(spec.stride, tile_out // spec.stride * spec.stride)
    block_px = max(tile, round_up(max(image.shape[-2:]), spec.stride))
    if spec.dims == 2:
        stack, tiling = image[None], Tiling((1, *image.shape), spec, block_px=block_px, tile_out=tile)
    else:
        z_stride = spec.z_axis.stride
        tz = max(z_stride, tile_z // z_stride * z_stride)
        stack, tiling = image, Tiling(image.shape, spec, block_px=block_px, tile_out=tile,
                                      block_z=max(round_up(image.shape[0], z_stride), tz), tile_z=tz)
    engine = Engine(model, tiling, stats=IntensityStats(0.0, 1.0), device=device, precision=precision,
                    channels_last=channels_last)
    out = np.empty((spec.n_classes, *image.shape), np.float32)
    for block in tiling.blocks():
        logits = engine.block_output(engine.stage(stack, block), logits=True)
        out[(slice(None), *tiling.region(block).to_slices())] = logits.cpu().numpy()
    return out


@dataclass(frozen=True)
class JobSummary:
    """What one :func:`predict_job` call did."""

    job: int
    jobs: int
    blocks: int
    skipped: int
    output_px: int
    seconds: float
    device: str
    precision: str

    @property
    def mpx_per_s(self) -> float:
        return self.output_px / 1e6 / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class _Run:
    """Everything one job needs, resolved from its arguments (see :func:`predict_job`)."""

    stack: Stack
    engine: Engine
    settings: dict[str, Any]


def _part_settings(stack: Stack, model_hash: str, engine: Engine, job: int, jobs: int,
                   metadata: dict[str, Any], offsets: list[float] | None) -> dict[str, Any]:
    """What a part's blocks depend on; a resumed job reuses blocks only if all of it is equal
    (so a re-ingested stack, another model or changed prediction code starts afresh). The batch
    size is among them: convolution kernels choose their algorithm by batch size, which changes
    the last bits of the probabilities."""
    stack_id = hashlib.sha256(json.dumps(stack.attrs, sort_keys=True, default=str).encode()).hexdigest()
    return {
        "format": PART_FORMAT, "version": __version__, "code": code_hash("predict"),
        "stack": str(stack.path), "stack_attrs_sha256": stack_id, "shape": list(stack.shape),
        "model_sha256": model_hash, "tiling": engine.tiling.to_dict(), "job": job, "jobs": jobs,
        "tta": engine.tta.value, "precision": engine.precision.value, "device": engine.device.type,
        "intensity": stack.intensity.to_dict(), "intensity_normalisation": model_normalisation(metadata).value,
        "logit_offsets": offsets, "probabilities": engine.encoding.value, "batch": engine.batch,
        "compile": engine.compile,
        "median_object_area_px": metadata.get("median_object_area_px"),
    }


def model_normalisation(metadata: dict[str, Any]) -> Normalisation:
    """The normalisation a model was trained with (its metadata; older files: stack z-score)."""
    return Normalisation.of_metadata(metadata.get("intensity_normalisation"))


def checked_normalisation(metadata: dict[str, Any], asked: Normalisation | str | None, *, model: Path) -> Normalisation:
    """The model's normalisation; ``asked`` (None: whatever the model's) must be the same.

    Raises:
        UserInputError: ``asked`` differs from the model's mode (names both).
    """
    mode = model_normalisation(metadata)
    if asked is None:
        return mode
    asked = parse_choice(Normalisation, asked, option="--normalisation")  # the workflow's config value enters here
    if asked is not mode:
        raise UserInputError(
            f"--normalisation {asked.value} (config normalisation) differs from {mode.value}, "
            f"the normalisation {model} was trained with; a model predicts only with its own: "
            f"set normalisation: {mode.value} or train a model with {asked.value}")
    return mode


def job_device(device: str, job: int) -> torch.device:
    """The device of job ``job``: ``auto`` takes GPU ``job mod (visible GPUs)``, so several jobs on
    one multi-GPU machine spread over its GPUs (a scheduler that gives each job its own GPU
    makes exactly one visible); any other choice is used as given."""
    dev = resolve_device(device)
    if str(device) == "auto" and dev.type == "cuda" and torch.cuda.device_count() > 1:
        return torch.device("cuda", job % torch.cuda.device_count())
    return dev


def _prepare_run(stack_path: Path, model_path: Path, settings: PredictSettings, *, job: int, jobs: int,
                 expect: ModelExpectation) -> _Run:
    """Open the stack and the model, resolve device, precision and geometry (errors before any work)."""
    if not stack_path.exists():
        raise UserInputError(f"{stack_path}: input stack not found (run 'unet ingest' first or fix the path)")
    st = open_stack(stack_path)
    digest = hashlib.sha256()  # of the bytes the model is loaded from, read once (= sha256_files of it)
    if is_package(model_path):  # a bioimage.io package (README "Sharing models")
        model, metadata = load_predict_model(model_path, expect=expect, digest=digest,
                                             cell_channel=settings.cell_channel,
                                             trust_torchscript=settings.trust_torchscript)
    else:
        model, metadata = load_model(model_path, expect=expect, digest=digest)
    block_z, tile_z = z_blocking(st, model.spec, settings, metadata, model=model_path)
    scaler = st.scaler(checked_normalisation(metadata, settings.normalisation, model=model_path))
    corrected = settings.decision is Decision.CORRECTED
    offsets = (metadata.get("decision") or {}).get("logit_offsets") if corrected else None
    tiling = Tiling(st.shape, model.spec, settings.block_px, settings.tile_out, block_z, tile_z)
    tiling.check_jobs(jobs, option="--jobs")  # no job without a block of its own
    tiling.job_blocks(job, jobs)  # validates job
    model, dev, backend = backend_network(model, settings, job_device(settings.device, job))
    engine = Engine(model, tiling, stats=scaler, device=dev, precision=resolve_precision(settings.precision, dev),
                    batch=settings.batch_for(dev.type), tta=settings.tta, offsets=offsets,
                    encoding=settings.probabilities, writers=WRITERS[dev.type], compile=settings.compile)
    settings_of_part = _part_settings(st, digest.hexdigest(), engine, job, jobs, metadata, offsets)
    return _Run(st, engine, settings_of_part | {"backend": backend, "cell_channel": settings.cell_channel})


def z_blocking(st: Stack, spec: UNetSpec, settings: PredictSettings, metadata: dict[str, Any], *,
               model: Path) -> tuple[int, int | None]:
    """``(block_z, tile_z)`` of a job, in slices (:class:`Tiling`'s arguments), checked before any work.

    A 2-D model predicts one slice at a time: ``(1, None)``, and ``--block-z``/``--tile-z`` are refused.
    A 3-D model (model.dims 3) predicts (Z, Y, X) blocks of ``block_z`` slices: the settings' value, or
    by default the stack's z chunk rounded up to a multiple of the network's z stride (the product
    of its ``pool_z``: z tiles start on multiples of it, which keeps the tiled result equal to one pass
    over the whole volume); ``tile_z`` None means ``block_z``. The stack must suit a 3-D model
    (:func:`check_volume_input`).

    Raises:
        UserInputError: ``--block-z``/``--tile-z`` given for a 2-D model or not a multiple of the z
            stride; what :func:`check_volume_input` refuses.
    """
    if spec.dims == 2:
        for name in ("block_z", "tile_z"):
            if (value := getattr(settings, name)) is not None:
                raise UserInputError(f"{OPTIONS[name]} {value}: {model} is a 2-D model (model.dims 2), which predicts "
                                     "one slice at a time; leave out --block-z and --tile-z (for 3-D models only)")
        return 1, None
    check_volume_input(st, settings, metadata, model=model)
    block_z = settings.block_z
    if block_z is None:
        block_z = default_block_z(st.image.chunks[0], spec)
    check_multiple_of_stride(block_z, spec, what=OPTIONS["block_z"], z=True)
    if settings.tile_z is not None:
        check_multiple_of_stride(settings.tile_z, spec, what=OPTIONS["tile_z"], z=True)
    return block_z, settings.tile_z


def check_volume_input(st: Stack, settings: PredictSettings, metadata: dict[str, Any], *, model: Path) -> None:
    """Refuse what a 3-D model cannot predict, in one line naming the file or option.

    Raises:
        UserInputError: ``--backend onnxruntime`` (2-D networks only); a single-slice stack; a stack
            whose voxel size ingest was not given (:attr:`Stack.voxel_size_given`: the 1 µm that stood in
            would be taken for the z spacing); a voxel size beyond
            :data:`unet_core.model.spec.VOXEL_SIZE_TOLERANCE` of the one the model was trained at
            (its metadata's ``voxel_size_um``; a model without it is not checked).
    """
    if settings.backend is Backend.ONNXRUNTIME:
        raise UserInputError(f"{model}: a 3-D model (model.dims 3); --backend onnxruntime runs 2-D models only: "
                             "use --backend torch")
    spacing = st.volume_voxel_size(needs=f"{model}, a 3-D model (model.dims 3),")
    trained = metadata.get("voxel_size_um")
    check_voxel_size(tuple(float(v) for v in trained) if trained else None, spacing,
                     where=f"{st.path} (model {model})")


def backend_network(model: torch.nn.Module, settings: PredictSettings,
                    device: torch.device) -> tuple[torch.nn.Module, torch.device, str]:
    """The network that runs, the device it runs on, and the backend's name (part of the part store's
    settings, so parts of different backends never resume or merge together).

    Our U-Net runs on torch, or with ``--backend onnxruntime`` exported to ONNX and run by ONNX Runtime
    (:func:`unet_core.model.onnx_network.onnx_unet`); a foreign bioimage.io package's network
    (:class:`unet_core.model.package.PackageNetwork`) runs its ONNX (or trusted TorchScript) weights. Both
    run on the CPU in float32: ``--device auto`` then means the CPU.

    Raises:
        UserInputError: a GPU, bf16/fp16 or ``--compile`` asked of a network that torch does not run.
    """
    foreign = isinstance(model, PackageNetwork)
    if settings.backend is Backend.TORCH and not foreign:
        return model, device, Backend.TORCH.value
    what = f"a bioimage.io package's {model.kind} weights" if foreign else "--backend onnxruntime"
    if device.type != "cpu":
        if settings.device != "auto":
            raise UserInputError(f"{what} run(s) on the CPU only, --device {settings.device} asks for {device}; "
                                 "use --device cpu (or auto)")
        device = torch.device("cpu")
    if settings.precision not in (Precision.AUTO, Precision.FP32) or settings.compile:
        raise UserInputError(f"{what} run(s) in float32 without torch.compile; use --precision fp32 (or auto) "
                             "and no --compile")
    if foreign:
        return model, device, f"package-{model.kind}"
    from unet_core.model.onnx_network import onnx_unet

    return onnx_unet(model), device, Backend.ONNXRUNTIME.value


def predict_job(
    stack: str | os.PathLike[str],
    model_path: str | os.PathLike[str],
    out_part: str | os.PathLike[str],
    settings: PredictSettings | None = None,
    *,
    job: int = 0,
    jobs: int = 1,
    expect: ModelExpectation = None,
    **options: Any,
) -> JobSummary:
    """Predict job ``job`` of ``jobs``'s blocks of ``stack`` into the part store ``out_part``.

    Args:
        stack: ingested stack (``.ome.zarr``; see :func:`unet_core.io.ngff.open_stack`).
        model_path: model file from :func:`unet_core.model.checkpoint.save_model`; it holds
            the architecture.
        out_part: this job's part store (:class:`unet_core.infer.part_store.PartStore`;
            created, or resumed if it holds blocks of a run with identical settings, or
            replaced if it is a part store of other settings; anything else there is refused).
            A second job on the same store is refused while this one runs (its lock).
        settings: what the job is asked to do (:class:`PredictSettings`: block and tile size, batch,
            device, precision, test-time augmentation, decision rule, storage of the probabilities,
            compilation, the normalisation expected); or give its fields as keywords
            (``block_px=64, tta="flips"``), from which the object is made once, here.
        job, jobs: which share of the C-ordered block list (see :meth:`Tiling.job_blocks`).
        expect: architecture keys the config asks for (a :class:`UNetSpec` or a partial
            mapping); a model file that differs in any of them is rejected.

    Returns:
        A :class:`JobSummary` (also logged as one line with Mpx/s).

    Raises:
        UserInputError: missing/invalid stack, bad sizes or job numbers, GPU memory exhausted, a
            normalisation other than the model's, or a per-slice one on a stack without per-slice
            statistics;
            CheckpointError for a model file that is unreadable or does not match ``expect``.
    """
    if settings is None:
        settings = PredictSettings(**options)
    elif options:
        raise TypeError(f"predict_job: give the settings object or its fields {sorted(options)}, not both")
    claim_outputs([(out_part, PART_MARK)], [stack, model_path])
    run = _prepare_run(Path(stack), Path(model_path), settings, job=job, jobs=jobs, expect=expect)
    store = PartStore(out_part)
    with store.locked():
        return _run_job(run, store, job=job, jobs=jobs)


def _run_job(run: _Run, store: PartStore, *, job: int, jobs: int) -> JobSummary:
    """Predict the job's unfinished blocks into ``store`` (held locked) and mark it complete."""
    engine = run.engine
    arrays = store.open_for_job(run.settings, engine.tiling, engine.encoding.dtype)
    mine = engine.tiling.job_blocks(job, jobs)
    todo = [b for b in mine if not store.is_done(b)]
    tiling = engine.tiling
    block_z, tile_z = (f" x {tiling.block_z} slices", f" x {tiling.tile_z} slices") if tiling.volumes else ("", "")
    log.info("job %d/%d: %d of %d blocks to do (%d already done), block %d px%s, tile %d px%s, FLOP overhead %.3fx, "
             "%s %s%s, batch %d, tta %s, probabilities %s, logit offsets %s", job, jobs, len(todo), len(mine),
             len(mine) - len(todo), tiling.block_px, block_z, tiling.tile_out, tile_z, tiling.flops_overhead(),
             engine.device, engine.precision.value, " compiled" if engine.compile else "", engine.batch,
             engine.tta.value, engine.encoding.value, run.settings["logit_offsets"])

    def write(result: BlockResult) -> None:
        arrays.write(result.block, result.probabilities, result.segmentation)
        store.mark_done(result.block)

    t0 = time.perf_counter()
    run_blocks(engine, run.stack.image, todo, write, desc=f"predict job {job}/{jobs}")
    seconds = time.perf_counter() - t0
    px = sum(b.write.size for b in todo)
    summary = JobSummary(job, jobs, len(mine), len(mine) - len(todo), px, seconds, str(engine.device),
                         engine.precision.value)
    store.mark_complete(asdict(summary))
    log.info("job %d/%d done: %d blocks, %.2f Mpx in %.1f s = %.3f Mpx/s (%s, %s)", job, jobs, len(todo),
             px / 1e6, seconds, summary.mpx_per_s, engine.device, summary.precision)
    return summary
