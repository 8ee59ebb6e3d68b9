"""elastic: displacement field, sampling grid, mirror convention, label safety, seeds, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unet_core.augment.elastic import (
    Deformation,
    DeformParams,
    Interpolation,
    adjust_grey,
    check_fits,
    deform,
    displacement_field,
    draw_transform,
    jacobian_determinant,
    rng_for,
    sampling_grid,
    source_coordinates,
    upsample_matrix,
    warp_images,
    warp_labels,
    warp_reference,
)
from unet_core.common.errors import ConfigError, UserInputError
from unet_core.common.mirror import mirror_pad, read_mirrored
from unet_core.model.spec import UNetSpec

PAPER = UNetSpec()
TILE_IN = PAPER.input_size(388)  # 572


def _transform(origin=(0, 0), *, angle=0.0, flip=(False, False), coarse=None, grid=3) -> Deformation:
    coarse = np.zeros((2, grid, grid)) if coarse is None else np.asarray(coarse, float)
    return Deformation(coarse, angle, flip, origin, 0.0, 1.0, 1.0)


def _torch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images))


def _random_labels(rng: np.random.Generator, shape, n: int = 30) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.int32)
    for i in range(1, n + 1):
        cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        out[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(4, 15) ** 2] = i
    return out


# -- mirror convention ------------------------------------------------------------------
def test_five_pixel_row_mirrors_without_repeating_the_edge() -> None:
    # row a b c d e = 0..4, tile of 9 starting 2 px before it: c b | a b c d e | d c
    row = np.arange(5, dtype=np.float32)[None, :].repeat(3, 0)
    grid = sampling_grid([_transform((0, -2))], tile_shape=(3, 9), source_shape=row.shape)
    out = warp_images(_torch(row)[None, None], grid, interpolation="nearest")[0, 0, 0]
    assert out.tolist() == [2, 1, 0, 1, 2, 3, 4, 3, 2]
    labels = warp_labels(_torch(row.astype(np.int32))[None], grid)[0, 0]
    assert labels.tolist() == [2, 1, 0, 1, 2, 3, 4, 3, 2]


@pytest.mark.parametrize(
    "origin",
    [
        pytest.param((-7, -11), id="beyond-top-left"),
        pytest.param((5, 9), id="beyond-bottom-right"),
        pytest.param((-20, 14), id="several-reflections"),
    ],
)
def test_shift_beyond_border_equals_mirror_pad(origin) -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(9, 13)).astype(np.float32)
    labels = rng.integers(0, 100, (9, 13)).astype(np.int32)
    tile = (16, 20)
    pad = [(max(0, -o), max(0, o + t - n)) for o, t, n in zip(origin, tile, image.shape)]
    expect_img = mirror_pad(image, pad)
    expect_lab = mirror_pad(labels, pad)
    cut = tuple(slice(o + p[0], o + p[0] + t) for o, p, t in zip(origin, pad, tile))
    tr = _transform(origin)
    out_img, out_lab = deform(_torch(image)[None, None], _torch(labels)[None], [tr], tile_shape=tile)
    np.testing.assert_array_equal(out_img[0, 0].numpy(), expect_img[cut])
    np.testing.assert_array_equal(out_lab[0].numpy(), expect_lab[cut])


@pytest.mark.parametrize("interpolation", [pytest.param(i, id=i.value) for i in Interpolation])
def test_torch_warp_equals_numpy_mirror_reference(interpolation) -> None:
    """grid_sample(padding_mode='reflection', align_corners=True) is unet_core.common.mirror's convention."""
    rng = np.random.default_rng(1)
    image = rng.normal(size=(23, 31))
    params = DeformParams(sigma_px=15.0)
    transforms = [draw_transform(rng_for(3, k), params=params, source_shape=image.shape, tile_shape=(40, 37))
                  for k in range(3)]
    coords = source_coordinates(transforms, (40, 37))
    assert coords.min() < -5 and coords[:, 1].max() > 36  # samples well beyond both borders
    grid = sampling_grid(transforms, tile_shape=(40, 37), source_shape=image.shape, dtype=torch.float64)
    out = warp_images(_torch(image)[None, None].expand(3, 1, -1, -1), grid, interpolation=interpolation)
    for i in range(3):
        ref = warp_reference(image, coords[i], interpolation=interpolation)
        np.testing.assert_allclose(out[i, 0].numpy(), ref, atol=1e-10)


