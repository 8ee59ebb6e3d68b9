"""unet evaluate --dims 3 (issue 36, item 7): 3-D object F1 and SEG beside the per-slice scores,
the per-slice instances linked into 3-D ids (--link-slices), and the refusals.

Hand-built (4, 12, 16) volumes; prediction stores written the way 'unet merge' lays them out (as
in test_evaluate.py), with 3-D instance ids where the test says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from unet_core.cli import main
from unet_core.common.errors import UserInputError
from unet_core.common.labels import LabelKind
from unet_core.evaluate import volume_scores as vs
from unet_core.io.ngff import IMAGE_LABEL, LABEL_NAME, PyramidWriter, label_group

Z, Y, X = 4, 12, 16
FAST = ["--no-warping", "--thresholds", "0.5", "--overlays", "1"]


def write_stack(path: Path, labels: np.ndarray, *, kind: str = "instance") -> Path:
    """A stack in the layout of 'unet ingest' (image pyramid, labels/gt, attrs['unet'])."""
    z, y, x = labels.shape
    image = np.random.default_rng(0).integers(0, 255, size=labels.shape).astype(np.uint8)
    root = zarr.open_group(path, mode="w")
    writer = PyramidWriter(root, image.shape, image.dtype, (1, y, x), (1.0, 1.0, 1.0), unit="micrometer")
    for k, plane in enumerate(image):
        writer.write_plane(k, plane)
    writer.finish()
    lw = PyramidWriter(label_group(root, LABEL_NAME), labels.shape, labels.dtype, (1, y, x), (1.0, 1.0, 1.0),
                       labels=True, name=LABEL_NAME)
    for k, plane in enumerate(labels):
        lw.write_plane(k, plane)
    lw.finish(IMAGE_LABEL)
    root.attrs.update({"unet": {"intensity": {"mean": float(image.mean()), "std": float(image.std())},
                                "label_kind": kind}})
    return path


def write_prediction(path: Path, instances: np.ndarray, *, dims: int | None = None,
                     store_instances: bool = True) -> Path:
    """A prediction in the layout of 'unet merge': P(cell) 0.9 on the instances, 0.1 elsewhere;
    labels/segmentation the argmax; labels/instances as given (unless not ``store_instances``);
    attrs unet.dims where given."""
    cell = np.where(instances > 0, 0.9, 0.1).astype(np.float32)
    probs = np.stack([1.0 - cell, cell])
    z, y, x = instances.shape
    root = zarr.open_group(path, mode="w")
    writer = PyramidWriter(root, probs.shape, np.float32, (1, 1, y, x), (1.0, 1.0, 1.0, 1.0), axes="czyx",
                           unit="micrometer", name="prediction")
    for c in range(2):
        for k in range(z):
            writer.write_plane((c, k), probs[c, k])
    writer.finish()
    labels = [("segmentation", probs.argmax(axis=0), np.uint8)]
    for name, volume, dtype in labels + ([("instances", instances, np.uint32)] if store_instances else []):
        w = PyramidWriter(label_group(root, name), volume.shape, dtype, (1, y, x), (1.0, 1.0, 1.0), labels=True,
                          name=name)
        for k, plane in enumerate(volume.astype(dtype)):
            w.write_plane(k, plane)
        w.finish(IMAGE_LABEL)
    attrs = {"model_sha256": "test", "decision_rule": "argmax"}
    root.attrs.update({"unet": attrs if dims is None else {**attrs, "dims": dims}})
    return path


def truth_cells(*, stacked: bool = False) -> np.ndarray:
    """Cell 1: a 4 x 4 x 4 cube (64 voxels); cell 2: slices 0-1 (32 voxels); cell 3: slices 2-3,
    beside cell 2 (``stacked``: directly under it, same footprint, touching it along z)."""
    t = np.zeros((Z, Y, X), np.int32)
    t[:, 1:5, 1:5] = 1
    t[0:2, 1:5, 8:12] = 2
    t[2:4, *((slice(1, 5), slice(8, 12)) if stacked else (slice(7, 11), slice(8, 12)))] = 3
    return t


def per_slice_ids(labels: np.ndarray) -> np.ndarray:
    """What a 2-D merge writes: every slice's cross-section of a cell its own id, 1..K over the stack."""
    out = np.zeros_like(labels)
    next_id = 1
    for z in range(labels.shape[0]):
        for cell in np.unique(labels[z])[1:]:
            out[z][labels[z] == cell] = next_id
            next_id += 1
    return out


