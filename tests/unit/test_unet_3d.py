"""The 3-D U-Net (issue 36, part 1): per-axis geometry owned by the model, the network in 3-D,
and 2-D models described and built exactly as before."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unet_core.common.errors import CheckpointError, ConfigError
from unet_core.model.checkpoint import load_model, save_model
from unet_core.model.spec import AxisGeometry, UNetSpec
from unet_core.model.unet import UNet


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_the_papers_axis_is_the_2d_geometry(depth: int) -> None:
    """Kernels 3 and pools 2 on one axis give the closed forms of the 2-D network."""
    axis = UNetSpec(depth=depth).plane
    assert axis.context == 6 * 2**depth - 4 and axis.stride == 2**depth
    valid = [n for n in range(1, 700) if axis._valid_forward(n) is not None]
    assert valid[0] == axis.min_input_size and valid == list(range(valid[0], 700, 2**depth))


def test_a_2d_models_description_is_unchanged() -> None:
    """model.pt, provenance and fingerprints of 2-D models hold the same keys as before dims."""
    assert UNetSpec().fingerprint() == json.dumps(
        {"base_channels": 64, "depth": 4, "dropout": 0.5, "in_channels": 1, "n_classes": 2,
         "norm": "none", "padding": "valid"}, sort_keys=True)
    assert UNetSpec.from_dict({"depth": 2, "dims": 2}) == UNetSpec(depth=2)


@pytest.mark.parametrize(("kernels", "pools", "context", "min_in", "stride"), [
    pytest.param((3, 3, 3, 3), (2, 2, 2), 44, 92, 8, id="isotropic"),
    pytest.param((1, 3, 3, 3), (1, 2, 2), 20, 44, 4, id="first-level-flat"),
    pytest.param((1, 1, 3, 3), (1, 1, 2), 8, 18, 2, id="two-levels-flat"),
    pytest.param((1, 1, 1, 1), (1, 1, 1), 0, 1, 1, id="z-never-mixed"),
])
def test_z_axis_geometry(kernels, pools, context, min_in, stride) -> None:
    """Context, smallest input and stride of anisotropic z axes, against a hand count (e.g. the
    second row: level 0 has no z conv, levels 1 and 2 are pooled x2: 4 convs x 1 at scale 1, ...)."""
    z = UNetSpec(depth=3, dims=3, pool_z=pools, kernel_z=kernels).z_axis
    assert (z.context, z.min_input_size, z.stride) == (context, min_in, stride)
    for k in range(4):
        n = min_in + k * stride
        assert z.output_size(n) == n - 2 * context
        assert z.input_size(n - 2 * context) == n
    if stride > 1:
        with pytest.raises(ValueError, match="nearest"):
            z.output_size(min_in + 1)


@pytest.mark.parametrize(("pool_z", "kernel_z"), [((2, 2), (3, 3, 3)), ((1, 2), (1, 3, 3)), ((1, 1), (1, 1, 3))])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_3d_network_output_shape_is_the_specs(pool_z, kernel_z, padding) -> None:
    spec = UNetSpec(depth=2, base_channels=2, dims=3, pool_z=pool_z, kernel_z=kernel_z, padding=padding, dropout=0.0)
    net = UNet(spec).eval()
    z, p = spec.z_axis, spec.plane
    shape = (z.min_input_size + z.stride, p.min_input_size, p.min_input_size + p.stride)
    with torch.no_grad():
        out = net(torch.randn(1, 1, *shape))
        margin = net.margin(torch.randn(1, 1, *shape))
    want = tuple(a.output_size(n) for a, n in zip(spec.axes, shape))
    assert out.shape == (1, 2, *want) and margin.shape == (1, 1, *want)


def test_3d_valid_network_is_translation_equivariant_on_its_strides() -> None:
    """A window shifted by the stride along each axis gives the output shifted by the stride:
    the property exact overlap-tile prediction of volumes rests on."""
    torch.manual_seed(0)
    spec = UNetSpec(depth=2, base_channels=2, dims=3, pool_z=(1, 2), kernel_z=(1, 3, 3), dropout=0.0)
    net = UNet(spec).eval()
    z, p = spec.z_axis, spec.plane
    big = torch.randn(1, 1, z.min_input_size + 2 * z.stride, p.min_input_size + 2 * p.stride,
                      p.min_input_size + 2 * p.stride)
    small = (z.min_input_size + z.stride, p.min_input_size + p.stride, p.min_input_size + p.stride)
    with torch.no_grad():
        whole = net(big)
        shifted = net(big[:, :, z.stride:z.stride + small[0], p.stride:p.stride + small[1], p.stride:p.stride + small[2]])
    n = shifted.shape[2:]
    ref = whole[:, :, z.stride:z.stride + n[0], p.stride:p.stride + n[1], p.stride:p.stride + n[2]]
    assert torch.allclose(shifted, ref, atol=1e-5, rtol=0)


def test_3d_he_init_counts_every_kernel_tap() -> None:
    torch.manual_seed(0)
    net = UNet(UNetSpec(depth=2, base_channels=16, dims=3, pool_z=(1, 2), kernel_z=(1, 3, 3)))
    conv = net.downs[1][1][0]  # level 2: 3 x 3 x 3 kernels from 32 channels
    assert conv.weight.shape == (64, 32, 3, 3, 3)
    assert abs(conv.weight.std().item() / (2 / (32 * 27)) ** 0.5 - 1) < 0.05
    flat = net.inc[0]  # level 0: 1 x 3 x 3 kernels
    assert flat.weight.shape == (16, 1, 1, 3, 3)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dims": 4}, "model.dims must be 2 or 3"),
    ({"dims": 2, "pool_z": [1, 2, 2, 2]}, "model.pool_z applies to model.dims 3 only"),
    ({"dims": 3, "pool_z": [1, 2]}, "model.pool_z must be a list of 4 values"),
    ({"dims": 3, "pool_z": [1, 2, 2, 3]}, "each 1 or 2"),
    ({"dims": 3, "kernel_z": [3, 3, 3, 2, 3]}, "model.kernel_z must be a list of 5 values, each 1 or 3"),
])
def test_bad_3d_settings_name_the_key(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        UNetSpec(**kwargs)


def test_a_3d_model_file_keeps_its_geometry_and_is_told_from_a_2d_config(tmp_path) -> None:
    spec = UNetSpec(depth=2, base_channels=2, dims=3, pool_z=(1, 2), kernel_z=(1, 1, 3), dropout=0.0)
    torch.manual_seed(0)
    net = UNet(spec)
    save_model(tmp_path / "m.pt", net)
    model, _ = load_model(tmp_path / "m.pt", expect={"dims": 3, "pool_z": [1, 2]})
    assert model.spec == spec and model.spec.z_axis.context == spec.z_axis.context
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), net.state_dict().values()))
    with pytest.raises(CheckpointError, match=r"dims: file 3 vs config 2"):
        load_model(tmp_path / "m.pt", expect={"dims": 2})
    save_model(tmp_path / "flat.pt", UNet(UNetSpec(depth=2, base_channels=2)))
    with pytest.raises(CheckpointError, match=r"dims: file 2 vs config 3"):
        load_model(tmp_path / "flat.pt", expect=spec)


def test_axis_geometry_alone() -> None:
    """The z axis of nnU-Net's anisotropic plans: no pooling, 1-px kernels at the first level."""
    axis = AxisGeometry(kernels=(1, 3), pools=(1,))
    assert (axis.context, axis.stride, axis.min_input_size, axis.output_size(5)) == (2, 1, 5, 1)


