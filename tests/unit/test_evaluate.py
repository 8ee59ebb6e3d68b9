"""evaluate: prediction OME-Zarr + ingested stack -> metrics.csv / metrics.json / overlays.png."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from unet_core.cli import main
from unet_core.evaluate import scoring as ev
from unet_core.evaluate.object_matching import match_objects
from unet_core.evaluate.pixel_scores import class_iou, confusion_matrix, pixel_error
from unet_core.evaluate.rand_scores import rand_pair_counts, rand_sweep
from unet_core.evaluate.score_inputs import connected_components
from unet_core.evaluate.warping_error import warping_error_count
from unet_core.io.ngff import IMAGE_LABEL, LABEL_NAME, PyramidWriter, label_group

Z, Y, X = 4, 40, 52


def _cells(z: int) -> np.ndarray:
    """(Y, X) instance labels: a grid of rectangular cells with 1-px membranes, shifted per slice."""
    labels = np.zeros((Y, X), np.int32)
    next_id = 1
    for y0 in range(1 + z, Y - 8, 12):
        for x0 in range(1, X - 8, 10 + z % 2):
            labels[y0:y0 + 10, x0:x0 + 9] = next_id
            next_id += 1
    return labels


def write_stack(path: Path, labels: np.ndarray | None, *, kind: str | None) -> Path:
    """A stack in the layout of 'unet ingest' (image pyramid, labels/gt, attrs['unet'])."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(Z, Y, X)).astype(np.uint8)
    root = zarr.open_group(path, mode="w")
    writer = PyramidWriter(root, image.shape, image.dtype, (1, Y, X), (1.0, 1.0, 1.0), unit="micrometer")
    for z, plane in enumerate(image):
        writer.write_plane(z, plane)
    writer.finish()
    attrs = {"intensity": {"mean": float(image.mean()), "std": float(image.std())}}
    if labels is not None:
        group = label_group(root, LABEL_NAME)
        lw = PyramidWriter(group, labels.shape, labels.dtype, (1, Y, X), (1.0, 1.0, 1.0), labels=True, name=LABEL_NAME)
        for z, plane in enumerate(labels):
            lw.write_plane(z, plane)
        lw.finish(IMAGE_LABEL)
        attrs["label_kind"] = kind
    root.attrs.update({"unet": attrs})
    return path


def write_prediction(path: Path, cell_probability: np.ndarray, *, segmentation: bool = True) -> Path:
    """A prediction in the layout of 'unet merge': (c, z, y, x) probabilities + labels/segmentation/0."""
    probs = np.stack([1.0 - cell_probability, cell_probability]).astype(np.float32)
    root = zarr.open_group(path, mode="w")
    writer = PyramidWriter(root, probs.shape, np.float32, (1, 1, Y, X), (1.0, 1.0, 1.0, 1.0), axes="czyx",
                           unit="micrometer", name="prediction")
    for c in range(probs.shape[0]):
        for z in range(probs.shape[1]):
            writer.write_plane((c, z), probs[c, z])
    writer.finish()
    if segmentation:
        seg = probs.argmax(axis=0).astype(np.uint8)
        group = label_group(root, "segmentation")
        sw = PyramidWriter(group, seg.shape, np.uint8, (1, Y, X), (1.0, 1.0, 1.0), labels=True, name="segmentation")
        for z, plane in enumerate(seg):
            sw.write_plane(z, plane)
        sw.finish(IMAGE_LABEL)
    root.attrs.update({"unet": {"model_sha256": "test", "decision_rule": "argmax"}})
    return path


def _instance_labels() -> np.ndarray:
    return np.stack([_cells(z) for z in range(Z)])


def _perfect_probability(classes: np.ndarray) -> np.ndarray:
    return np.where(classes == 1, 0.92, 0.07).astype(np.float32)


