"""The DIC-HeLa CPU profile (config/dic_hela_cpu.yaml) on a few frames, its samples table, and its
bad input.

Real DIC frames of touching HeLa cells (Cell Tracking Challenge data, never in the repository:
skipped where ../shared/datasets/dic_hela_seq01/ is absent): the profile's table trains on silver
truth and validates on gold truth with the frames near the validation frames held out; a missing
file or frames the stack does not have stop the workflow before any job, naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import zarr

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
ENV = {**os.environ, "PATH": os.pathsep.join([str(SNAKEMAKE.parent), os.environ.get("PATH", "")])}
TABLE = REPO / "config" / "samples_dic_hela.tsv"
SHIPPED_DATA = "../shared/datasets/dic_hela_seq01"
#: Frames of sequence 01 that gt-*.tif's slices are (the dataset's README); slice 8 (t067) is partial.
GOLD_FRAMES = (2, 5, 21, 31, 33, 34, 39, 54, 67)
#: How far the held-out window around each validation frame reaches, frames (the table's comment).
WINDOW = 2


def _rows() -> dict[str, dict[str, str]]:
    from unet_core.common.config_values import load_yaml
    from unet_core.common.samples import read_samples

    schema = load_yaml(REPO / "workflow" / "schemas" / "samples.schema.yaml")
    return read_samples(TABLE, schema, need_train=True)


def _frames(selection: str) -> set[int]:
    from unet_core.common.slices import parse_slices

    return set(parse_slices(selection, 84, what="test"))


def test_the_table_holds_out_the_validation_frames_and_their_neighbours() -> None:
    """No training frame lies within WINDOW frames of a validation frame; the partial gold frame
    t067 is not validated on; every other frame trains (none is wasted)."""
    rows = _rows()
    train = [r for r in rows.values() if r["role"] == "train"]
    val = [r for r in rows.values() if r["role"] == "val"]
    assert [r["image"] for r in train] == [f"{SHIPPED_DATA}/images.tif"]
    assert [r["labels"] for r in train] == [f"{SHIPPED_DATA}/st-labels.tif"]  # silver truth
    assert [(r["image"], r["labels"]) for r in val] == [(f"{SHIPPED_DATA}/gt-images.tif",
                                                         f"{SHIPPED_DATA}/gt-labels.tif")]  # gold truth
    validated = {GOLD_FRAMES[z] for z in _frames(val[0]["slices"])}
    assert validated == set(GOLD_FRAMES) - {67}
    held_out = {t for v in validated for t in range(v - WINDOW, v + WINDOW + 1)}
    trained = _frames(train[0]["slices"])
    assert not trained & held_out
    assert trained == set(range(84)) - held_out and len(trained) == 53


def _workdir(tmp_path: Path, hela_dir: Path, rows: list[tuple[str, str, str, str, str]],
             override: dict) -> None:
    """tmp_path set up to run a copy of config/ with a table of ``rows`` (name, image, labels,
    slices, role) in the shipped table's format, images in ``hela_dir``."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    header = TABLE.read_text().splitlines()
    header = [line for line in header if line.startswith(("#", "name\t"))]
    lines = [f"{name}\t{hela_dir / image}\t{hela_dir / labels if labels else ''}\t{z}\t{role}"
             for name, image, labels, z, role in rows]
    (tmp_path / "samples.tsv").write_text("\n".join(header + lines) + "\n")
    (tmp_path / "small.yaml").write_text(yaml.safe_dump({"samples": "samples.tsv", **override}))


def _snakemake(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "workflow" / "Snakefile"), "--cores", "2",
           "--configfile", "config/dic_hela_cpu.yaml", "small.yaml", *args]
    return subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=ENV)


def test_hela_profile_on_a_few_frames(tmp_path, hela_dir) -> None:
    """Two training frames (silver truth), two validation frames (gold truth), a few steps: the
    profile's settings reach the model and the cells, and the validation frames are scored."""
    from unet_core.infer.instances import auto_h_px, auto_min_object_px
    from unet_core.model.checkpoint import load_model

    rows = [("hela_train", "images.tif", "st-labels.tif", "8-9", "train"),
            ("hela_val", "gt-images.tif", "gt-labels.tif", "0-1", "val")]
    override = {"output_dir": "results/hela", "augment": {"samples_per_slice": 1},
                "train": {"iterations": 4, "validate_every": 2, "checkpoint_every": 2},
                "predict": {"jobs": 1, "merge_jobs": 1}}
    _workdir(tmp_path, hela_dir, rows, override)
    run = _snakemake(tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = tmp_path / "results" / "hela"
    _, meta = load_model(res / "model" / "model.pt")
    area = meta["median_object_area_px"]
    assert meta["intensity_normalisation"] == "stack-zscore" and area > 1000  # HeLa cells, not specks
    unet = zarr.open_group(res / "hela_val" / "prediction.ome.zarr", mode="r").attrs["unet"]
    assert unet["instance_method"] == "watershed" and unet["watershed"]["seeds"] == "distance"
    assert unet["watershed"]["h_px"] == pytest.approx(auto_h_px(area))
    assert unet["min_object_px"] == auto_min_object_px(area)
    scores = json.loads((res / "hela_val" / "evaluate" / "metrics.json").read_text())["dataset"]
    assert scores["slices"] == 2 and scores["n_true_objects"] == 20 and 0 <= scores["seg"] <= 1


@pytest.mark.parametrize(("rows", "named"), [
    pytest.param([("hela_train", "images.tif", "st-labels.tif", "8-9", "train"),
                  ("hela_val", "gt-images.tif", "gt-labels.tif", "7-12", "val")],
                 "sample 'hela_val': image {dir}/gt-images.tif: slice(s) 9, 10, 11, 12 out of range for a "
                 "stack of 9 slices (0-8)", id="frames-beyond-the-stack"),
    pytest.param([("hela_train", "images.tif", "st-labels.tif", "80-90", "train"),
                  ("hela_val", "gt-images.tif", "gt-labels.tif", "0-1", "val")],
                 "sample 'hela_train': image {dir}/images.tif: slice(s) 84, 85, 86, 87, 88 ... (7 in all) "
                 "out of range for a stack of 84 slices (0-83)", id="train-frames-beyond-the-stack"),
    pytest.param([("hela_train", "images.tif", "st-labels.tif", "8-9", "train"),
                  ("hela_val", "gt-images.tif", "gt-labels-missing.tif", "0-1", "val")],
                 "sample 'hela_val': labels {dir}/gt-labels-missing.tif: no such file or directory",
                 id="missing-labels"),
])
def test_bad_hela_table_stops_before_any_job(tmp_path, hela_dir, rows, named) -> None:
    """One line naming the samples table, the sample and the file; nothing written (before, a
    missing file was Snakemake's many-line MissingInputException, and frames beyond the stack
    stopped ingest after the other rows had been ingested)."""
    _workdir(tmp_path, hela_dir, rows, {"output_dir": "results/hela"})
    run = _snakemake(tmp_path)
    text = run.stdout + run.stderr
    assert run.returncode == 2, text[-3000:]  # bad input: exit 2, as the stages
    lines = [line for line in text.splitlines() if "out of range" in line or "no such file" in line]
    assert len(lines) == 1 and lines[0].startswith(f"samples.tsv: {named.format(dir=hela_dir)}"), text[-3000:]
    assert "MissingInputException" not in text and "rule ingest" not in text
    assert not (tmp_path / "results").exists()
