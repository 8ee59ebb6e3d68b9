"""Benchmark of overlap-tile inference (issue 8): exactness, throughput, FLOP overhead, memory.

Run: ``.venv/bin/python benchmarks/bench_predict.py [--size 2048] [--base-channels 64]``

Side by side in one run, on one random (He-initialised) paper U-Net and one random slice:

* ``whole``: one monolithic pass over the mirror-padded slice (the reference);
* ``ours``: :func:`unet_core.infer.predict.predict_plane` at the default block/tile sizes;
* ``paper-388``: the paper's 388-px output tiles stepped by 388 px (origins not multiples of
  16), on a corner of the slice: how large the seams are;
* ``monai``: the typical MONAI set-up, a same-padded U-Net of the same widths run with
  ``sliding_window_inference`` (roi 512, overlap 0.25, gaussian blending); skipped with a
  message if MONAI is not installed (``.venv/bin/pip install --no-deps monai``).

Prints max |tiled - whole|, output Mpx/s and ratios, the analytic FLOP overhead per output
pixel at several tile sizes, and the peak RSS of ``unet predict`` jobs on a small and a
large stack (a narrow net, same block/tile/batch: memory must not grow with the stack).
On a GPU it also reports bf16 and fp32 Mpx/s for ours and MONAI. Timings are never asserted.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unet_core.common.geometry import Box
from unet_core.common.intensity import IntensityStats
from unet_core.common.mirror import mirror_pad
from unet_core.infer.predict import predict_plane, predict_tiles
from unet_core.infer.tiling import Tiling
from unet_core.model.spec import UNetSpec
from unet_core.model.unet import UNet

DEFAULT_BLOCK, DEFAULT_TILE = 2048, 1024


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def whole_pass(model: UNet, image: np.ndarray, device: torch.device, bf16: bool = False) -> np.ndarray:
    spec = model.spec
    pads = [(spec.context, spec.context + spec.valid_output_size_at_least(n) - n) for n in image.shape]
    x = torch.from_numpy(mirror_pad(image, pads))[None, None].to(device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        probs = torch.softmax(model(x).float(), dim=1)[0].cpu().numpy()
    return probs[:, : image.shape[0], : image.shape[1]]


def monai_pass(image: np.ndarray, base: int, device: torch.device, bf16: bool = False):
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        return None
    torch.manual_seed(1)
    model = UNet(UNetSpec(base_channels=base, padding="same", dropout=0.0)).eval().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    x = torch.from_numpy(image)[None, None].to(device)

    def run():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = sliding_window_inference(
                x, roi_size=(512, 512), sw_batch_size=4 if device.type == "cuda" else 1,
                predictor=model, overlap=0.25, mode="gaussian",
            )
            out = torch.softmax(out.float(), dim=1).cpu()
        return out

    return run


def paper_388_error(model: UNet, image: np.ndarray, whole: np.ndarray) -> tuple[float, float, float]:
    """Max |diff|, share of pixels off by > 1e-3, and output std, for 388-px tiles at 388-px steps."""
    spec = model.spec
    span = min(2 * 388, image.shape[0]), min(2 * 388, image.shape[1])
    out_box = Box((0, 0), span)
    tiles = [Box((y, x), (388, 388)) for y in range(0, span[0], 388) for x in range(0, span[1], 388)]
    margin = spec.context + 16
    padded = mirror_pad(image, margin)
    big = Box((-margin, -margin), padded.shape)
    got = predict_tiles(model, padded, big, tiles, spec=spec, out_box=out_box, device=torch.device("cpu"))
    ref = whole[:, : span[0], : span[1]]
    diff = np.abs(got - ref)
    return float(diff.max()), float((diff > 1e-3).mean()), float(ref.std())


def memory_run(size: int, workdir: Path, *, base: int, block_px: int, tile_out: int) -> float:
    """Peak RSS (MiB) of a fresh process running one ``predict_job`` on a (1, size, size) stack."""
    code = f"""
