"""Bad input corpus across the stages (issue 7, part 1), through the installed ``unet`` CLI.

Every case must end with exit status 2 and ONE line ``unet STAGE: error: ...`` naming the
file or option and the problem, no Python traceback (``--debug`` shows it), no output under the
final name and no temporary sibling left behind, and the inputs untouched. The reference run of
the workflow supplies real stacks, weight stores, a model and predict parts to misuse.

Per-stage unit tests check more variants of some of these at the function level; this corpus
checks what the user sees from the command line, for every stage.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
from faults import assert_one_line_error, run_unet, snakemake, tree_state


@dataclass
class Case:
    """One misuse: ``argv`` builds the arguments from the scratch dir and the reference run;
    ``out`` (relative to the scratch dir) must not appear; ``names`` must be in the error line."""

    argv: Callable[[Path, Path], list[str]]
    out: str | None
    names: tuple[str, ...]


def _tiff(path: Path, data: np.ndarray, **kwargs) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, data, photometric="minisblack", **kwargs)
    return str(path)


def _inputs(d: Path) -> None:
    """Small TIFF files, good and bad, under ``d/in``."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (4, 32, 32), dtype=np.uint8)
    lab = (rng.random((4, 32, 32)) > 0.5).astype(np.uint8) * 255
    _tiff(d / "in/image.tif", img)
    _tiff(d / "in/labels.tif", lab)
    _tiff(d / "in/labels_small.tif", lab[:, :16])
    _tiff(d / "in/labels_float.tif", lab.astype(np.float32))
    _tiff(d / "in/labels_negative.tif", lab.astype(np.int16) - 1)
    nan = img.astype(np.float32)
    nan[1, 5, 5] = np.nan
    _tiff(d / "in/nan.tif", nan)
    inf = img.astype(np.float32)
    inf[2, 0, 0] = np.inf
    _tiff(d / "in/inf.tif", inf)
    _tiff(d / "in/4d.tif", rng.integers(0, 255, (2, 4, 32, 32), dtype=np.uint8), metadata={"axes": "TZYX"})
    (d / "in/not_a_tiff.tif").write_bytes(b"this is a PNG, honestly\n" * 100)
    whole = (d / "in/image.tif").read_bytes()
    (d / "in/truncated.tif").write_bytes(whole[: len(whole) * 2 // 3])
    (d / "in/zero_pages.tif").write_bytes(b"II*\x00" + (8).to_bytes(4, "little") + b"\x00\x00" + b"\x00" * 4)
    (d / "in/empty_dir").mkdir()
    (d / "in/a_file").write_text("a regular file, so nothing can be created below it\n")
    # a stack without labels (for the stages that need them)
    res = run_unet("ingest", d / "in/image.tif", d / "in/nolabels.ome.zarr", "--chunks", "1,32,32")
    assert res.returncode == 0, res.stderr


def _model_of_other_config(d: Path, ref: Path) -> str:
    """The reference model with another architecture (base channels) in its spec."""
    import torch

    data = torch.load(ref / "results/model/model.pt", weights_only=True)
    data["spec"]["base_channels"] = 2 * data["spec"]["base_channels"]
    torch.save(data, d / "in/other_config.pt")
    return str(d / "in/other_config.pt")


def _damaged_stack(d: Path, ref: Path) -> str:
    """A copy of a reference stack with one image chunk cut short (a disk or copy error)."""
    stack = d / "in/damaged.ome.zarr"
    shutil.copytree(ref / TV / "stack.ome.zarr", stack)
    chunk = next(p for p in sorted((stack / "0" / "c").rglob("*")) if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:20])
    return str(stack)


def _edited_stack(name: str, edit: Callable[[dict, Path], None]) -> Callable[[Path, Path], str]:
    """A copy of a reference stack whose root attributes (or arrays) ``edit(attrs, store)`` damages:
    a stack crafted or damaged after ingest, which every stage opens the same way."""
    def make(d: Path, ref: Path) -> str:
        import json

        stack = d / "in" / name
        shutil.copytree(ref / TV / "stack.ome.zarr", stack)
        meta = json.loads((stack / "zarr.json").read_text())
        edit(meta["attributes"], stack)
        (stack / "zarr.json").write_text(json.dumps(meta))
        return str(stack)
    return make


def _smaller_labels(attrs: dict, stack: Path) -> None:
    import zarr

    shutil.rmtree(stack / "labels/gt/0")
    zarr.open_group(stack / "labels/gt", mode="a").create_array("0", shape=(2, 16, 16), dtype="uint8")


_NO_STD = _edited_stack("nostd.ome.zarr", lambda attrs, _: attrs["unet"]["intensity"].pop("std"))
_NAN_MEAN = _edited_stack("nan.ome.zarr",
                          lambda attrs, _: attrs["unet"]["intensity"].update(mean=float("nan")))
_NO_MULTISCALES = _edited_stack("noms.ome.zarr", lambda attrs, _: attrs["ome"].pop("multiscales"))
_SHORT_SLICE_RECORDS = _edited_stack("slices.ome.zarr",
                                     lambda attrs, _: attrs["unet"]["slice_intensity"].update(mean=[]))
_SMALLER_LABELS = _edited_stack("lab.ome.zarr", _smaller_labels)


def _nan_pixel_stack(d: Path, ref: Path) -> str:
    """A float32 stack ingested from the reference image, then one pixel set to NaN in the store
    (ingest refuses NaN in a TIFF; this is an edit after ingest)."""
    import zarr

    from unet_core.io.ingest import ingest

    stack = d / "in/nanpixel.ome.zarr"
    image = tifffile.imread(ref / "resources/synth/image.tif")[:2].astype(np.float32)
    ingest(_tiff(d / "in/float.tif", image), stack, chunks=(1, 64, 64))
    zarr.open_array(stack / "0", mode="r+")[1, 70, 70] = np.nan
    return str(stack)


def _damaged_copy(src: str, name: str, array: str, keep: Callable[[int], int] = lambda n: 10,
                  ) -> Callable[[Path, Path], str]:
    """A copy of the reference validation store ``src`` with its array's first chunk cut short (a disk
    or copy error) to ``keep(its length)`` bytes (by default shorter than a Blosc header)."""
    def make(d: Path, ref: Path) -> str:
        store = d / "in" / name
        shutil.copytree(ref / TV / src, store)
        chunk = next(p for p in sorted((store / array / "c").rglob("*")) if p.is_file())
        data = chunk.read_bytes()
        chunk.write_bytes(data[:keep(len(data))])
        return str(store)
    return make


_DAMAGED_LABELS = _damaged_copy("stack.ome.zarr", "damaged-labels.ome.zarr", "labels/gt/0")
_DAMAGED_PART = _damaged_copy("predict/part-0.zarr", "damaged-part-0.zarr", "probabilities")
_DAMAGED_PREDICTION = _damaged_copy("prediction.ome.zarr", "damaged-prediction.ome.zarr", "0")
# cut inside the data: Blosc decoded it silently into garbage (it trusts its header's length)
_CUT_PART = _damaged_copy("predict/part-0.zarr", "cut-part-0.zarr", "probabilities", keep=lambda n: n - 1)


def _part_copied_in_part(d: Path, ref: Path) -> str:
    """A complete part store whose first probability chunk did not arrive (an interrupted copy:
    rsync sends COMPLETE and done/ before the chunks)."""
    part = d / "in/copied-part-0.zarr"
    shutil.copytree(ref / TV / "predict/part-0.zarr", part)
    next(p for p in sorted((part / "probabilities/c").rglob("*")) if p.is_file()).unlink()
    return str(part)


def _class_weights(d: Path, weights: list[float]) -> str:
    """A class_weights.json of 'unet class-weights' holding ``weights``."""
    import json

    path = d / "in/cw-huge.json"
    path.write_text(json.dumps({"class_weights": weights, "format": "unet-pipeline/class-weights/1"}))
    return str(path)


def _same_shape_other_stack(d: Path, ref: Path) -> str:
    """Slice 0 of the synthetic stack, ingested as the validation stack (slice 3) was: the same
    shape, other data."""
    stack = d / "in/other-slice.ome.zarr"
    if not stack.exists():
        res = run_unet("ingest", ref / "resources/synth/image.tif", stack, "--labels",
                       ref / "resources/synth/labels.tif", "--slices", "0", "--chunks", "1,64,64")
        assert res.returncode == 0, res.stderr
    return str(stack)


def _val_weights(d: Path, ref: Path) -> str:
    """A weights store of the validation stack written by this code (it records its stack)."""
    weights = d / "in/val-weights.zarr"
    if not weights.exists():
        res = run_unet("weights", ref / TV / "stack.ome.zarr", weights, "--plot-slice", "-1",
                       "--threads", "1")
        assert res.returncode == 0, res.stderr
    return str(weights)


def _corrupted_model(d: Path, ref: Path) -> str:
    raw = bytearray((ref / "results/model/model.pt").read_bytes())
    mid = len(raw) // 2
    raw[mid: mid + 4096] = bytes(4096)  # a zeroed block inside the zip (bad CRC / bad record)
    (d / "in/corrupted.pt").write_bytes(bytes(raw))
    return str(d / "in/corrupted.pt")


def _incomplete_part(d: Path, ref: Path) -> str:
    part = d / "in/part-0.zarr"
    shutil.copytree(ref / "results/tiny_val/predict/part-0.zarr", part)
    (part / "COMPLETE").unlink()
    return str(part)


TV = "results/tiny_val"
TT = "results/tiny_train"
MODEL_ARGS = ["--depth", "2", "--base-channels", "4", "--dropout", "0"]

CASES = {
    "missing-file": Case(lambda d, r: ["ingest", d / "in/nope.tif", d / "out/s.ome.zarr"], "out/s.ome.zarr",
                         ("nope.tif", "no such file")),
    "directory-instead-of-file": Case(
        lambda d, r: ["ingest", d / "in/empty_dir", d / "out/s.ome.zarr"], "out/s.ome.zarr", ("empty_dir", "no .tif")),
    "directory-instead-of-model": Case(
        lambda d, r: ["predict", r / TV / "stack.ome.zarr", d / "in/empty_dir", d / "out/p.zarr", *MODEL_ARGS],
        "out/p.zarr", ("empty_dir",)),
    "non-tiff-bytes": Case(lambda d, r: ["ingest", d / "in/not_a_tiff.tif", d / "out/s.ome.zarr"], "out/s.ome.zarr",
                           ("not_a_tiff.tif", "not a readable TIFF")),
    "truncated-tiff": Case(lambda d, r: ["ingest", d / "in/truncated.tif", d / "out/s.ome.zarr"], "out/s.ome.zarr",
                           ("truncated.tif", "truncated")),
    "zero-page-tiff": Case(lambda d, r: ["ingest", d / "in/zero_pages.tif", d / "out/s.ome.zarr"], "out/s.ome.zarr",
                           ("zero_pages.tif",)),
    "image-label-shape-mismatch": Case(
        lambda d, r: ["ingest", d / "in/image.tif", d / "out/s.ome.zarr", "--labels", d / "in/labels_small.tif"],
        "out/s.ome.zarr", ("labels_small.tif", "shape")),
    "float-labels": Case(
        lambda d, r: ["ingest", d / "in/image.tif", d / "out/s.ome.zarr", "--labels", d / "in/labels_float.tif"],
        "out/s.ome.zarr", ("labels_float.tif", "integers")),
    "negative-labels": Case(
        lambda d, r: ["ingest", d / "in/image.tif", d / "out/s.ome.zarr", "--labels", d / "in/labels_negative.tif"],
        "out/s.ome.zarr", ("labels_negative.tif", "negative")),
    "nan-pixels": Case(lambda d, r: ["ingest", d / "in/nan.tif", d / "out/s.ome.zarr"], "out/s.ome.zarr",
                       ("nan.tif", "NaN")),
    "inf-pixels": Case(lambda d, r: ["ingest", d / "in/inf.tif", d / "out/s.ome.zarr"], "out/s.ome.zarr",
                       ("inf.tif", "Inf")),
    "4d-input": Case(lambda d, r: ["ingest", d / "in/4d.tif", d / "out/s.ome.zarr"], "out/s.ome.zarr",
                     ("4d.tif", "axes")),
    "wrong-type-option": Case(
        lambda d, r: ["weights", r / TV / "stack.ome.zarr", d / "out/w.zarr", "--sigma-px", "five"], "out/w.zarr",
        ("--sigma-px", "five")),
    "invalid-tile-size": Case(
        lambda d, r: ["augment", r / TT / "stack.ome.zarr", r / TT / "weights.zarr", d / "out/a.zarr",
                      "--tile-out", "37", "--samples-per-slice", "1", *MODEL_ARGS], "out/a.zarr", ("37",)),
    "invalid-predict-tile": Case(
        lambda d, r: ["predict", r / TV / "stack.ome.zarr", r / "results/model/model.pt", d / "out/p.zarr",
                      "--tile-out", "42", *MODEL_ARGS], "out/p.zarr", ("42", "multiple")),
    "job-out-of-range": Case(
        lambda d, r: ["predict", r / TV / "stack.ome.zarr", r / "results/model/model.pt", d / "out/p.zarr",
                      "--job", "5", "--jobs", "2", *MODEL_ARGS], "out/p.zarr", ("job",)),
    "weights-of-other-model-config": Case(
        lambda d, r: ["predict", r / TV / "stack.ome.zarr", _model_of_other_config(d, r), d / "out/p.zarr",
                      *MODEL_ARGS], "out/p.zarr", ("other_config.pt", "base_channels")),
    "model-flags-differ-from-file": Case(
        lambda d, r: ["predict", r / TV / "stack.ome.zarr", r / "results/model/model.pt", d / "out/p.zarr",
                      "--depth", "3", "--base-channels", "4", "--dropout", "0"], "out/p.zarr", ("model.pt", "depth")),
    "corrupted-checkpoint": Case(
        lambda d, r: ["predict", r / TV / "stack.ome.zarr", _corrupted_model(d, r), d / "out/p.zarr", *MODEL_ARGS],
        "out/p.zarr", ("corrupted.pt",)),
    "damaged-stack-chunk": Case(
        # found while predicting: the resumable part store exists, never marked complete
        lambda d, r: ["predict", _damaged_stack(d, r), r / "results/model/model.pt", d / "out/damaged-part.zarr",
                      *MODEL_ARGS], "out/damaged-part.zarr/COMPLETE", ("damaged.ome.zarr", "damaged Zarr chunk")),
    "output-not-writable": Case(
        lambda d, r: ["ingest", d / "in/image.tif", d / "in/a_file/s.ome.zarr"], None, ("a_file",)),
    # damaged chunks where zarr, not the stack reader, decodes them (were codec tracebacks)
    "damaged-label-chunk-weights": Case(
        lambda d, r: ["weights", _DAMAGED_LABELS(d, r), d / "out/w3.zarr"], "out/w3.zarr",
        ("damaged-labels.ome.zarr/labels/gt/0/c/", "damaged Zarr chunk")),
    "damaged-part-chunk-merge": Case(
        lambda d, r: ["merge", _DAMAGED_PART(d, r), r / TV / "predict/part-1.zarr", "--stack",
                      r / TV / "stack.ome.zarr", "-o", d / "out/pred3.ome.zarr"], "out/pred3.ome.zarr",
        ("damaged-part-0.zarr/probabilities/c/", "damaged Zarr chunk")),
    "damaged-prediction-chunk-evaluate": Case(
        lambda d, r: ["evaluate", _DAMAGED_PREDICTION(d, r), r / TV / "stack.ome.zarr",
                      "-o", d / "out/eval3"], "out/eval3/metrics.csv",
        ("damaged-prediction.ome.zarr/0/c/", "damaged Zarr chunk")),
    "part-chunk-cut-inside-its-data-merge": Case(
        lambda d, r: ["merge", _CUT_PART(d, r), r / TV / "predict/part-1.zarr", "--stack",
                      r / TV / "stack.ome.zarr", "-o", d / "out/pred4.ome.zarr"], "out/pred4.ome.zarr",
        ("cut-part-0.zarr/probabilities/c/", "damaged Zarr chunk", "where its Blosc header says")),
    "class-weights-beyond-float32": Case(  # was a numpy overflow warning on stderr, naming the stack
        lambda d, r: ["weights", r / TV / "stack.ome.zarr", d / "out/w4.zarr", "--class-weights",
                      _class_weights(d, [1e39, 1.0])], "out/w4.zarr", ("cw-huge.json", "float32")),
    "w0-beyond-float32": Case(  # wrote a weights store of Inf with exit status 0
        lambda d, r: ["weights", r / TV / "stack.ome.zarr", d / "out/w5.zarr", "--w0", "1e39"], "out/w5.zarr",
        ("w0", "1e+39")),
    "stack-without-labels-weights": Case(
        lambda d, r: ["weights", d / "in/nolabels.ome.zarr", d / "out/w.zarr"], "out/w.zarr",
        ("nolabels.ome.zarr", "labels")),
    "stack-without-labels-class-weights": Case(
        lambda d, r: ["class-weights", d / "in/nolabels.ome.zarr", "-o", d / "out/cw.json"], "out/cw.json",
        ("nolabels.ome.zarr", "labels")),
    # deformation settings that wrote a set of Inf/NaN images with exit status 0
    "augment-brightness-beyond-float32": Case(
        lambda d, r: ["augment", r / TT / "stack.ome.zarr", r / TT / "weights.zarr", d / "out/a5.zarr",
                      "--tile-out", "36", "--samples-per-slice", "1", "--brightness", "1e39", *MODEL_ARGS],
        "out/a5.zarr", ("brightness", "NaN or Inf")),
    "augment-displacement-beyond-any-image": Case(
        lambda d, r: ["augment", r / TT / "stack.ome.zarr", r / TT / "weights.zarr", d / "out/a6.zarr",
                      "--tile-out", "36", "--samples-per-slice", "1", "--sigma-px", "1e30", *MODEL_ARGS],
        "out/a6.zarr", ("sigma_px", "beyond any image")),
    "weights-of-another-stack": Case(
        lambda d, r: ["augment", r / TT / "stack.ome.zarr", r / TV / "weights.zarr", d / "out/a.zarr",
                      "--tile-out", "36", "--samples-per-slice", "1", *MODEL_ARGS], "out/a.zarr", ("weights.zarr",)),
    "train-on-a-stack-not-a-training-set": Case(
        lambda d, r: ["train", "--train", r / TT / "stack.ome.zarr", "--out-dir", d / "out/model", *MODEL_ARGS,
                      "--iterations", "1", "--device", "cpu"], "out/model/model.pt", ("stack.ome.zarr",)),
    # a typo in the model's size: one line before anything is allocated (was an allocation traceback;
    # sizes just beyond the memory met the OOM killer)
    "train-model-beyond-memory": Case(
        lambda d, r: ["train", "--train", r / TT / "augment.zarr", "--out-dir", d / "out/big", *MODEL_ARGS,
                      "--base-channels", "100000000", "--iterations", "1", "--device", "cpu",
                      "--workers", "0"],
        "out/big", ("base_channels", "GiB")),
    "merge-unfinished-part": Case(
        lambda d, r: ["merge", _incomplete_part(d, r), r / TV / "predict/part-1.zarr", "--stack",
                      r / TV / "stack.ome.zarr", "-o", d / "out/pred.ome.zarr"], "out/pred.ome.zarr",
        ("part-0.zarr", "did not finish")),
    "merge-part-copied-in-part": Case(  # zarr read the missing chunk as zeros: background, silently
        lambda d, r: ["merge", _part_copied_in_part(d, r), r / TV / "predict/part-1.zarr", "--stack",
                      r / TV / "stack.ome.zarr", "-o", d / "out/pred5.ome.zarr"], "out/pred5.ome.zarr",
        ("copied-part-0.zarr/probabilities/c/", "missing chunk")),
    "merge-missing-part": Case(
        lambda d, r: ["merge", r / TV / "predict/part-1.zarr", "--stack", r / TV / "stack.ome.zarr",
                      "-o", d / "out/pred.ome.zarr"], "out/pred.ome.zarr", ("missing job",)),
    # stacks damaged or crafted after ingest: one line from every stage (were tracebacks, or NaN
    # statistics that normalised every pixel to NaN without a word)
    "stack-intensity-without-std": Case(
        lambda d, r: ["class-weights", _NO_STD(d, r), "-o", d / "out/cw.json"], "out/cw.json",
        ("nostd.ome.zarr", "damaged stack attributes")),
    "stack-intensity-nan": Case(
        lambda d, r: ["predict", _NAN_MEAN(d, r), r / "results/model/model.pt", d / "out/nan-part.zarr",
                      *MODEL_ARGS], "out/nan-part.zarr", ("nan.ome.zarr", "not finite")),
    "stack-pixel-nan-predict": Case(  # was NaN input to the network: silently background there
        lambda d, r: ["predict", _nan_pixel_stack(d, r), r / "results/model/model.pt",
                      d / "out/nanpx-part.zarr", *MODEL_ARGS], "out/nanpx-part.zarr/COMPLETE",
        ("nanpixel.ome.zarr/0/c/1/1/1", "NaN or Inf")),
    "stack-without-multiscales": Case(
        lambda d, r: ["weights", _NO_MULTISCALES(d, r), d / "out/w2.zarr"], "out/w2.zarr",
        ("noms.ome.zarr", "damaged stack attributes")),
    "stack-per-slice-records-damaged": Case(
        lambda d, r: ["augment", _SHORT_SLICE_RECORDS(d, r), r / TV / "weights.zarr", d / "out/a2.zarr",
                      "--tile-out", "36", "--samples-per-slice", "1", *MODEL_ARGS], "out/a2.zarr",
        ("slices.ome.zarr", "per-slice intensity")),
    "stack-labels-of-another-shape": Case(
        lambda d, r: ["evaluate", r / TV / "prediction.ome.zarr", _SMALLER_LABELS(d, r),
                      "-o", d / "out/eval2"], "out/eval2/metrics.csv", ("lab.ome.zarr", "differ in shape")),
    # another stack of the same shape (another sample; ISBI's test volume for its training volume):
    # the cells' intensities, or every score, silently from the wrong data before
    "merge-with-another-stack-of-the-same-shape": Case(
        lambda d, r: ["merge", r / TV / "predict/part-0.zarr", r / TV / "predict/part-1.zarr", "--stack",
                      _same_shape_other_stack(d, r), "-o", d / "out/pred4.ome.zarr",
                      "--cells", d / "out/c4.csv"],
        "out/pred4.ome.zarr", ("other-slice.ome.zarr", "made from another stack")),
    "evaluate-against-another-stack-of-the-same-shape": Case(
        lambda d, r: ["evaluate", r / TV / "prediction.ome.zarr", _same_shape_other_stack(d, r),
                      "-o", d / "out/eval4"], "out/eval4/metrics.csv",
        ("other-slice.ome.zarr", "another stack")),
    "augment-with-weights-of-another-stack-of-the-same-shape": Case(
        lambda d, r: ["augment", _same_shape_other_stack(d, r), _val_weights(d, r), d / "out/a4.zarr",
                      "--tile-out", "36", "--samples-per-slice", "1", *MODEL_ARGS], "out/a4.zarr",
        ("val-weights.zarr", "made from another stack")),
    "evaluate-prediction-of-another-stack": Case(
        lambda d, r: ["evaluate", r / TV / "prediction.ome.zarr", r / TT / "stack.ome.zarr", "-o", d / "out/eval"],
        "out/eval/metrics.csv", ("prediction.ome.zarr",)),
}


@pytest.fixture(scope="module")
def corpus(reference, tmp_path_factory):
    """Run every case (three at a time) once; {case id: (scratch dir, result)}; inputs checked unchanged."""
    d = tmp_path_factory.mktemp("bad_inputs")
    _inputs(d)
    before = tree_state(reference.workdir / "results")
    argvs = {name: [str(a) for a in case.argv(d, reference.workdir)] for name, case in CASES.items()}
    inputs_before = tree_state(d / "in")
    with ThreadPoolExecutor(3) as pool:
        results = dict(zip(argvs, pool.map(lambda argv: run_unet(*argv), argvs.values())))
    assert tree_state(reference.workdir / "results") == before, "a failing stage changed the reference outputs"
    assert tree_state(d / "in") == inputs_before, "a failing stage changed its inputs"
    return d, results


def test_corpus_is_large_enough():
    assert len(CASES) >= 15


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in CASES])
def test_bad_input_gives_one_line_and_no_output(corpus, name):
    d, results = corpus
    case = CASES[name]
    assert_one_line_error(results[name], *case.names)
    if case.out is not None:
        out = d / case.out
        assert not out.exists(), f"{out} left behind by a failed run"
        stray = [p.name for p in out.parent.glob(f".{out.name}.tmp-*")] if out.parent.exists() else []
        assert stray == [], f"temporary output left behind: {stray}"


