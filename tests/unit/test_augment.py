"""augment: stored deformed training sets (format, reproducibility, recomputed weights), CLI, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from unet_core.augment.elastic import DeformParams
from unet_core.augment.samples import (
    FORMAT,
    augment,
    drawn_transforms,
    make_sample,
    open_source,
)
from unet_core.cli import main
from unet_core.common.errors import UserInputError
from unet_core.common.intensity import (
    IntensityStats,
    Normalisation,
    RunningStats,
    normalize,
    slice_stats_from_attrs,
    slice_stats_to_attrs,
)
from unet_core.common.labels import median_area
from unet_core.common.mirror import read_mirrored
from unet_core.io.ngff import PyramidWriter, create_array
from unet_core.model.spec import UNetSpec
from unet_core.weights.maps import WeightParams, cells_from, class_map, cutoff_px, weight_map
from unet_core.weights.recipe import WeightRecipe

TINY = UNetSpec(depth=2, base_channels=4, dropout=0.0)
TILE_OUT = 44
TILE_IN = TINY.input_size(TILE_OUT)  # 84
SIZE = 96
RECIPE = {"class_weights": [0.7, 1.6], "w0": 10.0, "sigma_px": 3.0, "tolerance": 1e-3,
          "border_pixels": "background", "separate_touching": True}


def _cells(rng: np.random.Generator, size: int, n: int = 18) -> np.ndarray:
    """Touching disks with instance ids (later disks overwrite earlier ones)."""
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((size, size), np.int32)
    for i in range(1, n + 1):
        cy, cx = rng.integers(0, size, 2)
        out[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(6, 13) ** 2] = i
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[Path, Path]:
    """A 3-slice stack (OME-Zarr level 0 + intensity attrs) and its weights store."""
    tmp = tmp_path_factory.mktemp("aug")
    rng = np.random.default_rng(11)
    labels = np.stack([_cells(rng, SIZE) for _ in range(3)])
    raw = (90 + 60 * (labels > 0) + rng.normal(0, 12, labels.shape)).clip(0, 255).astype(np.uint8)
    stack = tmp / "stack.ome.zarr"
    root = zarr.open_group(stack, mode="w")
    writer = PyramidWriter(root, shape=raw.shape, dtype=raw.dtype, chunks=(1, 64, 64), scale=(1.0, 1.0, 1.0), levels=1)
    for z in range(3):
        writer.write_plane(z, raw[z])
    writer.finish()
    running = RunningStats()
    for z in range(3):
        running.update(raw[z] // (z + 1))  # per-slice statistics of other slices: they must be the ones used
    root.attrs["unet"] = {"intensity": IntensityStats(float(raw.mean()), float(raw.std())).to_dict(),
                          "slice_intensity": slice_stats_to_attrs(running.slices),
                          "label_kind": "instance", "name": "cells"}
    weights = tmp / "weights.zarr"
    group = zarr.open_group(weights, mode="w")
    arrays = {name: create_array(group, name, shape=labels.shape, dtype=dt, chunks=(1, 64, 64))
              for name, dt in (("weights", np.float32), ("classes", np.uint8), ("instances", np.int32))}
    for z in range(3):
        classes = class_map(labels[z], separate_touching=True)
        arrays["classes"][z] = classes
        arrays["weights"][z] = weight_map(labels[z], classes, class_weights=RECIPE["class_weights"],
                                          params=WeightParams(w0=RECIPE["w0"], sigma_px=RECIPE["sigma_px"]))
        arrays["instances"][z] = cells_from(labels[z], classes)
    group.attrs["unet"] = RECIPE
    return stack, weights


def _run(stores, out: Path, **kw) -> Path:
    stack, weights = stores
    args = dict(samples_per_slice=2, tile_out=TILE_OUT, seed=3, spec=TINY)
    args.update(kw)
    return augment(stack, weights, out, **args)


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


# -- format -------------------------------------------------------------------------------------------
def test_writes_the_contract_format(stores, tmp_path: Path) -> None:
    out = _run(stores, tmp_path / "aug.zarr", slices=[0, 2])
    g = zarr.open_group(out, mode="r")
    n = 2 * 2
    for name, dtype in (("image", np.float32), ("classes", np.uint8), ("weights", np.float32),
                        ("instances", np.int32)):
        assert g[name].shape == (n, TILE_IN, TILE_IN) and g[name].dtype == dtype
        assert g[name].chunks == (1, TILE_IN, TILE_IN)
    assert g["source"][:].tolist() == [[0, 0], [0, 1], [2, 0], [2, 1]]
    attrs = g.attrs["unet"]
    assert attrs["format"] == FORMAT and attrs["seed"] == 3
    assert (attrs["tile_in"], attrs["tile_out"], attrs["context"]) == (TILE_IN, TILE_OUT, TINY.context)
    assert attrs["model"] == TINY.to_dict() and attrs["deformation"] == DeformParams().to_dict()
    assert attrs["weight_recipe"]["w0"] == RECIPE["w0"] and attrs["slices"] == [0, 2]
    image = g["image"][:]
    assert np.isfinite(image).all() and abs(float(image.mean())) < 1.0  # z-scored
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporaries left


# -- reproducibility ----------------------------------------------------------------------------------
def test_same_seed_gives_the_same_bytes_in_any_order(stores, tmp_path: Path) -> None:
    a = _run(stores, tmp_path / "a.zarr")
    b = _run(stores, tmp_path / "b.zarr", workers=3)  # samples made concurrently, finishing in any order
    assert _files(a) == _files(b)  # every chunk and the metadata, byte for byte
    c = zarr.open_group(_run(stores, tmp_path / "c.zarr", slices=[2, 0, 1]), mode="r")  # another order
    ga = zarr.open_group(a, mode="r")
    order_a = [tuple(v) for v in ga["source"][:]]
    for j, key in enumerate(tuple(v) for v in c["source"][:]):
        i = order_a.index(key)
        for name in ("image", "classes", "weights", "instances"):
            assert ga[name][i].tobytes() == c[name][j].tobytes(), (name, key)
    alone = make_sample(open_source(*stores), 1, 1, seed=3, params=DeformParams(), tile_in=TILE_IN,
                        tile_out=TILE_OUT)  # one sample made on its own, as a parallel job would
    i = order_a.index((1, 1))
    assert alone.image[0].tobytes() == ga["image"][i].tobytes()
    assert alone.weights[0].tobytes() == ga["weights"][i].tobytes()


@pytest.mark.parametrize("mode", [Normalisation.SLICE_PERCENTILE, Normalisation.SLICE_ZSCORE])
def test_per_slice_normalisation_uses_each_slices_stored_statistics(stores, tmp_path: Path, mode) -> None:
    stack, weights = stores
    out = _run(stores, tmp_path / "pct.zarr", params=DeformParams.identity(), samples_per_slice=1, normalisation=mode)
    g = zarr.open_group(out, mode="r")
    unet = dict(g.attrs)["unet"]
    assert unet["intensity_normalisation"] == mode.value
    raw = zarr.open_group(stack, mode="r")["0"][:]
    slices = slice_stats_from_attrs(zarr.open_group(stack, mode="r").attrs["unet"]["slice_intensity"])
    for n, (z, k) in enumerate(g["source"][:]):
        (tr,) = drawn_transforms((SIZE, SIZE), [(int(z), int(k))], seed=3, params=DeformParams.identity(),
                                 tile_in=TILE_IN, tile_out=TILE_OUT)
        box = ((z, *tr.origin), (z + 1, tr.origin[0] + TILE_IN, tr.origin[1] + TILE_IN))
        np.testing.assert_array_equal(g["image"][n], normalize(read_mirrored(raw, *box)[0], slices[z].scaling(mode)))
    # the object areas of the undeformed source slices, for the model's median
    instances = zarr.open_group(weights, mode="r")["instances"][:]
    areas = np.concatenate([np.bincount(instances[z].ravel())[1:] for z in range(3)])
    assert median_area([unet["object_areas"]]) == float(np.median(areas[areas > 0]))


def test_different_seed_gives_different_samples(stores, tmp_path: Path) -> None:
    a = zarr.open_group(_run(stores, tmp_path / "a.zarr", slices=[0]), mode="r")
    b = zarr.open_group(_run(stores, tmp_path / "b.zarr", slices=[0], seed=4), mode="r")
    assert not np.array_equal(a["image"][:], b["image"][:])
    assert not np.array_equal(a["instances"][:], b["instances"][:])


# -- content ------------------------------------------------------------------------------------------
def test_identity_settings_reproduce_the_source_and_its_weights(stores, tmp_path: Path) -> None:
    stack, weights = stores
    out = _run(stores, tmp_path / "id.zarr", params=DeformParams.identity(), samples_per_slice=3)
    g = zarr.open_group(out, mode="r")
    raw = zarr.open_group(stack, mode="r")["0"][:]
    stats = IntensityStats.from_dict(zarr.open_group(stack, mode="r").attrs["unet"]["intensity"])
    w = {name: arr[:] for name, arr in zarr.open_group(weights, mode="r").arrays()}
    margin = int(np.ceil(cutoff_px(w0=RECIPE["w0"], sigma_px=RECIPE["sigma_px"], tolerance=RECIPE["tolerance"])))
    compared = 0
    for n, (z, k) in enumerate(g["source"][:]):
        (tr,) = drawn_transforms((SIZE, SIZE), [(int(z), int(k))], seed=3, params=DeformParams.identity(),
                                 tile_in=TILE_IN, tile_out=TILE_OUT)
        oy, ox = tr.origin
        box = ((z, oy, ox), (z + 1, oy + TILE_IN, ox + TILE_IN))
        np.testing.assert_array_equal(g["image"][n], normalize(read_mirrored(raw, *box)[0], stats))
        np.testing.assert_array_equal(g["instances"][n], read_mirrored(w["instances"], *box)[0])
        np.testing.assert_array_equal(g["classes"][n], read_mirrored(w["classes"], *box)[0])
        # weights: equal wherever the border term cannot see past the tile edge or the image border
        ys = np.arange(oy, oy + TILE_IN)
        xs = np.arange(ox, ox + TILE_IN)
        inner_y = (ys >= max(oy + margin, margin)) & (ys < min(oy + TILE_IN - margin, SIZE - margin))
        inner_x = (xs >= max(ox + margin, margin)) & (xs < min(ox + TILE_IN - margin, SIZE - margin))
        stored = g["weights"][n][np.ix_(inner_y, inner_x)]
        source = read_mirrored(w["weights"], *box)[0][np.ix_(inner_y, inner_x)]
        np.testing.assert_allclose(stored, source, rtol=0, atol=1e-6)
        compared += stored.size
    assert compared > 1000


def test_weights_are_recomputed_from_the_deformed_instances(stores, tmp_path: Path) -> None:
    g = zarr.open_group(_run(stores, tmp_path / "aug.zarr", slices=[1], samples_per_slice=3), mode="r")
    recipe = WeightRecipe.from_attrs(RECIPE, where="test")
    source_ids = set(np.unique(zarr.open_group(stores[1], mode="r")["instances"][1]))
    for n in range(3):
        inst = g["instances"][n]
        assert set(np.unique(inst)) <= source_ids  # nearest neighbour: no new ids
        classes, weights = recipe.apply(inst)
        np.testing.assert_array_equal(g["classes"][n], classes)
        np.testing.assert_array_equal(g["weights"][n], weights)
        assert weights.max() > max(RECIPE["class_weights"]) + 1.0  # the border term is there


def test_on_the_fly_tiles_are_the_stored_samples(stores) -> None:
    """Training's on-the-fly draws (unet train --train-stacks) are exactly the stored set's samples."""
    from unet_core.train.data import OnTheFlyTiles

    source = open_source(*stores)
    tiles = OnTheFlyTiles([stores], slices=[2], spec=TINY, tile_out=TILE_OUT, seed=3)
    c = TINY.context
    for k in range(2):
        image, classes, weights = tiles[k]  # one slice: draw k is sample k (epoch k) of slice 2
        stored = make_sample(source, 2, k, seed=3, params=DeformParams(), tile_in=TILE_IN, tile_out=TILE_OUT)
        assert image[0].numpy().tobytes() == stored.image[0].tobytes()
        np.testing.assert_array_equal(classes.numpy(), stored.classes[0][c:-c, c:-c])
        np.testing.assert_array_equal(weights.numpy(), stored.weights[0][c:-c, c:-c])


# -- bad input ----------------------------------------------------------------------------------------
def test_tile_larger_than_image_without_mirroring(stores, tmp_path: Path) -> None:
    out = tmp_path / "aug.zarr"
    with pytest.raises(UserInputError, match="mirroring is off"):
        _run(stores, out, tile_out=TINY.valid_output_size_at_least(SIZE), params=DeformParams(mirror=False))
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        pytest.param({"tile_out": 45}, "nearest valid output sizes", id="tile-out-invalid"),
        pytest.param({"samples_per_slice": 0}, "samples-per-slice", id="no-samples"),
        pytest.param({"seed": -1}, "seed", id="negative-seed"),
        pytest.param({"slices": [0, 3]}, "slices", id="slice-out-of-range"),
    ],
)
def test_bad_arguments(stores, tmp_path: Path, kwargs, match) -> None:
    with pytest.raises(UserInputError, match=match):
        _run(stores, tmp_path / "aug.zarr", **kwargs)
    assert not list(tmp_path.iterdir())


def test_weights_store_that_does_not_fit(stores, tmp_path: Path) -> None:
    stack, _ = stores
    bad = zarr.open_group(tmp_path / "w.zarr", mode="w")
    create_array(bad, "instances", shape=(3, SIZE, SIZE - 1), dtype=np.int32, chunks=(1, 64, 64))
    bad.attrs["unet"] = RECIPE
    with pytest.raises(UserInputError, match="does not match stack"):
        augment(stack, tmp_path / "w.zarr", tmp_path / "o.zarr", samples_per_slice=1, tile_out=TILE_OUT, seed=0,
                spec=TINY)
    no_inst = zarr.open_group(tmp_path / "v.zarr", mode="w")
    no_inst.attrs["unet"] = RECIPE
    with pytest.raises(UserInputError, match="no 'instances'"):
        augment(stack, tmp_path / "v.zarr", tmp_path / "o.zarr", samples_per_slice=1, tile_out=TILE_OUT, seed=0,
                spec=TINY)
    with pytest.raises(UserInputError, match="w0"):
        WeightRecipe.from_attrs({k: v for k, v in RECIPE.items() if k != "w0"}, where="x.zarr")


# -- CLI ----------------------------------------------------------------------------------------------
TINY_ARGS = ["--depth", "2", "--base-channels", "4", "--tile-out", str(TILE_OUT)]


def test_cli_writes_the_set_and_the_figure(stores, tmp_path: Path) -> None:
    stack, weights = stores
    out, png = tmp_path / "aug.zarr", tmp_path / "aug.png"
    code = main(["augment", str(stack), str(weights), str(out), "--samples-per-slice", "2", "--seed", "5",
                 "--slices", "0-1", "--plot", str(png), "--plot-samples", "2", "--gamma", "0.2", *TINY_ARGS])
    assert code == 0
    g = zarr.open_group(out, mode="r")
    assert g["image"].shape == (4, TILE_IN, TILE_IN) and g.attrs["unet"]["deformation"]["gamma"] == 0.2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_figure_that_cannot_be_written_leaves_no_set(stores, tmp_path: Path, monkeypatch, capsys) -> None:
    """The set used to be put in place before the figure was drawn: a full disk under the PNG
    left an augmented set behind a failed run."""
    import errno

    from unet_core.augment import samples

    def full_disk(path, *args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(samples, "plot_augmentation", full_disk)
    stack, weights = stores
    out = tmp_path / "new"
    code = main(["augment", str(stack), str(weights), str(out / "aug.zarr"), "--samples-per-slice", "1",
                 "--slices", "0", "--plot", str(out / "aug.png"), *TINY_ARGS])
    assert code == 2 and "no space left" in capsys.readouterr().err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    "extra,message",
    [
        pytest.param(["--grid", "1"], "augment.grid must be an integer >= 2", id="grid-below-2"),
        pytest.param(["--tile-out", "45"], "--tile-out 45", id="tile-out-invalid"),
        pytest.param(["--slices", "0-7"], "out of range", id="slices-out-of-range"),
        pytest.param(["--device", "cuda:9"], "--device", id="bad-device"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(stores, tmp_path: Path, capsys, extra, message) -> None:
    stack, weights = stores
    code = main(["augment", str(stack), str(weights), str(tmp_path / "o.zarr"), *TINY_ARGS, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o.zarr").exists()


def test_cli_rejects_negative_sigma(stores, tmp_path: Path, capsys) -> None:
    stack, weights = stores
    with pytest.raises(SystemExit) as exit_info:
        main(["augment", str(stack), str(weights), str(tmp_path / "o.zarr"), "--sigma-px", "-1"])
    assert exit_info.value.code == 2 and "--sigma-px" in capsys.readouterr().err
