"""Data safety (issue 14): no input ever destroys or silently drops the user's data.

A hostile corpus through the ``unet`` command line (with ``-q``), every case in its own
scratch folder holding copies of the inputs it needs (from the reference workflow run) and
files of "the user":

* the table: every stage with its output pointed at an input, the folder holding an input, a
  path inside an input, an existing user file, an existing user folder, and an earlier own
  output (the only one that may be replaced);
* the other defects of the issue: page-by-page TIFFs, 64-bit integer pixels, empty slice
  selections, non-finite numbers, loosely typed config numbers, two predict runs on one part
  store, errors of the weight stages that must name their stack.

Each refused case: exit status 2, exactly one line on stderr (``unet STAGE: error: ...``, which
names the user's path, never a hidden temporary), no traceback, no output, and every file of
its folder byte-identical (hashed before and after). Each legal case: exit status 0 and the
correct result. Cases run in two worker processes (``cli_batch.py``: ``unet_core.cli.main``
per case, one interpreter start), so the corpus costs seconds, not a torch import per case.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tifffile
from faults import ENV, run_unet, snakemake, tree_digest, tree_state

from unet_core.io.ingest import ingest

HERE = Path(__file__).resolve().parent
MODEL_ARGS = ["--depth", "2", "--base-channels", "4", "--dropout", "0"]
TT, TV = "results/tiny_train", "results/tiny_val"


@dataclass
class Case:
    """One command line run in folder ``c``: ``setup(c, ref)`` copies/creates what it needs and
    returns the arguments (after ``unet -q``). ``ok``: the legal cases (exit 0; ``check(c)``
    checks the result); otherwise the case must be refused naming every string of ``names``
    (``{c}`` is replaced by the case folder)."""

    setup: Callable[[Path, Path], list]
    names: tuple[str, ...] = ()
    ok: bool = False
    check: Callable[[Path], None] | None = None
    out: str | None = None  # relative to c: must not exist after a refused case
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- inputs of the cases

INPUTS = {
    "image.tif": "resources/synth/image.tif",
    "labels.tif": "resources/synth/labels.tif",
    "stack.ome.zarr": f"{TT}/stack.ome.zarr",
    "val.ome.zarr": f"{TV}/stack.ome.zarr",
    "class_weights.json": "results/class_weights.json",
    "weights.zarr": f"{TT}/weights.zarr",
    "val_weights.zarr": f"{TV}/weights.zarr",
    "augment.zarr": f"{TT}/augment.zarr",
    "model.pt": "results/model/model.pt",
    "part-0.zarr": f"{TV}/predict/part-0.zarr",
    "part-1.zarr": f"{TV}/predict/part-1.zarr",
    "prediction.ome.zarr": f"{TV}/prediction.ome.zarr",
}


def _copy(ref: Path, rel: str, dst: Path) -> Path:
    src = ref / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".snakemake_timestamp"))
    else:
        shutil.copy2(src, dst)
    return dst


def _in(c: Path, ref: Path, *names: str) -> list[Path]:
    """Copies of the named reference inputs under ``c/in``."""
    return [p if p.exists() else _copy(ref, INPUTS[n], p) for n in names for p in [c / "in" / n]]


def _user(c: Path) -> None:
    """The user's own files: a file and a folder that no stage may touch."""
    (c / "user/folder/sub").mkdir(parents=True, exist_ok=True)
    (c / "user/notes.txt").write_text("the user's notes\n")
    (c / "user/folder/a.txt").write_text("a\n")
    (c / "user/folder/sub/b.tif").write_bytes(b"II*\x00not really a tiff")


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Stage:
    """How to run one stage with its output at OUT, which input to aim at, and where its earlier
    own output comes from in the reference run."""

    inputs: tuple[str, ...]
    argv: Callable[[Path, Path], list]  # (case folder, output path) -> arguments
    the_input: str | None  # the input the output is pointed at
    inside: str | None  # an input to put the output inside
    own: str  # reference path of an earlier output of this stage (same kind)
    mark: Callable[[], object]  # the mark the output must carry afterwards


def _mark(module: str, name: str) -> Callable[[], object]:
    def get():
        import importlib

        return getattr(importlib.import_module(module), name)
    return get


def _i(c: Path, name: str) -> str:
    return str(c / "in" / name)