def test_stages_that_run_2d_models_only_refuse_a_3d_model_in_one_line(tmp_path, capsys) -> None:
    """unet predict with --backend onnxruntime and unet export-bioimageio: exit 2, one line naming the
    file, nothing written (issue 36, item 9; unet predict on torch runs 3-D models:
    tests/unit/test_predict_3d.py)."""
    from test_bioimageio_export import write_stack
    from unet_core.cli import main

    stack = write_stack(tmp_path / "s.ome.zarr", np.zeros((4, 40, 40), np.uint8))
    model = tmp_path / "m3d.pt"
    save_model(model, UNet(UNetSpec(depth=1, base_channels=2, dims=3, pool_z=(1,), dropout=0.0)))
    for args in (["predict", str(stack), str(model), str(tmp_path / "part"), "--backend", "onnxruntime"],
                 ["export-bioimageio", str(model), str(tmp_path / "pkg.zip"), "--sample", str(stack)]):
        capsys.readouterr()
        assert main(["-q", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(model) in err[0] and "3-D model" in err[0], err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m3d.pt", "s.ome.zarr"]


def test_flops_count_every_axis() -> None:
    """A 3-D net with 1-px z kernels and no z pooling works slice by slice: a (Z, Y, X) tile costs
    exactly Z tiles of the 2-D net, and its overhead over the ideal is the 2-D one; an isotropic
    net's overhead grows as its z tiles shrink (more z context per kept voxel)."""
    from unet_core.infer.tiling import Tiling

    flat = UNetSpec(depth=2, base_channels=4, dims=3, pool_z=(1, 1), kernel_z=(1, 1, 1))
    plane = UNetSpec(depth=2, base_channels=4)
    assert flat.tile_flops((5, 60, 76)) == 5 * plane.tile_flops((60, 76))
    assert flat.ideal_flops_per_output_pixel() == plane.ideal_flops_per_output_pixel()
    assert (Tiling((8, 64, 64), flat, 32, 32, block_z=4).flops_overhead()
            == Tiling((1, 64, 64), plane, 32, 32).flops_overhead())
    iso = UNetSpec(depth=2, base_channels=4, dims=3)
    thick = Tiling((64, 64, 64), iso, 32, 32, block_z=32).flops_overhead()
    thin = Tiling((64, 64, 64), iso, 32, 32, block_z=32, tile_z=8).flops_overhead()
    assert 1 < thick < thin


@pytest.mark.parametrize(("spacing", "depth", "pools", "kernels"), [
    pytest.param((2.0, 0.5, 0.5), 3, (1, 1, 2), (1, 1, 3, 3), id="4x-anisotropic"),
    pytest.param((1.0, 1.0, 1.0), 2, (2, 2), (3, 3, 3), id="isotropic"),
    pytest.param((1.0, 0.5, 0.5), 2, (1, 2), (1, 3, 3), id="2x: coarse at level 0 only"),
    pytest.param((0.9, 0.5, 0.5), 2, (2, 2), (3, 3, 3), id="1.8x: never coarse"),
    pytest.param((8.0, 0.5, 0.5), 3, (1, 1, 1), (1, 1, 1, 1), id="serial sections: z never mixed"),
])
def test_z_geometry_follows_the_spacing(spacing, depth, pools, kernels) -> None:
    from unet_core.model.spec import check_z_geometry, z_geometry_for

    assert z_geometry_for(depth, spacing) == (pools, kernels)
    check_z_geometry(UNetSpec(depth=depth, dims=3, pool_z=pools, kernel_z=kernels), spacing, where="s")


def test_pooling_a_coarse_z_is_refused_naming_the_rules_choice() -> None:
    from unet_core.model.spec import check_z_geometry

    spec = UNetSpec(depth=3, dims=3)  # isotropic pools
    with pytest.raises(ConfigError, match=r"sample 'a': model.pool_z \[2, 2, 2\] pools z at level 0.*"
                                          r"use pool_z \[1, 1, 2\] \(and kernel_z \[1, 1, 3, 3\]\)"):
        check_z_geometry(spec, (2.0, 0.5, 0.5), where="sample 'a'")
    check_z_geometry(spec, (0.5, 0.5, 0.5), where="sample 'a'")
    check_z_geometry(UNetSpec(depth=3), (2.0, 0.5, 0.5), where="2-D: not checked")


def test_a_model_refuses_data_of_another_voxel_size() -> None:
    from unet_core.model.spec import check_voxel_size

    check_voxel_size((2.0, 0.5, 0.5), (2.1, 0.52, 0.48), where="s")  # within 10 %
    check_voxel_size(None, (9.0, 9.0, 9.0), where="s")
    with pytest.raises(ConfigError, match=r"s.ome.zarr: voxel size \[2.0, 1.0, 1.0\] µm differs from the model's"):
        check_voxel_size((2.0, 0.5, 0.5), (2.0, 1.0, 1.0), where="s.ome.zarr")
