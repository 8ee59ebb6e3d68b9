"""Benchmark ``unet synth``: throughput (MB/s) and peak memory of synthetic stack generation.

Measured side by side in one run:

* ``write ceiling``: tifffile writing pre-generated random pages of the same shape, page by
  page (what the disk and tifffile allow; synth cannot beat it).
* ``kd-tree geometry``: the usual way to make Voronoi test images, a scipy cKDTree
  nearest/second-nearest query for every pixel of a slice (no warp, no rendering, no noise),
  against our complete slice (geometry + rendering + camera) and our geometry alone.
* Peak RSS of ``unet synth`` in a child process for N and 2N slices: streaming page by page,
  it must not grow with the stack size.

Usage: .venv/bin/python benchmarks/bench_synth.py [--size 2048] [--slices 8] [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from unet_core.synth.scene import SynthParams, _Scene, slice_rng, synth_slice  # noqa: E402
from unet_core.synth.tiffs import write_synth_tiffs  # noqa: E402


def _child_peak_rss_mb(argv: list[str]) -> tuple[float, float]:
    """Run ``argv`` in a fresh process; return (wall seconds, its peak RSS in MB)."""
    script = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, stderr=subprocess.DEVNULL); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", script, *argv], check=True, capture_output=True, text=True)
    wall, rss = out.stdout.split()
    return float(wall), float(rss)


def bench_write_ceiling(params: SynthParams, slices: int, tmp: Path) -> float:
    import tifffile

    rng = np.random.default_rng(0)
    page = rng.integers(0, 4096, (params.height, params.width), dtype=np.uint16).astype(params.dtype)
    labels = rng.integers(0, 60000, (params.height, params.width), dtype=np.uint16)
    t = time.perf_counter()
    with tifffile.TiffWriter(tmp / "ceil_i.tif") as ti, tifffile.TiffWriter(tmp / "ceil_l.tif") as tl:
        for _ in range(slices):
            ti.write(page, contiguous=True)
            tl.write(labels, contiguous=True)
    seconds = time.perf_counter() - t
    return slices * (page.nbytes + labels.nbytes) / 1e6 / seconds


def bench_kdtree_geometry(params: SynthParams) -> float:
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(0)
    n = int(params.height * params.width / params.cell_size_px**2)
    seeds = rng.uniform(0, (params.height, params.width), size=(n, 2))
    t = time.perf_counter()
    tree = cKDTree(seeds)
    yy, xx = np.mgrid[0 : params.height, 0 : params.width]
    dist, idx = tree.query(np.stack([yy.ravel(), xx.ravel()], axis=1), k=2)
    _ = (idx[:, 0].reshape(yy.shape), (dist[:, 1] - dist[:, 0]).reshape(yy.shape))
    return time.perf_counter() - t


def bench_our_geometry(params: SynthParams) -> float:
    scene = _Scene(slice_rng(0, 0), params)
    rows = max(1, 65536 // params.width)
    t = time.perf_counter()
    for r0 in range(0, params.height, rows):
        scene.geometry(r0, min(params.height, r0 + rows))
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=2048, help="slice height and width, px")
    parser.add_argument("--slices", type=int, default=8, help="slices of the timed stack")
    parser.add_argument("--workers", type=int, default=1, help="synth worker processes")
    args = parser.parse_args()
    params = SynthParams(height=args.size, width=args.size, dtype="uint16")
    print(f"# bench_synth: {args.slices} x {args.size} x {args.size} uint16 image + uint16 labels, "
          f"workers={args.workers}, cpus={os.cpu_count()}, load={os.getloadavg()[0]:.1f}")

    with tempfile.TemporaryDirectory(dir=REPO / "benchmarks") as tmpdir:
        tmp = Path(tmpdir)
        result = write_synth_tiffs(tmp / "image.tif", tmp / "labels.tif", params, seed=0,
                                   slices=args.slices, workers=args.workers)
        ceiling = bench_write_ceiling(params, args.slices, tmp)
        print(f"synth (write_synth_tiffs)      {result.mb_per_s:8.1f} MB/s  "
              f"({result.bytes_written / 1e6:.0f} MB in {result.seconds:.1f} s)")
        print(f"baseline: write ceiling        {ceiling:8.1f} MB/s   "
              f"ratio synth/ceiling = {result.mb_per_s / ceiling:.3f}")

        t, cpu = time.perf_counter(), time.process_time()
        image, labels = synth_slice(params, seed=0, index=0)
        ours_slice, ours_cpu = time.perf_counter() - t, time.process_time() - cpu
        print(f"one slice: {ours_cpu:.2f} CPU-s = {(image.nbytes + labels.nbytes) / 1e6 / ours_cpu:.1f} MB/s "
              "per busy core (CPU time; wall time depends on the load)")
        ours_geo = bench_our_geometry(params)
        kd = bench_kdtree_geometry(params)
        print(f"one slice, complete (ours)     {ours_slice:8.2f} s")
        print(f"one slice, geometry (ours)     {ours_geo:8.2f} s")
        print(f"baseline: cKDTree k=2 geometry {kd:8.2f} s   ratio kd/ours: geometry {kd / ours_geo:.2f}x, "
              f"complete slice {kd / ours_slice:.2f}x")

        rss = []
        for n in (args.slices, 2 * args.slices):
            argv = [str(REPO / ".venv" / "bin" / "unet"), "-q", "synth", "--image", str(tmp / f"m{n}.tif"),
                    "--labels", str(tmp / f"m{n}_l.tif"), "--slices", str(n), "--size", str(args.size),
                    "--dtype", "uint16", "--workers", str(args.workers)]
            wall, peak = _child_peak_rss_mb(argv)
            rss.append(peak)
            stack_mb = n * args.size * args.size * 4 / 1e6
            print(f"unet synth {n:3d} slices: {stack_mb:7.0f} MB written, "
                  f"peak RSS {peak:6.0f} MB, {wall:.1f} s")
        print(f"peak RSS ratio {2 * args.slices} vs {args.slices} slices: "
              f"{rss[1] / rss[0]:.2f} (1.00 = flat)")


if __name__ == "__main__":
    main()