STAGES = {
    "synth": Stage((), lambda c, o: ["synth", "--image", o, "--labels", c / "labels_out.tif", "--slices", "1",
                                     "--size", "64"],
                   None, None, "resources/synth/image.tif", _mark("unet_core.synth.tiffs", "SYNTH_TIFF_MARK")),
    "ingest": Stage(("image.tif", "labels.tif"),
                    lambda c, o: ["ingest", _i(c, "image.tif"), o, "--labels", _i(c, "labels.tif"), "--slices", "0-1",
                                  "--chunks", "1,64,64"],
                    "labels.tif", "image.tif", f"{TV}/stack.ome.zarr", _mark("unet_core.io.ingest", "STACK_MARK")),
    "class-weights": Stage(("stack.ome.zarr",), lambda c, o: ["class-weights", _i(c, "stack.ome.zarr"), "-o", o,
                                                              "--threads", "1"],
                           "stack.ome.zarr", "stack.ome.zarr", "results/class_weights.json",
                           _mark("unet_core.weights.blockwise", "CLASS_WEIGHTS_MARK")),
    "weights": Stage(("val.ome.zarr", "class_weights.json"),
                     lambda c, o: ["weights", _i(c, "val.ome.zarr"), o, "--class-weights", _i(c, "class_weights.json"),
                                   "--plot-slice", "-1", "--threads", "1"],
                     "class_weights.json", "val.ome.zarr", f"{TV}/weights.zarr",
                     _mark("unet_core.weights.blockwise", "WEIGHTS_MARK")),
    "augment": Stage(("stack.ome.zarr", "weights.zarr"),
                     lambda c, o: ["augment", _i(c, "stack.ome.zarr"), _i(c, "weights.zarr"), o, "--slices", "0",
                                   "--samples-per-slice", "1", "--tile-out", "36", *MODEL_ARGS, "--threads", "1"],
                     "weights.zarr", "weights.zarr", f"{TT}/augment.zarr",
                     _mark("unet_core.augment.samples", "AUGMENT_MARK")),
    "train": Stage(("augment.zarr",),
                   lambda c, o: ["train", "--train", _i(c, "augment.zarr"), "--out-dir", o, *MODEL_ARGS,
                                 "--iterations", "1", "--batch-size", "1", "--optimizer", "adam", "--device", "cpu",
                                 "--workers", "0", "--threads", "1", "--checkpoint-every", "1", "--validate-every", "1"],
                   "augment.zarr", "augment.zarr", "results/model", _mark("unet_core.train.loop", "OUT_DIR_MARK")),
    "predict": Stage(("val.ome.zarr", "model.pt"),
                     lambda c, o: ["predict", _i(c, "val.ome.zarr"), _i(c, "model.pt"), o, "--job", "0", "--jobs", "2",
                                   "--tile-out", "64", "--block-px", "64", "--device", "cpu", "--threads", "1",
                                   *MODEL_ARGS],
                     "model.pt", "val.ome.zarr", f"{TV}/predict/part-0.zarr",
                     _mark("unet_core.infer.part_store", "PART_MARK")),
    "merge": Stage(("part-0.zarr", "part-1.zarr", "val.ome.zarr"),
                   lambda c, o: ["merge", _i(c, "part-0.zarr"), _i(c, "part-1.zarr"), "--stack", _i(c, "val.ome.zarr"),
                                 "-o", o],
                   "part-1.zarr", "part-0.zarr", f"{TV}/prediction.ome.zarr",
                   _mark("unet_core.infer.merge", "PREDICTION_MARK")),
    "merge-tiff": Stage(("part-0.zarr", "part-1.zarr", "val.ome.zarr"),
                        lambda c, o: ["merge", _i(c, "part-0.zarr"), _i(c, "part-1.zarr"), "--stack",
                                      _i(c, "val.ome.zarr"), "-o", c / "pred.ome.zarr", "--tiff", o],
                        "val.ome.zarr", "part-0.zarr", f"{TV}/segmentation.tif",
                        _mark("unet_core.infer.merge", "TIFF_MARK")),
    "evaluate": Stage(("prediction.ome.zarr", "val.ome.zarr"),
                      lambda c, o: ["evaluate", _i(c, "prediction.ome.zarr"), _i(c, "val.ome.zarr"), "-o", o,
                                    "--no-warping", "--thresholds", "0.5", "--overlays", "1"],
                      "prediction.ome.zarr", "prediction.ome.zarr", f"{TV}/evaluate",
                      _mark("unet_core.evaluate.scoring", "OUT_DIR_MARK")),
}
TARGETS = ("an-input", "folder-holding-an-input", "inside-an-input", "user-file", "user-folder", "own-output")


def _table_case(stage: str, target: str) -> Case | None:
    st = STAGES[stage]
    if not st.inputs and target in TARGETS[:3]:
        return None  # synth reads no input

    def out_path(c: Path) -> Path:
        return {
            "an-input": lambda: c / "in" / str(st.the_input),
            "folder-holding-an-input": lambda: c / "in",
            "inside-an-input": lambda: c / "in" / str(st.inside) / "out",
            "user-file": lambda: c / "user/notes.txt",
            "user-folder": lambda: c / "user/folder",
            "own-output": lambda: c / "out" / Path(st.own).name,
        }[target]()

    def setup(c: Path, ref: Path) -> list:
        _in(c, ref, *st.inputs)
        _user(c)
        out = out_path(c)
        if target == "own-output":
            _copy(ref, st.own, out)
        return st.argv(c, out)

    if target == "own-output":
        def check(c: Path) -> None:
            out = out_path(c)
            assert st.mark().recognises(out), f"{out} is not an output of {stage} after the run"
        return Case(setup, ok=True, check=check, extra={"replaced": True, "out_of": out_path})
    why = {"an-input": "is the input", "folder-holding-an-input": "contains the input",
           "inside-an-input": "lies inside the input", "user-file": "holds a file",
           "user-folder": "holds a folder"}[target]
    return Case(setup, names=(why,), extra={"out_of": out_path})


