"""Elastic deformation speed: unet_core.augment.elastic (batched torch) vs elasticdeform.deform_random_grid.

Workload (issue 4): one 572 x 572 float32 image plus int32 labels, 3 x 3 coarse grid,
sigma = 10 px; image cubic (elasticdeform order 3 / our bicubic), labels nearest (order 0),
mirrored borders on both sides (elasticdeform mode="mirror" = scipy mirror = the project
convention). Both are timed side by side in this run; the figure reported is time per
sample and the ratio elasticdeform / ours (target >= 8x on CPU; >= 50x batched on a GPU).

Run: ``.venv/bin/python benchmarks/bench_elastic.py [--repeats 20] [--batch 8]``.
elasticdeform is optional (its NumPy-2 wheel is broken; build it from source):
``.venv/bin/pip install wheel && .venv/bin/pip install --no-deps --no-binary elasticdeform
--no-build-isolation elasticdeform==0.5.1``. Without it only our timings are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from unet_core.augment.elastic import DeformParams, deform, draw_transform, rng_for
from unet_core.model.spec import UNetSpec

SIZE = UNetSpec().input_size(388)  # 572: the paper's input tile


def _paired(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn_a()`` and ``fn_b()``, run alternately (after one warm-up each) so
    that a change in machine load affects both the same way."""
    fn_a()
    fn_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times_a), statistics.median(times_b)


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    labels = np.zeros((SIZE, SIZE), np.int32)
    for i in range(1, 120):
        cy, cx = rng.integers(0, SIZE, 2)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(10, 30) ** 2] = i
    image = (labels > 0).astype(np.float32) + rng.normal(0, 0.3, labels.shape).astype(np.float32)
    return image, labels


def ours(image: np.ndarray, labels: np.ndarray, *, batch: int, params: DeformParams, device: str):
    """A callable running one batch of the full torch path (transforms, grid, image, labels)."""
    img = torch.from_numpy(image)[None, None].expand(batch, 1, -1, -1).contiguous().to(device)
    lab = torch.from_numpy(labels)[None].expand(batch, -1, -1).contiguous().to(device)
    counter = iter(range(10**9))

    def run() -> None:
        step = next(counter)
        trs = [draw_transform(rng_for(0, step, i), params=params, source_shape=(SIZE, SIZE),
                              tile_shape=(SIZE, SIZE)) for i in range(batch)]
        out_img, out_lab = deform(img, lab, trs, tile_shape=(SIZE, SIZE), interpolation=params.interpolation)
        if device != "cpu":
            torch.cuda.synchronize()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per configuration (median)")
    parser.add_argument("--batch", type=int, default=8, help="samples per batched torch call")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts to time")
    args = parser.parse_args()
    image, labels = _data()
    paper_only = DeformParams(rotate=False, flip=False, brightness=0.0, contrast=0.0)  # what elasticdeform does
    full = DeformParams()  # + rotation, flips, brightness/contrast
    print(f"572x572 image (float32) + labels (int32), 3x3 grid, sigma 10 px; torch {torch.__version__}, "
          f"{os.cpu_count()} CPU cores; median of {args.repeats}; date {time.strftime('%Y-%m-%d', time.gmtime())}")

    try:
        import elasticdeform
    except ImportError:
        elasticdeform = None
        print("elasticdeform not installed: baseline skipped (see this file's docstring to install it)")
    rng = np.random.default_rng(1)

    def reference() -> None:
        np.random.seed(int(rng.integers(2**31)))  # elasticdeform draws from numpy's global RNG
        out_img, out_lab = elasticdeform.deform_random_grid([image, labels], sigma=10, points=3, order=[3, 0],
                                                            mode="mirror")
        assert set(np.unique(out_lab)) <= set(np.unique(labels))

    rows = []
    for threads in args.threads:
        rows += [("cpu", threads, 1, paper_only, "elastic only"), ("cpu", threads, args.batch, paper_only, "elastic only"),
                 ("cpu", threads, args.batch, full, "elastic+rotate+flip+grey")]
    if torch.cuda.is_available():
        rows += [("cuda", 0, 64, paper_only, "elastic only"), ("cuda", 0, 64, full, "elastic+rotate+flip+grey")]
    else:
        print("no CUDA device: GPU rows skipped")
    print(f"{'configuration':62s} {'ours':>9s} {'baseline':>9s}  speed-up (baseline/ours, per sample)")
    for device, threads, batch, params, what in rows:
        if threads:
            torch.set_num_threads(threads)
        run = ours(image, labels, batch=batch, params=params, device=device)
        where = f"{device} {threads}thr" if threads else device
        label = f"unet_core.augment.elastic {where:8s} batch {batch:3d} {what}"
        if elasticdeform is None:
            t = _paired(run, run, args.repeats)[0] / batch
            print(f"{label:62s} {t * 1e3:7.2f}ms")
            continue
        t, base = _paired(run, reference, args.repeats)
        t /= batch
        print(f"{label:62s} {t * 1e3:7.2f}ms {base * 1e3:7.2f}ms  {base / t:6.2f}x")


if __name__ == "__main__":
    main()
