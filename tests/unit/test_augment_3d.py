"""augment --dims 3: deformed (Z, Y, X) training tiles of a volume (issue 36, item 4 at the stage level).

The stored tiles agree with the core functions (the 3-D deformation of augment/elastic.py applied to
the whole mirrored volume, labels by nearest neighbour, w(x) of weights/maps.py in µm on the deformed
labels); sets are byte-identical for a seed whatever the worker count; bad input is one line, exit 2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from unet_core.augment import samples
from unet_core.augment.elastic import DeformParams, source_coordinates, warp_reference
from unet_core.augment.samples import (
    augment,
    draw_volume_sample,
    open_source,
    volume_tile_shapes,
)
from unet_core.cli import main
from unet_core.common.errors import UserInputError
from unet_core.common.intensity import IntensityStats, normalize
from unet_core.common.mirror import mirror_index
from unet_core.io.ngff import PyramidWriter, create_array
from unet_core.model.spec import UNetSpec
from unet_core.synth.volume import VolumeParams, synth_volume
from unet_core.weights.maps import VolumeWeightParams, class_map_3d, weight_map_3d
from unet_core.weights.recipe import VolumeWeightRecipe

#: A tiny 3-D net: one level, z never pooled, 1x3x3 then 3x3x3 kernels: z context 2, plane context 8.
TINY3D = UNetSpec(depth=1, base_channels=4, dropout=0.0, dims=3, pool_z=(1,), kernel_z=(1, 3))
TINY3D_ARGS = ["--dims", "3", "--depth", "1", "--base-channels", "4", "--dropout", "0", "--pool-z", "1",
               "--kernel-z", "1,3"]
TILE_OUT, TILE_OUT_Z = 12, 4  # -> input tiles of 8 x 28 x 28 voxels
SPACING = (2.0, 0.5, 0.5)
#: What 'unet weights --dims 3' records (sigma 1.5 µm = 3 in-plane voxels).
RECIPE = VolumeWeightRecipe(VolumeWeightParams(sigma_um=1.5), (0.7, 1.6), SPACING)
SLICE_RECIPE = {"class_weights": [0.7, 1.6], "w0": 10.0, "sigma_px": 3.0, "tolerance": 1e-3,
                "border_pixels": "background", "separate_touching": True}
NO_GREY = DeformParams(brightness=0.0, contrast=0.0)  # geometry only: the stored image is the warp alone


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_volume_stores(tmp: Path, *, depth: int = 12, size: int = 48, seed: int = 1, name: str = "vol",
                       voxel_size_given: bool = True, slice_store: bool = False) -> tuple[Path, Path]:
    """A synthetic nuclei volume (unet_core/synth/volume.py) as an ingested stack (level 0, voxel size
    (2, 0.5, 0.5) µm) and its weights store as 'unet weights --dims 3' writes it (3-D classes and w(x) in
    µm, instances, attrs dims 3 + the VolumeWeightRecipe); ``slice_store``: the attrs of a 2-D store."""
    raw, labels = synth_volume(VolumeParams(depth=max(depth, 2), height=size, width=size), seed=seed, index=0)
    raw, labels = raw[:depth], labels[:depth]  # depth 1: a single-slice stack
    stack = tmp / f"{name}.ome.zarr"
    root = zarr.open_group(stack, mode="w")
    writer = PyramidWriter(root, shape=raw.shape, dtype=raw.dtype, chunks=(4, size, size), scale=SPACING, levels=1)
    for z in range(depth):
        writer.write_plane(z, raw[z])
    writer.finish()
    root.attrs["unet"] = {"intensity": IntensityStats(float(raw.mean()), float(raw.std())).to_dict(),
                          "label_kind": "instance", "name": name, "voxel_size_given": voxel_size_given}
    instances = labels.astype(np.int32)
    classes, weights = RECIPE.apply(instances)
    store = tmp / f"{name}_weights.zarr"
    group = zarr.open_group(store, mode="w")
    for key, arr in (("weights", weights.astype(np.float32)), ("classes", classes), ("instances", instances)):
        create_array(group, key, shape=arr.shape, dtype=arr.dtype, chunks=(4, size, size))[:] = arr
    group.attrs["unet"] = SLICE_RECIPE if slice_store else RECIPE.to_dict()
    return stack, store


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[Path, Path]:
    return make_volume_stores(tmp_path_factory.mktemp("aug3d"))


def _run(stores, out: Path, **kw) -> Path:
    stack, weights = stores
    args = dict(samples_per_slice=3, tile_out=TILE_OUT, tile_out_z=TILE_OUT_Z, seed=3, spec=TINY3D)
    args.update(kw)
    return augment(stack, weights, out, **args)


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def test_tile_shapes_follow_the_3d_network() -> None:
    # z: out 4 + 2 * 2 (z context) = 8; plane: 12 + 2 * 8 = 28
    assert volume_tile_shapes(TINY3D, TILE_OUT, TILE_OUT_Z) == ((8, 28, 28), (4, 12, 12))
    assert volume_tile_shapes(TINY3D, TILE_OUT, None)[1][0] == 8  # default: smallest valid >= 8
    with pytest.raises(UserInputError, match="--tile-out-z 3"):
        volume_tile_shapes(UNetSpec(depth=1, base_channels=4, dims=3, pool_z=(2,)), TILE_OUT, 3)


def test_writes_volume_tiles_with_the_geometry_and_voxel_size(stores, tmp_path: Path) -> None:
    g = zarr.open_group(_run(stores, tmp_path / "aug.zarr"), mode="r")
    for name, dtype in (("image", np.float32), ("classes", np.uint8), ("weights", np.float32), ("instances", np.int32)):
        assert g[name].shape == (3, 8, 28, 28) and g[name].dtype == dtype and g[name].chunks == (1, 8, 28, 28)
    assert g["source"][:].tolist() == [[0, 0], [0, 1], [0, 2]]
    attrs = g.attrs["unet"]
    assert attrs["dims"] == 3 and attrs["tile_in"] == [8, 28, 28] and attrs["tile_out"] == [4, 12, 12]
    assert attrs["voxel_size_um"] == list(SPACING) and attrs["model"] == TINY3D.to_dict()
    assert attrs["sigma_um"] == 10.0 * 0.5 and attrs["weight_recipe"] == RECIPE.to_dict()
    assert np.isfinite(g["image"][:]).all() and set(np.unique(g["classes"][:])) <= {0, 1}
    assert (g["instances"][:] > 0).mean() > 0.05  # nuclei are there


def test_a_tile_is_the_core_deformation_of_the_volume_with_recomputed_weights(stores, tmp_path: Path) -> None:
    """Stored image == the 3-D warp (NumPy reference, trilinear, mirrored) of the whole normalised volume at
    the sample's source coordinates; labels == nearest neighbour there; classes and w(x) == weights/maps.py's
    3-D functions (µm) on the stored labels."""
    stack, weights = stores
    g = zarr.open_group(_run(stores, tmp_path / "aug.zarr", params=NO_GREY), mode="r")
    source = open_source(stack, weights, dims=3)
    volume = np.stack([normalize(np.asarray(source.stack.image[z]), source.scaling(z)) for z in range(12)])
    instances = np.asarray(source.instances[:])
    for k in range(3):
        tr = draw_volume_sample(source, k, seed=3, params=NO_GREY, tile_in=(8, 28, 28), tile_out=(4, 12, 12))
        coords = source_coordinates([tr], (8, 28, 28))[0]
        assert np.abs(g["image"][k] - warp_reference(volume, coords, interpolation="bilinear")).max() < 1e-4
        nearest = tuple(mirror_index(np.rint(c).astype(np.int64), n) for c, n in zip(coords, instances.shape))
        assert (g["instances"][k] == instances[nearest]).mean() > 0.999
        stored = np.asarray(g["instances"][k])
        classes = class_map_3d(stored, separate_touching=True)
        assert np.array_equal(g["classes"][k], classes)
        expected = weight_map_3d(stored, classes, class_weights=(0.7, 1.6), params=VolumeWeightParams(sigma_um=1.5),
                                 spacing_um=SPACING)
        assert np.array_equal(g["weights"][k], expected.astype(np.float32))


def test_same_seed_same_bytes_any_worker_count_other_seed_other_tiles(stores, tmp_path: Path) -> None:
    a = _files(_run(stores, tmp_path / "a.zarr", workers=1))
    b = _files(_run(stores, tmp_path / "b.zarr", workers=2))
    assert a == b
    c = zarr.open_group(_run(stores, tmp_path / "c.zarr", seed=4), mode="r")
    assert not np.array_equal(c["image"][0], zarr.open_group(tmp_path / "a.zarr", mode="r")["image"][0])


def test_cli_writes_a_volume_set(stores, tmp_path: Path) -> None:
    stack, weights = stores
    out = tmp_path / "aug.zarr"
    code = main(["augment", str(stack), str(weights), str(out), "--samples-per-slice", "2", "--tile-out",
                 str(TILE_OUT), "--tile-out-z", str(TILE_OUT_Z), "--sigma-um", "2", *TINY3D_ARGS])
    assert code == 0
    g = zarr.open_group(out, mode="r")
    assert g["image"].shape == (2, 8, 28, 28) and g.attrs["unet"]["sigma_um"] == 2.0


@pytest.mark.parametrize(
    "make,extra,message",
    [
        pytest.param(dict(depth=1), [], "single slice", id="single-slice"),
        pytest.param(dict(voxel_size_given=False), [], "voxel size was not given", id="no-voxel-size"),
        pytest.param({}, ["--tile-out-z", "16"], "larger than the", id="window-beyond-volume"),
        pytest.param({}, ["--slices", "0-3"], "--slices", id="slices"),
        pytest.param(dict(slice_store=True), [], "a 2-D weights store", id="slice-weights-store"),
    ],
)
def test_cli_bad_volume_input_is_one_line_exit_2(tmp_path: Path, capsys, make, extra, message) -> None:
    stack, weights = make_volume_stores(tmp_path, **{"depth": 12, "size": 32, **make})
    out = tmp_path / "o.zarr"
    code = main(["augment", str(stack), str(weights), str(out), "--tile-out", str(TILE_OUT),
                 *TINY3D_ARGS, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists() and not (tmp_path / "x.png").exists()


def test_cli_plot_shows_the_stored_tiles_and_fails_with_the_set(stores, tmp_path: Path, monkeypatch) -> None:
    """--plot with --dims 3 draws the stored tiles (slice, z-x section, w(x)); a figure that cannot be
    drawn leaves neither the set nor the PNG."""
    from PIL import Image

    stack, weights = stores
    args = [str(stack), str(weights), "--samples-per-slice", "2", "--tile-out", str(TILE_OUT), "--tile-out-z",
            str(TILE_OUT_Z), *TINY3D_ARGS]
    out, png = tmp_path / "aug.zarr", tmp_path / "aug.png"
    assert main(["augment", args[0], args[1], str(out), *args[2:], "--plot", str(png)]) == 0
    assert out.is_dir() and Image.open(png).size[0] > 500
    assert _files(out) == _files(_run(stores, tmp_path / "noplot.zarr", samples_per_slice=2, seed=0))  # the set alone

    def fail(*_a, **_k):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(samples, "plot_volume_samples", fail)
    out2, png2 = tmp_path / "aug2.zarr", tmp_path / "aug2.png"
    assert main(["augment", args[0], args[1], str(out2), *args[2:], "--plot", str(png2)]) == 1  # internal error
    assert not out2.exists() and not png2.exists()


def test_3d_options_on_a_2d_run_are_refused(stores, tmp_path: Path, capsys) -> None:
    stack, weights = stores
    code = main(["augment", str(stack), str(weights), str(tmp_path / "o.zarr"), "--tile-out-z", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--tile-out-z" in err[0]


def test_volumes_are_deformed_on_the_requested_device_only(stores, monkeypatch, tmp_path: Path) -> None:
    """The warp runs where asked (here the CPU): the set does not depend on threads or a GPU."""
    seen = []
    original = samples.deform

    def spy(images, labels, transforms, **kw):
        seen.append((images.device.type, images.ndim, len(transforms)))
        return original(images, labels, transforms, **kw)

    monkeypatch.setattr(samples, "deform", spy)
    _run(stores, tmp_path / "aug.zarr", samples_per_slice=2)
    assert seen == [("cpu", 5, 1), ("cpu", 5, 1)]


def test_a_volume_weights_store_is_refused_by_the_2d_mode(stores, tmp_path: Path, capsys) -> None:
    stack, weights = stores
    code = main(["augment", str(stack), str(weights), str(tmp_path / "o.zarr"), "--tile-out", "20", "--depth", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "a 3-D weights store" in err[0], err
    assert not (tmp_path / "o.zarr").exists()