TABLE = {f"{stage}-into-{target}": case for stage in STAGES for target in TARGETS
         if (case := _table_case(stage, target)) is not None}


# ---------------------------------------------------------------- the other defects


def _tiff(path: Path, data: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, data, photometric="minisblack", **kw)
    return path


def _page_by_page(path: Path, pages: list[np.ndarray]) -> Path:
    """One ``TiffWriter.write()`` per page, as acquisition software does: several series."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tif:
        for page in pages:
            tif.write(page, photometric="minisblack")
    return path


RNG = np.random.default_rng(14)
IMG = RNG.integers(0, 200, (3, 40, 48), dtype=np.uint16)
LAB = (RNG.random((3, 40, 48)) > 0.6).astype(np.uint16) * np.arange(1, 4, dtype=np.uint16)[:, None, None]


def _store(c: Path, name: str = "out.ome.zarr"):
    import zarr

    return zarr.open_group(c / name, mode="r")


def _check_pages(c: Path) -> None:
    g = _store(c)
    np.testing.assert_array_equal(g["0"][:], IMG)
    np.testing.assert_array_equal(g["labels/gt/0"][:], LAB)


def _check_narrowed(image_dtype: str, label_dtype: str | None, image: np.ndarray, labels: np.ndarray | None):
    def check(c: Path) -> None:
        g = _store(c)
        assert g["0"].dtype == np.dtype(image_dtype)
        np.testing.assert_array_equal(g["0"][:], image)
        if label_dtype is not None:
            assert g["labels/gt/0"].dtype == np.dtype(label_dtype)
            np.testing.assert_array_equal(g["labels/gt/0"][:], labels)
    return check


def _ingest(c: Path, image: Path, *more) -> list:
    return ["ingest", image, c / "out.ome.zarr", "--chunks", "1,40,48", *more]


def _val_pair(c: Path, ref: Path) -> str:
    stack, weights = _in(c, ref, "val.ome.zarr", "val_weights.zarr")
    return f"{stack}:{weights}"


def _train(c: Path, ref: Path, *more) -> list:
    (aug,) = _in(c, ref, "augment.zarr")
    return ["train", "--train", aug, "--out-dir", c / "model", *MODEL_ARGS, "--iterations", "1", "--device", "cpu",
            "--workers", "0", "--threads", "1", *more]


def _predict(c: Path, ref: Path, part: Path, *more) -> list:
    stack, model = _in(c, ref, "val.ome.zarr", "model.pt")
    return ["predict", stack, model, part, "--job", "0", "--jobs", "2", "--tile-out", "64", "--block-px", "64",
            "--device", "cpu", "--threads", "1", *MODEL_ARGS, *more]


def _write_lock(part: Path, pid: int, *, host: str | None = None, age_s: float = 0.0) -> None:
    from unet_core.common.atomic import host_name, process_start

    part.parent.mkdir(parents=True, exist_ok=True)
    lock = part.with_name(f".{part.name}.lock")
    lock.write_text(json.dumps({"host": host or host_name(), "pid": pid, "started": process_start(pid)}))
    if age_s:
        when = lock.stat().st_mtime - age_s
        os.utime(lock, (when, when))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


_HOLDER: list[subprocess.Popen] = []  # a live process "running predict" (killed after the batch)


def _live_lock(c: Path, ref: Path) -> list:
    holder = subprocess.Popen(["sleep", "300"])
    _HOLDER.append(holder)
    part = c / "predict/part-0.zarr"
    _copy(ref, INPUTS["part-0.zarr"], part)
    _write_lock(part, holder.pid)
    return _predict(c, ref, part, "--tta", "flips")


def _dead_lock(c: Path, ref: Path) -> list:
    part = c / "predict/part-0.zarr"
    _write_lock(part, _dead_pid())
    return _predict(c, ref, part)


def _check_dead_lock(c: Path) -> None:
    part = c / "predict/part-0.zarr"
    assert (part / "COMPLETE").is_file() and not part.with_name(".part-0.zarr.lock").exists()


def _other_host_lock(age_s: float) -> Callable[[Path, Path], list]:
    """A lock of a run on another node (shared file system), last refreshed ``age_s`` ago."""
    def setup(c: Path, ref: Path) -> list:
        _write_lock(c / "predict/part-0.zarr", 4242, host="othernode", age_s=age_s)
        return _predict(c, ref, c / "predict/part-0.zarr")
    return setup


def _other_settings(c: Path, ref: Path) -> list:
    part = c / "predict/part-0.zarr"
    _copy(ref, INPUTS["part-0.zarr"], part)  # a complete part of the reference run (tta none)
    return _predict(c, ref, part, "--tta", "flips")


def _check_other_settings(c: Path) -> None:
    """The part now holds only blocks of the new settings: manifest, blocks and bytes of a
    fresh run with those settings (case predict-fresh-flips)."""
    part, fresh = c / "predict/part-0.zarr", c.parent / "predict-fresh-flips/predict/part-0.zarr"
    settings = json.loads((part / "part.json").read_text())
    assert settings["tta"] == "flips" and (part / "COMPLETE").is_file()
    def chunks(root: Path) -> dict[str, str]:
        return {k: v for k, v in tree_digest(root).items()
                if k.startswith("probabilities/") and not k.endswith("zarr.json")}

    assert chunks(part) and chunks(part) == chunks(fresh)
    assert sorted(p.name for p in (part / "done").iterdir()) == sorted(p.name for p in (fresh / "done").iterdir())


def _binary_as_instances_stack(c: Path, ref: Path) -> list:
    """A stack ingested with --label-kind binary from instance labels (many values)."""
    _tiff(c / "in/img.tif", IMG)
    _tiff(c / "in/lab.tif", LAB * 7)
    ingest(c / "in/img.tif", c / "in/binary.ome.zarr", labels=c / "in/lab.tif", label_kind="binary", chunks=(1, 40, 48))
    return ["weights", c / "in/binary.ome.zarr", c / "w.zarr", "--threads", "1"]


def _no_cells_stack(c: Path, ref: Path) -> list:
    _tiff(c / "in/img.tif", IMG)
    _tiff(c / "in/lab.tif", np.zeros_like(LAB))
    ingest(c / "in/img.tif", c / "in/empty.ome.zarr", labels=c / "in/lab.tif", chunks=(1, 40, 48))
    return ["class-weights", c / "in/empty.ome.zarr", "-o", c / "cw.json", "--threads", "1"]


def _user_png_beside(c: Path, ref: Path) -> list:
    """weights writes OUT.png next to OUT.zarr: a user's PNG there is not replaced."""
    (stack,) = _in(c, ref, "val.ome.zarr")
    (c / "w.png").write_bytes(b"\x89PNG\r\n\x1a\nthe user's figure")
    return ["weights", stack, c / "w.zarr", "--threads", "1"]


