"""Config and samples-table checks at workflow start-up: one line per mistake, naming the file,
the key or column and the fix (``unet_core.common.config_values``, ``unet_core.common.samples``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from unet_core.common.config_values import schema_problem
from unet_core.common.errors import ConfigError
from unet_core.common.samples import read_samples, shared_slices

REPO = Path(__file__).resolve().parents[2]
CONFIG_SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
SAMPLES_SCHEMA = yaml.safe_load((REPO / "workflow/schemas/samples.schema.yaml").read_text())
KEYWORDS = {"$schema", "description", "type", "additionalProperties", "properties", "default", "enum",
            "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "items", "minItems", "maxItems",
            "pattern", "required"}
PROFILES = ["isbi2012", "isbi2012_cpu", "dsb2018", "dsb2018_cpu"]


def _walk(schema, path=""):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")


def test_schema_descriptions_are_whole():
    """An unquoted description with a comma in a YAML flow mapping splits into a bogus key; the
    units after the comma were lost from every error message and from the docs."""
    for path, schema in _walk(CONFIG_SCHEMA):
        assert set(schema) <= KEYWORDS, (path, set(schema) - KEYWORDS)
        if path.count(".") >= 1:
            assert schema.get("description"), f"{path} has no description"


@pytest.mark.parametrize("config, expected", [
    ({"normalization": "slice-zscore"}, "unknown key 'normalization' at the top level; did you mean 'normalisation'?"),
    ({"train": {"iteration": 3}}, "unknown key 'iteration' in train; did you mean 'iterations'?"),
    ({"zzz": 1}, "unknown key 'zzz' at the top level; known keys: augment, evaluate, ingest, model"),
    ({"predict": {"device": "gpu"}}, "config predict.device = 'gpu': auto = CUDA when available"),
    ({"train": {"optimizer": "rmsprop"}}, "config train.optimizer = 'rmsprop': use one of sgd, adam"),
    ({"predict": {"tiff": "instance"}},
     "config predict.tiff = 'instance': use one of false, true, segmentation, instances, cell-probability"),
    ({"train": {"iterations": "many"}}, "config train.iterations = 'many': must be an integer"),
    ({"train": {"iterations": 0}}, "config train.iterations = 0: must be >= 1"),
    ({"ingest": {"chunks": [1, 2]}}, "config ingest.chunks = [1, 2]: must have 3 items"),
    ({"ingest": {"chunks": [1, 0, 2]}}, "config ingest.chunks[1] = 0: must be >= 1"),
    ({"predict": {"min_object_px": "big"}}, "config predict.min_object_px = 'big': must be an integer or 'auto'"),
    ({"train": {"val_tile_out": "x"}}, "config train.val_tile_out = 'x': must be an integer or null"),
])
def test_schema_problem_is_one_line_naming_the_key(config, expected):
    line = schema_problem(config, CONFIG_SCHEMA, ["config/config.yaml", "mine.yaml"])
    assert line.startswith("config/config.yaml + mine.yaml: ") and expected in line, line
    assert "\n" not in line


@pytest.mark.parametrize("device, ok", [("auto", True), ("cpu", True), ("cuda", True), ("cuda:1", True),
                                        ("gpu", False), ("cuda:", False), ("cuda:x", False)])
def test_device_takes_what_the_command_line_takes(device, ok):
    for section in ("train", "predict"):
        assert (schema_problem({section: {"device": device}}, CONFIG_SCHEMA, []) is None) is ok


@pytest.mark.parametrize("name", ["config", *PROFILES, "dic_hela", "dic_hela_cpu", "synth3d", "synth3d_2d"])
def test_shipped_configs_validate(name):
    config = yaml.safe_load((REPO / f"config/{name}.yaml").read_text())
    assert schema_problem(config, CONFIG_SCHEMA, [name]) is None


def _flat(d, prefix=""):
    out = {}
    for key, value in d.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


@pytest.mark.parametrize("name", PROFILES)
def test_profiles_set_every_key_the_demo_config_sets(name):
    """A profile's missing keys take the schema's defaults (config/config.yaml is not read with a
    --configfile); each shipped profile still states every key the demo config sets, so what it
    runs with is written in it."""
    demo = {k for k in _flat(yaml.safe_load((REPO / "config/config.yaml").read_text())) if not k.startswith("synth.")}
    profile = set(_flat(yaml.safe_load((REPO / f"config/{name}.yaml").read_text())))
    assert demo - profile == set()


HEADER = "name\timage\tlabels\tslices\trole\n"


def _table(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "samples.tsv"
    path.write_text(text)
    return path


def test_samples_table_is_read(tmp_path):
    path = _table(tmp_path, "# a comment\n" + HEADER + "a\tx.tif\ty.tif\t0-5\ttrain\n\nb\tx.tif\t\tall\tpredict\r\n")
    table = read_samples(path, SAMPLES_SCHEMA, need_train=True)
    assert list(table) == ["a", "b"] and table["b"] == {"name": "b", "image": "x.tif", "labels": "",
                                                        "slices": "all", "role": "predict",
                                                        "voxel_size_um": ""}


@pytest.mark.parametrize("text, message", [
    ("name image labels slices role\n", "line 1: the first line must be the header name image labels slices "
                                        "role, separated by tabs; missing column(s) name, image, labels, "
                                        "slices, role (it has no tab: separate the columns by tabs, not spaces)"),
    ("name\timage\tlabels\tslices\n", "line 1: the first line must be the header"),
    (HEADER + "a\tx.tif\ty.tif\t0-5\ttrain\textra\n", "line 2: more cells than the header has columns"),
    (HEADER + "a\tx.tif\ty.tif\t0..5\ttrain\n", "line 2: column slices = '0..5': Slices of the stack to use"),
    (HEADER + "a b\tx.tif\ty.tif\t0-5\ttrain\n", "line 2: column name = 'a b': Sample name"),
    (HEADER + "a\tx.tif\ty.tif\t0-5\ttraining\n", "line 2: column role = 'training': use one of train, val, predict"),
    (HEADER + "a\tx.tif\ty.tif\t0-5\ttrain\n# c\na\tx.tif\ty.tif\t6-7\tval\n", "line 4: sample name 'a' appears twice"),
    (HEADER + "a\tx.tif\t\t0-5\tval\n", "line 2: sample 'a' has role val but no labels"),
    (HEADER + "a\tx.tif\t\t0-5\tpredict\n", "no sample has role 'train'"),
    ("# only a comment\n", "the samples table is empty"),
])
def test_samples_table_mistakes_name_the_line(tmp_path, text, message):
    path = _table(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        read_samples(path, SAMPLES_SCHEMA, need_train=True)
    assert str(err.value).startswith(str(path)) and message in str(err.value), str(err.value)


def test_missing_samples_table_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"config samples = '.*nope.tsv': no such file"):
        read_samples(tmp_path / "nope.tsv", SAMPLES_SCHEMA, need_train=True)


def test_training_slices_shared_with_judged_rows_are_found(tmp_path):
    path = _table(tmp_path, HEADER + "tr\tx.tif\ty.tif\t0-5\ttrain\n"
                                     "va\t./x.tif\ty.tif\t4-7\tval\n"
                                     "te\tx.tif\ty.tif\t8-9\tpredict\n"
                                     "new\tx.tif\t\tall\tpredict\n"
                                     "other\tz.tif\ty.tif\tall\tval\n")
    found = shared_slices(read_samples(path, SAMPLES_SCHEMA, need_train=True))
    assert len(found) == 1 and "'tr' and val sample 'va' share slice(s) 4, 5 of x.tif" in found[0], found
    path = _table(tmp_path, HEADER + "tr\tx.tif\ty.tif\tall\ttrain\nte\tx.tif\ty.tif\t8-9\tpredict\n")
    found = shared_slices(read_samples(path, SAMPLES_SCHEMA, need_train=True))
    assert len(found) == 1 and "share slice(s) 8, 9" in found[0] and "the scores" in found[0], found
    # ranges are compared as ranges: billions of slices cost nothing (expanded, they filled the memory)
    path = _table(tmp_path, HEADER + "tr\tx.tif\ty.tif\t0-3000000000\ttrain\n"
                                     "va\tx.tif\ty.tif\t2999999990-4000000000,7\tval\n")
    found = shared_slices(read_samples(path, SAMPLES_SCHEMA, need_train=True))
    assert len(found) == 1 and "share slice(s) 7, 2999999990, 2999999991, 2999999992, " in found[0]
    assert " ..." in found[0], found
    path = _table(tmp_path, HEADER + "tr\tx.tif\ty.tif\t0-5,3\ttrain\nva\tx.tif\ty.tif\t7\tval\n")
    with pytest.raises(ConfigError, match=r"sample 'tr': tr: slice selection '0-5,3' lists a slice twice"):
        shared_slices(read_samples(path, SAMPLES_SCHEMA, need_train=True))


def test_voxel_size_column_is_optional_and_checked(tmp_path):
    path = _table(tmp_path, "name\timage\tlabels\tslices\trole\tvoxel_size_um\n"
                            "a\tx.tif\ty.tif\t0-5\ttrain\t0.5, 0.1,0.1\nb\tx.tif\t\t\tpredict\t\n")
    table = read_samples(path, SAMPLES_SCHEMA, need_train=True)
    assert table["a"]["voxel_size_um"] == "0.5, 0.1,0.1" and table["b"]["voxel_size_um"] == ""
    assert read_samples(_table(tmp_path, HEADER + "a\tx.tif\ty.tif\t0-5\ttrain\n"), SAMPLES_SCHEMA,
                        need_train=True)["a"]["voxel_size_um"] == ""
    path = _table(tmp_path, "name\timage\tlabels\tslices\trole\tvoxel_size_um\na\tx.tif\ty.tif\t0-5\ttrain\t0.1,0.1\n")
    with pytest.raises(ConfigError, match="line 2: column voxel_size_um = '0.1,0.1': Optional column - the voxel"):
        read_samples(path, SAMPLES_SCHEMA, need_train=True)


def _dry_run(work: Path, override: dict) -> subprocess.CompletedProcess:
    """'snakemake -n' of the tiny workflow config with ``override`` merged over it, in ``work``."""
    import os
    import sys

    (work / "override.yaml").write_text(yaml.safe_dump(override))
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "snakemake"), "-s", str(REPO / "workflow/Snakefile"), "--configfile",
           str(REPO / "tests/integration/config.yaml"), "override.yaml", "-n", "--cores", "1"]
    env = {**os.environ, "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])}
    return subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture
def small_stack_workdir(tmp_path: Path) -> Path:
    """A working directory whose samples table predicts slices 0-1 of an existing 3 x 128 x 128
    TIFF: 2 slices x 2 x 2 blocks of 64 px = 8 blocks (the train row's image is synth's, not yet
    written)."""
    import numpy as np
    import tifffile

    shutil.copytree(REPO / "config", tmp_path / "config")
    tifffile.imwrite(tmp_path / "small.tif", np.zeros((3, 128, 128), np.uint16), photometric="minisblack")
    (tmp_path / "samples.tsv").write_text(
        "name\timage\tlabels\tslices\trole\n"
        "tiny_train\tresources/synth/image.tif\tresources/synth/labels.tif\t0-2\ttrain\n"
        "small\tsmall.tif\t\t0-1\tpredict\n")
    return tmp_path


@pytest.mark.parametrize("key", ["jobs", "merge_jobs"])
def test_more_jobs_than_blocks_stop_the_workflow_at_start_up_in_one_line(small_stack_workdir, key):
    """predict.jobs: 100000 on a 3-block stack was accepted: a 148 s, 2.1 GB dry run planning jobs
    with nothing to do. Refused before any job, also in a dry run, naming the key, the sample and
    its block count (from the TIFF header, the row's slices and predict.block_px)."""
    if key not in CONFIG_SCHEMA["properties"]["predict"]["properties"]:
        pytest.skip(f"predict.{key} is not in the config schema")
    res = _dry_run(small_stack_workdir, {"samples": "samples.tsv", "predict": {key: 9, "block_px": 64}})
    text = res.stdout + res.stderr
    assert res.returncode == 2, text[-3000:]
    lines = [line for line in text.splitlines() if f"config predict.{key} = 9" in line]
    assert len(lines) == 1, text[-3000:]
    assert "8 block(s) of sample 'small' (small.tif)" in lines[0] and "use at most 8" in lines[0], lines[0]
    assert "Job stats" not in text and "rule " not in text, text[-3000:]
    ok = _dry_run(small_stack_workdir, {"samples": "samples.tsv", "predict": {key: 8, "block_px": 64}})
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-3000:]
    assert "Job stats" in ok.stdout + ok.stderr


def test_merge_pieces_do_not_each_list_every_predict_part(small_stack_workdir):
    """Every merge piece listed all predict.jobs parts as inputs: merge_jobs x jobs DAG edges
    (256 x 256 made the dry run of one 4 x 8192^2 sample 41 s instead of 4 s). The pieces come
    after the merge's start round, which reads the parts; the serial rounds still list them."""
    res = _dry_run(small_stack_workdir, {"samples": "samples.tsv",
                                         "predict": {"jobs": 4, "merge_jobs": 4, "block_px": 64}})
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-3000:]
    inputs: dict[str, list[str]] = {}
    for block in text.split("\nrule ")[1:]:
        rule = block.split(":", 1)[0]
        line = next((ln for ln in block.splitlines() if ln.strip().startswith("input:")), "")
        inputs.setdefault(rule, []).append(line)
    pieces = ["merge_seeds", "merge_cells", "merge_write"]
    assert all(len(inputs.get(rule, [])) == 4 for rule in pieces), {r: len(v) for r, v in inputs.items()}
    assert not [ln for rule in pieces for ln in inputs[rule] if "predict/part-" in ln]
    assert all(ln.count("predict/part-") == 4 for ln in inputs["merge_start"] + inputs["merge"])
