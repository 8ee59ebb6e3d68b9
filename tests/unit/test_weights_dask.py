"""Tests of the Dask layer (unet_core.weights.blockwise) and the weights CLI."""

from __future__ import annotations

import json
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr

from unet_core.cli import main
from unet_core.common.errors import UserInputError
from unet_core.io.ngff import IMAGE_LABEL, PyramidWriter, label_group
from unet_core.synth.scene import voronoi_cells as voronoi
from unet_core.weights import blockwise as WD
from unet_core.weights import maps as W
from unet_core.weights.recipe import WeightParams


def make_stack(path: Path, labels: np.ndarray, *, kind: str, chunks=(1, 64, 64), image_shape=None) -> Path:
    """Minimal ingested stack in the layout of 'unet ingest' (image pyramid + labels/gt)."""
    root = zarr.open_group(path, mode="w")
    shape = image_shape or labels.shape
    image = PyramidWriter(root, shape, np.uint8, chunks, (1.0, 1.0, 1.0), levels=1)
    rng = np.random.default_rng(0)
    for z in range(shape[0]):
        image.write_plane(z, rng.integers(0, 255, shape[1:], dtype=np.uint8))
    image.finish()
    gt = PyramidWriter(label_group(root), labels.shape, labels.dtype, chunks, (1.0, 1.0, 1.0), labels=True,
                       levels=1, name="gt")
    for z in range(labels.shape[0]):
        gt.write_plane(z, labels[z])
    gt.finish(IMAGE_LABEL)
    root.attrs.update({**dict(root.attrs), "unet": {"intensity": {"mean": 127.0, "std": 70.0}, "label_kind": kind}})
    return path


@pytest.fixture
def instance_stack(tmp_path) -> tuple[Path, np.ndarray]:
    labels = np.stack([voronoi((150, 170), 30, seed=z, gap=1.1 * (z % 2)) for z in range(3)])
    labels[2] = 0  # an empty slice
    return make_stack(tmp_path / "inst.ome.zarr", labels, kind="instance", chunks=(1, 64, 48)), labels


def whole_slice(labels2d, *, kind, class_weights, params, foreground=None):
    inst = W.instances_from_labels(labels2d, kind=kind, connectivity=params.connectivity, foreground=foreground)
    classes = W.class_map(inst, separate_touching=kind == "instance")
    w = W.weight_map(inst, classes, class_weights=class_weights, params=params)
    return w, classes, W.cells_from(inst, classes)


def test_halo_strictly_beyond_cutoff():
    params = WeightParams()
    assert params.halo_px == 23 and params.halo_px > params.cutoff_px + 1


@pytest.mark.parametrize("pixels", [pytest.param("background", id="bg"), pytest.param("all", id="all")])
def test_chunked_equals_whole_slice(instance_stack, tmp_path, pixels):
    path, labels = instance_stack
    params = WeightParams(w0=10, sigma_px=5, border_pixels=pixels)
    out = tmp_path / "w.zarr"
    with WD.dask_scheduler("threads", workers=2):
        attrs = WD.write_weights(path, out, params=params, class_weights={"class_weights": [0.6, 2.5]})
    result = zarr.open_group(out, mode="r")
    assert result["weights"].dtype == np.float32 and result["classes"].dtype == np.uint8
    assert result["instances"].dtype == np.int32 and result["weights"].chunks == (1, 64, 48)
    for z in range(labels.shape[0]):
        w, classes, cells = whole_slice(labels[z], kind="instance", class_weights=(0.6, 2.5), params=params)
        np.testing.assert_array_equal(result["weights"][z], w)
        np.testing.assert_array_equal(result["classes"][z], classes)
        np.testing.assert_array_equal(result["instances"][z], cells)
    np.testing.assert_array_equal(result["weights"][2], np.float32(0.6))  # empty slice: w = w_c
    assert attrs["separate_touching"] is True and result.attrs["unet"]["halo_px"] == 23
    assert (tmp_path / "w.png").stat().st_size > 10_000


@pytest.mark.parametrize("scheduler", [pytest.param("threads", id="threads"),
                                       pytest.param("processes", id="processes", marks=pytest.mark.slow)])
def test_binary_stack_components(tmp_path, scheduler):
    fg = voronoi((120, 100), 20, seed=7, gap=0.9) > 0
    labels = np.stack([np.where(fg, 255, 0), np.where(fg[::-1], 255, 0)]).astype(np.uint8)
    path = make_stack(tmp_path / "bin.ome.zarr", labels, kind="binary", chunks=(1, 40, 40))
    params = WeightParams(w0=50, sigma_px=6, connectivity=8)
    with WD.dask_scheduler(scheduler, workers=2):
        WD.write_weights(path, tmp_path / "w.zarr", params=params, class_weights={"class_weights": [1.0, 1.0]},
                         plot_slice=None)
    result = zarr.open_group(tmp_path / "w.zarr", mode="r")
    for z in range(2):
        w, classes, cells = whole_slice(labels[z], kind="binary", class_weights=(1.0, 1.0), params=params,
                                        foreground=255)
        np.testing.assert_array_equal(result["weights"][z], w)
        np.testing.assert_array_equal(result["instances"][z], cells)
    assert result.attrs["unet"]["separate_touching"] is False
    assert not (tmp_path / "w.png").exists()


