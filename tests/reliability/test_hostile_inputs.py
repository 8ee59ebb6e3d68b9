"""Hostile and odd inputs (issue 33, item 5): each was a traceback, a silent misuse or a refusal of
legitimate input at an earlier commit.

The project's rule, as in test_bad_inputs.py: bad input gets ONE line naming the file or config key
and the problem, exit status 2 (the workflow: a start-up refusal), before any work where possible,
no partial output, and nothing the stage did not create is changed; legitimate input works. None
of these tests needs the reference run: the stacks and models they use are made here (an untrained
model predicts as well as any for these checks).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from faults import CONFIG, REPO, assert_one_line_error, new_workdir, run_unet, snakemake, tree_state

TINY_MODEL = {"depth": 2, "base_channels": 4, "dropout": 0.0}  # the tiny config's (tests/integration)
MODEL_ARGS = ["--depth", "2", "--base-channels", "4", "--dropout", "0"]


def _tiff(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, data, photometric="minisblack")
    return path


def _image(path: Path, shape=(2, 64, 64)) -> Path:
    return _tiff(path, np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8))


def _stack(tmp: Path, name: str = "s.ome.zarr") -> Path:
    """A small stack ingested from an 8-bit TIFF."""
    stack = tmp / name
    res = run_unet("ingest", _image(tmp / "in" / "image.tif"), stack, "--chunks", "1,64,64")
    assert res.returncode == 0, res.stderr
    return stack


def _model(path: Path, seed: int = 0) -> Path:
    """An untrained model file of the tiny config's architecture (as 'unet train' writes it)."""
    import torch

    from unet_core.model.checkpoint import save_model
    from unet_core.model.spec import UNetSpec
    from unet_core.model.unet import UNet

    torch.manual_seed(seed)
    save_model(path, UNet(UNetSpec(**TINY_MODEL)))
    return path


def _dry_run_refusal(res) -> str:
    """The start-up refusal of a workflow run: non-zero exit, a short message without a Python
    traceback or Snakemake's dump of the schema; returns the whole text."""
    text = res.stdout + res.stderr
    assert res.returncode != 0, text[-3000:]
    assert "Traceback" not in text and "Failed validating" not in text, text[-3000:]
    assert len(text) < 3000 and len(text.splitlines()) < 20, text[-3000:]
    return text


def _line(text: str, *names: str) -> str:
    """The one line of ``text`` that names every one of ``names``."""
    found = [line for line in text.splitlines() if all(n in line for n in names)]
    assert len(found) == 1, text[-3000:]
    return found[0]


# ---------------------------------------------------------------- 1. a loop of symbolic links


def test_symlink_loop_as_input_or_output_is_one_line(tmp_path):
    """Was a traceback ('Symlink loop from ...') ending in 'internal error', exit status 1."""
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    image = _image(tmp_path / "image.tif")
    before = tree_state(tmp_path)
    res = run_unet("ingest", tmp_path / "a", tmp_path / "o.ome.zarr")
    assert_one_line_error(res, str(tmp_path / "a"), "loop of symbolic links")
    res = run_unet("ingest", image, tmp_path / "a")  # the loop as the output path
    assert_one_line_error(res, str(tmp_path / "a"), "loop of symbolic links")
    assert not (tmp_path / "o.ome.zarr").exists() and tree_state(tmp_path) == before
    assert os.readlink(tmp_path / "a") == "b" and os.readlink(tmp_path / "b") == "a"


# ---------------------------------------------------------------- 2. float64 beyond float32


@pytest.mark.parametrize("largest", [1e200, 1e300])
def test_float64_tiff_beyond_float32_is_refused_naming_the_file(tmp_path, largest):
    """Was a traceback from an overflow in ingest's statistics. Every stage normalises in float32,
    where such a pixel is Inf: refused in one line, nothing written."""
    rng = np.random.default_rng(0)
    image = _tiff(tmp_path / "huge.tif", rng.random((2, 32, 32)) * largest)
    res = run_unet("ingest", image, tmp_path / "s.ome.zarr")
    assert_one_line_error(res, "huge.tif", "float32")
    assert not (tmp_path / "s.ome.zarr").exists() and list(tmp_path.iterdir()) == [image]


