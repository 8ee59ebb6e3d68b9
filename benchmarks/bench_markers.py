"""Benchmark a part store's per-block completion marker (``PartStore.mark_done``) against the
number of markers already in ``done/``.

``old`` is the marker as written before 0d54a0e (``atomic_output``: a temporary and a rename,
after listing ``done/`` for stale temporaries: O(markers) per block); ``new`` is today's
``PartStore.mark_done`` (an empty file created in one step: O(1)). 200 blocks are marked after
M existing markers; the figure is the mean per block, the best of 3 tries (a shared machine).

Usage: .venv/bin/python benchmarks/bench_markers.py [--markers 0 1600 16000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from unet_core.common.atomic import atomic_output  # noqa: E402
from unet_core.infer.part_store import PART_FORMAT, PartStore  # noqa: E402
from unet_core.infer.tiling import Block, Tiling  # noqa: E402
from unet_core.model.spec import UNetSpec  # noqa: E402

TIMED = 200


def old_mark(store: PartStore, block: Block) -> None:
    with atomic_output(store.path / "done" / block.name, own=None) as tmp:
        tmp.write_text("")


def per_block_s(mark, existing: int) -> float:
    spec = UNetSpec(depth=1, base_channels=1, dropout=0.0)
    tiling = Tiling((existing + TIMED, 32, 32), spec, 32, 32)  # one block per slice
    with tempfile.TemporaryDirectory() as tmp:
        store = PartStore(Path(tmp) / "part-0.zarr")
        with store.locked():
            store.open_for_job({"format": PART_FORMAT}, tiling, np.dtype(np.uint8))
            blocks = list(tiling.blocks())
            for block in blocks[:existing]:
                store.mark_done(block)
            t0 = time.perf_counter()
            for block in blocks[existing:]:
                mark(store, block)
            return (time.perf_counter() - t0) / TIMED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markers", type=int, nargs="+", default=[0, 1600, 16000])
    args = parser.parse_args()
    for existing in args.markers:
        old = min(per_block_s(old_mark, existing) for _ in range(3))
        new = min(per_block_s(PartStore.mark_done, existing) for _ in range(3))
        print(f"{existing:6d} markers: old {old * 1e3:7.3f} ms per block, new {new * 1e3:7.3f} ms per block")


if __name__ == "__main__":
    main()
