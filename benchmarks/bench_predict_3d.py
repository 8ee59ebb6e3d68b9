"""CPU inference of a 3-D U-Net (issue 36): our overlap tiles vs MONAI's sliding window, one run.

Run: ``.venv/bin/python benchmarks/bench_predict_3d.py [--shape 32x256x256] [--repeats 3]``

The issue's target: "CPU inference of a 3-D net (base 32, depth 3, the z pooling the synthetic
profile uses), our tiles vs MONAI's ``sliding_window_inference`` with a same-padded twin of the
net (roi equal to our input tile, overlap 0.25, gaussian, sw_batch 1), same volume, side by side
in one run: >= 1.0x."

* The net: ``UNetSpec(dims=3, depth=3, base_channels=32)``, random He-initialised weights (speed
  does not depend on them), fp32, two classes. z pooling: the synthetic 3-D profile (not written
  yet) has a z spacing 4x the in-plane spacing (2.0 vs 0.5 um). By default the z geometry is the
  project's rule for those voxels (:func:`unet_core.model.spec.z_geometry_for`, nnU-Net's: no z
  pooling and 1-px z kernels while the z spacing is >= 2x the in-plane one at that level), which at
  depth 3 gives ``pool_z (1, 1, 2)``, ``kernel_z (1, 1, 3, 3)`` (``--spacing-um`` changes the
  voxels). ``--pool-z`` / ``--kernel-z`` set them directly, e.g. ``1,2,2`` / ``1,3,3,3`` (z pooled
  at level 2 too, where z is exactly 2x the in-plane spacing: the rule, and
  :func:`unet_core.model.spec.check_z_geometry`, refuse that for these voxels; measured as well in
  benchmarks/RESULTS.md).
* ours: the :class:`unet_core.infer.engine.Engine` over a :class:`Tiling` of the in-memory
  volume (``--block``/``--block-z`` blocks, ``--tile``/``--tile-z`` output tiles, batch 1),
  through :func:`unet_core.infer.engine.run_blocks` as ``unet predict`` drives it, the results
  copied into one (2, Z, Y, X) float32 array.
* monai: the same-padded twin of the net (:func:`benchlib.same_padded_twin`: same dims, pools,
  kernels and widths, built by our UNet class, channels-last-3d like our engine) through
  ``monai.inferers.sliding_window_inference`` with roi = our input tile shape rounded *down* per
  axis to a multiple of the twin's stride along it (its inputs must be; rounding down never gives
  MONAI a larger window than our input tile), overlap 0.25, gaussian, sw_batch_size 1; softmax
  on its output. Skipped with a message where MONAI is not installed
  (``.venv/bin/pip install --no-deps monai``).

Both get the same float32 volume (normalised: mean 0, std 1; ours normalises it again per slice
with (0, 1), as it would a stored stack). The runs alternate (ours, monai, ours, ...) after one
untimed warm-up pass of each on one tile/window; the medians of ``--repeats`` runs are printed as
output Mvoxel/s with the ratio ours / MONAI, and the voxels each feeds its network per output voxel.

``--rss-shapes`` runs our engine alone in a fresh process per shape on a Zarr volume (chunks of
one block) and writes the results to Zarr, and prints each process's peak RSS (VmHWM: the
process's own high-water mark, which ``ru_maxrss`` after fork + exec may not be): a first look at
the issue's "flat RSS from 256^3 to 1024 x 1024 x 128" target at sizes this CPU can run.

Torch runs on ``--threads`` threads (default 2). Timings are never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B  # noqa: E402

from unet_core.common.intensity import IntensityStats  # noqa: E402
from unet_core.infer.engine import Engine, run_blocks  # noqa: E402
from unet_core.infer.tiling import Tiling, tile_read_box  # noqa: E402
from unet_core.model.spec import UNetSpec, z_geometry_for  # noqa: E402

CPU = torch.device("cpu")


def shape3(text: str) -> tuple[int, int, int]:
    z, y, x = (int(v) for v in text.lower().split("x"))
    return z, y, x


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def make_spec(args: argparse.Namespace) -> UNetSpec:
    """The benchmark's 3-D net: ``--pool-z`` / ``--kernel-z`` where given, else the project's z rule
    for ``--spacing-um`` (:func:`z_geometry_for`)."""
    pool_z, kernel_z = z_geometry_for(args.depth, args.spacing_um)
    return UNetSpec(depth=args.depth, base_channels=args.base_channels, dropout=0.0, dims=3,
                    pool_z=args.pool_z or pool_z, kernel_z=args.kernel_z or kernel_z)


def make_tiling(shape: tuple[int, int, int], spec: UNetSpec, args: argparse.Namespace) -> Tiling:
    return Tiling(shape, spec, block_px=args.block, tile_out=args.tile, block_z=args.block_z, tile_z=args.tile_z)


def input_tile(tiling: Tiling) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(write shape, input shape) of the first tile of the first block: what one network pass
    keeps and what it reads."""
    block = next(tiling.blocks())
    tile = tiling.tiles(block)[0]
    return tile.shape, tile_read_box(tile, tiling.spec).shape