def test_float64_tiff_within_float32_is_ingested_with_finite_statistics(tmp_path):
    import zarr

    rng = np.random.default_rng(0)
    image = _tiff(tmp_path / "large.tif", rng.random((2, 32, 32)) * 3e38)
    res = run_unet("ingest", image, tmp_path / "s.ome.zarr")
    assert res.returncode == 0, res.stderr
    intensity = zarr.open_group(tmp_path / "s.ome.zarr", mode="r").attrs["unet"]["intensity"]
    values = tifffile.imread(image)
    assert intensity["mean"] == pytest.approx(values.mean(), rel=1e-9)
    assert intensity["std"] == pytest.approx(values.std(), rel=1e-9)


# ---------------------------------------------------------------- 3. thread counts beyond any machine


def test_thread_limit_of_the_options_is_the_schemas():
    from unet_core.common.config_values import MAX_THREADS

    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())["properties"]
    assert schema["train"]["properties"]["threads"]["maximum"] == MAX_THREADS
    assert schema["train"]["properties"]["workers"]["maximum"] == MAX_THREADS
    assert schema["predict"]["properties"]["threads"]["maximum"] == MAX_THREADS


@pytest.mark.parametrize(("yaml_text", "key"), [
    pytest.param("train: {threads: 100000000000000000000}\n", "train.threads", id="train-threads"),
    pytest.param("predict: {threads: 1000000}\n", "predict.threads", id="predict-threads"),
    pytest.param("train: {workers: 100000000000000000000}\n", "train.workers", id="train-workers"),
    pytest.param("train: {seed: 100000000000000000000}\n", "train.seed", id="beyond-64-bit"),
])
def test_integers_beyond_any_machine_stop_the_workflow_at_start_up(tmp_path, yaml_text, key):
    """train.threads: 1e20 passed the start-up checks; training then failed after ingest, weights
    and augment had run ('Overflow when unpacking long long')."""
    work = new_workdir(tmp_path)
    (work / "mine.yaml").write_text(yaml_text)
    res = snakemake(work, "-n", "--cores", "1", configfiles=("mine.yaml",), check=False)
    _line(_dry_run_refusal(res), f"config {key} = 100")
    assert not (work / "results").exists()


@pytest.mark.parametrize("argv", [
    pytest.param(["train", "--threads", "100000000000000000000"], id="train-threads"),
    pytest.param(["train", "--workers", "100000000000000000000"], id="train-workers"),
    pytest.param(["predict", "--threads", "5000"], id="predict-threads"),
    pytest.param(["train", "--iterations", "100000000000000000000"], id="beyond-64-bit"),
])
def test_integer_options_beyond_any_machine_are_refused(tmp_path, argv):
    stage, option, value = argv
    if stage == "train":
        args = ["train", "--train", tmp_path, "--out-dir", tmp_path / "model", option, value]
    else:
        args = ["predict", tmp_path, tmp_path, tmp_path / "p.zarr", option, value]
    res = run_unet(*args)
    line = assert_one_line_error(res, option, value)
    assert "up to" in line, line
    assert not (tmp_path / "model").exists() and not (tmp_path / "p.zarr").exists()


# ---------------------------------------------------------------- 4. output_dir naming a file


@pytest.mark.parametrize("output_dir", ["a_file", "a_file/below"])
def test_output_dir_that_is_a_file_stops_the_workflow_at_start_up(tmp_path, output_dir):
    """Was a Snakemake traceback (NotADirectoryError) while it looked for the outputs."""
    work = new_workdir(tmp_path)
    (work / "a_file").write_text("the user's notes\n")
    (work / "mine.yaml").write_text(f"output_dir: {output_dir}\n")
    res = snakemake(work, "-n", "--cores", "1", configfiles=("mine.yaml",), check=False)
    line = _line(_dry_run_refusal(res), "config output_dir = ")
    assert "is a file, not a folder" in line and "'a_file'" in line, line
    assert (work / "a_file").read_text() == "the user's notes\n"