def _foreign_file_in_train_dir(c: Path, ref: Path) -> list:
    _copy(ref, "results/model", c / "model")
    (c / "model/my_notes.txt").write_text("mine\n")
    return _train(c, ref)


def _foreign_metrics_in_eval_dir(c: Path, ref: Path) -> list:
    pred, stack = _in(c, ref, "prediction.ome.zarr", "val.ome.zarr")
    (c / "eval").mkdir()
    (c / "eval/metrics.csv").write_text("sample,score\nmine,0.9\n")
    return ["evaluate", pred, stack, "-o", c / "eval", "--no-warping", "--thresholds", "0.5"]


def _other_stage_store(c: Path, ref: Path) -> list:
    """An ingested stack where a weights store is to go: another stage's output, not replaced."""
    (stack,) = _in(c, ref, "val.ome.zarr")
    _copy(ref, INPUTS["stack.ome.zarr"], c / "w.zarr")
    return ["weights", stack, c / "w.zarr", "--threads", "1"]


def _broken_link(c: Path, ref: Path) -> list:
    (stack,) = _in(c, ref, "stack.ome.zarr")
    os.symlink(c / "nowhere", c / "cw.json")
    return ["class-weights", stack, "-o", c / "cw.json", "--threads", "1"]


def _link_to_own_store(c: Path, ref: Path) -> list:
    """A link to the stage's own earlier store where its output goes: was found only after the work
    ("cannot put the output in place (Not a directory)"); for a file the link was replaced."""
    (image,) = _in(c, ref, "image.tif")
    _copy(ref, INPUTS["stack.ome.zarr"], c / "own.ome.zarr")
    os.symlink("own.ome.zarr", c / "link.ome.zarr")
    return ["ingest", image, c / "link.ome.zarr", "--slices", "0"]


def _link_to_own_file(c: Path, ref: Path) -> list:
    (stack,) = _in(c, ref, "stack.ome.zarr")
    _copy(ref, INPUTS["class_weights.json"], c / "own.json")
    os.symlink("own.json", c / "cw.json")
    return ["class-weights", stack, "-o", c / "cw.json", "--threads", "1"]


def _user_tiff_for_synth(c: Path, ref: Path) -> list:
    _tiff(c / "user/scan.tif", IMG)
    return ["synth", "--image", c / "user/scan.tif", "--slices", "1", "--size", "64"]


