"""ingest: TIFF -> OME-Zarr round trips for every input kind, bad inputs, no partial output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from unet_core.cli import main
from unet_core.io.ngff import open_stack

RNG = np.random.default_rng(0)


def _stack(z=3, y=40, x=56, dtype=np.uint16) -> np.ndarray:
    return RNG.integers(0, 1000, size=(z, y, x)).astype(dtype)


def _labels(z=3, y=40, x=56) -> np.ndarray:
    lab = np.zeros((z, y, x), np.uint16)
    lab[:, 5:15, 5:20] = 1
    lab[:, 20:30, 10:50] = 7
    return lab


def imwrite(path, data, **kw):
    """tifffile.imwrite as a microscope writes grey stacks (3-page stacks are not RGB)."""
    kw.setdefault("photometric", "minisblack")
    tifffile.imwrite(path, data, **kw)


def run_cli(*args: object) -> int:
    return main(["ingest", *map(str, args)])


def _write_imagej(path: Path, data: np.ndarray) -> None:
    imwrite(path, data, imagej=True, resolution=(1 / 0.25, 1 / 0.25),
                     metadata={"spacing": 2.0, "unit": "um", "axes": "ZYX"})


def _write_ome(path: Path, data: np.ndarray) -> None:
    imwrite(path, data, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "PhysicalSizeZ": 3.0,
        "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm", "PhysicalSizeZUnit": "µm"})


def _write_folder(path: Path, data: np.ndarray) -> None:
    path.mkdir()
    for z, plane in enumerate(data):  # names sort naturally: 2 before 10
        imwrite(path / f"slice_{z}.tif", plane)


@pytest.mark.parametrize(
    "writer, suffix, spacing",
    [
        pytest.param(lambda p, d: imwrite(p, d), ".tif", (1.0, 1.0, 1.0), id="multipage"),
        pytest.param(lambda p, d: imwrite(p, d, bigtiff=True), ".tif", (1.0, 1.0, 1.0), id="bigtiff"),
        pytest.param(_write_ome, ".ome.tif", (3.0, 0.5, 0.5), id="ome-tiff"),
        pytest.param(_write_imagej, ".tif", (2.0, 0.25, 0.25), id="imagej"),
        pytest.param(_write_folder, "", (1.0, 1.0, 1.0), id="folder"),
        pytest.param(lambda p, d: imwrite(p, d, compression="zlib"), ".tif", (1.0, 1.0, 1.0), id="zlib"),
    ],
)
def test_round_trip(tmp_path, writer, suffix, spacing):
    data = _stack(z=12, y=40, x=56)
    src = tmp_path / f"img{suffix}"
    writer(src, data)
    out = tmp_path / "out.ome.zarr"
    assert run_cli(src, out) == 0
    stack = open_stack(out)
    assert stack.image.dtype == data.dtype
    np.testing.assert_array_equal(stack.image[:], data)
    assert stack.scale == pytest.approx(spacing)
    assert stack.labels is None
    assert stack.intensity.mean == pytest.approx(data.mean())
    assert stack.intensity.std == pytest.approx(data.std())
    # per-slice statistics, stored once at ingest: what the per-slice normalisations use
    slices = stack.intensities.slices
    assert len(slices) == data.shape[0]
    for plane, s in zip(data, slices):
        assert s.mean == pytest.approx(plane.mean()) and s.std == pytest.approx(plane.std())
        assert (s.low, s.high) == tuple(float(v) for v in np.percentile(plane, [1.0, 99.8]))
    root = zarr.open_group(out, mode="r")
    ome = root.attrs["ome"]
    assert ome["version"] == "0.5"
    assert [a["name"] for a in ome["multiscales"][0]["axes"]] == ["z", "y", "x"]
    assert len(stack.attrs["sha256"]["image"]) == 64


def test_single_page_image_is_one_slice(tmp_path):
    data = _stack(z=1)[0]
    imwrite(tmp_path / "a.tif", data)
    assert run_cli(tmp_path / "a.tif", tmp_path / "o.zarr") == 0
    np.testing.assert_array_equal(open_stack(tmp_path / "o.zarr").image[:], data[None])


def test_labels_instance_and_pyramid(tmp_path):
    data, lab = _stack(y=600, x=520), _labels(y=600, x=520)
    imwrite(tmp_path / "i.tif", data)
    imwrite(tmp_path / "l.tif", lab)
    assert run_cli(tmp_path / "i.tif", tmp_path / "o.zarr", "--labels", tmp_path / "l.tif", "--chunks", "1,256,256") == 0
    stack = open_stack(tmp_path / "o.zarr", require_labels=True)
    np.testing.assert_array_equal(stack.labels[:], lab)
    assert stack.labels.dtype == np.uint16
    assert stack.label_kind == "instance"
    assert stack.image.chunks == (1, 256, 256)
    root = zarr.open_group(tmp_path / "o.zarr", mode="r")
    assert root["1"].shape == (3, 300, 260)
    assert set(np.unique(root["labels/gt/1"][:])) <= {0, 1, 7}  # no blended label values
    assert root["labels"].attrs["ome"]["labels"] == ["gt"]


def test_binary_labels_recognised_and_slices_selected(tmp_path):
    data = _stack(z=5)
    mask = np.where(_labels(z=5) > 0, 255, 0).astype(np.uint8)
    imwrite(tmp_path / "i.tif", data)
    imwrite(tmp_path / "l.tif", mask)
    out = tmp_path / "o.zarr"
    assert run_cli(tmp_path / "i.tif", out, "--labels", tmp_path / "l.tif", "--slices", "1-3") == 0
    stack = open_stack(out)
    assert stack.label_kind == "binary"
    np.testing.assert_array_equal(stack.image[:], data[1:4])
    assert stack.attrs["slices"] == [1, 2, 3]


def test_isbi_real_data(tmp_path, isbi_dir):
    out = tmp_path / "isbi.ome.zarr"
    assert run_cli(isbi_dir / "train-volume.tif", out, "--labels", isbi_dir / "train-labels.tif") == 0
    stack = open_stack(out)
    assert stack.shape == (30, 512, 512) and stack.label_kind == "binary"
    np.testing.assert_array_equal(stack.image[7], tifffile.imread(isbi_dir / "train-volume.tif", key=7))
    assert stack.attrs["sha256"]["image"] == "a05df637d576b2387966b7323a34e90e2cdbf86dcaeee86c44d1fd2d616be489"


# ---------------------------------------------------------------------------- bad input
def _bad_cases(tmp: Path) -> list[tuple[list, str]]:
    good = tmp / "good.tif"
    imwrite(good, _stack())
    cases = []
    cases.append(([tmp / "missing.tif"], "no such file"))
    (tmp / "dir").mkdir()
    cases.append(([tmp / "dir"], "holds no .tif"))
    (tmp / "text.tif").write_bytes(b"hello, I am not a TIFF at all\n" * 10)
    cases.append(([tmp / "text.tif"], "not a readable TIFF"))
    raw = good.read_bytes()
    (tmp / "trunc.tif").write_bytes(raw[: len(raw) // 2])
    cases.append(([tmp / "trunc.tif"], "truncated"))
    (tmp / "trunc_end.tif").write_bytes(raw[: len(raw) - 100])
    cases.append(([tmp / "trunc_end.tif"], "truncated"))
    imwrite(tmp / "small.tif", _stack(y=30))
    cases.append(([good, "--labels", tmp / "small.tif"], "differs from image stack shape"))
    imwrite(tmp / "flt.tif", _labels().astype(np.float32))
    cases.append(([good, "--labels", tmp / "flt.tif"], "labels must be integers"))
    imwrite(tmp / "neg.tif", -_labels().astype(np.int16))
    cases.append(([good, "--labels", tmp / "neg.tif"], "negative label"))
    nan = _stack().astype(np.float32)
    nan[1, 3, 3] = np.nan
    imwrite(tmp / "nan.tif", nan)
    cases.append(([tmp / "nan.tif"], "NaN"))
    inf = _stack().astype(np.float32)
    inf[2, 0, 0] = np.inf
    imwrite(tmp / "inf.tif", inf)
    cases.append(([tmp / "inf.tif"], "Inf"))
    imwrite(tmp / "4d.tif", RNG.integers(0, 9, (2, 3, 20, 20)).astype(np.uint8), imagej=True,
                     metadata={"axes": "TZYX"})
    cases.append(([tmp / "4d.tif"], "unsupported axes"))
    tifffile.imwrite(tmp / "rgb.tif", RNG.integers(0, 9, (20, 20, 3)).astype(np.uint8), photometric="rgb")
    cases.append(([tmp / "rgb.tif"], "RGB"))
    imwrite(tmp / "ch.tif", RNG.integers(0, 9, (3, 2, 20, 20)).astype(np.uint8), imagej=True,
                     metadata={"axes": "ZCYX"})
    cases.append(([tmp / "ch.tif"], "channels"))
    cases.append(([good, "--slices", "3-9"], "out of range"))
    # a typo of billions of slices: refused from its ranges (expanded first, it filled the memory)
    cases.append(([good, "--slices", "0-3000000000"], "out of range"))
    empty = tmp / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    cases.append(([empty], "holds no .tif"))
    return cases


def test_bad_inputs_one_line_no_partial_output(tmp_path, capsys):
    for args, message in _bad_cases(tmp_path):
        out = tmp_path / "out" / "x.ome.zarr"
        code = run_cli(args[0], out, *args[1:])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (args, err)
        last = err[-1]
        assert last.startswith("unet ingest: error:") and message in last, (args, err)
        assert "Traceback" not in "\n".join(err)
        name = str(args[0] if "--labels" not in args else args[args.index("--labels") + 1]).split("/")[-1]
        if message not in ("out of range",):
            assert name in last, (name, last)
        leftovers = list((tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
        assert leftovers == [], (args, leftovers)


def test_failure_keeps_previous_output(tmp_path):
    imwrite(tmp_path / "good.tif", _stack())
    out = tmp_path / "o.zarr"
    assert run_cli(tmp_path / "good.tif", out) == 0
    before = json.loads((out / "zarr.json").read_text())
    nan = _stack().astype(np.float32)
    nan[-1, 0, 0] = np.nan  # fails on the last slice, after most was written
    imwrite(tmp_path / "nan.tif", nan)
    assert run_cli(tmp_path / "nan.tif", out) == 2
    assert json.loads((out / "zarr.json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.tif", "nan.tif", "o.zarr"]


def test_unwritable_output_directory(tmp_path, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    imwrite(tmp_path / "good.tif", _stack())
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    assert run_cli(tmp_path / "good.tif", ro / "o.zarr") == 2
    assert "not writable" in capsys.readouterr().err


def test_output_under_a_file_is_a_clear_error(tmp_path, capsys):
    imwrite(tmp_path / "good.tif", _stack())
    (tmp_path / "afile").write_text("x")
    assert run_cli(tmp_path / "good.tif", tmp_path / "afile" / "o.zarr") == 2
    err = capsys.readouterr().err.strip()
    assert "cannot create output directory" in err and "afile" in err


def test_missing_voxel_size_is_said_in_the_log(tmp_path, caplog):
    """A file without a resolution gets 1 µm, so cells.csv's µm columns are pixels: the log says
    so and how to give the size; a given size is used and nothing is said."""
    import logging

    caplog.set_level(logging.INFO, logger="unet_core")
    src = tmp_path / "plain.tif"
    tifffile.imwrite(src, _stack(), photometric="minisblack")
    assert run_cli(src, tmp_path / "a.ome.zarr") == 0
    said = [r.getMessage() for r in caplog.records if "no voxel size" in r.getMessage()]
    assert len(said) == 1 and "axis z, y, x" in said[0] and "--voxel-size-um" in said[0], said
    assert open_stack(tmp_path / "a.ome.zarr").scale == pytest.approx((1.0, 1.0, 1.0))
    caplog.clear()
    assert run_cli(src, tmp_path / "b.ome.zarr", "--voxel-size-um", "0.5,0.1,0.1") == 0
    assert not [r for r in caplog.records if "no voxel size" in r.getMessage()]
    assert open_stack(tmp_path / "b.ome.zarr").scale == pytest.approx((0.5, 0.1, 0.1))


def test_a_binary_labels_foreground_is_decided_once_at_ingest_and_read_by_the_stages(tmp_path):
    """Ingest records which value is cell interior (the larger of the two; issue 33 item 2); the
    weights' label arrays and the evaluation read the record through
    Stack.binary_foreground (they took a Dask max() and the values seen; the kernel the slice maximum)."""
    import dask.array as da

    from unet_core.common.errors import UserInputError
    from unet_core.common.labels import LabelKind, binary_foreground
    from unet_core.weights.blockwise import label_arrays

    mask = np.where(_labels(z=3) > 0, 255, 0).astype(np.uint8)
    imwrite(tmp_path / "i.tif", _stack(z=3))
    imwrite(tmp_path / "l.tif", mask)
    out = tmp_path / "o.zarr"
    assert run_cli(tmp_path / "i.tif", out, "--labels", tmp_path / "l.tif") == 0
    stack = open_stack(out, require_labels=True)
    assert stack.label_kind is LabelKind.BINARY and stack.attrs["foreground_value"] == 255
    assert stack.binary_foreground() == 255
    _, classes = label_arrays(da.from_zarr(stack.labels), kind=stack.label_kind, foreground=stack.binary_foreground())
    np.testing.assert_array_equal(classes.compute() > 0, mask == 255)
    with pytest.raises(UserInputError, match="foreground value"):  # no second rule (the Dask max) behind it
        label_arrays(da.from_zarr(stack.labels), kind="binary")
    # stacks ingested before the record: the same rule on the values ingest saw, or on the labels
    stack.attrs.pop("foreground_value")
    assert stack.binary_foreground() == 255
    stack.attrs["label_values_seen"] = None
    assert stack.binary_foreground([0, 1]) == 255
    assert (binary_foreground([0]), binary_foreground([0, 1]), binary_foreground([])) == (1, 1, 1)


def test_a_label_kind_is_parsed_once_where_the_stack_is_opened(tmp_path):
    from unet_core.common.errors import UserInputError
    from unet_core.common.labels import LabelKind

    imwrite(tmp_path / "i.tif", _stack(z=2))
    imwrite(tmp_path / "l.tif", _labels(z=2))
    out = tmp_path / "o.zarr"
    assert run_cli(tmp_path / "i.tif", out, "--labels", tmp_path / "l.tif") == 0
    assert open_stack(out).label_kind is LabelKind.INSTANCE
    root = zarr.open_group(out, mode="r+")
    root.attrs["unet"] = {**root.attrs["unet"], "label_kind": "semantic"}
    with pytest.raises(UserInputError, match=r"label kind 'semantic' in attrs\['unet'\] is not one of instance, binary"):
        open_stack(out, require_labels=True)
    assert open_stack(out).label_kind is None  # the labels are not needed here (predict)