def test_sampling_grid_matches_float64_coordinates() -> None:
    params = DeformParams()
    transforms = [draw_transform(rng_for(0, k), params=params, source_shape=(300, 400), tile_shape=(92, 108))
                  for k in range(4)]
    coords = source_coordinates(transforms, (92, 108))
    grid = sampling_grid(transforms, tile_shape=(92, 108), source_shape=(300, 400), dtype=torch.float64).numpy()
    np.testing.assert_allclose((grid[..., 1] + 1) / 2 * 299, coords[:, 0], atol=1e-9)
    np.testing.assert_allclose((grid[..., 0] + 1) / 2 * 399, coords[:, 1], atol=1e-9)


# -- identity and label safety ----------------------------------------------------------
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_sigma_zero_without_other_transforms_is_exact_identity(interpolation) -> None:
    rng = np.random.default_rng(2)
    image = rng.normal(size=(120, 140)).astype(np.float32)
    labels = _random_labels(rng, (120, 140))
    params = DeformParams(sigma_px=0.0, rotate=False, flip=False, brightness=0.0, contrast=0.0, gamma=0.0,
                          interpolation=interpolation)
    for k in range(5):
        tr = draw_transform(rng_for(9, k), params=params, source_shape=image.shape, tile_shape=(60, 64),
                            out_shape=(20, 24))
        out_img, out_lab = deform(_torch(image)[None, None], _torch(labels)[None], [tr], tile_shape=(60, 64),
                                  interpolation=interpolation)
        (oy, ox) = tr.origin
        stop = (oy + 60, ox + 64)
        np.testing.assert_array_equal(out_lab[0].numpy(), read_mirrored(labels, tr.origin, stop))
        np.testing.assert_array_equal(out_img[0, 0].numpy(), read_mirrored(image, tr.origin, stop))


@pytest.mark.parametrize(
    "dtype,top",
    [
        pytest.param(np.uint8, 255, id="uint8"),
        pytest.param(np.int32, 2**31 - 1, id="int32-beyond-float32"),
        pytest.param(np.int64, 2**40, id="int64"),
    ],
)
def test_deformed_labels_are_a_subset_of_the_source_labels(dtype, top) -> None:
    rng = np.random.default_rng(4)
    labels = rng.integers(top - 1000, top, (150, 150), endpoint=True).astype(dtype)
    labels[rng.random(labels.shape) < 0.3] = 0
    params = DeformParams(sigma_px=25.0)
    transforms = [draw_transform(rng_for(1, k), params=params, source_shape=labels.shape, tile_shape=(108, 108))
                  for k in range(4)]
    image = _torch(np.zeros((4, 1, 150, 150), np.float32))
    _, out = deform(image, _torch(labels)[None].expand(4, -1, -1).contiguous(), transforms, tile_shape=(108, 108))
    assert out.dtype == _torch(labels).dtype
    assert set(np.unique(out.numpy())) <= set(np.unique(labels))


# -- displacement field -----------------------------------------------------------------
@pytest.mark.parametrize("n_coarse", [2, 3, 5])
def test_upsample_matrix_interpolates_and_reproduces_low_order_polynomials(n_coarse) -> None:
    n_out = 61
    a = upsample_matrix(n_out, n_coarse)
    np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-12)
    knots = np.arange(n_coarse) * (n_out - 1) // (n_coarse - 1)
    np.testing.assert_allclose(a[knots], np.eye(n_coarse), atol=1e-12)
    x_knots = np.linspace(0, 1, n_coarse)
    x = np.linspace(0, 1, n_out)
    degree = 1 if n_coarse == 2 else 2  # Keys a=-1/2 with its end conditions is exact for quadratics
    coeffs = [0.3, -1.2, 2.5][: degree + 1]
    np.testing.assert_allclose(a @ np.polyval(coeffs, x_knots), np.polyval(coeffs, x), atol=1e-12)


def test_field_equals_the_coarse_vectors_at_the_knots() -> None:
    coarse = np.random.default_rng(0).normal(0, 10, (2, 3, 3))
    field = displacement_field(coarse, (573, 573))  # knots on pixels 0, 286, 572
    np.testing.assert_allclose(field[:, ::286, ::286], coarse, atol=1e-12)
    field572 = displacement_field(coarse, (TILE_IN, TILE_IN))  # corners are knots at any size
    np.testing.assert_allclose(field572[:, [0, -1]][:, :, [0, -1]], coarse[:, [0, -1]][:, :, [0, -1]], atol=1e-12)


