"""Measurement primitives shared by the benchmarks and the GPU acceptance script.

Each function measures one thing side by side with what it is compared to, on the device it
is given (CPU or CUDA), and returns plain numbers; the scripts print and compare them.
Timings use wall time around synchronised device work; nothing here asserts a time.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import zarr

from unet_core.common.intensity import IntensityStats
from unet_core.common.mirror import mirror_pad
from unet_core.infer.predict import predict_job, predict_plane
from unet_core.infer.tiling import Tiling
from unet_core.io.ngff import PyramidWriter
from unet_core.model.checkpoint import save_model
from unet_core.model.spec import UNetSpec
from unet_core.model.unet import UNet


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 tensor-core math for float32 matmuls and cuDNN convolutions on (``enabled``) or off
    inside the block; the previous settings are restored on leaving it, also on an error.

    PyTorch's defaults are TF32 convolutions (``cudnn.allow_tf32`` True) and exact matmuls, and
    ``unet train`` turns both on, so a float32 row on a GPU is TF32 unless it turns them off.
    """
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """cuDNN autotuning (``torch.backends.cudnn.benchmark``) on or off inside the block, restored
    on leaving it. ``unet train`` turns it on; ``unet predict`` leaves PyTorch's default (off): an
    autotuned algorithm is picked by timing, so two processes may pick different ones and round
    differently, and predict's K jobs could then differ from one job in the last bits."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """``fn()`` and its wall time in seconds, device work included."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def matmul_ceiling_tflops(device: torch.device, *, n: int = 8192, repeats: int = 20,
                          dtype: torch.dtype | None = None, runs: int = 3) -> float:
    """Dense matmul rate, TFLOP/s, in ``dtype`` (default bf16 on a GPU, fp32 on the CPU): the
    ceiling rates are compared with; the median of ``runs`` timings of ``repeats`` products."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_seconds(lambda: [a @ b for _ in range(repeats)], device, runs)
    return 2 * n**3 * repeats / seconds / 1e12


def random_net(spec: UNetSpec, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(spec).eval()


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@dataclass(frozen=True)
class Rate:
    """A throughput figure: output Mpx/s (the median of the timed runs), achieved TFLOP/s and
    peak device memory; ``runs``: each timed run's Mpx/s; ``loop_mpx_per_s``: for ``unet predict``,
    the median rate of its block loop alone (start-up, model load and opening the stores excluded)."""

    mpx_per_s: float
    tflops: float
    peak_gib: float | None
    runs: tuple[float, ...] = ()
    loop_mpx_per_s: float | None = None

    def spread(self) -> str:
        """``median of 3: 30.1-31.0`` (the runs' range), or ``1 run``."""
        if len(self.runs) < 2:
            return f"{len(self.runs)} run"
        return f"median of {len(self.runs)}: {min(self.runs):.1f}-{max(self.runs):.1f}"


def _rate(pixels: int, seconds: list[float], flops_per_pixel: float, device: torch.device) -> Rate:
    """The :class:`Rate` of ``pixels`` output pixels per run, runs of ``seconds``: their median."""
    runs = tuple(pixels / t / 1e6 for t in seconds)
    rate = statistics.median(runs)
    return Rate(rate, rate * 1e6 * flops_per_pixel / 1e12, peak_memory_gib(device), runs)


def ours_in_memory(spec: UNetSpec, image: np.ndarray, device: torch.device, *, precision: str, batch: int,
                   block_px: int, tile_out: int, repeats: int = 1, compile: bool = False) -> Rate:
    """:func:`predict_plane` of a random He-initialised net on an in-memory (Y, X) slice, the
    median of ``repeats`` timed runs (``compile``: through ``torch.compile``; the warm-up block
    compiles the tile shape)."""
    model = random_net(spec)
    kw = dict(stats=IntensityStats(0.0, 1.0), device=device, precision=precision, batch=batch,
              block_px=block_px, tile_out=tile_out, compile=compile)
    predict_plane(model, image[: block_px, : block_px], **kw)  # warm-up: kernels, allocator, compilation
    reset_peak_memory(device)
    times = [timed(lambda: predict_plane(model, image, **kw), device)[1] for _ in range(repeats)]
    flops = Tiling((1, *image.shape), spec, block_px, tile_out).flops_overhead() * spec.ideal_flops_per_output_pixel()
    return _rate(image.size, times, flops, device)


def same_padded_twin(spec: UNetSpec) -> UNetSpec:
    """The usual MONAI-style counterpart of ``spec``: the same depth and widths with same padding
    and no dropout (3-D: the same ``dims``, ``pool_z`` and ``kernel_z``), built by our UNet class."""
    if spec.dims == 2:
        return UNetSpec(depth=spec.depth, base_channels=spec.base_channels, padding="same", dropout=0.0)
    return UNetSpec(depth=spec.depth, base_channels=spec.base_channels, padding="same", dropout=0.0, dims=3,
                    pool_z=spec.pool_z, kernel_z=spec.kernel_z)


def monai_window_count(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """Windows ``sliding_window_inference`` runs over an image of ``shape`` (any number of axes):
    per axis 1 where the image is no longer than the roi (MONAI pads it up to the roi), else
    ``ceil((n - roi) / step) + 1`` with ``step = int(roi * (1 - overlap))``."""
    counts = [max(1, -(-(n - r) // max(1, int(r * (1 - overlap)))) + 1) for n, r in zip(shape, roi, strict=True)]
    return int(np.prod(counts))


def monai_predictor(spec: UNetSpec, device: torch.device, roi: tuple[int, ...], *, sw_batch: int = 1,
                    overlap: float = 0.25, mode: str = "gaussian", seed: int = 1, precision: str = "fp32"
                    ) -> Callable[[np.ndarray], torch.Tensor] | None:
    """``run(image)``: MONAI ``sliding_window_inference`` of ``spec``'s same-padded twin
    (:func:`same_padded_twin`, random He weights drawn with ``seed``, in the channels-last layout
    of its dims as our engine runs: a baseline in the slower NCHW layout would flatter the ratio, on
    the CPU NCHW costs 25-40 % more per forward) over a (Y, X) or (Z, Y, X) float32 image, fp32 or
    under bf16 autocast, returning the (C, ...) softmax probabilities on the CPU; None where MONAI is
    not installed."""
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        return None
    same = same_padded_twin(spec)
    layout = torch.channels_last if same.dims == 2 else torch.channels_last_3d
    model = random_net(same, seed).to(device).to(memory_format=layout)
    bf16 = precision == "bf16"

    def run(image: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(image))[None, None].to(device)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = sliding_window_inference(x, roi_size=tuple(roi), sw_batch_size=sw_batch, predictor=model,
                                           overlap=overlap, mode=mode)
            return torch.softmax(out.float(), dim=1)[0].cpu()

    run.model = model  # type: ignore[attr-defined]
    return run


def monai_in_memory(spec: UNetSpec, image: np.ndarray, device: torch.device, *, precision: str,
                    roi: int = 512, sw_batch: int = 4, repeats: int = 1) -> Rate | None:
    """MONAI ``sliding_window_inference`` of a same-padded U-Net of the same widths (roi 512,
    overlap 0.25, gaussian, ``sw_batch`` windows per pass), the usual MONAI set-up, the median
    of ``repeats`` timed runs; None where MONAI is not installed."""
    run = monai_predictor(spec, device, (roi, roi), sw_batch=sw_batch, precision=precision)
    if run is None:
        return None
    run(image[: 2 * roi, : 2 * roi])  # warm-up
    reset_peak_memory(device)
    times = [timed(lambda: run(image), device)[1] for _ in range(repeats)]
    windows = monai_window_count(image.shape, (roi, roi), 0.25)
    executed = windows * same_padded_twin(spec).tile_flops(roi) / image.size  # FLOPs per output pixel, overlap included
    return _rate(image.size, times, executed, device)


def whole_image_probabilities(model: UNet, image: np.ndarray, device: torch.device) -> np.ndarray:
    """One network pass over the mirror-padded (Y, X) slice, fp32: the reference of tiling
    (in the channels-last layout our engine uses, so that its timing is a fair baseline)."""
    spec = model.spec
    pads = [(spec.context, spec.context + spec.valid_output_size_at_least(n) - n) for n in image.shape]
    x = torch.from_numpy(mirror_pad(image, pads))[None, None].to(device)
    net = model.to(device).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        probs = torch.softmax(net(x.contiguous(memory_format=torch.channels_last)).float(), dim=1)[0].cpu().numpy()
    return probs[:, : image.shape[0], : image.shape[1]]


def smooth_stack(slices: int, size: int, *, seed: int = 0) -> np.ndarray:
    """A (Z, Y, X) uint16 microscopy-like stack: smooth structure plus noise (compresses like data)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    base = 2000 + 1000 * np.sin(yy / 37.0) * np.cos(xx / 53.0)
    return np.stack([(base + rng.normal(0, 50, base.shape)).clip(0, 65535).astype(np.uint16) for _ in range(slices)])


def write_stack(path: Path, volume: np.ndarray) -> Path:
    """A stack laid out as ``unet ingest`` writes it (chunks 1 x 512 x 512, the project's compressor)."""
    root = zarr.open_group(path, mode="w")
    writer = PyramidWriter(root, volume.shape, volume.dtype, (1, 512, 512), (1.0, 1.0, 1.0), levels=1)
    for z in range(volume.shape[0]):
        writer.write_plane(z, volume[z])
    writer.finish()
    root.attrs.update({"unet": {"intensity": {"mean": float(volume.mean()), "std": float(volume.std())}}})
    return path


def end_to_end(spec: UNetSpec, volume: np.ndarray, device: torch.device, *, precision: str, batch: int,
               block_px: int, tile_out: int, workdir: Path | None = None, repeats: int = 1) -> Rate:
    """``unet predict`` (``predict_job``) from a Zarr stack to a part store, one job; the median
    of ``repeats`` runs, each into a new part store (peak memory: the largest), and the median
    rate of the job's block loop as the job reports it."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        stack = write_stack(Path(tmp) / "stack.ome.zarr", volume)
        model = Path(tmp) / "model.pt"
        save_model(model, random_net(spec))
        warm = write_stack(Path(tmp) / "warm.ome.zarr", volume[:1, :block_px, :block_px])
        kw = dict(device=str(device), precision=precision, batch=batch, block_px=block_px, tile_out=tile_out)
        predict_job(warm, model, Path(tmp) / "warm-part", **kw)
        reset_peak_memory(device)
        runs = [timed(lambda: predict_job(stack, model, Path(tmp) / f"part-{k}", **kw), device)
                for k in range(repeats)]
    flops = Tiling(volume.shape, spec, block_px, tile_out).flops_overhead() * spec.ideal_flops_per_output_pixel()
    rate = _rate(volume.size, [seconds for _, seconds in runs], flops, device)
    return replace(rate, loop_mpx_per_s=statistics.median(summary.mpx_per_s for summary, _ in runs))


def argmax_agreement(spec: UNetSpec, image: np.ndarray, device: torch.device, *, block_px: int,
                     tile_out: int) -> float:
    """Share of pixels whose bf16-on-``device`` argmax equals the fp32 CPU argmax (same net, slice)."""
    model = random_net(spec)
    kw = dict(stats=IntensityStats(float(image.mean()), float(image.std())), block_px=block_px, tile_out=tile_out)
    ref = predict_plane(model, image, device="cpu", precision="fp32", **kw).argmax(axis=0)
    got = predict_plane(model, image, device=device, precision="bf16" if device.type == "cuda" else "fp32",
                        batch=4, **kw).argmax(axis=0)
    return float((ref == got).mean())


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()
    return statistics.median(timed(fn, device)[1] for _ in range(repeats))


@dataclass(frozen=True)
class TrainingRates:
    """Steady-state training throughput of ``unet train`` and of a minimal loop, same work.

    Attributes:
        ours: tiles/s of ``unet train`` between its validation rows at 1/3 and 3/3 of the
            iterations (training time only: start-up, worker spawn, autotuning and the first
            third of the steps excluded).
        minimal: tiles/s of the minimal loop, mean of a run before and one after ``unet train``.
        minimal_before, minimal_after: the two minimal-loop runs (their spread shows load changes).
        flops_per_tile: forward + backward FLOPs of one tile (3 x the forward FLOPs).
        peak_gib, peak_gib_minimal: peak device memory of each (None on the CPU).
        checkpoint_seconds: wall time the loop of ``unet train`` spends in one ``state.pt``
            checkpoint (median of this run's): on the CPU the write, on CUDA the copy of the state
            to host memory that the steps wait for (the file is written on a background thread);
            ``ours`` does not count it (the run's only checkpoint comes after its last metrics
            row), :meth:`with_checkpoints` does.
        checkpoint_every, batch: the default checkpoint interval (iterations) and the batch.
        ours_runs: the tiles/s of each ``unet train`` run (``ours`` is their median).
        description: device and precision as ``unet train`` logged them.
        warmup_iterations, timed_iterations: steps excluded / timed, per run.
    """

    ours: float
    minimal: float
    minimal_before: float
    minimal_after: float
    flops_per_tile: float
    peak_gib: float | None
    peak_gib_minimal: float | None
    description: str
    warmup_iterations: int
    timed_iterations: int
    checkpoint_seconds: float | None = None
    checkpoint_every: int = 500
    batch: int = 1
    ours_runs: tuple[float, ...] = ()

    def tflops(self, rate: float) -> float:
        """Achieved TFLOP/s at ``rate`` tiles/s."""
        return rate * self.flops_per_tile / 1e12

    def with_checkpoints(self, rate: float) -> float:
        """``rate`` (tiles/s of training steps) counting one ``state.pt`` write per
        ``checkpoint_every`` iterations (validation is still not counted)."""
        tiles = self.checkpoint_every * self.batch
        return tiles / (tiles / rate + (self.checkpoint_seconds or 0.0))


def _training_set(path: Path, *, in_size: int, n: int) -> Path:
    """A stored training set as ``unet augment`` writes it: random classes, noisy image, w = 1 + class."""
    rng = np.random.default_rng(0)
    classes = (rng.random((n, in_size, in_size)) < 0.3).astype(np.uint8)
    group = zarr.open_group(path, mode="w")
    for name, arr in (("image", (classes + rng.normal(0, 0.5, classes.shape)).astype(np.float32)),
                      ("classes", classes), ("weights", (1.0 + classes).astype(np.float32))):
        group.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=(1, in_size, in_size))[:] = arr
    return path


def training_rates(spec: UNetSpec, device: torch.device, *, tile_out: int, batch: int, iterations: int,
                   workers: int = 2, precision: str = "auto", channels_last: bool = True,
                   workdir: Path | None = None, repeats: int = 1) -> TrainingRates:
    """Steady-state tiles/s of ``unet train`` (the real loop on a stored set of ``4 x batch`` tiles,
    Adam, one job; the median of ``repeats`` runs, each in a new folder) and of a minimal hand-written loop (tensors already on the device, same net,
    batch, precision, memory format and optimizer kernels: fused Adam on CUDA; TF32 and cuDNN
    autotuning on as ``unet train`` sets them), run before and after it. Their ratio is the cost
    of the loop's data loading and bookkeeping.

    ``unet train`` validates (without validation data: a metrics row only) at 1/3, 2/3 and the end
    of ``iterations``; its rate is taken between the first and last rows from their training
    seconds, which are read after the device has finished (the loop synchronises there). Each
    minimal run likewise skips its first third. Nothing of one run is alive during another, so
    each peak memory is its own. Validation is not training time; the ``state.pt`` checkpoint
    ``unet train`` makes at the end is timed on its own (``checkpoint_seconds``).
    """
    from unet_core.train.config import TrainConfig
    from unet_core.train.loop import train

    in_size = spec.input_size(tile_out)
    third = max(1, iterations // 3)
    kw = {"batch": batch, "precision": precision, "channels_last": channels_last}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        aug = _training_set(Path(tmp) / "aug.zarr", in_size=in_size, n=4 * batch)
        before, _ = _minimal_rate(spec, device, aug, warmup=third, timed_steps=2 * third, **kw)
        cfg = TrainConfig(iterations=3 * third, batch_size=batch, optimizer="adam", lr=1e-4, device=str(device),
                          precision=precision, channels_last=channels_last, validate_every=third,
                          checkpoint_every=3 * third, log_every=third, workers=workers, seed=0,
                          schedule="constant", warmup_iterations=0, export_weights="last")  # as measured before
        reset_peak_memory(device)
        runs = []
        with _timed_checkpoints() as writes:
            for k in range(repeats):
                result = train([aug], out_dir=Path(tmp) / f"run-{k}", spec=spec, config=cfg)
                rows = _metric_rows(Path(tmp) / f"run-{k}" / "metrics.csv")
                runs.append((rows[-1][0] - rows[0][0]) * batch / (rows[-1][1] - rows[0][1]))
        peak = peak_memory_gib(device)
        after, peak_minimal = _minimal_rate(spec, device, aug, warmup=third, timed_steps=2 * third, **kw)
    return TrainingRates(statistics.median(runs), (before + after) / 2, before, after, 3 * spec.tile_flops(in_size),
                         peak, peak_minimal, result.device, third, 2 * third,
                         checkpoint_seconds=statistics.median(writes) if writes else None,
                         checkpoint_every=TrainConfig().checkpoint_every, batch=batch, ours_runs=tuple(runs))


@contextlib.contextmanager
def _timed_checkpoints() -> Iterator[list[float]]:
    """The wall seconds the loop of ``unet train`` spends in each ``state.pt`` checkpoint inside the
    block (its ``_checkpoint`` wrapped): on the CPU the whole write; on CUDA the copy of the state to
    host memory, which the steps wait for (the file is written on a background thread beside them)."""
    from unet_core.train import loop

    writes: list[float] = []
    checkpoint = loop._checkpoint

    def timed(*args: object, **kwargs: object) -> None:
        t0 = time.perf_counter()
        checkpoint(*args, **kwargs)
        writes.append(time.perf_counter() - t0)

    loop._checkpoint = timed
    try:
        yield writes
    finally:
        loop._checkpoint = checkpoint


def _minimal_rate(spec: UNetSpec, device: torch.device, aug: Path, *, warmup: int, timed_steps: int, batch: int,
                  precision: str, channels_last: bool) -> tuple[float, float | None]:
    """Tiles/s of a hand-written loop (autocast forward, float32 weighted cross-entropy, Adam) over
    ``timed_steps`` after ``warmup`` untimed steps, and its peak device memory."""
    import torch.nn.functional as F

    from unet_core.common.precision import resolve_precision

    group = zarr.open_group(aug, mode="r")
    c = spec.context
    images = torch.from_numpy(group["image"][:])[:, None].to(device)
    target = torch.from_numpy(group["classes"][:, c:-c, c:-c].astype(np.int64)).to(device)
    weight = torch.from_numpy(group["weights"][:, c:-c, c:-c]).to(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = UNet(spec).to(device)
    dtype = resolve_precision(precision, device).autocast_dtype
    if channels_last and (device.type == "cuda" or dtype is not None):  # as unet train: CUDA, or CPU bf16
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    n = images.shape[0]

    def steps(k: int) -> None:
        for i in range(k):
            j = (i * batch) % n
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = model(images[j : j + batch])
            loss = (F.cross_entropy(logits.float(), target[j : j + batch], reduction="none")
                    * weight[j : j + batch]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    reset_peak_memory(device)
    steps(warmup)
    _, seconds = timed(lambda: steps(timed_steps), device)
    return timed_steps * batch / seconds, peak_memory_gib(device)


def _metric_rows(path: Path) -> list[tuple[int, float]]:
    """(iteration, cumulative training seconds) of each validation row of ``metrics.csv``."""
    import csv

    with open(path) as fh:
        return [(int(r["iteration"]), float(r["train_seconds"])) for r in csv.DictReader(fh)]


def elastic_seconds_per_sample(device: torch.device, *, batch: int, repeats: int = 5, size: int = 572) -> float:
    """Batched elastic deformation of ``size``² image + labels (3x3 grid, sigma 10 px, bicubic)."""
    from unet_core.augment.elastic import DeformParams, deform, draw_transform, rng_for

    params = DeformParams()
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.normal(size=(batch, 1, size, size)).astype(np.float32)).to(device)
    lab = torch.from_numpy(rng.integers(0, 50, (batch, size, size)).astype(np.int32)).to(device)
    out = params.interpolation
    transforms = [draw_transform(rng_for(0, i), params=params, source_shape=(size, size), tile_shape=(size, size),
                                 out_shape=(size, size)) for i in range(batch)]
    seconds = median_seconds(lambda: deform(img, lab, transforms, tile_shape=(size, size), interpolation=out),
                             device, repeats)
    return seconds / batch
