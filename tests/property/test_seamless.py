"""Seamlessness: tiled, blocked, multi-job prediction == one pass over the mirror-padded image.

Random He-initialised tiny U-Nets, random image sizes (down to 1 px), several block and tile
sizes and job counts (jobs run in shuffled order), fp32 on the CPU. A tiling whose origins
are not multiples of 2**depth is shown to break the equality, so the alignment is what
makes it exact.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from unet_core.common.geometry import Box
from unet_core.common.intensity import IntensityStats
from unet_core.common.mirror import mirror_pad
from unet_core.infer.engine import Engine
from unet_core.infer.tiling import Tiling, tile_read_box
from unet_core.model.spec import UNetSpec
from unet_core.model.unet import UNet

TOL = 1e-5
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in tests/conftest.py


def whole_image_prediction(model: UNet, image: np.ndarray) -> np.ndarray:
    """One network pass over a (Y, X) image mirror-padded by the context (+ up to a valid size)."""
    spec = model.spec
    pads = [(spec.context, spec.context + spec.valid_output_size_at_least(n) - n) for n in image.shape]
    x = torch.from_numpy(mirror_pad(image, pads))[None, None]
    with torch.inference_mode():
        probs = torch.softmax(model(x), dim=1)[0].numpy()
    return probs[:, : image.shape[0], : image.shape[1]]


def tiled_prediction(model: UNet, volume: np.ndarray, tiling: Tiling, jobs: int, seed: int) -> np.ndarray:
    """Every job's blocks through the engine (float32 storage), jobs in shuffled order."""
    out = np.full((model.spec.n_classes, *volume.shape), np.nan, np.float32)
    order = list(range(jobs))
    random.Random(seed).shuffle(order)
    engine = Engine(model, tiling, stats=IntensityStats(0.0, 1.0), device=CPU, batch=3)
    for job in order:
        for block in tiling.job_blocks(job, jobs):
            result = engine.predict(engine.stage(volume, block))()
            out[(slice(None), *block.write.to_slices())] = result.probabilities
    return out


def tiles_direct(model: UNet, padded: np.ndarray, padded_box: Box, tiles: list[Box], out_box: Box) -> np.ndarray:
    """Network outputs of arbitrary (Y, X) write boxes cut from a mirror-padded image, stitched.

    Bypasses the tiling, so tile origins can be misaligned on purpose.
    """
    spec = model.spec
    out = np.zeros((spec.n_classes, *out_box.shape), np.float32)
    for tile in tiles:
        read = tile_read_box(tile, spec)
        x = torch.from_numpy(np.ascontiguousarray(padded[read.relative_to(padded_box).to_slices()]))[None, None]
        with torch.inference_mode():
            probs = torch.softmax(model(x), dim=1)[0].numpy()
        keep = tile.intersect(out_box)
        src = keep.relative_to(tile).to_slices()
        out[(slice(None), *keep.relative_to(out_box).to_slices())] = probs[(slice(None), *src)]
    return out


def random_case(seed: int):
    rng = np.random.default_rng(seed)
    spec = UNetSpec(depth=int(rng.integers(2, 4)), base_channels=int(rng.choice([4, 8])),
                    n_classes=int(rng.choice([2, 3])), dropout=0.0)
    torch.manual_seed(seed)
    model = UNet(spec).eval()
    shape = (int(rng.integers(1, 3)), int(rng.choice([1, rng.integers(2, 110)])), int(rng.integers(1, 110)))
    volume = rng.normal(size=shape).astype(np.float32)
    s = spec.stride
    small = s * int(rng.integers(2, 40 // s + 1))
    large = s * int(rng.integers(40 // s + 1, 96 // s + 1))
    # (block_px, tile_out, jobs): several tile sizes and job counts per case
    settings = [
        (small, small // 2 // s * s or s, 3),
        (small, small, 1),
        (large, large // 2 // s * s, 2),
        (large, large, 4),
    ]
    return spec, model, volume, settings


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"seed-{s}") for s in range(8)])
def test_tiled_equals_whole_image(seed: int) -> None:
    spec, model, volume, settings = random_case(seed)
    whole = np.stack([whole_image_prediction(model, volume[z]) for z in range(volume.shape[0])], axis=1)
    for block_px, tile_out, jobs in settings:
        tiling = Tiling(volume.shape, spec, block_px=block_px, tile_out=tile_out)
        tiled = tiled_prediction(model, volume, tiling, jobs, seed)
        err = np.abs(tiled - whole).max()
        assert err <= TOL, f"{volume.shape}, block {block_px}, tile {tile_out}, jobs {jobs}: max |diff| {err}"


def test_arbitrary_aligned_tiles_are_exact_and_misaligned_ones_are_not() -> None:
    spec = UNetSpec(depth=3, base_channels=8, dropout=0.0)  # stride 8
    torch.manual_seed(3)
    model = UNet(spec).eval()
    image = np.random.default_rng(3).normal(size=(97, 83)).astype(np.float32)
    whole = whole_image_prediction(model, image)
    out_box = Box.from_shape(image.shape)
    big = Box((-64, -64), (97 + 160, 83 + 160))  # covers every read box below
    padded = mirror_pad(image, 64 + 32)[32 : 32 + big.shape[0], 32 : 32 + big.shape[1]]

    def tiles_from(origin: int, step: int) -> list[Box]:
        return [Box((y, x), (step, step)) for y in range(origin, 97, step) for x in range(origin, 83, step)]

    aligned = tiles_direct(model, padded, big, tiles_from(0, 24), out_box)
    assert np.abs(aligned - whole).max() <= TOL
    # the same tiles shifted by half a stride (origins 4 mod 8): every max-pool sees other pairs
    shifted = tiles_from(-4, 24)
    misaligned = tiles_direct(model, padded, big, shifted, out_box)
    diff = np.abs(misaligned - whole)
    assert diff.max() > 100 * TOL and (diff > TOL).mean() > 0.5


def test_block_input_is_mirrored_with_project_convention() -> None:
    volume = np.arange(5, dtype=np.float32).reshape(1, 1, 5)  # a b c d e
    spec = UNetSpec(depth=2, base_channels=4, dropout=0.0)
    tiling = Tiling(volume.shape, spec, block_px=4, tile_out=4)
    block = tiling.block((0, 0, 0))
    engine = Engine(UNet(spec).eval(), tiling, stats=IntensityStats(0.0, 1.0), device=CPU)
    staged = engine.stage(volume, block)
    image, box = staged.raw.numpy(), staged.read
    pads = [(-o, e - n) for o, e, n in zip(box.offset, box.end, volume.shape[1:])]
    np.testing.assert_array_equal(image, mirror_pad(volume[0], pads))
    # numpy 'reflect' (no repeated edge pixel): ... c b | a b c d e | d c ...
    x0 = -box.offset[1]
    assert image[0, x0 - 2 : x0 + 7].tolist() == [2, 1, 0, 1, 2, 3, 4, 3, 2]