import numpy as np, torch, zarr
from unet_core.io.ngff import PyramidWriter
from unet_core.model.spec import UNetSpec
from unet_core.model.unet import UNet
from unet_core.model.checkpoint import save_model
w = r"{workdir}"
rng = np.random.default_rng(0)
root = zarr.open_group(w + "/stack{size}.ome.zarr", mode="w")
pw = PyramidWriter(root, (1, {size}, {size}), np.uint8, (1, 512, 512), (1.0, 1.0, 1.0), levels=1)
for y in range(0, {size}, 1024):  # write in bands so the writer's own memory stays small
    pw.arrays[0][0, y:y + 1024] = rng.integers(0, 255, (min(1024, {size} - y), {size}), dtype=np.uint8)
pw.finish(); root.attrs.update({{"unet": {{"intensity": {{"mean": 127.0, "std": 73.0}}}}}})
torch.manual_seed(0)
save_model(w + "/narrow.pt", UNet(UNetSpec(base_channels={base}, dropout=0.0)))
def hwm():  # this process's own peak RSS in KiB (ru_maxrss would include the forking parent's peak)
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
base_rss = hwm()
from unet_core.infer.predict import predict_job
s = predict_job(w + "/stack{size}.ome.zarr", w + "/narrow.pt", w + "/part{size}", block_px={block_px},
                tile_out={tile_out}, batch=1, device="cpu")
print("RSS", hwm() / 1024, base_rss / 1024, s.mpx_per_s)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("RSS")][-1].split()
    return float(line[1]), float(line[2]), float(line[3])


def cpu_section(args: argparse.Namespace, spec: UNetSpec) -> None:
    """Exactness and throughput on the CPU: whole pass, ours, paper-388 seams, MONAI."""
    torch.manual_seed(0)
    model = UNet(spec).eval()
    cpu = torch.device("cpu")
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(args.size, args.size)).astype(np.float32)
    stats = IntensityStats(0.0, 1.0)
    mpx = args.size**2 / 1e6
    print(f"\n== CPU fp32, {args.size}x{args.size} slice, paper U-Net base {args.base_channels} "
          "(random He init)")
    whole, t_whole = timed(lambda: whole_pass(model, raw, cpu))
    print(f"  whole (monolithic, mirror-padded): {t_whole:7.1f} s  {mpx / t_whole:.4f} Mpx/s")
    ours, t_ours = timed(lambda: predict_plane(model, raw, stats=stats, block_px=DEFAULT_BLOCK,
                                               tile_out=DEFAULT_TILE, device=cpu)[:, 0])
    print(f"  ours (block {DEFAULT_BLOCK}, tile {DEFAULT_TILE}):       {t_ours:7.1f} s  "
          f"{mpx / t_ours:.4f} Mpx/s"
          f"  max |ours - whole| = {np.abs(ours - whole).max():.3g}")
    print(f"  ratio ours / whole throughput: {t_whole / t_ours:.2f}x (target >= 1.0x)")
    err, share, std = paper_388_error(model, raw, whole)
    print(f"  paper-388 (388-px tiles at 388-px steps, {min(776, args.size)}^2 corner): "
          f"max |diff| = {err:.3g} "
          f"({err / std:.1f}x the output std {std:.3g}), {share:.0%} of pixels off by > 1e-3")
    run = monai_pass(raw, args.base_channels, cpu)
    if run is None:
        print("  monai: skipped (MONAI not installed; .venv/bin/pip install --no-deps monai)")
    else:
        _, t_monai = timed(run)
        print(f"  monai sliding_window_inference (same-padded, roi 512, overlap 0.25, gaussian): "
              f"{t_monai:7.1f} s  {mpx / t_monai:.4f} Mpx/s")
        print(f"  ratio ours / monai throughput: {t_monai / t_ours:.2f}x (target >= 1.0x)")