def test_class_counts_over_stacks(instance_stack, tmp_path):
    path, labels = instance_stack
    counts = WD.class_counts([path, path])
    cells = sum(int(W.class_map(labels[z], separate_touching=True).sum()) for z in range(labels.shape[0]))
    np.testing.assert_array_equal(counts, [2 * (labels.size - cells), 2 * cells])


def test_shape_mismatch_is_a_user_error(tmp_path):
    labels = np.ones((2, 32, 32), np.int32)
    path = make_stack(tmp_path / "s.ome.zarr", labels, kind="instance", chunks=(1, 32, 32), image_shape=(2, 32, 40))
    with pytest.raises(UserInputError, match="differ in shape"):
        WD.write_weights(path, tmp_path / "w.zarr", class_weights={"class_weights": [1, 1]})
    assert not (tmp_path / "w.zarr").exists()


def test_float_labels_are_a_user_error():
    with pytest.raises(UserInputError, match="integers"):
        WD.label_arrays(da.zeros((1, 8, 8), dtype=np.float32), kind="instance")


def test_cli_class_weights_then_weights(instance_stack, tmp_path, capsys):
    path, labels = instance_stack
    cw = tmp_path / "cw.json"
    assert main(["class-weights", str(path), "-o", str(cw), "--threads", "2"]) == 0
    data = json.loads(cw.read_text())
    f = np.array(data["frequencies"])
    np.testing.assert_allclose((f * np.array(data["class_weights"])).sum(), 1.0)
    out = tmp_path / "out" / "weights.zarr"
    assert main(["weights", str(path), str(out), "--class-weights", str(cw), "--preset", "fiji",
                 "--plot-slice", "1", "--scheduler", "synchronous"]) == 0
    attrs = zarr.open_group(out, mode="r").attrs["unet"]
    assert attrs["w0"] == 50 and attrs["sigma_px"] == 6 and attrs["class_weights"] == data["class_weights"]
    assert (tmp_path / "out" / "weights.png").is_file()
    # user errors: one line, exit 2
    assert main(["weights", str(path), str(tmp_path / "x.zarr"), "--plot-slice", "9"]) == 2
    assert main(["weights", str(path), str(tmp_path / "x.zarr"), "--scheduler", "nonsense"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("unet weights: error:") and "scheduler" in err[-1]


def test_a_figure_that_cannot_be_written_leaves_no_store(instance_stack, tmp_path, monkeypatch, capsys):
    """The store used to be put in place before the figure was drawn: a full disk under the PNG
    left a weights store behind a failed run."""
    import errno

    def full_disk(*args, path, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(WD, "plot_weights", full_disk)
    path, _ = instance_stack
    assert main(["weights", str(path), str(tmp_path / "w.zarr"), "--scheduler", "synchronous"]) == 2
    assert "no space left" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inst.ome.zarr"]


def test_a_failed_dask_task_leaves_no_temporary(tmp_path):
    """Dask raises a task's error at once while the other tasks still run; the failed output
    is removed only after they have ended, so none of them re-creates part of it."""
    import time

    from unet_core.common.atomic import atomic_output

    written = []

    def block(x, block_info=None):
        if block_info[0]["chunk-location"][0] == 0:
            time.sleep(0.1)
            raise ValueError("bad block")
        time.sleep(0.5)  # still running when block 0 fails
        written.append(True)
        return x + 1

    with pytest.raises(ValueError, match="bad block"):
        with WD.dask_scheduler("threads", workers=2), atomic_output(tmp_path / "out.zarr", own=None) as tmp:
            target = zarr.create_array(tmp, shape=(2, 4), chunks=(1, 4), dtype="i4")
            da.store(da.zeros((2, 4), chunks=(1, 4), dtype="i4").map_blocks(block, dtype="i4"), target, lock=False)
    assert written == [True]  # the other block ran to its end before the removal...
    time.sleep(0.2)
    assert list(tmp_path.iterdir()) == []  # ...so nothing of the output is left


def test_settling_pool_cancels_queued_work_and_waits_for_running_work():
    import threading
    import time

    from unet_core.common.background import SettlingThreadPool

    started, finished = threading.Event(), []
    with SettlingThreadPool(1) as pool:
        running = pool.submit(lambda: (started.set(), time.sleep(0.3), finished.append("running")))
        queued = pool.submit(lambda: finished.append("queued"))
        started.wait(5)
        pool.settle(timeout_s=10)
        assert running.done() and queued.cancelled() and finished == ["running"]
        assert pool.submit(lambda: 7).result() == 7  # still usable after settling
