"""Benchmark of w(x): d1/d2 algorithms vs the naive one-EDT-per-cell reference, Dask scaling, RSS.

Run: .venv/bin/python benchmarks/bench_weights.py [--quick]

Baselines measured side by side in the same run:
  * naive = unet_core.weights.maps.border_weight_reference (one whole-image EDT per cell, the
    two smallest kept per pixel: what most re-implementations do);
  * Dask with 1 worker, for the 2-worker speed-up;
  * RSS of a 4-slice stack, for the RSS of a 16-slice stack.
Touching cells: seeded Voronoi tessellations (with --gaps also cells with background gaps).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from unet_core.synth.scene import voronoi_cells as voronoi
from unet_core.weights import maps as W

W0, SIGMA, TOL = 10.0, 5.0, 1e-3


def cells_of(labels: np.ndarray) -> np.ndarray:
    return W.cells_from(labels, W.class_map(labels, separate_touching=True))


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_kernel(cases, *, repeats: int) -> None:
    print("## d1/d2 kernels vs naive (one whole-image EDT per cell), 1 thread, best of", repeats)
    print(f"{'case':34s} {'cells':>6s} {'bg%':>5s} {'naive s':>8s} {'method':>7s} {'s':>7s} {'x naive':>8s} {'max|diff|':>10s}")
    for name, labels, run_naive in cases:
        cells = cells_of(labels)
        n = len(np.unique(cells)) - 1
        bg = 100 * float((cells == 0).mean())
        ref = None
        t_naive = float("nan")
        if run_naive:
            t = time.perf_counter()
            ref = W.border_weight_reference(cells, W.WeightParams(w0=W0, sigma_px=SIGMA))
            t_naive = time.perf_counter() - t
        for method in ("kdtree", "bbox", "auto"):
            out = W.border_weight(cells, W.WeightParams(w0=W0, sigma_px=SIGMA, tolerance=TOL, method=method))
            t = best_of(lambda: W.border_weight(cells, W.WeightParams(w0=W0, sigma_px=SIGMA, tolerance=TOL, method=method)), repeats)
            diff = float(np.abs(out - ref).max()) if ref is not None else float("nan")
            print(f"{name:34s} {n:6d} {bg:5.1f} {t_naive:8.2f} {method:>7s} {t:7.3f} {t_naive / t:8.1f} {diff:10.2e}")
        sys.stdout.flush()


def bench_dask(z: int, size: int, n_cells: int) -> None:
    import dask.array as da

    from unet_core.weights.blockwise import dask_scheduler, label_arrays, weight_array
    from unet_core.weights.recipe import WeightParams

    print(f"\n## Dask: {z} slices of {size}^2, ~{n_cells} cells each, chunks (1, 512, 512)")
    labels = np.stack([voronoi((size, size), n_cells, seed=s) for s in range(z)])
    arr = da.from_array(labels, chunks=(1, 512, 512))
    inst, _ = label_arrays(arr, kind="instance")
    w = weight_array(inst, kind="instance", class_weights=(1.0, 1.0), params=WeightParams())
    for scheduler in ("threads", "processes"):
        times = {}
        for workers in (1, 2):
            with dask_scheduler(scheduler, workers=workers):
                times[workers] = best_of(lambda: w.compute(), 2)
        print(f"{scheduler:10s} 1 worker {times[1]:6.2f} s   2 workers {times[2]:6.2f} s   speed-up {times[1] / times[2]:.2f}x")
        sys.stdout.flush()


RSS_CHILD = """
import sys, resource, numpy as np, zarr
sys.path.insert(0, {bench_dir!r})
from bench_weights import voronoi
from unet_core.io.ngff import PyramidWriter, label_group, IMAGE_LABEL
from unet_core.weights.blockwise import dask_scheduler, write_weights
from unet_core.weights.recipe import WeightParams
z, size, tmp, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if mode == 'make':
  root = zarr.open_group(tmp + '/s.ome.zarr', mode='w')
  img = PyramidWriter(root, (z, size, size), np.uint8, (1, 512, 512), (1.0, 1.0, 1.0), levels=1)
  gt = PyramidWriter(label_group(root), (z, size, size), np.int32, (1, 512, 512), (1.0, 1.0, 1.0), labels=True, levels=1, name='gt')
  for k in range(z):
    img.write_plane(k, np.zeros((size, size), np.uint8)); gt.write_plane(k, voronoi((size, size), 300, seed=k))
  img.finish(); gt.finish(IMAGE_LABEL)
  root.attrs.update({{**dict(root.attrs), 'unet': {{'intensity': {{'mean': 0.0, 'std': 1.0}}, 'label_kind': 'instance'}}}})
  sys.exit(0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with dask_scheduler('threads', workers=2):
    write_weights(tmp + '/s.ome.zarr', tmp + '/w.zarr', params=WeightParams(), class_weights={{'class_weights': [1, 1]}}, plot_slice=None, batch_slices=2)
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def bench_rss(size: int, stacks: tuple[int, ...]) -> None:
    print(f"\n## Peak RSS of 'write_weights' (threads, 2 workers, chunks (1,512,512), {size}^2 slices)")
    child = RSS_CHILD.format(bench_dir=str(Path(__file__).resolve().parent))
    for z in stacks:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-c", child, str(z), str(size), tmp, "make"], check=True)
            out = subprocess.run([sys.executable, "-c", child, str(z), str(size), tmp, "run"], capture_output=True,
                                 text=True, check=True)
            before, after = (int(v) for v in out.stdout.split())
        print(f"{z:3d} slices: peak RSS {after / 1024:7.1f} MiB (after imports, before computing: {before / 1024:7.1f} MiB)")
        sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run, ratios not comparable)")
    parser.add_argument("--gaps", action="store_true", help="also cells with wide background gaps")
    args = parser.parse_args()
    size = 256 if args.quick else 1024
    cases = [
        (f"{size}^2 ~300 touching", voronoi((size, size), 300 if not args.quick else 30, seed=1), True),
        (f"{size}^2 ~1000 touching", voronoi((size, size), 1000 if not args.quick else 100, seed=2), True),
    ]
    if args.gaps:
        cases += [(f"{size}^2 ~300 with gaps", voronoi((size, size), 300, seed=3, gap=1.1), True)]
    big = 1024 if args.quick else 4096
    cases.append((f"{big}^2 ~{16 * 300 if not args.quick else 300} touching (no naive)",
                  voronoi((big, big), 16 * 300 if not args.quick else 300, seed=4), False))
    print(f"# bench_weights  w0={W0} sigma={SIGMA} tolerance={TOL}  cutoff={W.cutoff_px(w0=W0, sigma_px=SIGMA, tolerance=TOL):.2f} px")
    bench_kernel(cases, repeats=3)
    bench_dask(4 if args.quick else 8, 512 if args.quick else 1024, 300)
    bench_rss(512 if args.quick else 1024, (4, 16))
    used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n(benchmark process peak RSS {used:.0f} MiB)")


if __name__ == "__main__":
    main()