@pytest.fixture
def binary_case(tmp_path):
    """ISBI-like binary labels (255 = cell interior, 0 = membrane) and a perfect prediction."""
    fg = _instance_labels() > 0
    stack = write_stack(tmp_path / "stack.ome.zarr", np.where(fg, 255, 0).astype(np.uint8), kind="binary")
    pred = write_prediction(tmp_path / "pred.ome.zarr", _perfect_probability(fg.astype(np.uint8)))
    return stack, pred, fg


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- ground truth
def test_ground_truth_binary_uses_foreground_components():
    labels = np.where(_cells(0) > 0, 255, 0).astype(np.uint8)
    instances, classes = ev.ground_truth_targets(labels, label_kind="binary", foreground_value=255)
    np.testing.assert_array_equal(classes, labels == 255)
    assert instances.max() == _cells(0).max()  # every rectangle its own component
    assert rand_pair_counts(_cells(0), instances).error == 0.0


def test_ground_truth_instance_separates_touching_cells():
    labels = np.zeros((8, 12), np.int32)
    labels[1:7, 1:6] = 3
    labels[1:7, 6:11] = 5  # touches cell 3 along a column
    instances, classes = ev.ground_truth_targets(labels, label_kind="instance")
    np.testing.assert_array_equal(instances, labels)
    # a 1-px background line now separates them, and nothing else changed
    parts = connected_components(classes == 1, connectivity=4)
    assert parts.max() == 2
    removed = (labels > 0) & (classes == 0)
    assert removed.sum() == 6  # one column of 6 pixels
    assert np.unique(np.nonzero(removed)[1]).size == 1


def test_ground_truth_binary_all_membrane_slice_has_no_cells():
    labels = np.zeros((5, 6), np.uint8)
    for fg_value in (None, 255):
        instances, classes = ev.ground_truth_targets(labels, label_kind="binary", foreground_value=fg_value)
        assert instances.max() == 0 and classes.max() == 0


def test_ground_truth_rejects_unknown_kind():
    with pytest.raises(ValueError, match="label_kind"):
        ev.ground_truth_targets(np.zeros((3, 3), np.uint8), label_kind="semantic")


# --------------------------------------------------------------------------- one slice
def test_score_slice_equals_the_metric_functions():
    rng = np.random.default_rng(2)
    truth = _cells(1)
    instances, classes = ev.ground_truth_targets(truth, label_kind="instance")
    prob = np.clip(_perfect_probability(classes) + rng.normal(0, 0.35, classes.shape), 0, 1).astype(np.float32)
    pred = (prob > 0.5).astype(np.uint8)
    thresholds = [0.3, 0.5, 0.7]
    counts = ev.score_slice(prob, pred, instances, classes, thresholds=thresholds)
    row = ev.summarise(counts, thresholds=thresholds)
    cm = confusion_matrix(classes, pred)
    assert row["pixel_error"] == pytest.approx(pixel_error(cm))
    assert row["iou_cell"] == pytest.approx(class_iou(cm)[1]) == pytest.approx(row["foreground_iou"])
    sweep = rand_sweep(prob, instances, thresholds=thresholds)
    i = int(np.argmin([c.error for c in sweep]))
    assert row["rand_error_fg"] == pytest.approx(sweep[i].error)
    assert row["rand_threshold"] == thresholds[i]
    comps = connected_components(pred == 1)
    assert row["adapted_rand_error"] == pytest.approx(rand_pair_counts(instances, comps, pred_background="segment").error)
    assert row["object_f1"] == pytest.approx(match_objects(instances, comps).f1)
    warp = [warping_error_count(classes == 1, prob > t) for t in thresholds]
    assert row["warping_pixels"] == warp[i].errors  # at the Rand operating point
    assert row["warping_split_merge_error"] == pytest.approx(warp[i].split_merge_error)
    assert row["warping_error_min"] == pytest.approx(min(w.errors for w in warp) / classes.size)


def test_pooled_counts_are_pixel_weighted():
    a = ev.score_slice(np.full((4, 4), 0.9, np.float32), np.ones((4, 4), np.uint8),
                       np.ones((4, 4), np.int32), np.ones((4, 4), np.uint8), thresholds=[0.5])
    half = np.zeros((4, 4), np.uint8)
    half[:2] = 1
    b = ev.score_slice(half.astype(np.float32), half, np.ones((4, 4), np.int32), np.ones((4, 4), np.uint8),
                       thresholds=[0.5])
    pooled = ev.summarise(a.add(b), thresholds=[0.5])
    assert pooled["pixel_error"] == pytest.approx(8 / 32)
    assert pooled["pixels"] == 32


