"""GPU acceptance check: one command, one table, about 8 minutes on one H100/H200.

    python benchmarks/gpu_check.py            # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --quick    # a tiny CPU run of the same code (seconds; CI runs it)

Rows, each measured side by side in this run (random He-initialised networks; timings never
asserted). Every timed row is the median of :attr:`Settings.repeats` runs (3; the row shows the
runs' range) after an untimed warm-up. Minute budgets on one H100/H200, estimated from the
2026-11-30 H200 figures (FACTS.md) and not yet checked (each section prints its wall time; the
device tool stops a command at 10 minutes, and rows already printed come back):

* matmul ceiling (< 0.1 min): dense bf16 matmul rate (TFLOP/s), the ceiling the other rows are a share of;
* inference in memory, paper net on one 8192² slice (≈ 3.5 min): ours (``predict_plane``; bf16
  also through ``torch.compile``, ``predict.compile``, and with cuDNN autotuning on, which
  ``unet predict`` leaves off: :func:`benchlib.cudnn_benchmark` says why) vs MONAI
  ``sliding_window_inference`` (same-padded net of the same widths, roi 512, overlap 0.25,
  gaussian; 4 and 16 windows per pass), in bf16, TF32 and fp32 (:data:`GPU_ARITHMETIC`: "TF32"
  is float32 storage with TF32 tensor-core convolutions, what ``--precision fp32`` runs on a GPU
  by cuDNN's default; "fp32 (TF32 off)" is true float32): Mpx/s, executed TFLOP/s, % of the
  ceiling, peak GPU memory;
* end to end (≈ 1.5 min): ``unet predict`` (``predict_job``) from a 4 x 8192² uint16 Zarr stack to its
  part store: Mpx/s and its ratio to the in-memory rate, with and without the job's start-up (the
  block loop's rate as the job logs it); peak memory vs a 1 x 2048² stack;
* training (≈ 2 min): steady-state tiles/s of ``unet train`` vs a minimal loop (paper net, 572 -> 388,
  bf16), % of the ceiling; training steps only (validation and ``state.pt`` writes are not
  training time), and beside it the rate counting a ``state.pt`` write (timed in the run) every
  ``checkpoint_every`` (500) iterations;
* elastic deformation (< 0.2 min): batched 572² image + labels on the GPU vs one CPU thread;
* agreement (< 0.3 min, mostly the CPU fp32 reference): share of pixels where the GPU bf16
  argmax equals the CPU fp32 argmax (same net and slice).

Needs only the project's dependencies; MONAI is optional (its rows say "not installed").
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B  # noqa: E402

from unet_core.model.spec import UNetSpec  # noqa: E402


@dataclass(frozen=True)
class Settings:
    spec: UNetSpec
    slice_px: int
    stack: tuple[int, int]  # (slices, edge px) of the end-to-end stack
    small_px: int
    block_px: int
    tile_out: int
    batch: int
    train_tile_out: int
    train_batch: int
    train_iterations: int
    elastic_batch: int
    agreement_px: int
    repeats: int  # timed runs per row (the row reports their median)


FULL = Settings(UNetSpec(dropout=0.0), 8192, (4, 8192), 2048, 2048, 2048, 8, 388, 8, 90, 64, 1024, 3)
QUICK = Settings(UNetSpec(depth=2, base_channels=4, dropout=0.0), 256, (2, 256), 128, 128, 64, 2, 44, 2, 6, 4, 128, 2)
#: MONAI's windows per pass in its rows: 4 (its examples' setting) and 16 (16 x 512² = 4.2 Mpx per pass, a
#: fuller GPU; ours passes 8 tiles of 2232² in, 40 Mpx)
MONAI_SW_BATCHES = (4, 16)


#: The in-memory rows' arithmetic on a GPU: (row label, engine precision, TF32 on). cuDNN runs
#: float32 convolutions in TF32 unless told otherwise, and ``unet predict`` does not tell it, so
#: its fp32 on a GPU is the "TF32" row; the "fp32 (TF32 off)" row is true float32.
GPU_ARITHMETIC = (("bf16", "bf16", True), ("TF32", "fp32", True), ("fp32 (TF32 off)", "fp32", False))
#: On the CPU there is no TF32: one float32 row.
CPU_ARITHMETIC = (("fp32", "fp32", False),)


@contextlib.contextmanager
def section(name: str) -> Iterator[None]:
    """Print the wall time of the rows made inside the block (against the docstring's budgets)."""
    t0 = time.perf_counter()
    yield
    print(f"  [{name}: {time.perf_counter() - t0:.0f} s]", flush=True)


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []

    def add(self, name: str, value: str) -> None:
        self.rows.append((name, value))
        print(f"  {name:<44} {value}", flush=True)

    def markdown(self) -> str:
        return "\n".join(["| check | result |", "|---|---|", *(f"| {n} | {v} |" for n, v in self.rows)])


def pct(tflops: float, ceiling: float) -> str:
    return f"{100 * tflops / ceiling:.1f}% of ceiling"


def inference_rows(table: Table, s: Settings, device: torch.device, ceiling: float) -> float:
    image = np.random.default_rng(0).normal(size=(s.slice_px, s.slice_px)).astype(np.float32)
    best = 0.0
    for label, precision, allow_tf32 in GPU_ARITHMETIC if device.type == "cuda" else CPU_ARITHMETIC:
        with B.tf32(allow_tf32):
            best = max(best, _inference_row(table, s, image, device, ceiling, label, precision))
    return best


def _inference_row(table: Table, s: Settings, image: np.ndarray, device: torch.device, ceiling: float,
                   label: str, precision: str) -> float:
    """Ours (and on a GPU in bf16 ours compiled, and autotuned) against MONAI in one arithmetic; ours' Mpx/s."""
    kw = dict(precision=precision, batch=s.batch, block_px=s.block_px, tile_out=s.tile_out, repeats=s.repeats)
    with B.cudnn_benchmark(False):  # unet predict's setting
        ours = B.ours_in_memory(s.spec, image, device, **kw)
    mem = f", peak {ours.peak_gib:.1f} GiB" if ours.peak_gib is not None else ""
    table.add(f"in memory {s.slice_px}², ours {label}",
              f"{ours.mpx_per_s:.1f} Mpx/s, {ours.tflops:.0f} TFLOP/s, {pct(ours.tflops, ceiling)}{mem} "
              f"({ours.spread()})")
    if device.type == "cuda" and precision == "bf16":  # predict.compile: does it pay? (compiling costs ~1 min on a CPU)
        comp = B.ours_in_memory(s.spec, image, device, compile=True, **kw)
        table.add(f"in memory {s.slice_px}², ours {label} torch.compile",
                  f"{comp.mpx_per_s:.1f} Mpx/s, {comp.tflops:.0f} TFLOP/s; compiled/eager "
                  f"{comp.mpx_per_s / ours.mpx_per_s:.2f}x ({comp.spread()})")
        with B.cudnn_benchmark(True):  # would autotuning pay for unet predict? (it costs 1-K byte identity)
            tuned = B.ours_in_memory(s.spec, image, device, **kw)
        table.add(f"in memory {s.slice_px}², ours {label} cudnn.benchmark",
                  f"{tuned.mpx_per_s:.1f} Mpx/s; autotuned/default {tuned.mpx_per_s / ours.mpx_per_s:.2f}x "
                  f"({tuned.spread()})")
    for sw_batch in MONAI_SW_BATCHES:
        monai = B.monai_in_memory(s.spec, image, device, precision=precision, sw_batch=sw_batch, repeats=s.repeats)
        if monai is None:
            table.add(f"in memory {s.slice_px}², MONAI {label}", "not installed (pip install monai)")
            break
        table.add(f"in memory {s.slice_px}², MONAI {label} sw_batch {sw_batch}",
                  f"{monai.mpx_per_s:.1f} Mpx/s, {monai.tflops:.0f} TFLOP/s; ours/MONAI "
                  f"{ours.mpx_per_s / monai.mpx_per_s:.2f}x ({monai.spread()})")
    return ours.mpx_per_s


def end_to_end_rows(table: Table, s: Settings, device: torch.device, in_memory: float) -> None:
    z, edge = s.stack
    kw = dict(precision="auto", batch=s.batch, block_px=s.block_px, tile_out=s.tile_out)
    big = B.end_to_end(s.spec, B.smooth_stack(z, edge), device, repeats=s.repeats, **kw)
    table.add(f"unet predict {z} x {edge}² uint16, Zarr -> Zarr",
              f"{big.mpx_per_s:.1f} Mpx/s = {big.mpx_per_s / in_memory:.2f}x in memory ({big.spread()}); "
              f"block loop alone {big.loop_mpx_per_s:.1f} Mpx/s = {big.loop_mpx_per_s / in_memory:.2f}x")
    if device.type == "cuda":
        small = B.end_to_end(s.spec, B.smooth_stack(1, s.small_px), device, **kw)
        table.add(f"peak GPU memory {z} x {edge}² vs 1 x {s.small_px}²",
                  f"{big.peak_gib:.2f} / {small.peak_gib:.2f} GiB = {big.peak_gib / small.peak_gib:.2f}x")


def training_row(table: Table, s: Settings, device: torch.device, ceiling: float) -> None:
    r = B.training_rates(s.spec, device, tile_out=s.train_tile_out, batch=s.train_batch,
                         iterations=s.train_iterations, repeats=s.repeats)
    runs = (f"median of {len(r.ours_runs)}: {min(r.ours_runs):.1f}-{max(r.ours_runs):.1f}" if len(r.ours_runs) > 1
            else "1 run")
    tflops = r.tflops(r.ours)
    mem = f", peak {r.peak_gib:.1f} GiB" if r.peak_gib is not None else ""
    table.add(f"training {s.spec.input_size(s.train_tile_out)} -> {s.train_tile_out}, batch {s.train_batch}",
              f"unet train {r.ours:.1f} tiles/s ({runs}; {tflops:.0f} TFLOP/s, {pct(tflops, ceiling)}{mem}); minimal loop "
              f"{r.minimal:.1f} tiles/s; ratio {r.ours / r.minimal:.2f}x; steps only: {_with_checkpoints(r)}")


def _with_checkpoints(r: B.TrainingRates) -> str:
    """What the training row's rate leaves out, and the rate counting the checkpoint writes."""
    if r.checkpoint_seconds is None:
        return "validation and state.pt writes not counted"
    return (f"with a {r.checkpoint_seconds:.2f} s state.pt write every {r.checkpoint_every} iterations "
            f"{r.with_checkpoints(r.ours):.1f} tiles/s (validation not counted)")


def elastic_row(table: Table, s: Settings, device: torch.device) -> None:
    here = B.elastic_seconds_per_sample(device, batch=s.elastic_batch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu = B.elastic_seconds_per_sample(torch.device("cpu"), batch=min(4, s.elastic_batch), repeats=2)
    finally:
        torch.set_num_threads(threads)
    table.add(f"elastic deformation 572², batch {s.elastic_batch} ({device.type})",
              f"{here * 1e3:.2f} ms/sample; one CPU thread {cpu * 1e3:.1f} ms/sample ({cpu / here:.0f}x)")


def main(argv: list[str] | None = None) -> Table:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run of the same code)")
    parser.add_argument("--device", default="auto", help="auto (the GPU if any), cuda, cuda:N or cpu")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here (Markdown)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per row (default 3, --quick 2; 1 for a smoke run such as gpu-session.sh --dry-run)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cpu" and not args.quick:
        parser.error("no CUDA GPU here: run with --quick for a CPU smoke run, or on a GPU machine")
    s = QUICK if args.quick else FULL
    if args.repeats is not None:
        s = replace(s, repeats=max(1, args.repeats))
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check on {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    table = Table()
    ceiling = B.matmul_ceiling_tflops(device, n=8192 if device.type == "cuda" else 512)
    table.add("matmul ceiling (bf16 on GPU, fp32 on CPU)", f"{ceiling:.0f} TFLOP/s" if ceiling >= 1 else f"{ceiling:.3f} TFLOP/s")
    with section("inference in memory"):
        in_memory = inference_rows(table, s, device, ceiling)
    with section("end to end"):
        end_to_end_rows(table, s, device, in_memory)
    with section("training"), B.tf32(True):  # as unet train sets it; restored for the rows after it
        training_row(table, s, device, ceiling)
    with section("elastic deformation"):
        elastic_row(table, s, device)
    with section("agreement"):
        agree = B.argmax_agreement(s.spec, B.smooth_stack(1, s.agreement_px)[0].astype(np.float32), device,
                                   block_px=s.block_px, tile_out=min(s.tile_out, s.agreement_px))
    table.add(f"argmax {device.type} {'bf16' if device.type == 'cuda' else 'fp32'} vs CPU fp32, {s.agreement_px}²",
              f"{100 * agree:.3f}% of pixels agree")
    table.add("wall time of this check", f"{time.perf_counter() - t0:.0f} s")
    if args.markdown:
        args.markdown.write_text(table.markdown() + "\n")
    return table


if __name__ == "__main__":
    main()
