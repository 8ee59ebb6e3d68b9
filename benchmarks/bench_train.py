"""Training benchmark: the weighted loss and the full training loop against plain baselines.

Two comparisons, each measured side by side in this run:

1. loss: ``unet_core.model.loss.weighted_cross_entropy`` (float32 cast + fused cross-entropy) against the
   usual one-liner ``(F.cross_entropy(logits, target, reduction="none") * w).mean()`` on one
   output tile, forward + backward; prints the time ratio and the largest difference.
2. loop: ``unet_core.train.loop.train`` (Zarr loader, iteration sampler, progress bar, checkpoint at
   the end, TorchScript/model-card export excluded from the rate) against a minimal hand-written
   loop over the same tiles already in memory, same model, optimizer and seed; prints tiles/s,
   achieved GFLOP/s (forward + backward = 3x the forward FLOPs of ``UNetSpec.tile_flops``) and
   the ratio. A ratio near 1 means the loader/bookkeeping costs nothing measurable.

On a GPU (``--device cuda``) the loop also reports peak memory and the fraction of the 790
TFLOP/s bf16 peak of an H100. Defaults are CPU-sized (base width 16, 284 px tiles); use
``--base-channels 64 --tile-out 388 --device cuda`` for the paper's network.

Usage: python benchmarks/bench_train.py [--iterations 30] [--base-channels 16] [--tile-out 100]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from unet_core.io.ngff import create_array
from unet_core.model.loss import weighted_cross_entropy
from unet_core.model.spec import UNetSpec
from unet_core.model.unet import UNet
from unet_core.train.config import TrainConfig
from unet_core.train.loop import train

H100_BF16_PEAK_TFLOPS = 790.0


def timed_pair(a, b, repeats: int) -> tuple[float, float]:
    """Median seconds of ``a()`` and ``b()``, interleaved (a b, b a, ...) after a warm-up.

    Interleaving keeps load from other processes on a shared machine out of the ratio.
    """
    a(), b()
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeats):
        order = ((0, a), (1, b)) if i % 2 else ((1, b), (0, a))
        for slot, fn in order:
            t0 = time.perf_counter()
            fn()
            times[slot].append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def bench_loss(out_size: int, device: torch.device, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(1, 2, out_size, out_size, generator=g) * 3).to(device).requires_grad_(True)
    target = torch.randint(0, 2, (1, out_size, out_size), generator=g).to(device)
    weight = (1 + 9 * torch.rand(1, out_size, out_size, generator=g)).to(device)

    def ours():
        logits.grad = None
        weighted_cross_entropy(logits, target, weight).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def baseline():
        logits.grad = None
        (F.cross_entropy(logits, target, reduction="none") * weight).mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    t_ours, t_base = timed_pair(ours, baseline, repeats)
    diff = abs(
        weighted_cross_entropy(logits, target, weight).item()
        - (F.cross_entropy(logits, target, reduction="none") * weight).mean().item()
    )
    print(
        f"loss  {out_size}x{out_size} fwd+bwd: ours {t_ours * 1e3:.3f} ms, baseline F.cross_entropy "
        f"{t_base * 1e3:.3f} ms, ratio ours/baseline {t_ours / t_base:.2f}x time, |diff| {diff:.2e}"
    )


def make_set(path: Path, *, in_size: int, n: int) -> None:
    rng = np.random.default_rng(0)
    classes = (rng.random((n, in_size, in_size)) < 0.3).astype(np.uint8)
    image = (classes + rng.normal(0, 0.5, classes.shape)).astype(np.float32)
    group = zarr.open_group(path, mode="w")
    for name, arr in (
        ("image", image),
        ("classes", classes),
        ("weights", (1.0 + classes).astype(np.float32)),
    ):
        create_array(group, name, shape=arr.shape, dtype=arr.dtype, chunks=(1, in_size, in_size))[:] = arr


def bench_loop(spec: UNetSpec, out_size: int, iterations: int, device: str, workers: int) -> None:
    in_size = spec.input_size(out_size)
    flops = 3 * spec.tile_flops(in_size)
    with tempfile.TemporaryDirectory() as tmp:
        aug = Path(tmp) / "aug.zarr"
        make_set(aug, in_size=in_size, n=8)
        cfg = TrainConfig(
            iterations=iterations,
            workers=workers,
            device=device,
            validate_every=iterations,
            checkpoint_every=iterations,
            log_every=10,
            seed=0,
        )
        # minimal baseline: tensors in memory, same model/optimizer/seed, fp32 (CPU) or bf16 autocast (CUDA)
        dev = torch.device("cuda" if device.startswith("cuda") else "cpu")
        torch.manual_seed(0)
        model = UNet(spec).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        group = zarr.open_group(aug, mode="r")
        ctx = spec.context
        images = torch.from_numpy(group["image"][:])[:, None].to(dev)
        classes = torch.from_numpy(group["classes"][:, ctx:-ctx, ctx:-ctx].astype(np.int64)).to(dev)
        weights = torch.from_numpy(group["weights"][:, ctx:-ctx, ctx:-ctx]).to(dev)
        amp = dev.type == "cuda"

        def step(i: int) -> None:
            k = i % images.shape[0]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(images[k : k + 1])
            loss = (
                F.cross_entropy(logits.float(), classes[k : k + 1], reduction="none") * weights[k : k + 1]
            ).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

        def baseline_rate() -> float:
            step(0)  # warm-up (unet train's rate includes its first step; this one's does not)
            if amp:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(iterations):
                step(i)
            if amp:
                torch.cuda.synchronize()
            return iterations / (time.perf_counter() - t0)

        # baseline before and after, so a change in machine load shows up as their spread
        base_before = baseline_rate()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        result = train([aug], out_dir=Path(tmp) / "run", spec=spec, config=cfg)
        ours = result.metrics["tiles_per_s"]
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
        base_after = baseline_rate()
        base = (base_before + base_after) / 2
    print(
        f"loop  {spec.base_channels}-wide depth-{spec.depth} U-Net, {in_size}->{out_size} px tiles, "
        f"{iterations} iterations on {result.device}"
    )
    print(f"      unet train: {ours:.3f} tiles/s = {ours * flops / 1e9:.1f} GFLOP/s")
    print(
        f"      baseline minimal loop: {base:.3f} tiles/s = {base * flops / 1e9:.1f} GFLOP/s "
        f"(before {base_before:.3f}, after {base_after:.3f})"
    )
    print(f"      ratio unet-train/baseline: {ours / base:.2f}x throughput")
    if peak is not None:
        print(
            f"      peak GPU memory {peak:.2f} GiB; {ours * flops / 1e12 / H100_BF16_PEAK_TFLOPS:.1%} of the "
            f"{H100_BF16_PEAK_TFLOPS:.0f} TFLOP/s bf16 peak"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--tile-out", type=int, default=100, help="output tile size, px (valid for the depth)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--loss-repeats", type=int, default=20)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    spec = UNetSpec(depth=args.depth, base_channels=args.base_channels)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    bench_loss(388, device, args.loss_repeats)
    bench_loop(spec, args.tile_out, args.iterations, str(device), args.workers)


if __name__ == "__main__":
    main()
