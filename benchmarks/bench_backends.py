"""Benchmark: ONNX Runtime vs torch as the CPU backend of the overlap-tile engine (issue 35, item 4).

Run: ``.venv/bin/python benchmarks/bench_backends.py [--size 1024] [--threads 2] [--repeats 3]``
(needs the ``[bioimageio]`` extra: onnx, onnxruntime).

For each profile's network (random He-initialised weights, seeded) and one random-looking uint16
slice of ``--size`` px, :func:`unet_core.infer.predict.predict_plane` runs the same blocks and tiles
(the profile's ``predict.block_px`` / ``predict.tile_out``, batch 1, fp32, float32 probabilities)
with the network run by torch (channels-last, oneDNN: the engine's CPU path) and by ONNX Runtime
(the network exported to ONNX in memory: ``unet predict --backend onnxruntime``). The two backends
alternate within each round (torch first in even rounds, ONNX Runtime first in odd ones), so a
machine shared with other work loads both alike; the 1-minute load average is printed per round.

First, the network alone on one 572 -> 388 px tile of the paper net (the issue's protocol), then
printed per network: the median wall seconds and CPU seconds (this process, all threads) of each
backend, the ratio torch / ONNX Runtime of the medians (> 1: ONNX Runtime faster), each round's
ratio, max |probability difference|, and the ONNX export's seconds (once per model, not timed in).
Timings are never asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B

from unet_core.common.intensity import IntensityStats
from unet_core.infer.predict import predict_plane
from unet_core.model.onnx_network import onnx_unet
from unet_core.model.spec import UNetSpec


@dataclass(frozen=True)
class Profile:
    """A network and the prediction geometry of a shipped profile."""

    name: str
    spec: UNetSpec
    block_px: int
    tile_out: int


PROFILES = {
    # config/isbi2012_cpu.yaml's predict section with the paper's network (64 base channels, depth 4)
    "paper": Profile("paper net (depth 4, 64 ch), isbi2012_cpu tiles", UNetSpec(), 512, 512),
    # config/dsb2018_cpu.yaml: its model and predict sections
    "dsb": Profile("dsb2018_cpu net (depth 3, 32 ch)", UNetSpec(depth=3, base_channels=32, dropout=0.0), 256, 256),
}


def timed(fn) -> tuple[np.ndarray, float, float]:
    """(result, wall s, CPU s of this process) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def compare(profile: Profile, image: np.ndarray, repeats: int) -> None:
    model = B.random_net(profile.spec, seed=0)
    t0 = time.perf_counter()
    network = onnx_unet(model)
    export_s = time.perf_counter() - t0
    stats = IntensityStats(float(image.mean()), float(image.std()))
    runs = {"torch": model, "onnxruntime": network}
    kwargs = {"stats": stats, "block_px": profile.block_px, "tile_out": profile.tile_out}
    for name, net in runs.items():  # warm-up on a corner: oneDNN's kernels, ONNX Runtime's first run
        predict_plane(net, image[:profile.tile_out, :profile.tile_out], **kwargs)
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    outputs: dict[str, np.ndarray] = {}
    print(f"\n{profile.name}: {image.shape[0]}² uint16, block {profile.block_px}, tile {profile.tile_out}, "
          f"{torch.get_num_threads()} threads, ONNX export {export_s:.1f} s")
    for r in range(repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        load = os.getloadavg()[0]
        for name in order:
            outputs[name], w, c = timed(lambda n=runs[name]: predict_plane(n, image, **kwargs))
            wall[name].append(w)
            cpu[name].append(c)
        print(f"  round {r + 1} ({' then '.join(order)}; load {load:.2f} -> {os.getloadavg()[0]:.2f}): "
              f"torch {wall['torch'][-1]:.2f} s, onnxruntime {wall['onnxruntime'][-1]:.2f} s, "
              f"ratio {wall['torch'][-1] / wall['onnxruntime'][-1]:.2f}")
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    mpx = image.size / 1e6
    print(f"  median wall: torch {med['torch']:.2f} s ({mpx / med['torch']:.3f} Mpx/s), onnxruntime "
          f"{med['onnxruntime']:.2f} s ({mpx / med['onnxruntime']:.3f} Mpx/s); torch / onnxruntime = "
          f"{med['torch'] / med['onnxruntime']:.2f}x")
    print(f"  median CPU: torch {med_cpu['torch']:.2f} s, onnxruntime {med_cpu['onnxruntime']:.2f} s; "
          f"ratio {med_cpu['torch'] / med_cpu['onnxruntime']:.2f}x")
    print(f"  max |probability torch - onnxruntime| = {np.abs(outputs['torch'] - outputs['onnxruntime']).max():.2e}")


def one_tile(spec: UNetSpec, in_px: int, repeats: int) -> None:
    """The network alone on one (1, 1, in_px, in_px) tile: torch channels-last (the engine's layout) vs
    ONNX Runtime, alternating, median of ``repeats`` (the issue's 572 -> 388 protocol)."""
    model = B.random_net(spec, seed=0).to(memory_format=torch.channels_last)
    network = onnx_unet(model)
    x = torch.randn(1, 1, in_px, in_px)
    runs = {"torch": lambda: model(x.contiguous(memory_format=torch.channels_last)), "onnxruntime": lambda: network(x)}
    wall: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for fn in runs.values():
            fn()
        for r in range(repeats):
            for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                _, w, _ = timed(runs[name])
                wall[name].append(w)
    med = {k: statistics.median(v) for k, v in wall.items()}
    print(f"\none {in_px}-px tile, {spec.depth}/{spec.base_channels}: torch channels-last {med['torch']:.2f} s, "
          f"onnxruntime {med['onnxruntime']:.2f} s, ratio {med['torch'] / med['onnxruntime']:.2f}x "
          f"(median of {repeats}; load {os.getloadavg()[0]:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="slice edge, px (the issue's protocol: 4096)")
    parser.add_argument("--threads", type=int, default=2, help="threads of both backends (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3; medians)")
    parser.add_argument("--profiles", nargs="+", choices=sorted(PROFILES), default=["dsb", "paper"])
    parser.add_argument("--tile-repeats", type=int, default=5,
                        help="rounds of the one-tile comparison (paper net, 572 px; 0: skip it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # ONNX Runtime's sessions take torch's thread count
    image = B.smooth_stack(1, args.size, seed=1)[0]
    print(f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.tile_repeats:
        one_tile(UNetSpec(), 572, args.tile_repeats)
    for name in args.profiles:
        compare(PROFILES[name], image, args.repeats)


if __name__ == "__main__":
    main()
