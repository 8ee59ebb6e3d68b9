"""``unet merge`` of 3-D parts holds what a window needs, not what the stack's width asks (issue 36).

A piece's memory must depend on the block and halo sizes, not on the volume: the watershed's
P(cell) cache holds at most the blocks one window touches (3 x 3 x 3 with a halo of at most one
block), and the numbered seeds are read one chunk at a time (a neighbour's whole block of uint32
seed labels is never kept for the slab of it a window needs). Measured in benchmarks/RESULTS.md
("3-D peak RSS of predict and merge"): 3 x 3 x 3 uint32 seed blocks of 32 x 256 x 256 voxels are
216 MiB. The cells stay the whole volume's watershed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from test_merge_3d import SPEC3, WATERSHED_RULES, balls, same_partition, write_parts, write_stack

from unet_core.cli import main
from unet_core.infer import merge
from unet_core.infer.tiling import Tiling


def test_a_wide_3d_merge_keeps_a_window_of_blocks_and_one_seed_chunk(tmp_path: Path, monkeypatch) -> None:
    shape = (8, 24, 80)  # 10 blocks along x: a block row's cache would be 9 x 10 + 27 = 117 blocks
    tiling = Tiling(shape, SPEC3, block_px=8, tile_out=4, block_z=2)
    assert tiling.grid == (4, 3, 10)
    p = balls(shape, 1)
    stack = write_stack(tmp_path / "s.ome.zarr", (p * 1000).astype(np.uint16))
    parts = write_parts(tmp_path / "parts", stack, p, tiling, 2)

    held: list[int] = []
    plane = merge._CellProbability.plane

    def counting_plane(self, index):
        out = plane(self, index)
        held.append(len(self.cache))
        return out

    caches: list[tuple[str, int]] = []
    cache_type = merge.ChunkCache

    def recording_cache(array, max_chunks):
        caches.append((str(array.store_path), max_chunks))
        return cache_type(array, max_chunks)

    monkeypatch.setattr(merge._CellProbability, "plane", counting_plane)
    monkeypatch.setattr(merge, "ChunkCache", recording_cache)
    extra, whole = WATERSHED_RULES["distance"]
    out = tmp_path / "p.ome.zarr"
    # halo 8 px: 4 µm, 2 slices of 2 µm, one block deep along z as in y and x
    assert main(["merge", *map(str, parts), "--stack", str(stack), "-o", str(out), "--instances", "watershed",
                 "--halo-px", "8", *extra]) == 0
    assert held and max(held) == 27  # a window's 3 x 3 x 3 blocks, reached in the stack's middle
    seeds = [n for path, n in caches if "seeds" in path]
    assert seeds == [1]
    inst = zarr.open_group(out, mode="r")["labels/instances/0"][:]
    assert same_partition(inst, whole(p))