CORPUS = {
    # 1. outputs: beyond the table
    "predict-into-its-model-file": Case(
        lambda c, r: _predict(c, r, c / "in/model.pt"), ("model.pt", "is the input"), out=None),
    "weights-png-beside-the-store-is-a-user-file": Case(_user_png_beside, ("w.png", "not a PNG figure"), out="w.zarr"),
    "train-dir-holding-a-user-file": Case(_foreign_file_in_train_dir, ("my_notes.txt", "did not write")),
    "evaluate-dir-holding-a-user-metrics-csv": Case(_foreign_metrics_in_eval_dir, ("metrics.csv", "did not write")),
    "weights-into-an-ingested-stack": Case(_other_stage_store, ("w.zarr", "written by 'unet weights'")),
    "class-weights-onto-a-broken-link": Case(_broken_link, ("cw.json", "broken link")),
    "ingest-onto-a-link-to-its-own-store": Case(_link_to_own_store,
                                                ("link.ome.zarr", "is a link (to own.ome.zarr)")),
    "class-weights-onto-a-link-to-its-own-file": Case(_link_to_own_file,
                                                      ("cw.json", "is a link (to own.json)")),
    "synth-onto-a-user-tiff": Case(_user_tiff_for_synth, ("scan.tif", "written by 'unet synth'")),
    "synth-image-and-labels-one-file": Case(
        lambda c, r: ["synth", "--image", c / "x.tif", "--labels", c / "x.tif", "--slices", "1", "--size", "64"],
        ("x.tif",), out="x.tif"),
    "ingest-labels-are-the-output": Case(
        lambda c, r: ["ingest", _in(c, r, "image.tif")[0], _in(c, r, "labels.tif")[0], "--labels",
                      c / "in/labels.tif"], ("labels.tif", "is the input")),
    "merge-tiff-equals-merge-output": Case(
        lambda c, r: ["merge", *_in(c, r, "part-0.zarr", "part-1.zarr"), "--stack", _in(c, r, "val.ome.zarr")[0],
                      "-o", c / "p.ome.zarr", "--tiff", c / "p.ome.zarr"], ("p.ome.zarr", "overlaps"), out="p.ome.zarr"),
    # 2. page-by-page TIFFs
    "ingest-page-by-page-tiffs": Case(
        lambda c, r: _ingest(c, _page_by_page(c / "in/img.tif", list(IMG)), "--labels",
                             _page_by_page(c / "in/lab.tif", list(LAB))), ok=True, check=_check_pages),
    "ingest-page-by-page-pages-of-two-shapes": Case(
        lambda c, r: _ingest(c, _page_by_page(c / "in/img.tif", [IMG[0], IMG[1, :20]])), ("img.tif", "differ"),
        out="out.ome.zarr"),
    "ingest-page-by-page-pages-of-two-dtypes": Case(
        lambda c, r: _ingest(c, _page_by_page(c / "in/img.tif", [IMG[0], IMG[1].astype(np.uint8)])),
        ("img.tif", "dtype"), out="out.ome.zarr"),
    "ingest-page-by-page-labels-of-other-length": Case(
        lambda c, r: _ingest(c, _page_by_page(c / "in/img.tif", list(IMG)), "--labels",
                             _page_by_page(c / "in/lab.tif", list(LAB[:2]))), ("lab.tif", "shape"),
        out="out.ome.zarr"),
    # 3. 64-bit integers
    "ingest-uint64-image-small-values": Case(
        lambda c, r: _ingest(c, _tiff(c / "in/img.tif", IMG.astype(np.uint64))), ok=True,
        check=_check_narrowed("uint8", None, IMG, None)),
    "ingest-int64-image-negative-values": Case(
        lambda c, r: _ingest(c, _tiff(c / "in/img.tif", IMG.astype(np.int64) - 1000)), ok=True,
        check=_check_narrowed("int16", None, IMG.astype(np.int64) - 1000, None)),
    "ingest-int64-labels": Case(
        lambda c, r: _ingest(c, _tiff(c / "in/img.tif", IMG), "--labels", _tiff(c / "in/lab.tif", LAB.astype(np.int64))),
        ok=True, check=_check_narrowed("uint16", "uint8", IMG, LAB)),
    "ingest-uint64-labels-beyond-32-bits": Case(
        lambda c, r: _ingest(c, _tiff(c / "in/img.tif", IMG), "--labels",
                             _tiff(c / "in/lab.tif", LAB.astype(np.uint64) << np.uint64(40))),
        ("lab.tif", "32-bit"), out="out.ome.zarr"),
    # 4. empty selections
    "train-val-slices-backwards": Case(
        lambda c, r: _train(c, r, "--val", _val_pair(c, r), "--val-slices", "5-2"), ("--val-slices", "5-2", "selects no slice"),
        out="model"),
    "train-val-slices-without-val": Case(lambda c, r: _train(c, r, "--val-slices", "0"), ("--val-slices", "--val"),
                                         out="model"),
    "train-train-slices-backwards": Case(
        lambda c, r: ["train", "--train-stacks", f"{_in(c, r, 'stack.ome.zarr')[0]}:{_in(c, r, 'weights.zarr')[0]}",
                      "--train-slices", "2-1", "--tile-out", "36", "--out-dir", c / "model", *MODEL_ARGS,
                      "--iterations", "1", "--device", "cpu", "--workers", "0"], ("--train-slices", "2-1", "selects no slice"), out="model"),
    "ingest-slices-backwards": Case(
        lambda c, r: _ingest(c, _tiff(c / "in/img.tif", IMG), "--slices", "2-0"), ("--slices", "2-0", "selects no slice"),
        out="out.ome.zarr"),
    "augment-slices-backwards": Case(
        lambda c, r: ["augment", *_in(c, r, "stack.ome.zarr", "weights.zarr"), c / "a.zarr", "--slices", "2-1",
                      "--tile-out", "36", *MODEL_ARGS], ("--slices", "2-1", "selects no slice"), out="a.zarr"),
    "evaluate-slices-backwards": Case(
        lambda c, r: ["evaluate", *_in(c, r, "prediction.ome.zarr", "val.ome.zarr"), "-o", c / "eval",
                      "--slices", "0-0,1-0"], ("--slices", "1-0", "selects no slice"), out="eval"),
    # 5. non-finite numbers
    "ingest-voxel-size-nan": Case(
        lambda c, r: _ingest(c, _tiff(c / "in/img.tif", IMG), "--voxel-size-um", "nan,1,1"), ("--voxel-size-um", "nan"),
        out="out.ome.zarr"),
    "ingest-voxel-size-inf": Case(
        lambda c, r: _ingest(c, _tiff(c / "in/img.tif", IMG), "--voxel-size-um", "1,inf,1"), ("--voxel-size-um",),
        out="out.ome.zarr"),
    "train-lr-nan": Case(lambda c, r: _train(c, r, "--lr", "nan"), ("--lr", "nan"), out="model"),
    "train-momentum-inf": Case(lambda c, r: _train(c, r, "--momentum", "inf"), ("--momentum",), out="model"),
    "train-lr-gamma-minus-inf": Case(lambda c, r: _train(c, r, "--lr-gamma=-inf"), ("--lr-gamma",), out="model"),
    "train-weight-decay-inf": Case(lambda c, r: _train(c, r, "--weight-decay", "inf"), ("--weight-decay",),
                                   out="model"),
    "weights-w0-nan": Case(lambda c, r: ["weights", _in(c, r, "val.ome.zarr")[0], c / "w.zarr", "--w0", "nan"],
                           ("--w0", "nan"), out="w.zarr"),
    "weights-tolerance-inf": Case(lambda c, r: ["weights", _in(c, r, "val.ome.zarr")[0], c / "w.zarr", "--tolerance",
                                                "inf"], ("--tolerance",), out="w.zarr"),
    "augment-sigma-nan": Case(
        lambda c, r: ["augment", *_in(c, r, "stack.ome.zarr", "weights.zarr"), c / "a.zarr", "--sigma-px", "nan"],
        ("--sigma-px",), out="a.zarr"),
    "synth-density-nan": Case(lambda c, r: ["synth", "--image", c / "x.tif", "--density", "nan"], ("--density",),
                              out="x.tif"),
    "evaluate-thresholds-to-inf": Case(
        lambda c, r: ["evaluate", *_in(c, r, "prediction.ome.zarr", "val.ome.zarr"), "-o", c / "eval",
                      "--thresholds", "0:inf:0.1"], ("--thresholds",), out="eval"),
    # 7. two predict runs on one part store
    "predict-while-another-run-holds-the-part": Case(_live_lock, ("part-0.zarr", "another 'unet predict'", "pid")),
    "predict-takes-over-a-dead-runs-lock": Case(_dead_lock, ok=True, check=_check_dead_lock),
    "predict-while-a-run-on-another-host-holds-the-part": Case(
        _other_host_lock(5.0), ("part-0.zarr", "pid 4242 on host othernode")),
    "predict-takes-over-a-lock-another-host-stopped-refreshing": Case(
        _other_host_lock(3600.0), ok=True, check=_check_dead_lock),
    "predict-fresh-flips": Case(lambda c, r: _predict(c, r, c / "predict/part-0.zarr", "--tta", "flips"), ok=True),
    "predict-other-settings-replace-the-part": Case(_other_settings, ok=True, check=_check_other_settings),
    # errors of the weight stages name their stack
    "weights-error-names-its-stack": Case(_binary_as_instances_stack, ("binary.ome.zarr", "more than two values"),
                                          out="w.zarr"),
    "class-weights-error-names-its-stack": Case(_no_cells_stack, ("empty.ome.zarr", "never occur"), out="cw.json"),
}
CASES = {**TABLE, **CORPUS}


