"""Ingest benchmark: streaming `unet ingest` vs the naive load-everything approach.

Writes BigTIFF stacks of 1 GiB and 4 GiB (uint16, 4096 x 4096 slices, microscopy-like
smooth signal plus Poisson noise, so compression does real work), then converts each
twice, every run in a fresh subprocess so peak RSS is measured per run:

- naive:  ``tifffile.imread(path)`` (whole stack in memory), then one ``zarr`` write with
  the same chunks and compressor;
- ingest: ``unet_core.io.ingest.ingest`` (page by page; also writes the 2x pyramid and
  hashes the source file with sha256, which the naive path does not).

Prints throughput (GiB/s of raw pixels), the ratio ingest/naive, and peak RSS.
Targets (issue 2): throughput >= 0.8x naive, peak RSS <= 1/4 of naive, and ingest's RSS
flat from 1 GiB to 4 GiB.

Usage: python benchmarks/bench_ingest.py [--sizes-gib 1 4] [--workdir DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

SIDE = 4096

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
mode, src, out = sys.argv[1:4]
t0 = time.perf_counter()
if mode == "naive":
    import tifffile, zarr
    from unet_core.io.ngff import compressor
    data = tifffile.imread(src)
    g = zarr.open_group(out, mode="w")
    a = g.create_array("0", shape=data.shape, dtype=data.dtype, chunks=(1, 512, 512), compressors=compressor())
    a[:] = data
else:
    import logging
    from unet_core.io.ingest import ingest
    ingest(src, out)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_stack(path: Path, gib: float) -> int:
    """Write a BigTIFF of ``gib`` GiB page by page; returns the number of slices."""
    n = max(1, int(round(gib * 2**30 / (SIDE * SIDE * 2))))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
    base = 300 + 200 * np.sin(12 * xx) * np.cos(9 * yy)

    def pages():
        for z in range(n):
            yield rng.poisson(base + 5 * z).astype(np.uint16)

    tifffile.imwrite(path, pages(), shape=(n, SIDE, SIDE), dtype=np.uint16, bigtiff=True, photometric="minisblack")
    return n


def run(mode: str, src: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=False)
    res = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out)], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{mode} failed:\n{res.stderr[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-gib", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (needs ~2x the largest size free)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per mode, interleaved naive/ingest; the fastest of each is kept (default 1)")
    args = parser.parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_ingest_", dir=args.workdir))
    print(f"# bench_ingest  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  cores={os.cpu_count()}  workdir={work}")
    print(f"{'size':>8} {'slices':>6} {'mode':>7} {'seconds':>8} {'GiB/s':>7} {'peak RSS MiB':>13}")
    rss = {}
    try:
        for gib in args.sizes_gib:
            src = work / f"stack_{gib:g}GiB.tif"
            n = make_stack(src, gib)
            raw_gib = n * SIDE * SIDE * 2 / 2**30
            results: dict[str, dict] = {}
            for _, mode in ((i, m) for i in range(max(1, args.repeats)) for m in ("naive", "ingest")):
                r = run(mode, src, work / "out.zarr")
                if mode not in results or r["seconds"] < results[mode]["seconds"]:
                    results[mode] = r
                print(f"{raw_gib:7.2f}G {n:6d} {mode:>7} {r['seconds']:8.1f} {raw_gib / r['seconds']:7.3f} {r['peak_rss_mib']:13.0f}")
            speed = results["naive"]["seconds"] / results["ingest"]["seconds"]
            mem = results["ingest"]["peak_rss_mib"] / results["naive"]["peak_rss_mib"]
            rss[gib] = results["ingest"]["peak_rss_mib"]
            print(f"  ratio ingest/naive: throughput {speed:.2f}x (target >= 0.8x), peak RSS {mem:.3f}x (target <= 0.25x)")
            src.unlink()
        if len(rss) > 1:
            sizes = sorted(rss)
            print(f"  ingest peak RSS {sizes[0]:g} GiB -> {sizes[-1]:g} GiB: {rss[sizes[-1]] / rss[sizes[0]]:.2f}x (target: flat)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