# --------------------------------------------------------------------------- whole stage
def test_perfect_prediction_scores_perfectly(binary_case, tmp_path):
    stack, pred, fg = binary_case
    out = tmp_path / "eval"
    dataset = ev.evaluate(pred, stack, out, thresholds=[0.2, 0.5, 0.8], overlay_count=1)
    for key in ("pixel_error", "pixel_error_best", "rand_error_fg", "adapted_rand_error", "warping_error",
                "warping_split_merge_error", "warping_error_min"):
        assert dataset[key] == 0.0, key
    for key in ("iou_cell", "iou_background", "foreground_iou", "dice", "object_f1", "seg"):
        assert dataset[key] == 1.0, key
    assert dataset["n_true_objects"] == sum(_cells(z).max() for z in range(Z))
    rows = _read_csv(out / "metrics.csv")
    assert [int(r["z"]) for r in rows] == list(range(Z))
    report = json.loads((out / "metrics.json").read_text())
    assert report["dataset"]["slices"] == Z
    assert len(report["slices"]) == Z
    assert "rand_error_fg" in report["decision_rules"]
    assert report["parameters"]["label_kind"] == "binary"
    assert report["provenance"]["prediction_unet_attrs"]["model_sha256"] == "test"
    assert (out / "overlays.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_held_out_slices_and_ranking(tmp_path):
    labels = _instance_labels()
    stack = write_stack(tmp_path / "stack.ome.zarr", labels, kind="instance")
    classes = np.stack([ev.ground_truth_targets(s, label_kind="instance")[1] for s in labels])
    prob = _perfect_probability(classes)
    prob[2, :, 20:30] = 0.8  # slice 2: a band of false cell pixels merges cells
    pred = write_prediction(tmp_path / "pred.ome.zarr", prob)
    out = tmp_path / "eval"
    dataset = ev.evaluate(pred, stack, out, slices=[1, 2, 3], thresholds=[0.5], overlay_count=1, warping=False)
    rows = {int(r["z"]): r for r in _read_csv(out / "metrics.csv")}
    assert sorted(rows) == [1, 2, 3]
    assert float(rows[2]["pixel_error"]) > 0 and float(rows[1]["pixel_error"]) == 0
    assert float(rows[2]["adapted_rand_error"]) > 0.1
    assert "warping_error" not in rows[1]
    worst, best = ev.rank_slices(list(rows.values()), by="adapted_rand_error", count=1)
    assert list(rows)[worst[0]] == 2 and list(rows)[best[0]] != 2
    # the dataset row pools the three slices
    n = 3 * Y * X
    assert dataset["pixel_error"] == pytest.approx(float(rows[2]["pixel_error"]) * Y * X / n, rel=1e-5)


def test_argmax_used_when_segmentation_missing(tmp_path):
    labels = _instance_labels()
    stack = write_stack(tmp_path / "stack.ome.zarr", labels, kind="instance")
    classes = np.stack([ev.ground_truth_targets(s, label_kind="instance")[1] for s in labels])
    pred = write_prediction(tmp_path / "pred.ome.zarr", _perfect_probability(classes), segmentation=False)
    dataset = ev.evaluate(pred, stack, tmp_path / "eval", thresholds=[0.5], warping=False)
    assert dataset["pixel_error"] == 0.0 and dataset["object_f1"] == 1.0


# --------------------------------------------------------------------------- CLI
def test_cli_writes_outputs(binary_case, tmp_path):
    stack, pred, _ = binary_case
    out = tmp_path / "cli"
    rc = main(["-q", "evaluate", str(pred), str(stack), "-o", str(out), "--slices", "1-2",
               "--thresholds", "0.25:0.75:0.25", "--connectivity", "8", "--overlays", "1",
               "--rank-by", "pixel_error"])
    assert rc == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["parameters"]["slices"] == [1, 2]
    assert report["parameters"]["thresholds"] == [0.25, 0.5, 0.75]
    assert report["parameters"]["connectivity"] == 8


@pytest.mark.parametrize(
    "case, message",
    [
        pytest.param("no-labels", "no ground-truth labels", id="no-labels"),
        pytest.param("shape", "does not match", id="shape-mismatch"),
        pytest.param("not-zarr", "not a Zarr store", id="not-zarr"),
        pytest.param("rank-by", "not a per-slice score", id="bad-rank-by"),
        pytest.param("slices", "out of range", id="bad-slices"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(case, message, binary_case, tmp_path, capsys):
    stack, pred, _ = binary_case
    args = [str(pred), str(stack)]
    extra: list[str] = []
    if case == "no-labels":
        args[1] = str(write_stack(tmp_path / "nolabels.ome.zarr", None, kind=None))
    elif case == "shape":
        small = _perfect_probability(np.zeros((Z, Y, X), np.uint8))
        args[0] = str(write_prediction(tmp_path / "other.ome.zarr", small[:2]))
    elif case == "not-zarr":
        (tmp_path / "plain").mkdir()
        args[0] = str(tmp_path / "plain")
    elif case == "rank-by":
        extra = ["--rank-by", "rand_threshold"]
    elif case == "slices":
        extra = ["--slices", "3-9"]
    out = tmp_path / "out"
    rc = main(["evaluate", *args, "-o", str(out), "--no-warping", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_cli_rejects_bad_thresholds(binary_case, tmp_path, capsys):
    stack, pred, _ = binary_case
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(pred), str(stack), "-o", str(tmp_path / "o"), "--thresholds", "0.5,1.5"])
    assert exc.value.code == 2
    assert "[0, 1]" in capsys.readouterr().err


def test_scores_the_instances_the_workflow_wrote(tmp_path):
    """Object scores come from the prediction's labels/instances (what merge wrote), not from a
    re-segmentation; the *_components scores keep the argmax components for comparison."""
    truth = _instance_labels()
    stack = write_stack(tmp_path / "stack.ome.zarr", truth.astype(np.uint16), kind="instance")
    _, classes = ev.ground_truth_targets(truth[0], label_kind="instance")
    prob = np.stack([_perfect_probability(ev.ground_truth_targets(t, label_kind="instance")[1]) for t in truth])
    pred = write_prediction(tmp_path / "pred.ome.zarr", prob)
    # the stored instances merge every ground-truth cell of each slice into one object
    merged = np.where(prob > 0.5, np.arange(1, Z + 1)[:, None, None], 0).astype(np.uint32)
    root = zarr.open_group(pred, mode="r+")
    group = label_group(root, "instances")
    iw = PyramidWriter(group, merged.shape, np.uint32, (1, Y, X), (1.0, 1.0, 1.0), labels=True, name="instances")
    for z, plane in enumerate(merged):
        iw.write_plane(z, plane)
    iw.finish(IMAGE_LABEL)
    dataset = ev.evaluate(pred, stack, tmp_path / "out")
    assert dataset["object_f1_components"] == 1.0 and dataset["seg_components"] == pytest.approx(1.0)
    assert dataset["n_pred_objects"] == Z and dataset["object_f1"] < 0.5  # the merges show
    assert dataset["adapted_rand_error"] > dataset["adapted_rand_error_components"]
    # the merged foreground is the true foreground: the loss is the instance rule's, not the classifier's
    assert dataset["seg_truth_split"] == pytest.approx(1.0) and dataset["object_f1_truth_split"] == 1.0


@pytest.mark.parametrize("n, count, shown", [(1, 2, (1, 0)), (2, 2, (1, 1)), (3, 2, (2, 1)), (4, 2, (2, 2)),
                                             (9, 2, (2, 2))])
def test_few_slices_show_each_once_worst_and_best(n, count, shown):
    """Two scored slices used to be both labelled 'worst', and no 'best'."""
    rows = [{"z": z, "pixels": 1, "pixel_error": 0.1 * z} for z in range(n)]
    worst, best = ev.rank_slices(rows, by="pixel_error", count=count)
    assert (len(worst), len(best)) == shown and not set(worst) & set(best)
    assert worst[0] == n - 1 and (not best or best[0] == 0)