def test_debug_flag_shows_the_traceback(tmp_path):
    res = run_unet("--debug", "ingest", tmp_path / "nope.tif", tmp_path / "s.ome.zarr")
    assert res.returncode == 2 and "Traceback" in res.stderr and "UserInputError" in res.stderr


def test_samples_table_missing_a_column_names_it(reference, tmp_path):
    from faults import new_workdir

    work = new_workdir(tmp_path)
    table = work / "tests/integration/samples.tsv"
    rows = [line.rsplit("\t", 1)[0] for line in table.read_text().splitlines()]
    table.write_text("\n".join(rows) + "\n")  # the 'role' column removed
    res = snakemake(work, "-n", "--cores", "1", check=False)
    text = res.stdout + res.stderr
    assert res.returncode != 0 and "role" in text and "samples" in text, text[-3000:]


def test_misspelt_config_key_is_one_line_with_a_suggestion(tmp_path):
    """Snakemake's own schema error buries the key under the whole schema and config (hundreds
    of lines); the workflow says it in one line naming the file and the closest key."""
    from faults import new_workdir

    work = new_workdir(tmp_path)
    (work / "mine.yaml").write_text("normalization: slice-zscore\n")
    res = snakemake(work, "-n", "--cores", "1", configfiles=("mine.yaml",), check=False)
    text = res.stdout + res.stderr
    assert res.returncode != 0, text[-3000:]
    line = next(line for line in text.splitlines() if "unknown key" in line)
    assert "mine.yaml" in line and "'normalization'" in line and "did you mean 'normalisation'" in line, line
    assert "Failed validating" not in text and len(text.splitlines()) < 15, text[-3000:]