# ---------------------------------------------------------------- 5. impossible intensity statistics


def _edited(stack: Path, name: str, edit) -> Path:
    """A copy of ``stack`` whose ``unet`` attributes ``edit(attrs)`` changes (after ingest)."""
    copy = stack.with_name(name)
    shutil.copytree(stack, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    edit(meta["attributes"]["unet"])
    (copy / "zarr.json").write_text(json.dumps(meta))
    return copy


def _set_slice(field: str, value: float):
    def edit(unet: dict) -> None:
        unet["slice_intensity"][field][0] = value
    return edit


@pytest.mark.parametrize(("edit", "names"), [
    pytest.param(_set_slice("std", -5.0), ("slice 0", "std -5.0 < 0"), id="slice-std-negative"),
    pytest.param(_set_slice("std", 0.0), ("slice 0", "std 0 for grey values that differ"), id="slice-std-zero"),
    pytest.param(_set_slice("mean", 1e38), ("slice 0", "outside the grey values' range"), id="slice-mean-1e38"),
    pytest.param(lambda unet: unet["intensity"].update(mean=1e38), ("intensity statistics", "outside"),
                 id="stack-mean-1e38"),
    pytest.param(lambda unet: unet["intensity"].update(std=1e30), ("intensity statistics", "half the range"),
                 id="stack-std-1e30"),
])
def test_impossible_finite_intensity_statistics_are_refused(tmp_path, edit, names):
    """Finite but impossible statistics of a stack edited or damaged after ingest (NaN there was
    already refused) were used silently: the probabilities collapsed, exit status 0."""
    stack = _edited(_stack(tmp_path), "edited.ome.zarr", edit)
    model = _model(tmp_path / "model.pt")
    before = tree_state(tmp_path)
    # checked wherever a stage asks for the normalisation (augment, train, validation, predict), in
    # every mode: a stack whose records are no data's is damaged whichever of them a model uses
    res = run_unet("predict", stack, model, tmp_path / "p.zarr", *MODEL_ARGS, "--block-px", "64",
                   "--tile-out", "64", "--device", "cpu")
    assert_one_line_error(res, "edited.ome.zarr", "impossible", "ingest it again", *names)
    assert not (tmp_path / "p.zarr").exists() and tree_state(tmp_path) == before


def test_statistics_ingest_writes_are_never_impossible():
    """Constant slices, one bright pixel, a tiny range, float data: what ingest computes passes."""
    from unet_core.common.intensity import RunningStats, impossible_statistics

    rng = np.random.default_rng(1)
    slices = [np.full((8, 8), 7, np.uint8), np.zeros((8, 8), np.uint16), rng.random((8, 8)) * 1e-30,
              np.full((8, 8), 3e38), np.array([[1.0, 1.0 + 2**-52]]), rng.normal(5, 2, (16, 16)).astype(np.float32)]
    one = np.zeros((8, 8), np.uint8)
    one[3, 3] = 255
    for data in [*slices, one]:
        running = RunningStats()
        s = running.update(data)
        assert impossible_statistics(s.mean, s.std, s.minimum, s.maximum, (s.low, s.high)) is None, data
        whole = running.result()
        assert impossible_statistics(whole.mean, whole.std, s.minimum, s.maximum) is None, data


# ---------------------------------------------------------------- 6. model_file without the model keys


def _model_file_run(work: Path, model: str, *, model_keys: dict | None = None) -> Path:
    """A config of the tiny one predicting new stacks with ``model`` (README, 'Predict with a model you
    already have'), its model section deleted unless ``model_keys``; returns its file."""
    config = yaml.safe_load((work / CONFIG).read_text())
    del config["model"]
    if model_keys:
        config["model"] = model_keys
    config.update(model_file=model, samples="batch2.tsv", output_dir="results/batch2")
    config["predict"]["tiff"] = False
    _image(work / "data/new.tif", (1, 128, 128))
    (work / "batch2.tsv").write_text("name\timage\tlabels\tslices\trole\nnew\tdata/new.tif\t\t\tpredict\n")
    path = work / "batch2.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(work: Path, *args: str, check: bool = True):
    """snakemake with batch2.yaml only (not the tiny config): the README's remedy is about the
    user's own config file over config/config.yaml."""
    import subprocess

    from faults import ENV, SNAKEFILE, SNAKEMAKE

    cmd = [str(SNAKEMAKE), "-s", str(SNAKEFILE), "--configfile", "batch2.yaml", "--cores", "2", *args]
    res = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=900, env=ENV, check=False)
    if check:
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return res


