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
* ``ours in bf16``: the same on a CPU with native bf16 (AMX / AVX512-BF16), where
  ``--precision bf16`` is honoured; its rate against ours in fp32 and the argmax agreement.

Prints max |tiled - whole|, output Mpx/s and ratios, the analytic FLOP overhead per output
pixel at several tile sizes, and the peak RSS of ``unet predict`` jobs on a small and a
large stack (a narrow net, same block/tile/batch: memory must not grow with the stack).

``--sections host`` measures the host side of ``unet predict`` on the CPU, one thread, a
2 x 4096² uint16 stack, in fresh processes: (a) the CPU time (all threads) of a
``predict_job`` with a depth-1, width-1 network over the CPU time of that network's forward
passes alone on the same tiles, in the engine's channels-last layout (NCHW shown beside); (b) the
same job with a zero-cost network (a benchmark-only module returning the valid-geometry crop of
its input) in CPU-ms per output Mpx. A two-class job runs the network with its head folded to
the logit margin (one output channel, less work than the forward in (a)): its forward is shown
beside, so the host overhead proper is job / that forward. Process
start-up (Python and torch imports, ~2 CPU-s) is outside both.

On a GPU (``--sections gpu``) it reports, through ``benchmarks/benchlib.py``, bf16 and fp32
Mpx/s of ours and MONAI in memory and of ``unet predict`` end to end; ``gpu_check.py`` runs
the same measurements as one acceptance table. Timings are never asserted.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B  # noqa: E402

from unet_core.common.geometry import Box  # noqa: E402
from unet_core.common.intensity import IntensityStats  # noqa: E402
from unet_core.common.mirror import mirror_pad  # noqa: E402
from unet_core.common.precision import cpu_has_native_bf16  # noqa: E402
from unet_core.infer.predict import predict_plane  # noqa: E402
from unet_core.infer.tiling import Tiling, tile_read_box  # noqa: E402
from unet_core.model.spec import UNetSpec  # noqa: E402
from unet_core.model.unet import UNet  # noqa: E402

DEFAULT_BLOCK, DEFAULT_TILE = 2048, 1024


def paper_388_error(model: UNet, image: np.ndarray, whole: np.ndarray) -> tuple[float, float, float]:
    """Max |diff|, share of pixels off by > 1e-3, and output std, for 388-px tiles at 388-px steps
    (origins not multiples of 16: the paper's tiling, which our tiler never produces)."""
    spec = model.spec
    span = min(2 * 388, image.shape[0]), min(2 * 388, image.shape[1])
    margin = spec.context + 16
    padded = mirror_pad(image, margin)
    got = np.zeros((spec.n_classes, *span), np.float32)
    for y in range(0, span[0], 388):
        for x in range(0, span[1], 388):
            tile = Box((y, x), (388, 388))
            read = tile_read_box(tile, spec).shift((margin, margin))
            inp = torch.from_numpy(np.ascontiguousarray(padded[read.to_slices()]))[None, None]
            with torch.inference_mode():
                probs = torch.softmax(model(inp), dim=1)[0].numpy()
            keep = tile.intersect(Box((0, 0), span))
            got[(slice(None), *keep.to_slices())] = probs[(slice(None), *keep.relative_to(tile).to_slices())]
    ref = whole[:, : span[0], : span[1]]
    diff = np.abs(got - ref)
    return float(diff.max()), float((diff > 1e-3).mean()), float(ref.std())


HOST_CHILD = """
import sys, time, tempfile
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, {bench!r})
import benchlib as B
import unet_core.infer.predict as P
from unet_core.infer.tiling import Tiling, tile_read_box
from unet_core.model.checkpoint import save_model
from unet_core.model.spec import UNetSpec
spec = UNetSpec(depth=1, base_channels=1, dropout=0.0)
w = Path(tempfile.mkdtemp(dir={workdir!r}))
volume = B.smooth_stack({slices}, {size})
stack = B.write_stack(w / "stack.ome.zarr", volume)
model = B.random_net(spec)
save_model(w / "model.pt", model)
class ZeroCost(torch.nn.Module):
    def __init__(self, spec):
        super().__init__(); self.spec = spec
    def forward(self, x):
        c = self.spec.context
        return x[..., c : x.shape[-2] - c, c : x.shape[-1] - c].expand(-1, self.spec.n_classes, -1, -1)
if {zero!r}:
    P.load_model = lambda path, expect=None: (ZeroCost(spec), {{}})
t0 = time.process_time()
P.predict_job(stack, w / "model.pt", w / "part", device="cpu")
job = time.process_time() - t0
fwd, fwd_nchw, fwd_margin = 0.0, 0.0, 0.0
if not {zero!r}:
    tiling = Tiling(volume.shape, spec, 2048, 1024)
    inputs = [torch.randn(1, 1, *tile_read_box(t, spec).shape) for b in tiling.blocks() for t in tiling.tiles(b)]
    def forwards(net):
        t0 = time.process_time()
        with torch.inference_mode():
            for x in inputs:
                net(x)
        return time.process_time() - t0
    fwd_nchw = forwards(model)
    fwd = forwards(model.to(memory_format=torch.channels_last))  # the engine's layout
    fwd_margin = forwards(model.margin)  # what a two-class job runs: the head folded to one output
print("RESULT", job, fwd, fwd_nchw, fwd_margin, volume.size)
"""