def test_coarse_displacements_have_the_requested_std() -> None:
    sigma = 10.0
    params = DeformParams(sigma_px=sigma)
    values = np.concatenate([
        draw_transform(rng_for(12345, k), params=params, source_shape=(512, 512), tile_shape=(TILE_IN, TILE_IN)
                       ).coarse.ravel()
        for k in range(2000)
    ])  # 36000 values: the sample std has a relative standard error of 1 / sqrt(2 n) = 0.37 %
    assert abs(values.mean()) < 4 * sigma / math.sqrt(values.size)
    assert abs(values.std() / sigma - 1.0) < 4 / math.sqrt(2 * values.size)
    # and they are Gaussian: about 68.3 % within one sigma
    assert abs(np.mean(np.abs(values) < sigma) - 0.6827) < 0.01


def test_default_deformation_never_folds_on_a_paper_tile() -> None:
    params = DeformParams(flip=False)  # flips reverse orientation (det -1) without folding
    worst = np.inf
    for k in range(40):
        tr = draw_transform(rng_for(7, k), params=params, source_shape=(1024, 1024), tile_shape=(TILE_IN, TILE_IN))
        det = jacobian_determinant(source_coordinates([tr], (TILE_IN, TILE_IN))[0])
        worst = min(worst, float(det.min()))
    assert worst > 0.5  # strictly positive with a wide margin (sigma 10 px over ~286 px knot spacing)
    # an extreme sigma does fold, so the check can fail
    wild = draw_transform(rng_for(7, 0), params=DeformParams(sigma_px=400.0, flip=False), source_shape=(1024, 1024),
                          tile_shape=(TILE_IN, TILE_IN))
    assert jacobian_determinant(source_coordinates([wild], (TILE_IN, TILE_IN))[0]).min() < 0


# -- randomness -------------------------------------------------------------------------
def test_transforms_depend_only_on_the_key() -> None:
    params = DeformParams()
    kw = dict(params=params, source_shape=(500, 600), tile_shape=(TILE_IN, TILE_IN), out_shape=(388, 388))
    a = draw_transform(rng_for(5, 2, 3), **kw)
    _ = [draw_transform(rng_for(5, 0, k), **kw) for k in range(10)]  # other draws in between change nothing
    b = draw_transform(rng_for(5, 2, 3), **kw)
    np.testing.assert_array_equal(a.coarse, b.coarse)
    assert (a.angle, a.flip, a.origin, a.brightness, a.contrast, a.gamma) == (
        b.angle, b.flip, b.origin, b.brightness, b.contrast, b.gamma)
    for other in (rng_for(6, 2, 3), rng_for(5, 3, 2), rng_for(5, 2, 4)):
        assert not np.array_equal(draw_transform(other, **kw).coarse, a.coarse)


def test_switching_a_change_off_keeps_the_other_draws() -> None:
    kw = dict(source_shape=(800, 800), tile_shape=(TILE_IN, TILE_IN), out_shape=(388, 388))
    full = draw_transform(rng_for(1, 0), params=DeformParams(), **kw)
    plain = draw_transform(rng_for(1, 0), params=DeformParams(rotate=False, flip=False, brightness=0.0), **kw)
    np.testing.assert_array_equal(full.coarse, plain.coarse)
    assert full.origin == plain.origin and full.contrast == plain.contrast
    assert plain.angle == 0.0 and plain.flip == (False, False) and plain.brightness == 0.0


def test_origins_keep_the_output_window_inside_the_image() -> None:
    params = DeformParams()
    origins = np.array([
        draw_transform(rng_for(0, k), params=params, source_shape=(600, 700), tile_shape=(TILE_IN, TILE_IN),
                       out_shape=(388, 388)).origin
        for k in range(300)
    ])
    ctx = (TILE_IN - 388) // 2
    assert origins[:, 0].min() >= -ctx and origins[:, 0].max() <= 600 - 388 - ctx
    assert origins[:, 1].min() >= -ctx and origins[:, 1].max() <= 700 - 388 - ctx
    assert np.ptp(origins[:, 0]) > 150 and np.ptp(origins[:, 1]) > 250  # spread over the range