def test_model_file_without_model_keys_takes_the_files_architecture(tmp_path):
    """The README's remedy for "model does not match the config's model section" (delete the model:
    keys from your config) did not work: config/config.yaml's model section was merged in and checked
    against the file. Only the keys of the user's --configfile are checked now."""
    work = new_workdir(tmp_path)
    _model(work / "model.pt")
    _model_file_run(work, "model.pt")
    _run(work)
    assert (work / "results/batch2/new/prediction.ome.zarr").is_dir()
    # keys the user does give are still checked against the file
    _model_file_run(work, "model.pt", model_keys={"depth": 3})
    text = _dry_run_refusal(_run(work, "-n", check=False))
    line = _line(text, "model.pt", "model does not match")
    assert "depth: file 2 vs config 3" in line and "base_channels" not in line, line


# ---------------------------------------------------------------- 7. duplicate keys in YAML


def test_duplicate_key_in_a_config_file_is_refused_naming_file_and_key(tmp_path):
    """A second train: section silently replaced the first."""
    work = new_workdir(tmp_path)
    (work / "mine.yaml").write_text("train: {iterations: 3}\npredict: {jobs: 1}\ntrain: {seed: 5}\n")
    res = snakemake(work, "-n", "--cores", "1", configfiles=("mine.yaml",), check=False)
    line = _line(_dry_run_refusal(res), "mine.yaml line 3", "'train'")
    assert "appears twice" in line, line


def test_yaml_reader_refuses_duplicates_at_any_depth_and_keeps_merge_keys(tmp_path):
    from unet_core.common.config_values import load_yaml
    from unet_core.common.errors import ConfigError

    (tmp_path / "deep.yaml").write_text("train:\n  seed: 1\n  iterations: 2\n  seed: 3\n")
    with pytest.raises(ConfigError, match=r"deep.yaml line 4: key 'seed' appears twice"):
        load_yaml(tmp_path / "deep.yaml")
    (tmp_path / "merge.yaml").write_text("a: &base {x: 1, y: 2}\nb: {<<: *base, y: 3}\n")
    assert load_yaml(tmp_path / "merge.yaml") == {"a": {"x": 1, "y": 2}, "b": {"x": 1, "y": 3}}
    assert load_yaml(REPO / "config/config.yaml")["model"]["depth"] == 4


# ---------------------------------------------------------------- 8. a YAML alias bomb


def _bomb(levels: int) -> str:
    """``output_dir:`` a list of ``levels`` nested levels of nine aliases each (9**levels strings)."""
    parts = ["&a0 [" + ", ".join(['"lolololol"'] * 9) + "]"]
    parts += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return f"output_dir: [{', '.join(parts)}]\n"


@pytest.mark.parametrize(("levels", "names"), [
    pytest.param(7, ("bomb.yaml", "aliases", "expand to more than"), id="7-levels-refused-unexpanded"),
    pytest.param(5, ("config output_dir = [[", "must be a string"), id="5-levels-echoed-cut"),
])
def test_alias_bomb_as_a_value_gives_a_short_line(tmp_path, levels, names):
    """Seven levels of nine aliases each were echoed fully expanded in the error line (336 MB)."""
    work = new_workdir(tmp_path)
    (work / "bomb.yaml").write_text(_bomb(levels))
    t0 = time.monotonic()
    res = snakemake(work, "-n", "--cores", "1", configfiles=("bomb.yaml",), check=False)
    assert time.monotonic() - t0 < 60
    line = _line(_dry_run_refusal(res), *names)
    assert len(line.replace(str(work), "")) < 250, line[:1000]  # the paths of the config files aside


