"""Overlap-tile inference, one job of a scatter: predict some blocks of a stack into a part store.

Core (array in, array out): :func:`run_network` (a batch of tiles through the net) and
:func:`predict_block` (one block: mirrored read with halo, z-score with the stack's
statistics, tiles in batches, optional test-time augmentation, stitch). I/O adapter:
:func:`predict_job` reads only its blocks plus halo from the stack's Zarr array and writes
them to its own *part store*, so jobs never write the same file.

Part store layout (a directory written only by one job)::

    part/
      part.json            geometry, model hash, settings (written before any block)
      probabilities/       Zarr v3 array float32 (C, Z, Y, X), chunks (C, 1, B, B) = one
                           chunk per block; only this job's blocks are stored
      done/<z>.<by>.<bx>   per-block completion marker, renamed into place after the
                           block's chunk is written (a killed job leaves no block that looks
                           finished; a rerun recomputes only blocks without a marker)
      COMPLETE             written last (atomically) with the job summary

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
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from unet_core import __version__
from unet_core.common.atomic import atomic_output, remove_path
from unet_core.model.decision import CorrectedLogits
from unet_core.common.device import resolve_device
from unet_core.common.errors import UserInputError
from unet_core.common.geometry import Box
from unet_core.common.intensity import IntensityStats, normalize
from unet_core.common.mirror import read_mirrored
from unet_core.model.spec import UNetSpec
from unet_core.common.progress import progress
from unet_core.common.provenance import code_hash
from unet_core.infer.tiling import TTA, Block, Tiling, Transform, output_offset, tile_read_box, transforms

log = logging.getLogger(__name__)

PART_FORMAT = "unet-pipeline/predict-part/1"
PROBABILITIES = "probabilities"
DECISIONS = ("corrected", "raw")


# -- devices ---------------------------------------------------------------------------
def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bf16"`` on a GPU, ``"fp32"`` on the CPU (exact tiling is checked in fp32)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise UserInputError(f"--precision {precision!r}: use auto, fp32 or bf16")
    return precision


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Eval mode on ``device``; channels_last memory layout on a GPU (faster tensor-core convs)."""
    model = model.eval().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


# -- core: network on tiles --------------------------------------------------------------
def run_network(
    model: torch.nn.Module, tiles: np.ndarray, *, device: torch.device, precision: str = "fp32"
) -> np.ndarray:
    """Class probabilities (softmax over the logits) for a batch of input tiles.

    Args:
        tiles: (N, C_in, Y, X) float32 normalised input tiles; Y, X valid network inputs.
        device: where the model lives.
        precision: ``"fp32"`` or ``"bf16"`` (autocast; softmax in float32).

    Returns:
        (N, n_classes, Y', X') float32 probabilities, Y' = spec.output_size(Y).
    """
    x = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32))
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
               else contextlib.nullcontext())
        with ctx:
            logits = model(x)
        probs = torch.softmax(logits.float(), dim=1)
    return probs.cpu().numpy()


def _forward(t: Transform, tile: np.ndarray) -> np.ndarray:
    """Apply ``t`` to the last two axes of ``tile`` (flip, then transpose)."""
    if t.flip_y:
        tile = tile[..., ::-1, :]
    if t.flip_x:
        tile = tile[..., ::-1]
    if t.transpose:
        tile = np.swapaxes(tile, -1, -2)
    return tile


def _inverse(t: Transform, out: np.ndarray) -> np.ndarray:
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
    jobs: dict[tuple[int, ...], list[tuple[Box, Transform]]] = {}
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
def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (model provenance)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


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


def _part_settings(
    stack_path: Path, shape, model_hash: str, tiling: Tiling, job: int, jobs: int, tta: TTA, precision: str,
    device: torch.device, stats: IntensityStats, stack_attrs: dict[str, Any], offsets: list[float] | None,
) -> dict[str, Any]:
    """What a part's blocks depend on; a resumed job reuses blocks only if all of it is equal
    (so a re-ingested stack, another model or changed prediction code starts afresh)."""
    stack_id = hashlib.sha256(json.dumps(stack_attrs, sort_keys=True, default=str).encode()).hexdigest()
    return {
        "format": PART_FORMAT, "version": __version__, "code": code_hash("predict"),
        "stack": str(stack_path), "stack_attrs_sha256": stack_id, "shape": list(shape),
        "model_sha256": model_hash, "tiling": tiling.to_dict(), "job": job, "jobs": jobs,
        "tta": tta.value, "precision": precision, "device": device.type,
        "intensity": stats.to_dict(), "intensity_normalisation": "stack z-score",
        "logit_offsets": offsets,
    }


def _open_or_create_part(out: Path, settings: dict[str, Any], tiling: Tiling) -> zarr.Array:
    """Reuse a part store written with identical settings (resume), else start a new one."""
    from unet_core.io.ngff import create_array

    manifest = out / "part.json"
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old == settings and (out / PROBABILITIES / "zarr.json").is_file():
            return zarr.open_array(out / PROBABILITIES, mode="r+")
        log.warning("%s: written with other settings; starting it afresh", out)
    remove_path(out)
    with atomic_output(out) as tmp:
        tmp.mkdir()
        root = zarr.open_group(tmp, mode="w")
        z, y, x = tiling.shape
        b = tiling.block_px
        create_array(root, PROBABILITIES, shape=(tiling.spec.n_classes, z, y, x), dtype=np.float32,
                     chunks=(tiling.spec.n_classes, 1, b, b), dimension_names=list("czyx"))
        (tmp / "done").mkdir()
        (tmp / "part.json").write_text(json.dumps(settings, indent=1, sort_keys=True))
    return zarr.open_array(out / PROBABILITIES, mode="r+")


