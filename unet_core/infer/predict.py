"""Overlap-tile inference, one job of a scatter: predict some blocks of a stack into a part store.

Core (array in, array out): :func:`run_network` (a batch of tiles through the net) and
:func:`predict_block` (one block: mirrored read with halo, z-score with the stack's
statistics, tiles in batches, optional test-time augmentation, stitch). I/O adapter:
:func:`predict_job` reads only its blocks plus halo from the stack's Zarr array and writes
them to its own *part store*, so jobs never write the same file.

The part store's layout is :mod:`unet_core.infer.part_store`'s.

Peak memory per job is one block read box plus its output plus ``batch`` network tiles
(and one block in flight each for the prefetching reader and the writer), independent of
the stack size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from unet_core import __version__
from unet_core.common.device import resolve_device
from unet_core.common.precision import Precision, resolve_precision
from unet_core.common.errors import UserInputError, parse_choice
from unet_core.common.geometry import Box
from unet_core.common.intensity import IntensityStats, normalize
from unet_core.common.mirror import read_mirrored
from unet_core.common.progress import progress
from unet_core.common.provenance import code_hash, sha256_files
from unet_core.common.outputs import claim_outputs
from unet_core.infer.part_store import PART_FORMAT, PART_MARK, PartStore
from unet_core.infer.tiling import TTA, Block, Dihedral, Tiling, output_offset, tile_read_box, transforms
from unet_core.io.ngff import Stack, open_stack
from unet_core.model.checkpoint import ModelExpectation, load_model
from unet_core.model.decision import Decision
from unet_core.model.spec import UNetSpec

log = logging.getLogger(__name__)



# -- devices ---------------------------------------------------------------------------
def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Eval mode on ``device``; channels_last memory layout on a GPU (faster tensor-core convs)."""
    model = model.eval().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


class CorrectedLogits(torch.nn.Module):
    """A trained U-Net whose logits carry the weight-prior correction (for inference only).

    Keeps the wrapped model's :attr:`spec`, so the overlap-tile code sees the same geometry.
    """

    def __init__(self, model: torch.nn.Module, offsets: np.ndarray) -> None:
        super().__init__()
        self.model = model
        self.spec: UNetSpec = model.spec
        self.register_buffer("offsets", torch.as_tensor(np.asarray(offsets, np.float32)).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return logits + self.offsets.to(logits.dtype)


# -- core: network on tiles --------------------------------------------------------------
def run_network(
    model: torch.nn.Module, tiles: np.ndarray, *, device: torch.device, precision: Precision | str = Precision.FP32
) -> np.ndarray:
    """Class probabilities (softmax over the logits) for a batch of input tiles.

    Args:
        tiles: (N, C_in, Y, X) float32 normalised input tiles; Y, X valid network inputs.
        device: where the model lives.
        precision: ``fp32``, or ``bf16``/``fp16`` autocast (softmax in float32).

    Returns:
        (N, n_classes, Y', X') float32 probabilities, Y' = spec.output_size(Y).
    """
    x = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32))
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    dtype = Precision(precision).autocast_dtype
    with torch.inference_mode():
        ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            logits = model(x)
        probs = torch.softmax(logits.float(), dim=1)
    return probs.cpu().numpy()


def _forward(t: Dihedral, tile: np.ndarray) -> np.ndarray:
    """Apply ``t`` to the last two axes of ``tile`` (flip, then transpose)."""
    if t.flip_y:
        tile = tile[..., ::-1, :]
    if t.flip_x:
        tile = tile[..., ::-1]
    if t.transpose:
        tile = np.swapaxes(tile, -1, -2)
    return tile


def _inverse(t: Dihedral, out: np.ndarray) -> np.ndarray:
    """Undo ``t`` on the last two axes of ``out`` (transpose back, then flip)."""
    if t.transpose:
        out = np.swapaxes(out, -1, -2)
    if t.flip_x:
        out = out[..., ::-1]
    if t.flip_y:
        out = out[..., ::-1, :]
    return out


