"""Host side of training: how many stored tiles per second ``unet train``'s loader delivers.

On a GPU the paper net trains at about 100 tiles/s (572 -> 388, bf16; FACTS.md, H200). Each tile
the loader hands over is three Zarr chunk reads (image, classes, weights), their decompression and
the crop to the output region (:class:`unet_core.train.data.AugmentedTiles`), in ``train.workers``
forked processes. This measures that rate on this machine's CPU, the bound a GPU run's
``train.workers`` and ``train.batch_size`` must clear, without a network or a GPU:

* CPU-s per tile of one process (``workers 0``: the dataset read in the main process), the cost a
  worker pays per tile;
* tiles/s through the real ``DataLoader`` (``unet_core.train.loop._loader``, the run's sampler and
  prefetching) with 0, 1 and 2 workers (at most one per core), median of ``--repeats``.

Usage:
    python benchmarks/bench_loader.py                 # 572-px tiles (the paper's), batch 4
    python benchmarks/bench_loader.py --tile-out 388 --batch 8 --tiles 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B  # noqa: E402

from unet_core.model.spec import UNetSpec  # noqa: E402
from unet_core.train.config import TrainConfig  # noqa: E402
from unet_core.train.data import AugmentedTiles  # noqa: E402
from unet_core.train.loop import _loader  # noqa: E402
from unet_core.train.runtime import Runtime  # noqa: E402


def loader_rate(dataset: AugmentedTiles, *, batch: int, workers: int, iterations: int) -> float:
    """Tiles/s of ``unet train``'s loader over ``iterations`` batches (its first batch, the
    workers' start, excluded), as on the CPU (no pinned memory)."""
    import torch

    config = TrainConfig(iterations=iterations + 1, batch_size=batch, workers=workers, seed=0, device="cpu")
    runtime = Runtime(torch.device("cpu"), config.precision, False, "cpu")
    batches = iter(_loader(dataset, config, runtime, start=0))
    next(batches)
    t0 = time.perf_counter()
    n = sum(1 for _ in batches)
    return n * batch / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile-out", type=int, default=388, help="output tile px (input: + 184 at depth 4)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tiles", type=int, default=32, help="tiles in the stored set")
    parser.add_argument("--iterations", type=int, default=40, help="batches timed per loader run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    spec = UNetSpec(dropout=0.0)
    size = spec.input_size(args.tile_out)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        aug = B._training_set(Path(tmp) / "aug.zarr", in_size=size, n=args.tiles)
        dataset = AugmentedTiles([aug], spec=spec)
        dataset[0]
        t0 = time.process_time()
        for i in range(args.tiles):
            dataset[i]
        cpu = (time.process_time() - t0) / args.tiles
        print(f"stored {size}-px tiles -> {args.tile_out} px, batch {args.batch}, {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.1f}")
        print(f"  one process: {cpu * 1e3:.1f} CPU-ms per tile = {1 / cpu:.0f} tiles/s per busy core")
        for workers in sorted({0, 1, min(2, os.cpu_count() or 1)}):
            rates = [loader_rate(dataset, batch=args.batch, workers=workers, iterations=args.iterations)
                     for _ in range(args.repeats)]
            print(f"  loader, {workers} workers: {statistics.median(rates):.0f} tiles/s "
                  f"(median of {args.repeats}: {min(rates):.0f}-{max(rates):.0f})")


if __name__ == "__main__":
    main()