def run(tmp_path: Path, truth: np.ndarray, pred: np.ndarray, *args: str, name: str = "out", kind: str = "instance",
        dims: int | None = None) -> tuple[int, Path]:
    stack = tmp_path / "stack.ome.zarr"
    if not stack.exists():
        write_stack(stack, truth if kind == "instance" else np.where(truth > 0, 255, 0).astype(np.uint8), kind=kind)
    prediction = tmp_path / f"pred-{name}.ome.zarr"
    write_prediction(prediction, pred, dims=dims)
    out = tmp_path / name
    return main(["-q", "evaluate", str(prediction), str(stack), "-o", str(out), *FAST, *args]), out


def report(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


# --------------------------------------------------------------------------- 3-D scores
def hand_prediction() -> np.ndarray:
    """p1: cell 1 without its last slice (IoU 48/64 = 0.75: a match, SEG 0.75); p2: cells 2 and 3
    under one id (IoU 32/64 = 0.5 with each: no match, SEG 0.5 each); p3: 4 voxels of nothing."""
    t = truth_cells()
    p = np.zeros_like(t)
    p[t == 1] = 1
    p[3][t[3] == 1] = 0
    p[(t == 2) | (t == 3)] = 2
    p[0, 8:10, 1:3] = 3
    return p


def test_3d_f1_and_seg_equal_the_hand_computed_values(tmp_path):
    rc, out = run(tmp_path, truth_cells(), hand_prediction(), "--dims", "3")
    assert rc == 0
    d = report(out)["dataset"]
    # 3-D objects: tp 1 (p1), fp 2 (p2, p3), fn 2 (cells 2, 3)
    assert (d["n_true_objects_3d"], d["n_pred_objects_3d"]) == (3, 3)
    assert d["object_precision_3d"] == pytest.approx(1 / 3) and d["object_recall_3d"] == pytest.approx(1 / 3)
    assert d["object_f1_3d"] == pytest.approx(2 / 6)
    assert d["seg_3d"] == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    # the 6-connected components of the argmax split p2 in two: cells 2 and 3 exactly, p3 the only false one
    assert d["n_pred_objects_components_3d"] == 4
    assert d["object_f1_components_3d"] == pytest.approx(6 / 7)
    assert d["seg_components_3d"] == pytest.approx((0.75 + 1 + 1) / 3)
    assert d["seg_truth_split_3d"] == pytest.approx((0.75 + 1 + 1) / 3)
    assert d["object_f1_truth_split_3d"] == pytest.approx(6 / 7)
    # per slice, a cell counts once in every slice it crosses: 4 + 2 + 2 true objects
    assert d["n_true_objects"] == 8
    params = report(out)["parameters"]
    assert params["dims"] == 3 and params["volume_slices"] == [0, Z - 1] and params["link_slices"] is False
    assert "per_slice_vs_3d" in report(out)["decision_rules"]


def test_3d_scores_of_binary_labels_are_the_6_connected_foreground_components(tmp_path):
    rc, out = run(tmp_path, truth_cells(), hand_prediction(), "--dims", "3", kind="binary")
    assert rc == 0
    d = report(out)["dataset"]
    assert d["n_true_objects_3d"] == 3 and d["object_f1_3d"] == pytest.approx(2 / 6)
    assert d["seg_3d"] == pytest.approx((0.75 + 0.5 + 0.5) / 3)


def test_per_slice_scores_are_those_of_the_2d_stage(tmp_path):
    truth, pred = truth_cells(), hand_prediction()
    rc2, out2 = run(tmp_path, truth, pred, name="two")
    rc3, out3 = run(tmp_path, truth, pred, "--dims", "3", name="three")
    assert rc2 == rc3 == 0
    assert (out2 / "metrics.csv").read_bytes() == (out3 / "metrics.csv").read_bytes()
    r2, r3 = report(out2), report(out3)
    assert r3["slices"] == r2["slices"]
    assert {k: v for k, v in r3["dataset"].items() if not k.endswith("_3d")} == r2["dataset"]
    assert not [k for k in r2["dataset"] if k.endswith("_3d")] and "dims" not in r2["parameters"]
    assert r2["decision_rules"].keys() < r3["decision_rules"].keys()


def test_dims_3_is_the_default_where_the_prediction_records_it(tmp_path):
    rc, out = run(tmp_path, truth_cells(), truth_cells(), dims=3)
    assert rc == 0
    d = report(out)["dataset"]
    assert d["object_f1_3d"] == 1.0 and d["seg_3d"] == 1.0
    rc, out = run(tmp_path, truth_cells(), truth_cells(), "--dims", "2", name="per-slice", dims=3)
    assert rc == 0 and "object_f1_3d" not in report(out)["dataset"]


# --------------------------------------------------------------------------- linking
def test_linked_per_slice_instances_score_as_3d_objects(tmp_path):
    """A 2-D prediction whose cross-sections are exact: as stored every one is an object of its own
    (3-D F1 0, SEG 0); linked, they rebuild the cells, except cells 2 and 3 stacked along z, which
    linking by overlap cannot tell apart (one object of 64 voxels: IoU 0.5 with each)."""
    truth = truth_cells(stacked=True)
    rc, out = run(tmp_path, truth, per_slice_ids(truth), "--dims", "3", "--link-slices")
    assert rc == 0
    d = report(out)["dataset"]
    assert d["n_pred_objects_3d"] == 8 and d["object_f1_3d"] == 0.0 and d["seg_3d"] == 0.0
    assert d["n_pred_objects_linked_3d"] == 2
    assert d["object_precision_linked_3d"] == 0.5 and d["object_recall_linked_3d"] == pytest.approx(1 / 3)
    assert d["object_f1_linked_3d"] == pytest.approx(2 / 5)
    assert d["seg_linked_3d"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    # the per-slice scores see none of this: every cross-section is right
    assert d["object_f1"] == 1.0 and d["seg"] == 1.0
    assert report(out)["parameters"]["link_min_iou"] == 0.25


def test_3d_instances_beat_linked_slices_on_stacked_cells(tmp_path):
    """The comparison the issue asks for, on one volume: the 3-D mode's ids vs the 2-D mode linked."""
    truth = truth_cells(stacked=True)
    _, out3 = run(tmp_path, truth, truth, "--dims", "3", name="three")
    _, out2 = run(tmp_path, truth, per_slice_ids(truth), "--dims", "3", "--link-slices", name="two")
    assert report(out3)["dataset"]["seg_3d"] == 1.0
    assert report(out2)["dataset"]["seg_linked_3d"] == pytest.approx(2 / 3)


def test_link_min_iou_cuts_shrinking_sections(tmp_path):
    """Cell 1 shrinks from 4 x 4 to 2 x 2 between slices 1 and 2 (IoU 0.25): linked at 0.2, cut at 0.25."""
    truth = np.zeros((Z, Y, X), np.int32)
    truth[0:2, 1:5, 1:5] = 1
    truth[2:4, 2:4, 2:4] = 1
    pred = per_slice_ids(truth)
    _, joined = run(tmp_path, truth, pred, "--dims", "3", "--link-slices", "--link-min-iou", "0.2", name="a")
    _, cut = run(tmp_path, truth, pred, "--dims", "3", "--link-slices", name="b")
    assert report(joined)["dataset"]["n_pred_objects_linked_3d"] == 1
    assert report(joined)["dataset"]["object_f1_linked_3d"] == 1.0
    assert report(cut)["dataset"]["n_pred_objects_linked_3d"] == 2
    assert report(cut)["dataset"]["seg_linked_3d"] == pytest.approx(32 / 40)


def test_linking_without_stored_instances_links_the_argmax_components(tmp_path):
    truth = truth_cells()
    stack = write_stack(tmp_path / "stack.ome.zarr", truth)
    pred = write_prediction(tmp_path / "pred.ome.zarr", truth, store_instances=False)
    out = tmp_path / "out"
    assert main(["-q", "evaluate", str(pred), str(stack), "-o", str(out), *FAST, "--dims", "3", "--link-slices"]) == 0
    d = report(out)["dataset"]
    assert d["object_f1_3d"] == 1.0 and d["object_f1_linked_3d"] == 1.0 and d["n_pred_objects_linked_3d"] == 3


# --------------------------------------------------------------------------- refusals
def restarting_ids() -> np.ndarray:
    """Valid 2-D labels, ids 1.. on every slice: id 1 is the left cell in even slices, the right
    cell in odd ones (not touching), so id 1 lies in 4 pieces."""
    t = np.zeros((Z, Y, X), np.int32)
    for z in range(Z):
        t[z, 1:5, 1:5] = 1 + z % 2
        t[z, 1:5, 8:12] = 2 - z % 2
    return t


@pytest.mark.parametrize(
    "case, message",
    [
        pytest.param("restart", "label id 1 lies in 4 separate 6-connected pieces", id="ids-restart-per-slice"),
        pytest.param("single", "has a single slice", id="single-slice-stack"),
        pytest.param("one-selected", "--slices selects a single slice", id="one-slice-selected"),
        pytest.param("gap", "contiguous", id="slices-with-a-gap"),
        pytest.param("link-2d", "add --dims 3", id="link-without-dims-3"),
        pytest.param("link-3d", "holds 3-D instances already", id="link-3d-instances"),
        pytest.param("min-iou", "--link-min-iou must be in [0, 1)", id="bad-link-min-iou"),
    ],
)
def test_refusals_exit_2_in_one_line_and_write_nothing(case, message, tmp_path, capsys):
    truth, extra, dims = truth_cells(), ["--dims", "3"], None
    if case == "restart":
        truth = restarting_ids()
    elif case == "single":
        truth = truth[:1]
    elif case == "one-selected":
        extra += ["--slices", "2"]
    elif case == "gap":
        extra += ["--slices", "0,2-3"]
    elif case == "link-2d":
        extra = ["--link-slices"]
    elif case == "link-3d":
        extra, dims = ["--link-slices"], 3
    elif case == "min-iou":
        extra += ["--link-slices", "--link-min-iou", "1"]
    stack = write_stack(tmp_path / "stack.ome.zarr", truth)
    pred = write_prediction(tmp_path / "pred.ome.zarr", truth, dims=dims)
    out = tmp_path / "out"
    rc = main(["evaluate", str(pred), str(stack), "-o", str(out), *FAST, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists() or not any(out.iterdir())


def test_dims_other_than_2_or_3_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(tmp_path), str(tmp_path), "-o", str(tmp_path / "o"), "--dims", "4"])
    assert exc.value.code == 2 and "expected 2 or 3" in capsys.readouterr().err


# --------------------------------------------------------------------------- array core
def test_split_label_id_finds_ids_in_several_pieces():
    from unet_core.common.labels import split_label_id

    assert split_label_id(iter(truth_cells(stacked=True))) is None
    assert split_label_id(iter(restarting_ids())) == (1, [[0], [1], [2], [3]])
    diagonal = np.zeros((2, 3, 3), np.int32)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = 5  # corner contact only: two pieces under 6-connectivity
    assert split_label_id(iter(diagonal)) == (5, [[0], [1]])


def test_truth_volume_of_binary_labels_refuses_a_third_value():
    labels = np.zeros((2, 3, 3), np.uint8)
    labels[0, 0, 0], labels[1, 1, 1] = 255, 7
    with pytest.raises(UserInputError, match="binary labels"):
        vs.truth_volume(labels, label_kind=LabelKind.BINARY, foreground_value=255)
    labels[1, 1, 1] = 255
    assert vs.truth_volume(labels, label_kind=LabelKind.BINARY).max() == 2  # corner contact: two cells