def predict_tiles(
    model: torch.nn.Module,
    image: np.ndarray,
    image_box: Box,
    tiles: Sequence[Box],
    *,
    spec: UNetSpec,
    out_box: Box,
    device: torch.device,
    precision: str = "fp32",
    batch: int = 1,
    tta: TTA | str = TTA.NONE,
) -> np.ndarray:
    """Run the network over ``tiles`` and stitch the kept outputs into ``out_box``.

    Each tile is cut from ``image`` at :func:`unet_core.infer.tiling.tile_read_box` (per TTA
    transform), transformed, batched with tiles of the same shape, and its first
    ``write.shape`` output pixels (in the transformed frame) are transformed back and
    averaged over the transforms. This function does not check alignment: the tiles decide
    whether the result is seamless (see :class:`unet_core.infer.tiling.Tiling`).

    Args:
        image: (Y, X) float32 normalised input covering every tile's read box.
        image_box: where ``image`` lies in image coordinates.
        tiles: (Y, X) write boxes, each shape a multiple of ``spec.stride`` (or any shape the
            net accepts with :func:`unet_core.infer.tiling.tile_margins`).
        out_box: (Y, X) region to return; tile outputs outside it are dropped.
        batch: tiles per network pass.
        tta: transforms to average.

    Returns:
        (n_classes, *out_box.shape) float32 probabilities.
    """
    trs = transforms(tta)
    out = np.zeros((spec.n_classes, *out_box.shape), np.float32)
    jobs: dict[tuple[int, ...], list[tuple[Box, Dihedral]]] = {}
    for tile in tiles:
        for tr in trs:
            read = tile_read_box(tile, spec, tr)
            shape = read.shape[::-1] if tr.transpose else read.shape
            jobs.setdefault(shape, []).append((tile, tr))
    for work in jobs.values():
        for start in range(0, len(work), batch):
            chunk = work[start : start + batch]
            inputs = np.stack([
                _forward(tr, image[tile_read_box(tile, spec, tr).relative_to(image_box).to_slices()])
                for tile, tr in chunk
            ])[:, None]
            probs = run_network(model, inputs, device=device, precision=precision)
            for (tile, tr), p in zip(chunk, probs, strict=True):
                shape = tile.shape[::-1] if tr.transpose else tile.shape
                oy, ox = (output_offset(spec, s) for s in shape)
                kept = _inverse(tr, p[:, oy : oy + shape[0], ox : ox + shape[1]])
                target = tile.intersect(out_box)
                if target.empty:
                    continue
                src = target.relative_to(tile).to_slices()
                out[(slice(None), *target.relative_to(out_box).to_slices())] += kept[(slice(None), *src)]
    if len(trs) > 1:
        out /= np.float32(len(trs))
    return out


def read_block_input(
    stack_image: Any, block: Block, tiling: Tiling, *, stats: IntensityStats, tta: TTA | str = TTA.NONE
) -> tuple[np.ndarray, Box]:
    """The normalised (Y, X) float32 input a block needs, and its box in image coordinates.

    Reads only the in-bounds part of the block's read box (block plus halo) from the
    (Z, Y, X) ``stack_image`` and mirrors the rest (:func:`unet_core.common.mirror.read_mirrored`).
    """
    read = tiling.block_read(block, tta)
    z = block.write.offset[0]
    raw = read_mirrored(stack_image, (z, *read.offset), (z + 1, *read.end))[0]
    return normalize(raw, stats), read


def predict_block(
    model: torch.nn.Module,
    stack_image: Any,
    block: Block,
    tiling: Tiling,
    *,
    stats: IntensityStats,
    device: torch.device,
    precision: str = "fp32",
    batch: int = 1,
    tta: TTA | str = TTA.NONE,
) -> np.ndarray:
    """Predict one block of a stack.

    Args:
        stack_image: (Z, Y, X) raw grey values (NumPy or Zarr; only the block's read box
            is read, mirrored at the stack borders).
        block: the block (from ``tiling``).
        stats: the stack's intensity statistics (z-score; never per tile).

    Returns:
        (n_classes, 1, by, bx) float32 probabilities of the block's voxels.
    """
    image, read = read_block_input(stack_image, block, tiling, stats=stats, tta=tta)
    probs = predict_tiles(
        model, image, read, tiling.tiles(block), spec=tiling.spec, out_box=block.plane,
        device=device, precision=precision, batch=batch, tta=tta,
    )
    return probs[:, None]