def gpu_section(args: argparse.Namespace, spec: UNetSpec) -> None:
    """bf16 and fp32 throughput of ours and MONAI on a GPU, if there is one."""
    rng = np.random.default_rng(0)
    stats = IntensityStats(0.0, 1.0)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        size = 8192
        img = rng.normal(size=(size, size)).astype(np.float32)
        gmodel = UNet(spec).eval()
        print(f"\n== GPU {torch.cuda.get_device_name()} {size}x{size}")
        for prec in ("bf16", "fp32"):
            warm = img[:2048, :2048]
            predict_plane(gmodel, warm, stats=stats, device=gpu, precision=prec, batch=8)
            torch.cuda.synchronize()
            _, t = timed(lambda: predict_plane(gmodel, img, stats=stats, device=gpu, precision=prec, batch=8))
            rate = size**2 / 1e6 / t
            per_px = Tiling((1, size, size), spec).flops_overhead() * spec.ideal_flops_per_output_pixel()
            tflops = rate * 1e6 * per_px / 1e12
            print(f"  ours {prec}: {rate:.1f} Mpx/s ({tflops:.0f} TFLOP/s incl. overlap)")
            mrun = monai_pass(img, args.base_channels, gpu, bf16=prec == "bf16")
            if mrun is not None:
                mrun()
                _, tm = timed(mrun)
                print(f"  monai {prec}: {size**2 / 1e6 / tm:.1f} Mpx/s; ratio ours / monai {tm / t:.2f}x")
    else:
        print("\n== GPU: none on this machine (bf16/channels_last path not measured)")


def memory_section(args: argparse.Namespace) -> None:
    """Peak RSS of one predict job on a small and a large stack (fresh processes)."""
    sizes = [int(s) for s in args.memory_sizes.split(",")]
    print(f"\n== Peak RSS of one predict job (CPU, base {args.memory_base_channels}, "
          f"block {DEFAULT_BLOCK}, "
          f"tile {DEFAULT_TILE}, batch 1)")
    with tempfile.TemporaryDirectory() as tmp:
        rss = {}
        for size in sizes:
            peak, before, rate = memory_run(size, Path(tmp), base=args.memory_base_channels,
                                            block_px=DEFAULT_BLOCK, tile_out=DEFAULT_TILE)
            rss[size] = peak
            print(f"  {size}x{size}: peak RSS {peak:.0f} MiB (before predicting {before:.0f} MiB), "
                  f"{rate:.2f} Mpx/s")
        for small in sizes[:-1]:
            print(f"  ratio {sizes[-1]} / {small}: {rss[sizes[-1]] / rss[small]:.2f}x (target <= 1.2x)")
        print("  (a stack of one block has no second block in flight in the prefetching reader and the "
              "writer; from two blocks on, memory no longer grows with the stack)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="slice edge in px (issue: 2048)")
    parser.add_argument("--base-channels", type=int, default=64, help="U-Net width (paper: 64)")
    parser.add_argument("--memory-sizes", default="2048,8192", help="stack edges for the RSS check, px")
    parser.add_argument("--memory-base-channels", type=int, default=8, help="net width for the RSS check")
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak-RSS check")
    parser.add_argument("--skip-cpu", action="store_true", help="skip the CPU exactness/throughput runs")
    args = parser.parse_args()
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {now}")

    spec = UNetSpec(base_channels=args.base_channels, dropout=0.0)
    ideal = spec.ideal_flops_per_output_pixel()
    print(f"\n== FLOP overhead per output pixel vs an infinite image (ideal {ideal / 1e6:.3f} MFLOP/px)")
    for tile in (384, 768, 1024, 1152, 1536, 2048):
        t = Tiling((1, 8192, 8192), spec, block_px=max(tile, DEFAULT_BLOCK), tile_out=tile)
        mark = "  <- default" if tile == DEFAULT_TILE else ""
        out_px = spec.valid_output_size_at_least(tile)
        print(f"  tile {tile:5d} px (net output {out_px}): {t.flops_overhead():.3f}x{mark}")

    if not args.skip_cpu:
        cpu_section(args, spec)
    gpu_section(args, spec)
    if not args.skip_memory:
        memory_section(args)


if __name__ == "__main__":
    main()