def _mark_done(out: Path, block: Block) -> None:
    with atomic_output(out / "done" / block.name) as tmp:
        tmp.write_text("")


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
    decision: str = "corrected",
    expect: UNetSpec | None = None,
) -> JobSummary:
    """Predict job ``job`` of ``jobs``'s blocks of ``stack`` into the part store ``out_part``.

    Args:
        stack: ingested stack (``.ome.zarr``; see :func:`unet_core.io.ngff.open_stack`).
        model_path: model file from :func:`unet_core.model.checkpoint.save_model`.
        out_part: this job's part store (a directory; created, or resumed if it holds
            blocks of a run with identical settings).
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
        expect: the architecture the config asks for; a model file that differs is rejected.

    Returns:
        A :class:`JobSummary` (also logged as one line with Mpx/s).

    Raises:
        UserInputError: missing/invalid stack, bad sizes or job numbers; CheckpointError for
            a model file that is unreadable or does not match ``expect``.
    """
    from unet_core.model.checkpoint import load_model
    from unet_core.io.ngff import open_stack

    stack_path, out = Path(stack), Path(out_part)
    if not stack_path.exists():
        raise UserInputError(f"{stack_path}: input stack not found (run 'unet ingest' first or fix the path)")
    st = open_stack(stack_path)
    model, metadata = load_model(model_path, expect=expect)
    if decision not in DECISIONS:
        raise UserInputError(f"--decision {decision!r}: use one of {', '.join(DECISIONS)}")
    offsets = (metadata.get("decision") or {}).get("logit_offsets") if decision == "corrected" else None
    if offsets is not None:
        model = CorrectedLogits(model, np.asarray(offsets))
    spec = model.spec
    tiling = Tiling(st.shape, spec, block_px, tile_out)
    mine = tiling.job_blocks(job, jobs)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    tta = TTA(tta)
    batch = batch or (8 if dev.type == "cuda" else 1)
    settings = _part_settings(stack_path, st.shape, file_sha256(model_path), tiling, job, jobs, tta, prec,
                              dev, st.intensity, st.attrs, offsets)
    if (out / "COMPLETE").is_file():  # a rerun: the job is complete again only when it ends
        (out / "COMPLETE").unlink()
    probs_out = _open_or_create_part(out, settings, tiling)
    todo = [b for b in mine if not (out / "done" / b.name).is_file()]
    log.info("job %d/%d: %d of %d blocks to do (%d already done), block %d px, tile %d px, "
             "FLOP overhead %.3fx, %s %s, batch %d, tta %s, logit offsets %s", job, jobs, len(todo), len(mine),
             len(mine) - len(todo), block_px, tile_out, tiling.flops_overhead(), dev, prec, batch, tta.value,
             offsets)
    model = prepare_model(model, dev)

    def read(block: Block) -> tuple[np.ndarray, Box]:
        return read_block_input(st.image, block, tiling, stats=st.intensity, tta=tta)

    def write(block: Block, probs: np.ndarray) -> None:
        probs_out[(slice(None), *block.write.to_slices())] = probs
        _mark_done(out, block)

    t0 = time.perf_counter()
    px = 0
    with (
        ThreadPoolExecutor(1, thread_name_prefix="read") as reader,
        ThreadPoolExecutor(1, thread_name_prefix="write") as writer,
    ):
        pending: Future | None = None
        nxt = reader.submit(read, todo[0]) if todo else None
        for i, block in enumerate(progress(todo, desc=f"predict job {job}/{jobs}", unit="block")):
            image, image_box = nxt.result()
            nxt = reader.submit(read, todo[i + 1]) if i + 1 < len(todo) else None
            probs = predict_tiles(
                model, image, image_box, tiling.tiles(block), spec=spec,
                out_box=block.plane, device=dev, precision=prec, batch=batch, tta=tta,
            )[:, None]
            if pending is not None:
                pending.result()
            pending = writer.submit(write, block, probs)
            px += block.write.size
        if pending is not None:
            pending.result()
    seconds = time.perf_counter() - t0
    summary = JobSummary(job, jobs, len(mine), len(mine) - len(todo), px, seconds, str(dev), prec)
    with atomic_output(out / "COMPLETE") as tmp:
        tmp.write_text(json.dumps(asdict(summary), indent=1))
    log.info("job %d/%d done: %d blocks, %.2f Mpx in %.1f s = %.3f Mpx/s (%s, %s)", job, jobs, len(todo),
             px / 1e6, seconds, summary.mpx_per_s, dev, prec)
    return summary


def iter_done_blocks(part: Path) -> Iterator[str]:
    """Names of the blocks a part store marks as finished."""
    done = part / "done"
    if done.is_dir():
        for p in sorted(done.iterdir()):
            if not p.name.startswith("."):
                yield p.name