# ---------------------------------------------------------------- running the corpus


def _one_error_line(stderr: str) -> str:
    """The single line of a refusal: argparse's usage block aside, stderr must hold exactly one
    line, ``unet STAGE: error: ...``."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if lines and lines[0].startswith("usage:"):  # argparse: usage block, then the error line
        lines = [line for line in lines if ": error:" in line]
    assert len(lines) == 1 and ": error:" in lines[0], stderr[-3000:]
    return lines[0]


def _batch(argvs: list[list[str]]) -> list[dict]:
    res = subprocess.run([sys.executable, str(HERE / "cli_batch.py")], input=json.dumps(argvs), capture_output=True,
                         text=True, env=ENV, timeout=900, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def corpus(reference, tmp_path_factory):
    """Set up every case in its own folder, run them all (two worker processes), and return
    {name: (folder, result, files before, files after)}."""
    root = tmp_path_factory.mktemp("data_safety")
    ref_before = tree_state(reference.workdir / "results")
    folders, argvs, before = {}, {}, {}
    try:
        for name, case in CASES.items():
            c = root / name
            c.mkdir()
            argvs[name] = ["-q", *map(str, case.setup(c, reference.workdir))]
            folders[name] = c
            before[name] = tree_state(c)
        names = list(CASES)
        halves = [names[0::2], names[1::2]]
        with ThreadPoolExecutor(2) as pool:
            outs = list(pool.map(lambda part: _batch([argvs[n] for n in part]), halves))
    finally:
        for holder in _HOLDER:
            holder.kill()
            holder.wait()
    results = {n: r for part, out in zip(halves, outs) for n, r in zip(part, out)}
    assert tree_state(reference.workdir / "results") == ref_before, "the corpus changed the reference run"
    return {n: (folders[n], results[n], before[n], tree_state(folders[n])) for n in names}


def test_the_corpus_is_large_enough():
    assert len(TABLE) >= 6 * 9 + 3 and len(CASES) >= len(TABLE) + 40


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in CASES])
def test_case(corpus, name):
    case = CASES[name]
    c, result, before, after = corpus[name]
    stderr = result["stderr"]
    assert "Traceback" not in stderr, stderr[-4000:]
    if case.ok:
        assert result["rc"] == 0, stderr[-4000:]
        if case.check is not None:
            case.check(c)
        if case.extra.get("replaced"):  # only the own output changed; every other file is as it was
            out = case.extra["out_of"](c).relative_to(c).as_posix()
            changed = [k for k, v in before.items() if not k.startswith(out + "/") and k != out and after.get(k) != v]
            assert changed == []
        return
    assert result["rc"] == 2, f"exit {result['rc']}, expected 2: {stderr[-3000:]}"
    line = _one_error_line(stderr)
    assert ".tmp-" not in line, line  # the user's path, never the hidden temporary
    for text in case.names:
        assert text.lower() in line.lower(), f"{text!r} not in: {line}"
    if "out_of" in case.extra:  # the table: the message names the output path the user gave
        assert str(case.extra["out_of"](c)) in line, line
    assert after == before, "a refused run changed, added or removed files: " + str(
        sorted(set(after.items()) ^ set(before.items()))[:6])
    if case.out is not None:
        assert not (c / case.out).exists()


def test_the_console_script_refuses_too(reference, tmp_path):
    """The corpus runs cli.main in a worker; the installed 'unet' behaves the same (the issue's
    first example: a model file given as the part store)."""
    stack, model = _in(tmp_path, reference.workdir, "val.ome.zarr", "model.pt")
    before = tree_state(tmp_path)
    res = run_unet("-q", "predict", stack, model, model, *MODEL_ARGS)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert _one_error_line(res.stderr).endswith("choose another output path")
    assert tree_state(tmp_path) == before


# what the user added inside a stage's own earlier output (a proofread label image, a note, a
# link to their data): replacing the output would delete it, so the output is refused, naming
# the first entry the stage did not write
ADDED_INSIDE = {
    "ingest": ("labels/proofread/zarr.json", "labels/proofread"),
    "weights": ("notes.txt", "notes.txt"),
    "augment": ("my_data", "my_data"),  # a link
    "merge": ("labels/proofread/zarr.json", "labels/proofread"),
    "predict": ("done/notes.txt", "done/notes.txt"),
}


@pytest.mark.parametrize("stage", list(ADDED_INSIDE))
def test_own_output_holding_what_the_stage_did_not_write_is_refused(reference, tmp_path, stage):
    st, (added, named) = STAGES[stage], ADDED_INSIDE[stage]
    c = tmp_path / stage
    _in(c, reference.workdir, *st.inputs)
    _user(c)
    out = c / "out" / Path(st.own).name
    _copy(reference.workdir, st.own, out)
    if added == "my_data":
        os.symlink(c / "user/folder", out / added)
    else:
        (out / added).parent.mkdir(parents=True, exist_ok=True)
        (out / added).write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}\n')
    before = tree_state(c)
    (result,) = _batch([["-q", *map(str, st.argv(c, out))]])
    assert "Traceback" not in result["stderr"] and result["rc"] == 2, result["stderr"][-3000:]
    line = _one_error_line(result["stderr"])
    assert str(out) in line and repr(named) in line and "did not write" in line, line
    assert tree_state(c) == before and os.path.islink(out / added) == (added == "my_data")


def test_dotdot_after_a_link_is_resolved_like_the_file_system_does(reference, tmp_path):
    """``LINK/..`` is the folder above the link's target, not the folder holding the link: an output
    there that lies inside an input is refused (a lexical ``..`` would let it into the input)."""
    (stack,) = _in(tmp_path, reference.workdir, "stack.ome.zarr")
    os.symlink(stack / "labels", tmp_path / "lnk")
    before = tree_state(tmp_path)
    argv = ["class-weights", stack, "-o", tmp_path / "lnk/../cw.json", "--threads", "1"]
    (result,) = _batch([["-q", *map(str, argv)]])
    assert result["rc"] == 2, result["stderr"][-3000:]
    assert "lies inside the input" in _one_error_line(result["stderr"])
    assert tree_state(tmp_path) == before and not (stack / "cw.json").exists()


def test_config_numbers_are_settled_once_naming_the_key(tmp_path):
    """Integers given as 400.0 run as integers; NaN stops the run naming the key."""
    from faults import new_workdir

    work = new_workdir(tmp_path / "work")
    (work / "ints.yaml").write_text("train: {iterations: 6.0}\npredict: {jobs: 2.0, tile_out: 64.0}\n")
    res = snakemake(work, "-n", "-p", "--cores", "1", configfiles=("ints.yaml",))
    text = res.stdout + res.stderr
    assert "--iterations 6 " in text and "--jobs 2 " in text and "--tile-out 64 " in text, text[-3000:]
    assert not any(f"{flag} {v}.0" in text for flag, v in (("--iterations", 6), ("--jobs", 2), ("--tile-out", 64)))
    (work / "nan.yaml").write_text("weights: {w0: .nan}\n")
    res = snakemake(work, "-n", "--cores", "1", configfiles=("nan.yaml",), check=False)
    text = res.stdout + res.stderr
    assert res.returncode == 2 and "config weights.w0 = nan: must be a finite number" in text, text[-3000:]


@pytest.mark.parametrize("config, message", [
    ({"train": {"lr": float("inf")}}, "config train.lr = inf"),
    ({"ingest": {"chunks": [1, 64.0, float("nan")]}}, "config ingest.chunks[2] = nan"),
    ({"train": {"iterations": 400.5}}, "config train.iterations = 400.5: must be an integer"),
])
def test_exact_numbers_rejects(config, message):
    import yaml

    from unet_core.common.config_values import exact_numbers
    from unet_core.common.errors import ConfigError

    schema = yaml.safe_load((HERE.parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        exact_numbers(config, schema)


def test_exact_numbers_converts_integral_floats():
    import yaml

    from unet_core.common.config_values import exact_numbers

    schema = yaml.safe_load((HERE.parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    config = exact_numbers({"train": {"iterations": 400.0, "lr": 0.5}, "ingest": {"chunks": [1.0, 64, 64.0]}}, schema)
    assert config == {"train": {"iterations": 400, "lr": 0.5}, "ingest": {"chunks": [1, 64, 64]}}
    assert type(config["train"]["iterations"]) is int and all(type(v) is int for v in config["ingest"]["chunks"])


# A user's file at a declared output path, or added inside one: Snakemake deletes a job's declared
# outputs before the job runs (before its stage could refuse them), so the workflow refuses them at
# start-up. Case: (what is planted, the output named in the refusal, the rule forced to rerun).
PLANTED = {
    "file replacing an output": ("results/tiny_val/segmentation.tif", "results/tiny_val/segmentation.tif",
                                 "merge"),
    "note in the model folder": ("results/model/notes.txt", "results/model", "train"),
    "labels added to the prediction": ("results/tiny_val/prediction.ome.zarr/labels/proofread/zarr.json",
                                       "results/tiny_val/prediction.ome.zarr", "merge"),
    "file in an evaluate folder": ("results/tiny_val/evaluate/mine.csv", "results/tiny_val/evaluate",
                                   "evaluate"),
    "figure replaced": ("results/tiny_train/weights.png", "results/tiny_train/weights.png", "weights"),
}


@pytest.mark.parametrize("case", list(PLANTED))
def test_workflow_refuses_foreign_content_at_declared_outputs_before_any_job(reference, tmp_path, case):
    from faults import clone_run

    planted, named, rule = PLANTED[case]
    work = clone_run(reference.workdir, tmp_path / "work")
    new = next((p for p in reversed((work / planted).parents) if not p.exists()), work / planted)
    (work / planted).parent.mkdir(parents=True, exist_ok=True)
    (work / planted).write_text("the user's own\n")
    before = tree_state(work / "results")
    res = snakemake(work, "--cores", "2", "--forcerun", rule, check=False)
    text = res.stdout + res.stderr
    lines = [ln for ln in text.splitlines() if "output path holds" in ln]
    assert res.returncode == 2 and len(lines) == 1, text[-3000:]  # bad input: exit 2, as the stages
    assert lines[0].startswith(f"{named}: ") and "move it away or set another output_dir" in lines[0], lines
    assert f"rule {rule}:" not in text and tree_state(work / "results") == before  # no job started
    shutil.rmtree(new) if new.is_dir() else new.unlink()  # without it the same command runs
    assert snakemake(work, "--cores", "2", "-n", "--forcerun", rule).returncode == 0