def monai_roi(spec: UNetSpec, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Our input tile shape rounded down per axis to a multiple of the same-padded twin's stride."""
    twin = B.same_padded_twin(spec)
    return tuple(max(a.stride, n // a.stride * a.stride) for a, n in zip(twin.axes, in_shape, strict=True))


def ours_runner(model: torch.nn.Module, volume: np.ndarray, tiling: Tiling):
    """``run()``: the engine over every block of the in-memory volume, as unet predict drives it
    (reader and writer threads), the probabilities gathered into one (C, Z, Y, X) array."""
    engine = Engine(model, tiling, stats=IntensityStats(0.0, 1.0), device=CPU, batch=1)
    blocks = list(tiling.blocks())

    def run() -> np.ndarray:
        out = np.empty((model.spec.n_classes, *volume.shape), np.float32)

        def write(result) -> None:
            out[(slice(None), *result.block.write.to_slices())] = result.probabilities

        run_blocks(engine, volume, blocks, write, desc="ours")
        return out

    return engine, run


def n_tiles(tiling: Tiling) -> int:
    return sum(len(tiling.tiles(b)) for b in tiling.blocks())


def speed_section(args: argparse.Namespace, spec: UNetSpec) -> None:
    shape = args.shape
    voxels = math.prod(shape)
    tiling = make_tiling(shape, spec, args)
    write, inp = input_tile(tiling)
    roi = monai_roi(spec, inp)
    tiles = n_tiles(tiling)
    print(f"\n== Speed, CPU fp32, {args.threads} threads: volume {'x'.join(map(str, shape))} (Z x Y x X) = "
          f"{voxels:,} voxels ({voxels / 1e6:.2f} Mvoxel), float32, mean 0, std 1")
    print(f"  ours: blocks {args.block_z}x{args.block}x{args.block}, output tiles up to "
          f"{tiling.tile_z}x{args.tile}x{args.tile}; this volume: {tiling.n_blocks} block(s), {tiles} tile(s) of "
          f"{'x'.join(map(str, write))} output, input tile {'x'.join(map(str, inp))}, batch 1")
    print(f"        net input voxels per output voxel: {tiles * math.prod(inp) / voxels:.2f}")
    rng = np.random.default_rng(0)
    volume = rng.normal(size=shape).astype(np.float32)
    model = B.random_net(spec)
    engine, ours = ours_runner(model, volume, tiling)
    monai = B.monai_predictor(spec, CPU, roi, sw_batch=1, overlap=0.25, mode="gaussian")
    if monai is None:
        print("  monai: skipped (MONAI not installed: .venv/bin/pip install --no-deps monai)")
    else:
        windows = B.monai_window_count(shape, roi, 0.25)
        padded = [n < r for n, r in zip(shape, roi)]
        pad_note = (f"; the volume is thinner than the roi along {', '.join(a for a, p in zip('zyx', padded) if p)}: "
                    "MONAI pads it up to the roi there") if any(padded) else ""
        print(f"  monai: roi {'x'.join(map(str, roi))} (our input tile {'x'.join(map(str, inp))} rounded down to a "
              f"multiple of the twin's strides {tuple(a.stride for a in B.same_padded_twin(spec).axes)}), overlap 0.25, "
              f"gaussian, sw_batch 1: {windows} window(s){pad_note}")
        print(f"        net input voxels per output voxel: {windows * math.prod(roi) / voxels:.2f}")
    # warm-up (untimed): one pass of each network on one tile / window shape
    with torch.inference_mode():
        x = torch.zeros((1, 1, *inp)).contiguous(memory_format=torch.channels_last_3d)
        engine._margin_net(x)
        if monai is not None:
            monai.model(torch.zeros((1, 1, *roi)).contiguous(memory_format=torch.channels_last_3d))
    t_ours, t_monai = [], []
    for k in range(args.repeats):
        out, t = B.timed(ours, CPU)
        t_ours.append(t)
        assert out.shape == (2, *shape) and np.isfinite(out).all()
        line = f"  run {k + 1}: ours {t:7.1f} s ({voxels / t / 1e6:.4f} Mvoxel/s)"
        if monai is not None:
            out, t = B.timed(lambda: monai(volume), CPU)
            t_monai.append(t)
            assert tuple(out.shape) == (2, *shape)
            line += f", monai {t:7.1f} s ({voxels / t / 1e6:.4f} Mvoxel/s)"
        print(line, flush=True)
    r_ours = voxels / statistics.median(t_ours) / 1e6
    print(f"  ours:  {r_ours:.4f} Mvoxel/s (median of {len(t_ours)}: "
          f"{voxels / max(t_ours) / 1e6:.4f}-{voxels / min(t_ours) / 1e6:.4f})")
    if monai is not None:
        r_monai = voxels / statistics.median(t_monai) / 1e6
        print(f"  monai: {r_monai:.4f} Mvoxel/s (median of {len(t_monai)}: "
              f"{voxels / max(t_monai) / 1e6:.4f}-{voxels / min(t_monai) / 1e6:.4f})")
        print(f"  ratio ours / monai throughput: {r_ours / r_monai:.2f}x (target >= 1.0x)")


def forward_flops(spec: UNetSpec, in_shape: tuple[int, ...], *, margin: bool) -> float:
    """FLOPs of one forward pass (torch's FlopCounterMode on the meta device: nothing computed);
    ``margin``: through the folded two-class head, as our engine runs it."""
    from torch.utils.flop_counter import FlopCounterMode

    from unet_core.model.unet import UNet

    with torch.device("meta"):
        model = UNet(spec).eval()
        x = torch.empty((1, 1, *in_shape))
        with FlopCounterMode(display=False) as counter:
            model.margin(x) if margin else model(x)
    return float(counter.get_total_flops())


def flops_section(args: argparse.Namespace, spec: UNetSpec) -> None:
    """Executed FLOPs per output voxel of each method (analytic, no timing) at the benchmark's
    volume and at thicker ones (``--flops-shapes``): where the speed ratio comes from."""
    shapes = [args.shape] + [shape3(s) for s in args.flops_shapes.split(",") if s]
    twin = B.same_padded_twin(spec)
    print("\n== Executed FLOPs per output voxel (torch FlopCounterMode on the meta device; same tiles / roi as above)")
    for shape in shapes:
        tiling = make_tiling(shape, spec, args)
        _, inp = input_tile(tiling)
        roi = monai_roi(spec, inp)
        voxels = math.prod(shape)
        ours = n_tiles(tiling) * forward_flops(spec, inp, margin=True) / voxels
        windows = B.monai_window_count(shape, roi, 0.25)
        monai = windows * forward_flops(twin, roi, margin=False) / voxels
        print(f"  {'x'.join(map(str, shape))}: ours {ours / 1e6:.2f} MFLOP/voxel ({n_tiles(tiling)} tiles of input "
              f"{'x'.join(map(str, inp))}), monai {monai / 1e6:.2f} MFLOP/voxel ({windows} windows of "
              f"{'x'.join(map(str, roi))}); monai / ours {monai / ours:.2f}x")


RSS_CHILD = """
import sys, time
import numpy as np, torch, zarr
torch.set_num_threads({threads})
sys.path.insert(0, {bench!r})
import benchlib as B
from unet_core.common.intensity import IntensityStats
from unet_core.infer.engine import Engine, run_blocks
from unet_core.infer.tiling import Tiling
from unet_core.model.spec import UNetSpec
def hwm():
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) / 1024
spec = UNetSpec(depth={depth}, base_channels={base}, dropout=0.0, dims=3, pool_z={pool_z}, kernel_z={kernel_z})
shape = {shape}
tiling = Tiling(shape, spec, block_px={block}, tile_out={tile}, block_z={block_z}, tile_z={tile_z})
chunks = (min({block_z}, shape[0]), min({block}, shape[1]), min({block}, shape[2]))
root = zarr.open_group({work!r}, mode="w")
image = root.create_array("image", shape=shape, dtype=np.float32, chunks=chunks)
rng = np.random.default_rng(0)
for z in range(0, shape[0], chunks[0]):  # written in slabs: the writer's memory stays small
    image[z:z + chunks[0]] = rng.normal(size=(min(chunks[0], shape[0] - z), *shape[1:])).astype(np.float32)
probs = root.create_array("probabilities", shape=(2, *shape), dtype=np.float32, chunks=(2, *chunks))
seg = root.create_array("segmentation", shape=shape, dtype=np.uint8, chunks=chunks)
model = B.random_net(spec)
before = hwm()
engine = Engine(model, tiling, stats=IntensityStats(0.0, 1.0), device=torch.device("cpu"), batch=1)
def write(r):
    s = r.block.write.to_slices()
    probs[(slice(None), *s)] = r.probabilities
    seg[s] = r.segmentation
t0 = time.perf_counter()
run_blocks(engine, image, list(tiling.blocks()), write, desc="rss")
t = time.perf_counter() - t0
print("RSS", hwm(), before, t, tiling.n_blocks)
"""


def rss_section(args: argparse.Namespace, spec: UNetSpec) -> None:
    import tempfile

    shapes = [shape3(s) for s in args.rss_shapes.split(",") if s]
    print(f"\n== Peak RSS of our engine path (fresh process per volume; Zarr in, Zarr out; base {spec.base_channels}, "
          f"blocks {args.block_z}x{args.block}x{args.block}, tiles up to {args.tile_z or args.block_z}x{args.tile}x"
          f"{args.tile}, batch 1, {args.threads} threads)")
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            code = RSS_CHILD.format(threads=args.threads, bench=str(Path(__file__).resolve().parent), depth=spec.depth,
                                    base=spec.base_channels, pool_z=spec.pool_z, kernel_z=spec.kernel_z, shape=shape,
                                    block=args.block, tile=args.tile, block_z=args.block_z, tile_z=args.tile_z,
                                    work=str(Path(tmp) / ("x".join(map(str, shape)) + ".zarr")))
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if out.returncode:
                print(f"  {'x'.join(map(str, shape))}: failed\n{out.stderr[-2000:]}")
                continue
            _, peak, before, seconds, blocks = [l for l in out.stdout.splitlines() if l.startswith("RSS")][-1].split()
            peaks[shape] = float(peak)
            vox = math.prod(shape)
            print(f"  {'x'.join(map(str, shape))} ({vox / 1e6:.2f} Mvoxel, {blocks} block(s)): peak RSS {float(peak):.0f} MiB "
                  f"(before predicting {float(before):.0f} MiB), {float(seconds):.0f} s, "
                  f"{vox / float(seconds) / 1e6:.4f} Mvoxel/s", flush=True)
    if len(peaks) >= 2:
        small, large = min(peaks, key=math.prod), max(peaks, key=math.prod)
        print(f"  ratio {'x'.join(map(str, large))} / {'x'.join(map(str, small))}: {peaks[large] / peaks[small]:.2f}x "
              f"for {math.prod(large) / math.prod(small):.0f}x the voxels (target: within +-20 %)")


def header(args: argparse.Namespace, spec: UNetSpec) -> None:
    model = "unknown"
    try:
        model = [l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout
                 .splitlines() if l.startswith("Model name")][0]
    except (OSError, IndexError):
        pass
    try:
        import monai

        monai_version = monai.__version__
    except ImportError:
        monai_version = "not installed"
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {model}, {os.cpu_count()} CPUs ({platform.machine()}); torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), MONAI {monai_version}, Python {platform.python_version()}")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    z = spec.z_axis
    print(f"net: 3-D U-Net depth {spec.depth}, base {spec.base_channels}, 2 classes, fp32, random He init; "
          f"pool_z {spec.pool_z}, kernel_z {spec.kernel_z} (z stride {z.stride}, z context {z.context}; "
          f"in-plane stride {spec.stride}, context {spec.context})")
    rule = z_geometry_for(spec.depth, args.spacing_um)
    if (spec.pool_z, spec.kernel_z) == rule:
        print(f"  (the project's z rule, nnU-Net's, for voxels of {args.spacing_um} um (z, y, x), the synthetic 3-D "
              "profile's: no z pooling and 1-px z kernels while the z spacing is >= 2x the in-plane one)")
    else:
        print(f"  (set by --pool-z/--kernel-z; the project's z rule for voxels of {args.spacing_um} um would give "
              f"pool_z {rule[0]}, kernel_z {rule[1]})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=shape3, default=(32, 256, 256), help="volume Z x Y x X (default 32x256x256)")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--base-channels", type=int, default=32)
    ap.add_argument("--spacing-um", type=lambda t: tuple(float(v) for v in t.split(",")), default=(2.0, 0.5, 0.5),
                    help="voxel size z,y,x in um the z rule plans for (default 2.0,0.5,0.5: the synthetic 3-D profile)")
    ap.add_argument("--pool-z", type=ints, default=None, help="z pooling per level (default: the z rule's)")
    ap.add_argument("--kernel-z", type=ints, default=None, help="z kernel per level (default: the z rule's)")
    ap.add_argument("--block", type=int, default=256, help="block edge in the plane, px (default 256)")
    ap.add_argument("--block-z", type=int, default=32, help="block depth, slices (default 32)")
    ap.add_argument("--tile", type=int, default=128, help="largest output tile edge in the plane, px (default 128)")
    ap.add_argument("--tile-z", type=int, default=None, help="largest output tile depth, slices (default: --block-z)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rss-shapes", default="32x128x128,64x256x256",
                    help="volumes for the peak-RSS runs, comma-separated (empty: skip)")
    ap.add_argument("--flops-shapes", default="128x512x512",
                    help="further volumes for the analytic FLOP comparison, comma-separated")
    ap.add_argument("--sections", default="speed,flops,rss", help="any of speed, flops, rss (comma-separated)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = make_spec(args)
    header(args, spec)
    sections = set(args.sections.split(","))
    if "speed" in sections:
        speed_section(args, spec)
    if "flops" in sections:
        flops_section(args, spec)
    if "rss" in sections and args.rss_shapes:
        rss_section(args, spec)
    print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"date at end: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")


if __name__ == "__main__":
    main()