def test_samples_table_with_spaces_for_tabs_says_so(tmp_path):
    from faults import new_workdir

    work = new_workdir(tmp_path)
    table = work / "tests/integration/samples.tsv"
    table.write_text(table.read_text().replace("\t", "  "))
    res = snakemake(work, "-n", "--cores", "1", check=False)
    text = res.stdout + res.stderr
    assert res.returncode != 0 and "samples.tsv line" in text and "not spaces" in text, text[-3000:]
    assert "Failed validating" not in text, text[-3000:]


def test_cuda_asked_for_where_there_is_none_stops_before_any_job(tmp_path):
    """Was found by the training job, after synth, ingest, weights and augment had run."""
    import torch
    from faults import new_workdir

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    work = new_workdir(tmp_path)
    (work / "gpu.yaml").write_text("train: {device: cuda}\n")
    dry = snakemake(work, "-n", "--cores", "1", configfiles=("gpu.yaml",), check=False)
    assert dry.returncode == 0, (dry.stdout + dry.stderr)[-3000:]  # a dry run may plan for a GPU node
    res = snakemake(work, "--cores", "1", configfiles=("gpu.yaml",), check=False)
    text = res.stdout + res.stderr
    assert res.returncode != 0, text[-3000:]
    assert "config train.device = cuda: CUDA is not available on this machine" in text, text[-3000:]
    assert "rule synth:" not in text and not (work / "results").exists() and not (work / "resources").exists()
