"""Seamlessness of volumes (issue 36): a 3-D network's tiled, blocked, multi-job prediction ==
one pass over the whole mirror-padded volume, within 1e-5 in fp32.

Random tiny 3-D U-Nets (isotropic, and anisotropic z: no z pooling or 1-px z kernels at the
first levels), odd volume sizes in every axis, volumes thinner than the network's z context
(mirrored several times over), blocks and tiles smaller than the volume along every axis, jobs
in shuffled order, slice-by-slice normalisation. Misaligned z tiles are shown to break it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unet_core.common.geometry import Box
from unet_core.common.intensity import Scaling
from unet_core.common.mirror import mirror_pad
from unet_core.infer.engine import Engine
from unet_core.infer.tiling import TTA, Tiling, tile_read_box
from unet_core.model.spec import UNetSpec
from unet_core.model.unet import UNet


TOL = 1e-5
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in tests/conftest.py


def scaling(z: int) -> Scaling:
    """A different normalisation per slice, as the slice modes give."""
    return Scaling(offset=0.1 * z, scale=1.0 + 0.05 * z)


def normalised(volume: np.ndarray) -> np.ndarray:
    out = volume.astype(np.float32).copy()
    for z in range(out.shape[0]):
        out[z] = (out[z] - np.float32(scaling(z).offset)) / np.float32(scaling(z).scale)
    return out


def whole_volume_prediction(model: UNet, volume: np.ndarray) -> np.ndarray:
    """One network pass over the normalised (Z, Y, X) volume mirror-padded by the context per axis
    (+ up to a valid size)."""
    pads = [(a.context, a.context + a.valid_output_size_at_least(n) - n) for a, n in zip(model.spec.axes, volume.shape)]
    x = torch.from_numpy(mirror_pad(normalised(volume), pads))[None, None]
    with torch.inference_mode():
        probs = torch.softmax(model(x), dim=1)[0].numpy()
    return probs[(slice(None), *(slice(0, n) for n in volume.shape))]


def tiled_volume_prediction(model: UNet, volume: np.ndarray, tiling: Tiling, jobs: int, seed: int,
                            tta: str = "none") -> np.ndarray:
    out = np.full((model.spec.n_classes, *volume.shape), np.nan, np.float32)
    order = np.random.default_rng(seed).permutation(jobs)
    engine = Engine(model, tiling, stats=scaling, device=CPU, batch=2, tta=tta)
    for job in order:
        for block in tiling.job_blocks(int(job), jobs):
            result = engine.predict(engine.stage(volume, block))()
            out[(slice(None), *block.write.to_slices())] = result.probabilities
    return out


def random_case(seed: int) -> tuple[UNet, np.ndarray, Tiling, int]:
    rng = np.random.default_rng(seed)
    depth = int(rng.integers(1, 3))
    pool_z = tuple(int(v) for v in rng.choice([1, 2], size=depth))
    kernel_z = tuple(int(v) for v in rng.choice([1, 3], size=depth + 1))
    spec = UNetSpec(depth=depth, base_channels=2, n_classes=int(rng.choice([2, 3])), dropout=0.0,
                    dims=3, pool_z=pool_z, kernel_z=kernel_z)
    torch.manual_seed(seed)
    model = UNet(spec).eval()
    shape = (int(rng.integers(1, 12)) | 1, int(rng.integers(3, 40)) | 1, int(rng.integers(3, 40)) | 1)  # odd sizes
    volume = rng.normal(size=shape).astype(np.float32) * 3 + 1
    zs, ps = spec.z_axis.stride, spec.stride
    block_z = zs * int(rng.integers(1, 4))
    tiling = Tiling(shape, spec, block_px=ps * int(rng.integers(1, 5)), tile_out=ps * int(rng.integers(1, 4)),
                    block_z=block_z, tile_z=zs * int(rng.integers(1, 3)))
    return model, volume, tiling, int(rng.integers(1, tiling.n_blocks + 1))


@pytest.mark.parametrize("seed", range(8))
def test_tiled_volume_equals_one_pass(seed: int) -> None:
    model, volume, tiling, jobs = random_case(seed)
    want = whole_volume_prediction(model, volume)
    got = tiled_volume_prediction(model, volume, tiling, jobs, seed)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_a_volume_thinner_than_the_z_context() -> None:
    """3 slices, z context 20 (z pools 2, 2; kernels 3): every tile reads the volume mirrored
    several times over along z, and still equals the one pass."""
    spec = UNetSpec(depth=2, base_channels=2, dropout=0.0, dims=3)
    assert spec.z_axis.context == 20
    torch.manual_seed(1)
    model = UNet(spec).eval()
    volume = np.random.default_rng(1).normal(size=(3, 13, 11)).astype(np.float32)
    tiling = Tiling(volume.shape, spec, block_px=8, tile_out=4, block_z=4, tile_z=4)
    np.testing.assert_allclose(tiled_volume_prediction(model, volume, tiling, 2, 0),
                               whole_volume_prediction(model, volume), atol=TOL, rtol=0)


def test_in_plane_test_time_flips_of_volumes_are_exact() -> None:
    """d4 on a 3-D net: the 8 in-plane transforms of each tile, averaged; equal to the average of
    the one-pass predictions of the 8 transformed volumes (in-plane sizes multiples of the stride:
    a flipped axis is aligned to the image end rounded up to the stride, as in 2-D)."""
    spec = UNetSpec(depth=1, base_channels=2, dropout=0.0, dims=3, pool_z=(1,), kernel_z=(1, 3))
    torch.manual_seed(2)
    model = UNet(spec).eval()
    volume = np.random.default_rng(2).normal(size=(5, 10, 10)).astype(np.float32)
    tiling = Tiling(volume.shape, spec, block_px=4, tile_out=2, block_z=2, tile_z=1)
    got = tiled_volume_prediction(model, volume, tiling, 3, 0, tta="d4")
    want = np.zeros_like(got)
    for k in range(4):
        for flip in (False, True):
            v = np.rot90(volume, k, axes=(1, 2))
            v = v[:, :, ::-1] if flip else v
            p = whole_volume_prediction(model, np.ascontiguousarray(v))
            p = p[:, :, :, ::-1] if flip else p
            want += np.rot90(p, -k, axes=(2, 3))
    np.testing.assert_allclose(got, want / 8, atol=TOL, rtol=0)


def test_misaligned_z_tiles_break_the_equality() -> None:
    """Tiles whose z origins are not multiples of the z pooling product see other pooling pairs:
    what the tiling's alignment prevents."""
    spec = UNetSpec(depth=1, base_channels=4, dropout=0.0, dims=3, pool_z=(2,), kernel_z=(3, 3))
    torch.manual_seed(3)
    model = UNet(spec).eval()
    volume = np.random.default_rng(3).normal(size=(6, 8, 8)).astype(np.float32)
    want = whole_volume_prediction(model, volume)
    pads = [(a.context + 8, a.context + 8) for a in spec.axes]
    padded = mirror_pad(normalised(volume), pads)
    tile = Box((1, 0, 0), (2, 8, 8))  # z origin 1: odd
    read = tile_read_box(tile, spec)
    x = torch.from_numpy(np.ascontiguousarray(padded[read.shift([p for p, _ in pads]).to_slices()]))[None, None]
    with torch.inference_mode():
        probs = torch.softmax(model(x), dim=1)[0].numpy()[:, :2, :8, :8]
    assert np.abs(probs - want[:, 1:3]).max() > 1e-3