def predict_plane(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    stats: IntensityStats,
    block_px: int = 2048,
    tile_out: int = 1024,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    batch: int = 1,
    tta: TTA | str = TTA.NONE,
) -> np.ndarray:
    """Tiled prediction of a whole (Y, X) or (Z, Y, X) array in memory (for tests, notebooks).

    Returns:
        (n_classes, Z, Y, X) float32 probabilities (Z = 1 for a 2-D input).
    """
    vol = image[None] if image.ndim == 2 else image
    tiling = Tiling(vol.shape, model.spec, block_px, tile_out)
    dev = torch.device(device) if isinstance(device, str) else device
    out = np.zeros((model.spec.n_classes, *vol.shape), np.float32)
    for block in tiling.blocks():
        out[(slice(None), *block.write.to_slices())] = predict_block(
            model, vol, block, tiling, stats=stats, device=dev, precision=precision, batch=batch, tta=tta
        )
    return out


# -- I/O: one job of the scatter ----------------------------------------------------------
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
    model: torch.nn.Module
    tiling: Tiling
    device: torch.device
    precision: Precision
    batch: int
    tta: TTA
    settings: dict[str, Any]


def _part_settings(
    stack: Stack, model_hash: str, tiling: Tiling, job: int, jobs: int, tta: TTA, precision: Precision,
    device: torch.device, offsets: list[float] | None,
) -> dict[str, Any]:
    """What a part's blocks depend on; a resumed job reuses blocks only if all of it is equal
    (so a re-ingested stack, another model or changed prediction code starts afresh)."""
    stack_id = hashlib.sha256(json.dumps(stack.attrs, sort_keys=True, default=str).encode()).hexdigest()
    return {
        "format": PART_FORMAT, "version": __version__, "code": code_hash("predict"),
        "stack": str(stack.path), "stack_attrs_sha256": stack_id, "shape": list(stack.shape),
        "model_sha256": model_hash, "tiling": tiling.to_dict(), "job": job, "jobs": jobs,
        "tta": tta.value, "precision": precision.value, "device": device.type,
        "intensity": stack.intensity.to_dict(), "intensity_normalisation": "stack z-score",
        "logit_offsets": offsets,
    }


def _prepare_run(
    stack_path: Path, model_path: Path, *, job: int, jobs: int, block_px: int, tile_out: int, batch: int | None,
    device: str, precision: str, tta: TTA | str, decision: Decision | str, expect: ModelExpectation,
) -> _Run:
    """Open the stack and the model, resolve device, precision and geometry (errors before any work)."""
    if not stack_path.exists():
        raise UserInputError(f"{stack_path}: input stack not found (run 'unet ingest' first or fix the path)")
    st = open_stack(stack_path)
    model, metadata = load_model(model_path, expect=expect)
    decision = parse_choice(Decision, decision, option="--decision")
    offsets = (metadata.get("decision") or {}).get("logit_offsets") if decision is Decision.CORRECTED else None
    if offsets is not None:
        model = CorrectedLogits(model, np.asarray(offsets))
    tiling = Tiling(st.shape, model.spec, block_px, tile_out)
    tiling.job_blocks(job, jobs)  # validates job and jobs
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    tta = TTA(tta)
    settings = _part_settings(st, sha256_files([model_path]), tiling, job, jobs, tta, prec, dev, offsets)
    return _Run(st, model, tiling, dev, prec, batch or (8 if dev.type == "cuda" else 1), tta, settings)