def host_run(*, zero: bool, slices: int, size: int, workdir: str) -> tuple[float, float, float, float, int]:
    """(CPU-s of the predict job, CPU-s of the network's forwards alone in the engine's
    channels-last layout, in NCHW, and of its folded-head margin, output px) in a fresh process."""
    code = HOST_CHILD.format(bench=str(Path(__file__).resolve().parent), workdir=workdir, slices=slices,
                             size=size, zero=zero)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    _, job, fwd, fwd_nchw, fwd_margin, px = [l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1].split()
    return float(job), float(fwd), float(fwd_nchw), float(fwd_margin), int(px)


def host_section(args: argparse.Namespace) -> None:
    """CPU host overhead of unet predict: figures (a) and (b), one thread, best of --host-repeats."""
    print(f"\n== Host side of unet predict, CPU, 1 thread, {args.host_slices} x {args.host_size}² uint16 "
          f"(best of {args.host_repeats} fresh processes each)")
    with tempfile.TemporaryDirectory() as tmp:
        runs = [host_run(zero=False, slices=args.host_slices, size=args.host_size, workdir=tmp)
                for _ in range(args.host_repeats)]
        zero = [host_run(zero=True, slices=args.host_slices, size=args.host_size, workdir=tmp)
                for _ in range(args.host_repeats)]
    job, fwd, fwd_nchw, fwd_margin, px = min(runs, key=lambda r: r[0] / r[1])
    print(f"  (a) depth-1 width-1 net: predict job {job:.2f} CPU-s, forward alone {fwd:.2f} CPU-s in the "
          f"engine's channels-last layout: {job / fwd:.2f}x (target <= 1.30x); all runs "
          f"{', '.join(f'{r[0] / r[1]:.2f}x' for r in runs)}")
    print(f"      (the same forwards in NCHW: {fwd_nchw:.2f} CPU-s, job / NCHW forward {job / fwd_nchw:.2f}x)")
    print(f"      (what the job runs, the head folded to the logit margin: {fwd_margin:.2f} CPU-s; the job's "
          f"own overhead, job / margin forward {job / fwd_margin:.2f}x)")
    z_job, _, _, _, px = min(zero)
    print(f"  (b) zero-cost net: {1000 * z_job / (px / 1e6):.1f} CPU-ms per output Mpx (target <= 30); "
          f"all runs {', '.join(f'{1000 * r[0] / (px / 1e6):.1f}' for r in zero)}")


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
    model = B.random_net(spec)
    cpu = torch.device("cpu")
    raw = np.random.default_rng(0).normal(size=(args.size, args.size)).astype(np.float32)
    mpx = args.size**2 / 1e6
    print(f"\n== CPU fp32, {args.size}x{args.size} slice, paper U-Net base {args.base_channels} "
          "(random He init)")
    whole, t_whole = B.timed(lambda: B.whole_image_probabilities(model, raw, cpu), cpu)
    print(f"  whole (monolithic, mirror-padded): {t_whole:7.1f} s  {mpx / t_whole:.4f} Mpx/s")
    ours, t_ours = B.timed(lambda: predict_plane(model, raw, stats=IntensityStats(0.0, 1.0), block_px=DEFAULT_BLOCK,
                                                 tile_out=DEFAULT_TILE, device=cpu)[:, 0], cpu)
    print(f"  ours (block {DEFAULT_BLOCK}, tile {DEFAULT_TILE}):       {t_ours:7.1f} s  {mpx / t_ours:.4f} Mpx/s"
          f"  max |ours - whole| = {np.abs(ours - whole).max():.3g}")
    print(f"  ratio ours / whole throughput: {t_whole / t_ours:.2f}x (target >= 1.0x)")
    err, share, std = paper_388_error(model, raw, whole)
    print(f"  paper-388 (388-px tiles at 388-px steps, {min(776, args.size)}^2 corner): max |diff| = {err:.3g} "
          f"({err / std:.1f}x the output std {std:.3g}), {share:.0%} of pixels off by > 1e-3")
    if cpu_has_native_bf16():  # AMX / AVX512-BF16: predict --precision bf16 is honoured on this CPU
        bf16, t_bf16 = B.timed(lambda: predict_plane(model, raw, stats=IntensityStats(0.0, 1.0), block_px=DEFAULT_BLOCK,
                                                     tile_out=DEFAULT_TILE, device=cpu, precision="bf16")[:, 0], cpu)
        agree = float((bf16.argmax(axis=0) == ours.argmax(axis=0)).mean())
        print(f"  ours in bf16 (native on this CPU):  {t_bf16:7.1f} s  {mpx / t_bf16:.4f} Mpx/s = {t_ours / t_bf16:.2f}x "
              f"ours fp32; max |bf16 - fp32| = {np.abs(bf16 - ours).max():.3g}, argmax agreement {agree:.4%}")
    else:
        print("  ours in bf16: skipped (this CPU has no native bf16; predict computes in fp32 here)")
    monai = B.monai_in_memory(spec, raw, cpu, precision="fp32", sw_batch=1)
    if monai is None:
        print("  monai: skipped (MONAI not installed; .venv/bin/pip install --no-deps monai)")
    else:
        print(f"  monai sliding_window_inference (same-padded, roi 512, overlap 0.25, gaussian): "
              f"{monai.mpx_per_s:.4f} Mpx/s; ratio ours / monai throughput: "
              f"{mpx / t_ours / monai.mpx_per_s:.2f}x (target >= 1.0x)")