def test_volume_tiling_checks_z_sizes() -> None:
    spec = UNetSpec(depth=2, base_channels=2, dims=3, pool_z=(1, 2))
    with pytest.raises(Exception, match="block z size 3 slices is not a multiple of the z pooling product = 2"):
        Tiling((5, 16, 16), spec, block_px=8, tile_out=8, block_z=3)
    with pytest.raises(Exception, match="a 2-D network predicts one slice at a time"):
        Tiling((5, 16, 16), UNetSpec(depth=2), block_px=8, tile_out=8, block_z=2)
    tiling = Tiling((5, 16, 16), spec, block_px=8, tile_out=4, block_z=4)
    assert tiling.grid == (2, 2, 2) and [b.write.shape for b in tiling.blocks()][-1] == (1, 8, 8)
    assert Tiling.from_dict(tiling.to_dict()) == tiling
    assert [t.shape for t in tiling.tiles(tiling.block((1, 0, 0)))] == [(2, 4, 4)] * 4


def test_too_many_jobs_counts_z_blocks() -> None:
    spec = UNetSpec(depth=2, base_channels=2, dims=3, pool_z=(1, 2))
    with pytest.raises(Exception, match=r"--jobs 13 is more than the 12 block\(s\) of the stack: 2 z block\(s\) of "
                                        r"4 slices for 7 x 3 x 2 blocks of 12 px for 29 x 23 px"):
        Tiling((7, 29, 23), spec, 12, 8, 4).check_jobs(13, option="--jobs")
