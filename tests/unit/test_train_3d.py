"""train --dims 3: a 3-D U-Net trained on (N, Z, Y, X) tiles of 'unet augment --dims 3' (issue 36, item 5 at
the stage level): the loss falls, validation runs volumes through the engine with a 3-D Tiling, model.pt holds
the 3-D spec and the training voxel size, runs are deterministic and resume exactly on the CPU; bad input is one
line, exit 2.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from test_augment_3d import SPACING, TILE_OUT, TILE_OUT_Z, TINY3D, TINY3D_ARGS, make_volume_stores
from unet_core.augment.samples import augment
from unet_core.cli import main
from unet_core.common.errors import ConfigError, UserInputError
from unet_core.common.precision import Precision
from unet_core.model.checkpoint import load_model, safe_load
from unet_core.model.loss import weighted_cross_entropy
from unet_core.model.unet import UNet
from unet_core.train.config import TrainConfig
from unet_core.train.data import AugmentedTiles
from unet_core.train.loop import train
from unet_core.infer.predict import network_logits


class _Crash(Exception):
    pass


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """An augmented 3-D set (6 tiles of 8 x 28 x 28 voxels) of one synthetic volume, and a held-out volume."""
    tmp = tmp_path_factory.mktemp("train3d")
    stack, weights = make_volume_stores(tmp, seed=1, name="train")
    aug = augment(stack, weights, tmp / "aug.zarr", samples_per_slice=6, tile_out=TILE_OUT, tile_out_z=TILE_OUT_Z,
                  seed=0, spec=TINY3D)
    val_stack, val_weights = make_volume_stores(tmp, depth=6, size=32, seed=2, name="val")
    return {"aug": aug, "val": (val_stack, val_weights), "tmp": tmp}


def config(**kw) -> TrainConfig:
    base = {"iterations": 12, "optimizer": "adam", "lr": 1e-2, "momentum": 0.9, "workers": 0, "validate_every": 6,
            "checkpoint_every": 4, "log_every": 2, "device": "cpu", "schedule": "constant", "warmup_iterations": 0,
            "export_weights": "last", "batch_size": 2}
    base.update(kw)
    return TrainConfig(**base)


def test_weighted_loss_on_volumes_is_the_mean_weighted_voxel_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 6, generator=g)
    target = torch.randint(0, 3, (2, 4, 5, 6), generator=g)
    weight = torch.rand(2, 4, 5, 6, generator=g) + 0.5
    manual = -(F.log_softmax(logits, 1).gather(1, target[:, None])[:, 0] * weight).mean()
    assert torch.allclose(weighted_cross_entropy(logits, target, weight), manual, atol=1e-6)
    with pytest.raises(ValueError, match="crop to the output"):
        weighted_cross_entropy(logits, target[:, 1:], weight)


def test_dataset_crops_volume_tiles_by_each_axis_context(data) -> None:
    ds = AugmentedTiles([data["aug"]], spec=TINY3D)
    image, classes, weights = ds[0]
    assert image.shape == (1, 8, 28, 28) and classes.shape == (4, 12, 12) and weights.shape == (4, 12, 12)
    stored = zarr.open_group(data["aug"], mode="r")
    assert np.array_equal(classes.numpy(), stored["classes"][0][2:-2, 8:-8, 8:-8])  # z context 2, plane 8
    assert ds.voxel_size_um == SPACING and ds.in_shape == (8, 28, 28) and ds.out_shape == (4, 12, 12)


def test_volume_validation_does_not_depend_on_the_tiles() -> None:
    """Engine tiles of 1 x 4 x 4 output voxels == one tile over the whole (odd-sized) volume."""
    torch.manual_seed(0)
    model = UNet(TINY3D).eval()
    volume = np.random.default_rng(0).normal(size=(5, 13, 11)).astype(np.float32)
    kw = dict(device=torch.device("cpu"), precision=Precision.FP32)
    small = network_logits(model, volume, tile_out=4, tile_z=1, **kw)
    whole = network_logits(model, volume, tile_out=16, tile_z=8, **kw)
    assert small.shape == (2, 5, 13, 11) and np.abs(small - whole).max() <= 1e-5


def test_loss_falls_validation_runs_and_model_records_3d_spec_and_voxel_size(data, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train([data["aug"]], out_dir=out, spec=TINY3D, config=config(iterations=40, validate_every=20, log_every=4),
                   validation=[data["val"]])
    assert result.iterations == 40
    model, metadata = load_model(out / "model.pt")
    assert model.spec == TINY3D
    assert metadata["voxel_size_um"] == list(SPACING) and (metadata["tile_in_z"], metadata["tile_out_z"]) == (8, 4)
    labels = np.asarray(zarr.open_group(data["tmp"] / "train_weights.zarr", mode="r")["instances"][:])
    voxels = np.bincount(labels.ravel())[1:]
    assert metadata["median_object_volume_um3"] == float(np.median(voxels[voxels > 0])) * 2.0 * 0.5 * 0.5
    log = safe_load(out / "state.pt")["history"]["train_log"]
    first, last = log[0][1], log[-1][1]
    assert last < 0.8 * first, log
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["iteration"] for r in rows] == ["20", "40"]
    assert all(np.isfinite(float(r["val_loss"])) and 0 <= float(r["val_pixel_error"]) <= 1 for r in rows)
    card = json.loads((out / "model_card.json").read_text())
    assert card["model"]["dims"] == 3


def test_same_seed_same_weights_and_resume_equals_an_uninterrupted_run(data, tmp_path: Path) -> None:
    kw = {"spec": TINY3D, "config": config(), "validation": [data["val"]]}
    train([data["aug"]], out_dir=tmp_path / "ref", **kw)
    train([data["aug"]], out_dir=tmp_path / "again", **kw)

    def crash(i: int) -> None:
        if i == 7:
            raise _Crash

    with pytest.raises(_Crash):
        train([data["aug"]], out_dir=tmp_path / "cut", on_iteration=crash, **kw)
    assert safe_load(tmp_path / "cut" / "state.pt")["iteration"] == 4
    train([data["aug"]], out_dir=tmp_path / "cut", resume=True, **kw)
    ref, again, cut = ((tmp_path / d / "model.pt").read_bytes() for d in ("ref", "again", "cut"))
    assert ref == again == cut


def test_loader_workers_do_not_change_the_weights(data, tmp_path: Path) -> None:
    kw = {"spec": TINY3D, "config": config(iterations=4, validate_every=4)}
    train([data["aug"]], out_dir=tmp_path / "w0", **kw)
    train([data["aug"]], out_dir=tmp_path / "w2", **{**kw, "config": config(iterations=4, validate_every=4, workers=2)})
    a, b = (safe_load(tmp_path / d / "model.pt")["state_dict"] for d in ("w0", "w2"))  # metadata names the workers
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cli(data, out: Path, *extra: str, model: list[str] = TINY3D_ARGS) -> list[str]:
    return ["train", "--train", str(data["aug"]), "--out-dir", str(out), "--iterations", "2", "--workers", "0",
            "--device", "cpu", "--threads", "1", "--validate-every", "2", *model, *extra]


def test_cli_trains_a_3d_network(data, tmp_path: Path) -> None:
    stack, weights = data["val"]
    assert main(_cli(data, tmp_path / "cli", "--val", f"{stack}:{weights}")) == 0
    assert (tmp_path / "cli" / "model.pt").is_file()


@pytest.mark.parametrize(
    "which,extra,message",
    [
        pytest.param("2d-model", [], "holds (N, Z, H, W) volume tiles but the model has --dims 2",
                     id="2d-model-3d-set"),
        pytest.param("val-single", [], "single slice", id="val-single-slice"),
        pytest.param("val-no-size", [], "voxel size was not given", id="val-no-voxel-size"),
        pytest.param("val-other-size", [], "differs from the model's training data", id="val-other-voxel-size"),
        pytest.param("val-slices", ["--val-slices", "0"], "--val-slices", id="val-slices"),
        pytest.param("on-the-fly", [], "--train-stacks", id="on-the-fly"),
        pytest.param("val-slice-store", [], "a 2-D weights store, but the model has --dims 3", id="val-2d-store"),
        pytest.param("tile-z", [], "tile z size", id="set-of-another-z-geometry"),
    ],
)
def test_cli_bad_3d_input_is_one_line_exit_2(data, tmp_path: Path, capsys, which, extra, message) -> None:
    val = data["val"]
    argv = _cli(data, tmp_path / "out", *extra)
    if which == "2d-model":
        argv = _cli(data, tmp_path / "out", model=["--depth", "1", "--base-channels", "4", "--dropout", "0"])
    elif which == "val-single":
        val = make_volume_stores(tmp_path, depth=1, size=32, name="one")
    elif which == "val-no-size":
        val = make_volume_stores(tmp_path, depth=4, size=32, name="nosize", voxel_size_given=False)
    elif which == "val-other-size":
        val = make_volume_stores(tmp_path, depth=4, size=32, name="other")
        zarr.open_group(val[0], mode="r+").attrs["ome"] = _rescaled(val[0], (4.0, 0.5, 0.5))
    elif which == "val-slice-store":
        val = make_volume_stores(tmp_path, depth=4, size=32, name="flat", slice_store=True)
    elif which == "on-the-fly":
        argv = [a if a != "--train" else "--train-stacks" for a in argv]
        argv[argv.index("--train-stacks") + 1] = f"{val[0]}:{val[1]}"
    elif which == "tile-z":
        argv += ["--kernel-z", "3,3"]  # z context 6: the set's 8-slice tiles are too thin
    argv += ["--val", f"{val[0]}:{val[1]}"]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "model.pt").exists()


def _rescaled(stack: Path, scale: tuple[float, float, float]) -> dict:
    ome = dict(zarr.open_group(stack, mode="r").attrs["ome"])
    ome["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] = list(scale)
    return ome


def test_a_2d_set_on_a_3d_model_is_refused(tmp_path: Path) -> None:
    group = zarr.open_group(tmp_path / "flat.zarr", mode="w")
    for name in ("image", "classes", "weights"):
        group.create_array(name, shape=(2, 28, 28), dtype=np.float32 if name != "classes" else np.uint8)
    with pytest.raises(UserInputError, match="slice tiles but the model has --dims 3"):
        AugmentedTiles([tmp_path / "flat.zarr"], spec=TINY3D)
    with pytest.raises(ConfigError, match="--train-stacks"):
        train([], out_dir=tmp_path / "x", spec=TINY3D, config=config(tile_out=12),
              train_stacks=[(tmp_path / "a", tmp_path / "b")])


def test_validation_stores_must_match_the_mode(data) -> None:
    from unet_core.train.data import load_validation

    with pytest.raises(UserInputError, match="a 3-D weights store, but the model has --dims 2"):
        load_validation([data["val"]], slices=None, n_classes=2, dims=2)
    (item,) = load_validation([data["val"]], slices=None, n_classes=2, dims=3)
    assert item.image.shape == item.classes.shape == item.weights.shape == (6, 32, 32)
    assert item.voxel_size_um == SPACING
