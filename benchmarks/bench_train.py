"""Training benchmark: the weighted loss, and the training loop's steady state against a minimal loop.

Measured side by side in one run, on one device, one job:

1. loss: ``unet_core.model.loss.weighted_cross_entropy`` (float32 cast + fused cross-entropy) against
   the usual one-liner ``(F.cross_entropy(logits, target, reduction="none") * w).mean()`` on one
   388² output tile, forward + backward; prints the time ratio and the largest difference.
2. ceiling: a dense matmul rate on the same device (bf16 on a GPU, where training runs under bf16
   autocast; fp32 on the CPU, where training computes in fp32 unless ``--precision bf16`` on a CPU
   with native bf16): ``benchlib.matmul_ceiling_tflops``.
3. loop: ``benchlib.training_rates``: the steady state of ``unet train`` (a stored Zarr set read by
   the loader, its sampler, device-side loss sums, metrics rows; the first third of the iterations,
   start-up, worker spawn and cuDNN autotuning excluded; validation and ``state.pt`` writes are not
   training time: the rate counting a write every ``checkpoint_every`` iterations is printed
   beside it) against a minimal hand-written loop over
   the same tiles already on the device (same net, batch, precision, memory format, optimizer
   kernels), run before and after it. Prints tiles/s, TFLOP/s (forward + backward = 3 x
   ``UNetSpec.tile_flops``), % of the ceiling, peak GPU memory and the ratio.

Settings are those of a workflow config ("batch as configured"): ``model`` and ``train`` of
``config/config.yaml`` with the sections of ``--config FILE`` laid over them (as Snakemake does);
the flags below override single values.

Usage:
    python benchmarks/bench_train.py                       # config/config.yaml settings (CPU-sized)
    python benchmarks/bench_train.py --config config/isbi2012.yaml --device cuda --iterations 150
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B

from unet_core.common.precision import resolve_precision
from unet_core.model.loss import weighted_cross_entropy
from unet_core.model.spec import UNetSpec

REPO = Path(__file__).resolve().parents[1]


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
        B.sync(device)

    def baseline():
        logits.grad = None
        (F.cross_entropy(logits, target, reduction="none") * weight).mean().backward()
        B.sync(device)

    t_ours, t_base = timed_pair(ours, baseline, repeats)
    diff = abs(
        weighted_cross_entropy(logits, target, weight).item()
        - (F.cross_entropy(logits, target, reduction="none") * weight).mean().item()
    )
    print(
        f"loss  {out_size}x{out_size} fwd+bwd: ours {t_ours * 1e3:.3f} ms, baseline F.cross_entropy "
        f"{t_base * 1e3:.3f} ms, ratio ours/baseline {t_ours / t_base:.2f}x time, |diff| {diff:.2e}"
    )


def configured(path: Path | None) -> tuple[dict, dict]:
    """The ``model`` and ``train`` sections of config/config.yaml with those of ``path`` laid over them."""
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    over = yaml.safe_load(path.read_text()) if path else {}
    return ({**base["model"], **(over.get("model") or {})}, {**base["train"], **(over.get("train") or {})})


def bench_loop(spec: UNetSpec, device: torch.device, *, tile_out: int, batch: int, iterations: int,
               workers: int, precision: str) -> None:
    n = 8192 if device.type == "cuda" else 1024
    computed = resolve_precision(precision, device).value
    kind = "bf16" if device.type == "cuda" or computed == "bf16" else "fp32"
    ceiling = B.matmul_ceiling_tflops(device, n=n, dtype=torch.bfloat16 if kind == "bf16" else torch.float32)
    print(f"ceil  dense {kind} matmul {n}x{n} on {device}: {ceiling:.3f} TFLOP/s")
    r = B.training_rates(spec, device, tile_out=tile_out, batch=batch, iterations=iterations, workers=workers,
                         precision=precision)

    def figures(rate: float, peak: float | None) -> str:
        mem = f", peak GPU memory {peak:.2f} GiB" if peak is not None else ""
        return (f"{rate:.3f} tiles/s = {r.tflops(rate):.4g} TFLOP/s = {100 * r.tflops(rate) / ceiling:.1f}% "
                f"of the {kind} matmul ceiling{mem}")

    print(f"loop  {spec.base_channels}-wide depth-{spec.depth} U-Net, {spec.input_size(tile_out)}->{tile_out} px "
          f"tiles, batch {batch}, {computed}, {workers} loader workers; {r.warmup_iterations + r.timed_iterations} "
          f"iterations per run, the first {r.warmup_iterations} excluded; unet train on {r.description}")
    print(f"      unet train (steady state, training steps only): {figures(r.ours, r.peak_gib)}")
    if r.checkpoint_seconds is not None:
        print(f"      unet train counting a state.pt write every {r.checkpoint_every} iterations "
              f"({r.checkpoint_seconds:.3f} s each, timed in the run): {r.with_checkpoints(r.ours):.3f} tiles/s "
              "(validation not counted)")
    print(f"      minimal loop: {figures(r.minimal, r.peak_gib_minimal)} "
          f"(before {r.minimal_before:.3f}, after {r.minimal_after:.3f})")
    print(f"      ratio unet-train/minimal: {r.ours / r.minimal:.2f}x throughput")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=None, help="workflow config whose model/train settings to use")
    p.add_argument("--iterations", type=int, default=30, help="steps per run; the first third is warm-up")
    p.add_argument("--base-channels", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--tile-out", type=int, default=None, help="output tile size, px (valid for the depth)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="loader workers of unet train")
    p.add_argument("--precision", default=None,
                   help="auto, bf16, fp16 or fp32 (the CPU computes in fp32, or bf16 where it has it natively)")
    p.add_argument("--device", default="auto")
    p.add_argument("--loss-repeats", type=int, default=20)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    model, train = configured(args.config)
    model.update({k: v for k, v in (("depth", args.depth), ("base_channels", args.base_channels)) if v is not None})
    spec = UNetSpec.from_dict(model)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"bench_train {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device} ({name}), config {args.config or 'config/config.yaml'}")
    bench_loss(388, device, args.loss_repeats)

    def pick(flag, key):
        return flag if flag is not None else train[key]

    bench_loop(spec, device, tile_out=pick(args.tile_out, "tile_out"), batch=pick(args.batch_size, "batch_size"),
               iterations=args.iterations, workers=pick(args.workers, "workers"),
               precision=pick(args.precision, "precision"))


if __name__ == "__main__":
    main()