# -- grey values ------------------------------------------------------------------------
def test_grey_value_changes() -> None:
    images = torch.linspace(-2, 2, 100, dtype=torch.float64).view(1, 1, 10, 10).repeat(2, 1, 1, 1)
    lin = _transform()
    lin = Deformation(lin.coarse, 0.0, (False, False), (0, 0), 0.25, 1.5, 1.0)
    gam = Deformation(lin.coarse, 0.0, (False, False), (0, 0), 0.0, 1.0, 2.0)
    out = adjust_grey(images, [lin, gam])
    torch.testing.assert_close(out[0], images[0] * 1.5 + 0.25)
    assert out[1].min() == images[1].min() and out[1].max() == images[1].max()  # gamma keeps the range
    unit = (images[1] + 2) / 4
    torch.testing.assert_close(out[1], unit**2 * 4 - 2)


def test_brightness_and_contrast_ranges() -> None:
    params = DeformParams(brightness=0.2, contrast=0.5, gamma=0.3)
    trs = [draw_transform(rng_for(0, k), params=params, source_shape=(600, 600), tile_shape=(60, 60))
           for k in range(500)]
    b = np.array([t.brightness for t in trs])
    c = np.array([t.contrast for t in trs])
    g = np.array([t.gamma for t in trs])
    assert -0.2 <= b.min() < -0.15 and 0.15 < b.max() <= 0.2
    assert 1 / 1.5 <= c.min() < 0.75 and 1.4 < c.max() <= 1.5
    assert 1 / 1.3 <= g.min() and g.max() <= 1.3


# -- no mirroring -----------------------------------------------------------------------
def test_without_mirroring_samples_stay_inside_the_image() -> None:
    params = DeformParams(mirror=False)
    for k in range(20):
        tr = draw_transform(rng_for(0, k), params=params, source_shape=(900, 950), tile_shape=(TILE_IN, TILE_IN))
        coords = source_coordinates([tr], (TILE_IN, TILE_IN))[0]
        assert coords[0].min() >= 1 and coords[0].max() <= 900 - 2
        assert coords[1].min() >= 1 and coords[1].max() <= 950 - 2


# -- bad input --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        pytest.param({"sigma_px": -1.0}, "sigma_px", id="negative-sigma"),
        pytest.param({"sigma_px": float("nan")}, "sigma_px", id="nan-sigma"),
        pytest.param({"grid": 1}, "grid", id="grid-below-2"),
        pytest.param({"grid": 2.5}, "grid", id="grid-not-integer"),
        pytest.param({"contrast": -0.1}, "contrast", id="negative-contrast"),
        pytest.param({"interpolation": "cubic"}, "interpolation", id="unknown-interpolation"),
    ],
)
def test_bad_parameters_are_config_errors(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        DeformParams(**kwargs)


@pytest.mark.parametrize(
    "rotate,source",
    [
        pytest.param(False, (500, 800), id="tile-taller-than-image"),
        pytest.param(True, (700, 700), id="rotated-tile-diagonal-too-big"),
    ],
)
def test_tile_larger_than_image_without_mirroring(rotate, source) -> None:
    params = DeformParams(mirror=False, rotate=rotate)
    with pytest.raises(UserInputError, match="mirroring is off"):
        check_fits(source, (TILE_IN, TILE_IN), params=params)
    check_fits(source, (TILE_IN, TILE_IN), params=DeformParams(rotate=rotate))  # fine with mirroring


def test_negative_seed_is_rejected() -> None:
    with pytest.raises(UserInputError, match="seed"):
        rng_for(-1, 0)


# -- devices ----------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu() -> None:
    rng = np.random.default_rng(0)
    image = _torch(rng.normal(size=(2, 1, 300, 300)).astype(np.float32))
    labels = _torch(_random_labels(rng, (300, 300)))[None].repeat(2, 1, 1)
    trs = [draw_transform(rng_for(0, k), params=DeformParams(), source_shape=(300, 300), tile_shape=(188, 188))
           for k in range(2)]
    cpu_img, cpu_lab = deform(image, labels, trs, tile_shape=(188, 188))
    gpu_img, gpu_lab = deform(image.cuda(), labels.cuda(), trs, tile_shape=(188, 188))
    torch.testing.assert_close(gpu_img.cpu(), cpu_img, atol=1e-4, rtol=1e-4)
    assert (gpu_lab.cpu() != cpu_lab).float().mean() < 1e-3  # ties at half pixels may round differently