def predict_job(
    stack: str | os.PathLike[str],
    model_path: str | os.PathLike[str],
    out_part: str | os.PathLike[str],
    *,
    job: int = 0,
    jobs: int = 1,
    block_px: int = 2048,
    tile_out: int = 1024,
    batch: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    tta: TTA | str = TTA.NONE,
    decision: Decision | str = Decision.CORRECTED,
    expect: ModelExpectation = None,
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
        job, jobs: which share of the C-ordered block list (see :meth:`Tiling.job_blocks`).
        block_px: block (and output chunk) edge, px, a multiple of 2**depth.
        tile_out: largest output tile per network pass, px, a multiple of 2**depth.
        batch: tiles per network pass (default: 1 on the CPU, 8 on a GPU).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32`` or ``bf16``.
        tta: test-time augmentation, ``none``, ``flips`` or ``d4``.
        decision: ``corrected`` (default): the probabilities carry the model's weight-prior
            correction (:mod:`unet_core.model.decision`), so 0.5 / the argmax is the best decision
            for a network trained with w(x); ``raw``: the plain softmax of the network.
        expect: architecture keys the config asks for (a :class:`UNetSpec` or a partial
            mapping); a model file that differs in any of them is rejected.

    Returns:
        A :class:`JobSummary` (also logged as one line with Mpx/s).

    Raises:
        UserInputError: missing/invalid stack, bad sizes or job numbers; CheckpointError for
            a model file that is unreadable or does not match ``expect``.
    """
    claim_outputs([(out_part, PART_MARK)], [stack, model_path])
    run = _prepare_run(Path(stack), Path(model_path), job=job, jobs=jobs, block_px=block_px, tile_out=tile_out,
                       batch=batch, device=device, precision=precision, tta=tta, decision=decision, expect=expect)
    store = PartStore(out_part)
    with store.locked():
        return _run_job(run, store, job=job, jobs=jobs, block_px=block_px, tile_out=tile_out)


def _run_job(run: _Run, store: PartStore, *, job: int, jobs: int, block_px: int, tile_out: int) -> JobSummary:
    """Predict the job's unfinished blocks into ``store`` (held locked) and mark it complete."""
    probs_out = store.open_for_job(run.settings, run.tiling)
    mine = run.tiling.job_blocks(job, jobs)
    todo = [b for b in mine if not store.is_done(b)]
    log.info("job %d/%d: %d of %d blocks to do (%d already done), block %d px, tile %d px, "
             "FLOP overhead %.3fx, %s %s, batch %d, tta %s, logit offsets %s", job, jobs, len(todo), len(mine),
             len(mine) - len(todo), block_px, tile_out, run.tiling.flops_overhead(), run.device, run.precision.value,
             run.batch, run.tta.value, run.settings["logit_offsets"])
    t0 = time.perf_counter()
    px = _predict_blocks(run, todo, probs_out, store, desc=f"predict job {job}/{jobs}")
    seconds = time.perf_counter() - t0
    summary = JobSummary(job, jobs, len(mine), len(mine) - len(todo), px, seconds, str(run.device), run.precision.value)
    store.mark_complete(asdict(summary))
    log.info("job %d/%d done: %d blocks, %.2f Mpx in %.1f s = %.3f Mpx/s (%s, %s)", job, jobs, len(todo),
             px / 1e6, seconds, summary.mpx_per_s, run.device, summary.precision)
    return summary


def _predict_blocks(run: _Run, todo: list[Block], probs_out: zarr.Array, store: PartStore, *, desc: str) -> int:
    """Predict ``todo`` into ``probs_out``, reading the next block and writing the last one in
    background threads while this one computes; returns the output pixels written."""
    model = prepare_model(run.model, run.device)
    spec = run.tiling.spec

    def read(block: Block) -> tuple[np.ndarray, Box]:
        return read_block_input(run.stack.image, block, run.tiling, stats=run.stack.intensity, tta=run.tta)

    def write(block: Block, probs: np.ndarray) -> None:
        probs_out[(slice(None), *block.write.to_slices())] = probs
        store.mark_done(block)

    px = 0
    with (
        ThreadPoolExecutor(1, thread_name_prefix="read") as reader,
        ThreadPoolExecutor(1, thread_name_prefix="write") as writer,
    ):
        pending: Future | None = None
        nxt = reader.submit(read, todo[0]) if todo else None
        for i, block in enumerate(progress(todo, desc=desc, unit="block")):
            image, image_box = nxt.result()
            nxt = reader.submit(read, todo[i + 1]) if i + 1 < len(todo) else None
            probs = predict_tiles(
                model, image, image_box, run.tiling.tiles(block), spec=spec, out_box=block.plane,
                device=run.device, precision=run.precision, batch=run.batch, tta=run.tta,
            )[:, None]
            if pending is not None:
                pending.result()
            pending = writer.submit(write, block, probs)
            px += block.write.size
        if pending is not None:
            pending.result()
    return px