def test_error_lines_cut_long_values():
    from unet_core.common.config_values import schema_problem

    schema = {"type": "object", "properties": {"samples": {"type": "string"}}}
    line = schema_problem({"samples": [["x" * 10_000] * 10] * 10}, schema, ["mine.yaml"])
    assert line.startswith("mine.yaml: config samples = [[") and line.endswith(": must be a string")
    assert len(line) < 200, line


# ---------------------------------------------------------------- 9. a samples table with a BOM


def test_samples_table_with_a_byte_order_mark_is_read(tmp_path):
    """Spreadsheet programs write UTF-8 with a BOM: the header's first column was '\\ufeffname'
    ("missing column(s) name")."""
    work = new_workdir(tmp_path)
    table = work / "tests/integration/samples.tsv"
    table.write_bytes(b"\xef\xbb\xbf" + table.read_bytes())
    res = snakemake(work, "-n", "--cores", "1", check=False)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "tiny_train" in res.stdout + res.stderr


# ---------------------------------------------------------------- 10. model_file replaced between jobs


def test_part_of_a_replaced_model_file_is_redone_on_rerun(tmp_path):
    """A model_file replaced between the predict jobs by a file with an older modification time (mv,
    cp -p, rsync -t): the part of the first model was never redone, and every rerun's merge failed
    with the same line. The model's hash is a predict param now: the next run redoes that part."""
    from unet_core.common.provenance import sha256_files

    work = new_workdir(tmp_path)
    _model(work / "model.pt", seed=0)
    _model(work / "other.pt", seed=1)
    os.utime(work / "other.pt", (1e9, 1e9))  # older than any part
    _model_file_run(work, "model.pt")
    _run(work, "results/batch2/new/predict/part-0.zarr/COMPLETE")  # job 0 with the first model
    shutil.copy2(work / "other.pt", work / "model.pt")  # replaced, its old time kept
    _run(work)
    want = sha256_files([work / "model.pt"])
    for job in (0, 1):
        part = work / f"results/batch2/new/predict/part-{job}.zarr/part.json"
        assert json.loads(part.read_text())["model_sha256"] == want, job
    assert (work / "results/batch2/new/prediction.ome.zarr").is_dir()
    again = _run(work, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_parts_of_two_runs_name_the_remedy(tmp_path):
    from unet_core.common.errors import UserInputError
    from unet_core.infer.part_store import _check_one_run

    class Part:
        def __init__(self, job: int, model: str) -> None:
            self.path, self.settings = Path(f"part-{job}.zarr"), {"job": job, "jobs": 2, "model_sha256": model}

    with pytest.raises(UserInputError, match=r"differs in model_sha256\); .*rerun 'unet predict'"):
        _check_one_run([Part(0, "a"), Part(1, "b")])


# ---------------------------------------------------------------- 11. a TIFF where a model belongs


def test_tiff_given_for_the_model_is_not_a_model_file(tmp_path):
    """Was refused as untrusted code ("only load files you trust"): torch.load read it as a pickle."""
    stack = _stack(tmp_path)
    image = tmp_path / "in/image.tif"
    (tmp_path / "empty.pt").write_bytes(b"")
    for model, kind in ((image, "a TIFF image"), (tmp_path / "empty.pt", "empty")):
        res = run_unet("predict", stack, model, tmp_path / "p.zarr", *MODEL_ARGS)
        line = assert_one_line_error(res, str(model), "not a model file", kind)
        assert "trust" not in line, line
    assert not (tmp_path / "p.zarr").exists()
