"""The merge's serial number-cells round at R times the cells of a recorded run: peak memory and time.

The 16 GiB benchmark (``bench_scale.py --sizes 128``) needs an hour of a quiet machine; the round
whose memory grows with the number of cells can be measured in a minute from the records of a
smaller run, replicated along z. Get the records by running a merge in pieces up to its cells
round with a work folder of your own, e.g. on the 1 GiB stack of ``bench_scale.py --sizes 8
--keep``::

    unet merge part-0 part-1 --stack S.ome.zarr -o P2.ome.zarr --cells c.csv --instances watershed \\
        --seeds distance --seed-h-px 1 --min-object-px 20 --mask-threshold 0.5 --halo-px 64 \\
        --jobs 2 --work W --step start            # then seeds (--job 0, 1), number-seeds, cells (--job 0, 1)

then ``python benchmarks/bench_merge_serial.py W --replicate 16 --slices 8``. Each copy r of the
record shifts block indices by r x the recorded blocks and ids by r x the recorded seeds (seeds
stay distinct, own labels stay own), so the round sees R x the blocks, seeds, rows and cells with
the recorded structure. The round is :func:`unet_core.infer.merge` 's ``_number_cells`` step by
step, with the package's own functions (numbering, areas, small objects dropped, the cell table
written a range of ids at a time); only the reading of the records is this script's (it maps the
copies on the fly). Prints one JSON line: cells, provisional ids, peak RSS (MiB), wall s.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from unet_core.infer.block_labels import PieceLabels, drop_small, number_labels
from unet_core.infer.cells import add_areas, row_chunks, write_cell_table


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", type=Path, help="a merge's work folder after its cells round (cells-<k>.npz/.rows)")
    p.add_argument("--replicate", type=int, default=16, help="R: copies of the record along z (default 16)")
    p.add_argument("--slices", type=int, required=True, help="slices of the recorded stack")
    p.add_argument("--min-object-px", type=int, default=20, help="the merge's --min-object-px (default 20)")
    args = p.parse_args(argv)
    t0 = time.time()
    records = sorted(args.work.glob("cells-*.npz"))
    data = [dict(np.load(r)) for r in records]
    n_fixed0 = int(data[0]["n_fixed"])
    n_blocks0 = sum(len(d["blocks"]) for d in data)
    side = int(round((n_blocks0 // args.slices) ** 0.5))
    grid = (args.slices * args.replicate, side, side)
    n_fixed = n_fixed0 * args.replicate

    def shifted(values: np.ndarray, r: int) -> np.ndarray:
        v = values.astype(np.int64)
        return np.where(v == 0, 0, np.where(v <= n_fixed0, v + r * n_fixed0, v - n_fixed0 + n_fixed))

    pieces = []
    for r in range(args.replicate):
        for d in data:
            piece = PieceLabels.from_arrays(d, "")
            piece.blocks = [b + r * n_blocks0 for b in piece.blocks]
            pairs = piece.pairs[0].astype(np.int64)
            pairs[:, [0, 2]] += r * n_blocks0
            pairs[:, 1], pairs[:, 3] = shifted(pairs[:, 1], r), shifted(pairs[:, 3], r)
            piece.pairs = [pairs]
            piece.strips = {(f + r * n_blocks0, a, s): shifted(v, r).astype(np.uint32)
                            for (f, a, s), v in piece.strips.items()}
            pieces.append(piece)
    files = [(r.with_suffix(".rows"), int(d["n_rows"])) for r, d in zip(records, data)]
    del data
    numbering = number_labels(pieces, grid, n_fixed, what="cells")
    del pieces

    def rows_with(lookup: np.ndarray):
        for r in range(args.replicate):
            for chunk in row_chunks(files):
                chunk["value"] = shifted(chunk["value"], r)
                chunk["flat"] += r * n_blocks0
                yield chunk, lookup[numbering.provisional(chunk["flat"], chunk["value"])]

    areas = np.zeros(numbering.n_final + 1, np.int64)
    for chunk, ids in rows_with(numbering.final):
        add_areas(areas, ids, chunk)
    final = drop_small(numbering.final, areas, min_px=args.min_object_px)
    del areas
    n_cells = int(final.max(initial=0))
    with tempfile.TemporaryFile() as fh:
        write_cell_table(fh, lambda: rows_with(final), n_cells)
    out = {"replicate": args.replicate, "cells": n_cells, "provisional_ids": len(final) - 1,
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "wall_s": round(time.time() - t0, 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