def gpu_section(args: argparse.Namespace, spec: UNetSpec) -> None:
    """In-memory and end-to-end rates of ours and MONAI on a GPU (benchlib; as gpu_check.py)."""
    if not torch.cuda.is_available():
        print("\n== GPU: none on this machine (bf16/channels_last path not measured; see gpu_check.py)")
        return
    gpu = torch.device("cuda")
    ceiling = B.matmul_ceiling_tflops(gpu)
    size = args.gpu_size
    image = np.random.default_rng(0).normal(size=(size, size)).astype(np.float32)
    print(f"\n== GPU {torch.cuda.get_device_name()}: {size}² slice, bf16 matmul ceiling {ceiling:.0f} TFLOP/s")
    for prec in ("bf16", "fp32"):
        ours = B.ours_in_memory(spec, image, gpu, precision=prec, batch=args.gpu_batch, block_px=args.gpu_block,
                                tile_out=args.gpu_tile)
        line = (f"  ours {prec}: {ours.mpx_per_s:.1f} Mpx/s, {ours.tflops:.0f} TFLOP/s "
                f"({100 * ours.tflops / ceiling:.1f}% of ceiling), peak {ours.peak_gib:.1f} GiB")
        monai = B.monai_in_memory(spec, image, gpu, precision=prec)
        if monai is not None:
            line += f"; MONAI {monai.mpx_per_s:.1f} Mpx/s, ours/MONAI {ours.mpx_per_s / monai.mpx_per_s:.2f}x"
        print(line)
    e2e = B.end_to_end(spec, B.smooth_stack(4, size), gpu, precision="auto", batch=args.gpu_batch,
                       block_px=args.gpu_block, tile_out=args.gpu_tile)
    print(f"  unet predict 4 x {size}² uint16 Zarr -> Zarr: {e2e.mpx_per_s:.1f} Mpx/s, peak {e2e.peak_gib:.1f} GiB")


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


SECTIONS = ("flops", "host", "cpu", "gpu", "memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--size", type=int, default=2048, help="CPU slice edge in px (issue: 2048)")
    parser.add_argument("--base-channels", type=int, default=64, help="U-Net width (paper: 64)")
    parser.add_argument("--memory-sizes", default="2048,8192", help="stack edges for the RSS check, px")
    parser.add_argument("--memory-base-channels", type=int, default=8, help="net width for the RSS check")
    parser.add_argument("--host-size", type=int, default=4096, help="edge of the host-overhead stack, px")
    parser.add_argument("--host-slices", type=int, default=2, help="slices of the host-overhead stack")
    parser.add_argument("--host-repeats", type=int, default=3, help="fresh processes per host figure")
    parser.add_argument("--gpu-size", type=int, default=8192, help="GPU slice edge, px")
    parser.add_argument("--gpu-block", type=int, default=2048)
    parser.add_argument("--gpu-tile", type=int, default=2048)
    parser.add_argument("--gpu-batch", type=int, default=8)
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {now}")
    spec = UNetSpec(base_channels=args.base_channels, dropout=0.0)
    if "flops" in sections:
        ideal = spec.ideal_flops_per_output_pixel()
        print(f"\n== FLOP overhead per output pixel vs an infinite image (ideal {ideal / 1e6:.3f} MFLOP/px)")
        for tile in (384, 768, 1024, 1152, 1536, 2048):
            t = Tiling((1, 8192, 8192), spec, block_px=max(tile, DEFAULT_BLOCK), tile_out=tile)
            mark = "  <- default" if tile == DEFAULT_TILE else ""
            out_px = spec.valid_output_size_at_least(tile)
            print(f"  tile {tile:5d} px (net output {out_px}): {t.flops_overhead():.3f}x{mark}")
    if "host" in sections:
        host_section(args)
    if "cpu" in sections:
        cpu_section(args, spec)
    if "gpu" in sections:
        gpu_section(args, spec)
    if "memory" in sections:
        memory_section(args)


if __name__ == "__main__":
    main()
