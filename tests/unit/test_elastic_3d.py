"""elastic, volumes (issue 36 item 4): knots, µm displacements, mirror convention, label safety, seeds, bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from unet_core.augment.elastic import (
    DeformParams,
    VolumeDeformation,
    coarse_grid_shape,
    deform,
    displacement_field,
    draw_volume_transform,
    jacobian_determinant,
    rng_for,
    sampling_grid,
    source_coordinates,
    warp_images,
    warp_labels,
    warp_reference,
)
from unet_core.common.errors import ConfigError, UserInputError
from unet_core.common.mirror import SCIPY_MODE, mirror_pad, read_mirrored

SPACING = (2.0, 0.5, 0.5)  # anisotropic serial-section-like voxels, µm: z 4x coarser
TILE = (32, 128, 128)  # the example tile, voxels


def _volume_transform(origin=(0, 0, 0), *, angle=0.0, flip=(False, False), coarse=None,
                      spacing=SPACING) -> VolumeDeformation:
    coarse = np.zeros((3, 2, 2, 2)) if coarse is None else np.asarray(coarse, float)
    return VolumeDeformation(coarse, angle, flip, origin, spacing, 0.0, 1.0, 1.0)


def _draw(key, *, params=None, source=(40, 150, 160), tile=(12, 40, 36), out=None, **kw) -> VolumeDeformation:
    return draw_volume_transform(rng_for(*key), params=params or DeformParams(), spacing_um=kw.pop("spacing", SPACING),
                                 source_shape=source, tile_shape=tile, out_shape=out, **kw)


def _blobs(rng: np.random.Generator, shape, n: int = 40, top: int = 60) -> np.ndarray:
    """Instance labels: n random balls (in voxels, flattened along z) with ids in [top - n, top)."""
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    out = np.zeros(shape, np.int64)
    for i in range(n):
        c = [rng.integers(0, s) for s in shape]
        r = rng.integers(3, 9)
        out[(4 * (zz - c[0])) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < r**2] = top - n + i
    return out


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


# -- the coarse grid --------------------------------------------------------------------
@pytest.mark.parametrize(
    "tile,spacing,sigma_um,expect",
    [
        # knots <= 28.55 sigma apart: step 28.55 * 5 = 142.75 µm; extents 62 / 63.5 / 63.5 µm -> 2 each
        pytest.param((32, 128, 128), (2.0, 0.5, 0.5), 5.0, (2, 2, 2), id="issue-tile-2-knots"),
        # the paper's tile in µm: 571 px * 1 µm / 285.5 = 2 steps -> 3 knots; z 143 * 2 / 285.5 = 1.0 -> 2
        pytest.param((144, 572, 572), (2.0, 1.0, 1.0), 10.0, (2, 3, 3), id="paper-tile-3-knots"),
        # 599.5 / 142.75 = 4.2 -> 5, capped at grid = 3; z 598 / 142.75 = 4.19 -> 3
        pytest.param((300, 1200, 1200), (2.0, 0.5, 0.5), 5.0, (3, 3, 3), id="large-capped-at-grid"),
        # thin in µm: 7 * 4 / 28.55 < 1 -> 2 knots in z, in-plane capped at 3
        pytest.param((8, 1000, 1000), (4.0, 1.0, 1.0), 1.0, (2, 3, 3), id="thin-tile-linear-in-z"),
        pytest.param((32, 128, 128), (2.0, 0.5, 0.5), 0.0, (3, 3, 3), id="sigma-zero"),
    ],
)
def test_coarse_grid_keeps_the_papers_knot_spacing_in_sigmas(tile, spacing, sigma_um, expect) -> None:
    assert coarse_grid_shape(tile, spacing, grid=3, sigma_um=sigma_um) == expect


# -- identity, mirror convention, label safety ------------------------------------------
@pytest.mark.parametrize(
    "origin,flip",
    [
        pytest.param((3, 10, 20), (False, False), id="inside"),
        pytest.param((-4, -7, 30), (False, False), id="beyond-top"),
        pytest.param((9, 25, -30), (False, False), id="beyond-bottom-and-several-reflections"),
        pytest.param((2, 5, 6), (True, False), id="flip-y"),
        pytest.param((2, 5, 6), (True, True), id="flip-y-x"),
    ],
)
def test_whole_voxel_transforms_copy_exactly_with_the_mirror_convention(origin, flip) -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(13, 31, 29)).astype(np.float32)
    labels = _blobs(rng, image.shape).astype(np.int32)
    tile = (10, 24, 22)
    tr = _volume_transform(origin, flip=flip)
    out_img, out_lab = deform(_t(image)[None, None], _t(labels)[None], [tr], tile_shape=tile)
    stop = tuple(o + t for o, t in zip(origin, tile))
    # a flip maps tile voxel p to c - (p - c): the same source box, read backwards along that axis
    flips = tuple(axis for axis, flipped in ((1, flip[0]), (2, flip[1])) if flipped)
    np.testing.assert_array_equal(out_img[0, 0].numpy(), np.flip(read_mirrored(image, origin, stop), flips))
    np.testing.assert_array_equal(out_lab[0].numpy(), np.flip(read_mirrored(labels, origin, stop), flips))


def test_five_voxel_rows_mirror_without_repeating_the_edge_in_every_axis() -> None:
    # along each axis a b c d e = 0..4, 9 voxels from 2 before: c b | a b c d e | d c
    volume = np.zeros((5, 5, 5), np.float32)
    for axis in range(3):
        row = np.arange(5, dtype=np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
        vol = volume + row
        tr = _volume_transform(tuple(-2 if a == axis else 0 for a in range(3)))
        tile = tuple(9 if a == axis else 5 for a in range(3))
        grid = sampling_grid([tr], tile_shape=tile, source_shape=vol.shape)
        out = warp_images(_t(vol)[None, None], grid, interpolation="nearest")[0, 0]
        line = out[tuple(slice(None) if a == axis else 0 for a in range(3))]
        assert line.tolist() == [2, 1, 0, 1, 2, 3, 4, 3, 2]
        lab = warp_labels(_t(vol.astype(np.int32))[None], grid)[0]
        pad = [(2, 2) if a == axis else (0, 0) for a in range(3)]
        np.testing.assert_array_equal(lab.numpy(), mirror_pad(vol.astype(np.int32), pad))


def test_sigma_zero_without_rotation_is_an_exact_copy_of_a_drawn_tile() -> None:
    rng = np.random.default_rng(1)
    image = rng.normal(size=(20, 60, 70)).astype(np.float32)
    labels = _blobs(rng, image.shape)
    params = DeformParams(sigma_px=0.0, rotate=False, flip=False, brightness=0.0, contrast=0.0)
    for k in range(3):
        tr = _draw((9, 0, k), params=params, source=image.shape, tile=(14, 40, 44), out=(6, 20, 24))
        out_img, out_lab = deform(_t(image)[None, None], _t(labels)[None], [tr], tile_shape=(14, 40, 44))
        stop = tuple(o + t for o, t in zip(tr.origin, (14, 40, 44)))
        np.testing.assert_array_equal(out_img[0, 0].numpy(), read_mirrored(image, tr.origin, stop))
        np.testing.assert_array_equal(out_lab[0].numpy(), read_mirrored(labels, tr.origin, stop))


@pytest.mark.parametrize(
    "dtype,top",
    [
        pytest.param(np.uint16, 60_000, id="uint16"),
        pytest.param(np.int32, 2**31 - 1, id="int32-beyond-float32"),
        pytest.param(np.int64, 2**40, id="int64"),
    ],
)
def test_deformed_labels_are_a_subset_of_the_source_labels(dtype, top) -> None:
    rng = np.random.default_rng(4)
    labels = _blobs(rng, (20, 50, 50), n=60, top=top).astype(dtype)
    params = DeformParams(sigma_px=40.0)  # 20 µm: strong, to sample many boundaries
    trs = [_draw((1, 0, k), params=params, source=labels.shape, tile=(16, 40, 40)) for k in range(3)]
    assert all(np.any(t.coarse) and t.angle != 0 for t in trs)
    images = torch.zeros((3, 1, *labels.shape))
    _, out = deform(images, _t(labels)[None].expand(3, -1, -1, -1).contiguous(), trs, tile_shape=(16, 40, 40))
    assert out.dtype == _t(labels).dtype
    values = set(np.unique(out.numpy()))
    assert values <= set(np.unique(labels)) and len(values) > 20


# -- geometry of the field --------------------------------------------------------------
def test_jacobian_determinant_is_positive_at_the_defaults() -> None:
    """sigma 10 px in plane = 5 µm at 0.5 µm; the 32 x 128 x 128 tile at (2, 0.5, 0.5) µm never folds."""
    worst = np.inf
    for k in range(8):
        tr = _draw((0, 3, k), source=(48, 200, 200), tile=TILE)
        assert tr.coarse.shape == (3, 2, 2, 2) and np.any(tr.coarse)
        det = jacobian_determinant(source_coordinates([tr], TILE)[0]) * np.sign(np.linalg.det(tr.matrix()))
        worst = min(worst, float(det.min()))
    assert worst > 0.3  # strictly positive with a margin
    # three knots per axis on the same tile (the 2-D count) do fold: why coarse_grid_shape limits them
    folded = 0
    for k in range(8):
        tr = _draw((0, 3, k), source=(48, 200, 200), tile=TILE)
        coarse = rng_for(0, 4, k).standard_normal((3, 3, 3, 3)) * 5.0 / np.array(SPACING)[:, None, None, None]
        three = VolumeDeformation(coarse, tr.angle, (False, False), tr.origin, SPACING, 0.0, 1.0, 1.0)
        folded += jacobian_determinant(source_coordinates([three], TILE)[0]).min() <= 0
    assert folded >= 2  # 4 of these 8


def test_displacement_is_isotropic_in_micrometres() -> None:
    """Drawn in µm: along z (2 µm voxels) the voxel displacement is 1/4 of that in plane (0.5 µm)."""
    params = DeformParams(rotate=False, flip=False)
    means = np.zeros(3)
    for k in range(40):  # the field on the tile
        tr = _draw((2, 0, k), source=(48, 200, 200), tile=TILE, params=params)
        means += np.abs(displacement_field(tr.coarse, TILE)).mean(axis=(1, 2, 3)) / 40
    assert means[0] / means[1] == pytest.approx(0.25, rel=0.1)
    assert means[0] / means[2] == pytest.approx(0.25, rel=0.1)
    # each voxel's displacement is a fixed linear combination of the knots' (the same for every
    # component), so the knots of many samples pin the ratio of the means more tightly
    knots = np.stack([_draw((2, 1, k), source=(48, 200, 200), tile=TILE, params=params).coarse for k in range(2000)])
    spread = np.abs(knots).mean(axis=(0, 2, 3, 4))
    assert spread[0] / spread[1] == pytest.approx(0.25, rel=0.03)
    assert spread[0] / spread[2] == pytest.approx(0.25, rel=0.03)
    assert spread[1] / spread[2] == pytest.approx(1.0, rel=0.03)


def test_sigma_um_sets_the_knot_vectors_in_micrometres() -> None:
    coarse = np.stack([_draw((3, 0, k), tile=TILE, source=(48, 200, 200), sigma_um=3.0).coarse for k in range(200)])
    um = coarse * np.array(SPACING)[None, :, None, None, None]
    assert um.std() == pytest.approx(3.0, rel=0.05)
    default = _draw((3, 0, 0), tile=TILE, source=(48, 200, 200))  # 10 px * 0.5 µm
    explicit = _draw((3, 0, 0), tile=TILE, source=(48, 200, 200), sigma_um=5.0)
    np.testing.assert_array_equal(default.coarse, explicit.coarse)


def test_rotation_is_about_z_and_physical_for_unequal_pixels() -> None:
    tr = _volume_transform(angle=0.7, flip=(True, False), spacing=(3.0, 0.4, 0.8))
    m = tr.matrix()
    np.testing.assert_array_equal(m[0], [1, 0, 0])
    np.testing.assert_array_equal(m[:, 0], [1, 0, 0])
    s = np.diag((0.4, 0.8))
    physical = s @ m[1:, 1:] @ np.linalg.inv(s)  # the map in µm: a rotation times a flip
    np.testing.assert_allclose(physical @ physical.T, np.eye(2), atol=1e-12)
    assert np.linalg.det(physical) == pytest.approx(-1.0)
    coords = source_coordinates([_volume_transform((5, 0, 0), angle=0.7)], (4, 6, 6))[0]
    np.testing.assert_allclose(coords[0], 5 + np.arange(4)[:, None, None] + np.zeros((4, 6, 6)), atol=1e-12)


# -- torch against NumPy ----------------------------------------------------------------
def test_sampling_grid_matches_float64_coordinates() -> None:
    trs = [_draw((0, 1, k), source=(30, 90, 100), tile=(12, 44, 40), sigma_um=8.0) for k in range(3)]
    coords = source_coordinates(trs, (12, 44, 40))
    grid = sampling_grid(trs, tile_shape=(12, 44, 40), source_shape=(30, 90, 100), dtype=torch.float64).numpy()
    for axis, slot, size in ((0, 2, 30), (1, 1, 90), (2, 0, 100)):  # grid holds (x, y, z)
        np.testing.assert_allclose((grid[..., slot] + 1) / 2 * (size - 1), coords[:, axis], atol=1e-9)


def test_torch_trilinear_warp_equals_the_numpy_mirror_reference() -> None:
    rng = np.random.default_rng(1)
    image = rng.normal(size=(9, 23, 31))
    params = DeformParams(sigma_px=30.0)
    trs = [_draw((3, 0, k), params=params, source=image.shape, tile=(14, 40, 37), out=(6, 20, 20)) for k in range(3)]
    coords = source_coordinates(trs, (14, 40, 37))
    assert coords[:, 0].min() < -1 and coords[:, 0].max() > 9 and coords[:, 2].min() < -3  # beyond the borders
    batch = _t(image)[None, None].expand(3, 1, -1, -1, -1)
    grid64 = sampling_grid(trs, tile_shape=(14, 40, 37), source_shape=image.shape, dtype=torch.float64)
    out64 = warp_images(batch, grid64, interpolation="bilinear")
    out32 = warp_images(batch.float(), sampling_grid(trs, tile_shape=(14, 40, 37), source_shape=image.shape),
                        interpolation="bilinear")
    for i in range(3):
        ref = warp_reference(image, coords[i], interpolation="bilinear")
        np.testing.assert_allclose(out64[i, 0].numpy(), ref, atol=1e-5)
        np.testing.assert_allclose(out32[i, 0].numpy(), ref, atol=1e-3)  # float32 grid on the training device


def test_reference_is_scipy_mirror_map_coordinates() -> None:
    """The reference's mirror convention is scipy.ndimage's 'mirror', in 3-D too."""
    rng = np.random.default_rng(2)
    image = rng.normal(size=(6, 11, 9))
    coords = rng.uniform(-4, 14, (3, 5, 7, 8))  # inside and beyond every face (one reflection)
    expect = ndi.map_coordinates(image, coords, order=1, mode=SCIPY_MODE)
    np.testing.assert_allclose(warp_reference(image, coords, interpolation="bilinear"), expect, atol=1e-12)


# -- randomness and batching ------------------------------------------------------------
def test_a_sample_depends_only_on_its_key_whatever_the_order_or_batch() -> None:
    rng = np.random.default_rng(5)
    volumes = [rng.normal(size=(16, 50, 60)).astype(np.float32) for _ in range(2)]
    labels = [_blobs(rng, (16, 50, 60)).astype(np.int32) for _ in range(2)]
    keys = [(7, v, k) for v in range(2) for k in range(3)]
    forward = {key: _draw(key, source=(16, 50, 60), tile=(12, 40, 36)) for key in keys}
    backward = {key: _draw(key, source=(16, 50, 60), tile=(12, 40, 36)) for key in reversed(keys)}
    for key in keys:
        a, b = forward[key], backward[key]
        np.testing.assert_array_equal(a.coarse, b.coarse)
        for name in ("angle", "flip", "origin", "brightness", "contrast", "gamma"):
            assert getattr(a, name) == getattr(b, name)
    assert len({forward[key].coarse.tobytes() for key in keys}) == len(keys)
    images = torch.stack([_t(volumes[v])[None] for _, v, _ in keys])
    labs = torch.stack([_t(labels[v]) for _, v, _ in keys])
    batch_img, batch_lab = deform(images, labs, [forward[key] for key in keys], tile_shape=(12, 40, 36))
    for i in (4, 0, 2):  # one at a time, another order
        one_img, one_lab = deform(images[i : i + 1], labs[i : i + 1], [backward[keys[i]]], tile_shape=(12, 40, 36))
        assert torch.equal(one_img[0], batch_img[i]) and torch.equal(one_lab[0], batch_lab[i])


def test_a_sample_is_the_same_in_another_process() -> None:
    code = (
        "from unet_core.augment.elastic import DeformParams, draw_volume_transform, rng_for\n"
        "t = draw_volume_transform(rng_for(7, 1, 2), params=DeformParams(), spacing_um=(2.0, 0.5, 0.5),"
        " source_shape=(16, 50, 60), tile_shape=(12, 40, 36))\n"
        "print(t.coarse.tobytes().hex(), t.angle.hex(), t.origin)\n"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    here = _draw((7, 1, 2), source=(16, 50, 60), tile=(12, 40, 36))
    assert there[:2] == [here.coarse.tobytes().hex(), here.angle.hex()]
    assert " ".join(there[2:]) == str(here.origin)


def test_switching_the_deformation_off_keeps_the_other_draws() -> None:
    full = _draw((1, 0, 0), tile=TILE, source=(48, 200, 200))
    rigid = _draw((1, 0, 0), tile=TILE, source=(48, 200, 200), params=DeformParams(sigma_px=0.0))
    assert not np.any(rigid.coarse) and rigid.coarse.shape == (3, 3, 3, 3)
    for name in ("angle", "flip", "origin", "brightness", "contrast"):
        assert getattr(full, name) == getattr(rigid, name)


def test_origins_keep_the_output_window_inside_the_volume() -> None:
    origins = np.array([_draw((0, 0, k), source=(20, 90, 100), tile=(12, 40, 36), out=(4, 20, 16)).origin
                        for k in range(300)])
    ctx = ((12 - 4) // 2, (40 - 20) // 2, (36 - 16) // 2)
    for axis, (n, o) in enumerate(zip((20, 90, 100), (4, 20, 16))):
        assert origins[:, axis].min() == -ctx[axis] and origins[:, axis].max() == n - o - ctx[axis]


def test_without_mirroring_samples_stay_inside_the_volume() -> None:
    params = DeformParams(mirror=False)
    for k in range(5):
        tr = _draw((0, 2, k), params=params, source=(30, 120, 130), tile=(20, 64, 64))
        coords = source_coordinates([tr], (20, 64, 64))[0]
        for axis, n in enumerate((30, 120, 130)):
            assert coords[axis].min() >= 0 and coords[axis].max() <= n - 1


# -- bad input --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spacing",
    [
        pytest.param((0.0, 0.5, 0.5), id="zero"),
        pytest.param((2.0, -0.5, 0.5), id="negative"),
        pytest.param((2.0, 0.5, float("nan")), id="nan"),
        pytest.param((0.5, 0.5), id="two-values"),
    ],
)
def test_bad_spacing_is_a_config_error(spacing) -> None:
    with pytest.raises(ConfigError, match="spacing_um") as err:
        _draw((0, 0, 0), spacing=spacing)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "call,match",
    [
        pytest.param(lambda: _draw((0, 0, 0), source=(150, 160), tile=(40, 36)), "Z, Y, X", id="2-d-shapes"),
        pytest.param(lambda: _draw((0, 0, 0), source=(10, 150, 160), tile=(12, 40, 36)), "larger than",
                     id="tile-thicker-than-volume"),
        pytest.param(lambda: _draw((0, 0, 0), source=(20, 30, 160), tile=(12, 40, 36)), "larger than",
                     id="tile-taller-than-volume"),
        pytest.param(lambda: _draw((0, 0, 0), source=(20, 60, 60), tile=(12, 56, 56),
                                   params=DeformParams(mirror=False)), "mirroring is off", id="rotated-tile-no-mirror"),
        pytest.param(lambda: deform(torch.zeros(1, 1, 50, 60), None, [_volume_transform()], tile_shape=(12, 40, 36)),
                     "needs images", id="2-d-array-for-a-volume-tile"),
        pytest.param(lambda: deform(torch.zeros(1, 1, 50, 60), None, [_volume_transform()], tile_shape=(40, 36)),
                     "3-D transform", id="volume-transform-on-a-slice"),
        pytest.param(lambda: deform(torch.zeros(1, 1, 20, 50, 60), None, [_volume_transform(angle=0.1)],
                                    tile_shape=(12, 40, 36), interpolation="bicubic"), "bilinear", id="bicubic-volume"),
    ],
)
def test_bad_input_raises_one_line(call, match) -> None:
    with pytest.raises(UserInputError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


def test_negative_sigma_um_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="sigma_um"):
        _draw((0, 0, 0), sigma_um=-1.0)


# -- devices ----------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu() -> None:
    rng = np.random.default_rng(0)
    image = _t(rng.normal(size=(2, 1, 40, 150, 150)).astype(np.float32))
    labels = _t(_blobs(rng, (40, 150, 150)).astype(np.int32))[None].repeat(2, 1, 1, 1)
    trs = [_draw((0, 0, k), source=(40, 150, 150), tile=TILE) for k in range(2)]
    cpu_img, cpu_lab = deform(image, labels, trs, tile_shape=TILE)
    gpu_img, gpu_lab = deform(image.cuda(), labels.cuda(), trs, tile_shape=TILE)
    torch.testing.assert_close(gpu_img.cpu(), cpu_img, atol=1e-4, rtol=1e-4)
    assert (gpu_lab.cpu() != cpu_lab).float().mean() < 1e-3  # ties at half voxels may round differently
