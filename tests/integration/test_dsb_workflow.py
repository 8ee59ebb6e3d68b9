"""The DSB2018 CPU profile (config/dsb2018_cpu.yaml) end to end on a few slices.

Real nuclei from experiments with different intensity scales, images smaller than a network tile:
the per-slice percentile normalisation reaches the model, and the cells come from the distance
seeds with the settings the model's median nucleus area gives. Skipped where the data is absent.
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


def test_dsb_profile_on_a_few_slices(tmp_path, dsb_dir) -> None:
    from unet_core.infer.instances import auto_h_px, auto_min_object_px
    from unet_core.model.checkpoint import load_model

    shutil.copytree(REPO / "config", tmp_path / "config")
    rows = [("dsb_train", "0-3", "train"), ("dsb_val", "200-201", "val"), ("dsb_test", "250-251", "predict")]
    table = ["name\timage\tlabels\tslices\trole"] + [
        f"{name}\t{dsb_dir / 'images.tif'}\t{dsb_dir / 'labels.tif'}\t{z}\t{role}" for name, z, role in rows]
    (tmp_path / "samples.tsv").write_text("\n".join(table) + "\n")
    override = {"samples": "samples.tsv", "output_dir": "results/dsb", "augment": {"samples_per_slice": 1},
                "train": {"iterations": 4, "validate_every": 2, "checkpoint_every": 2}, "predict": {"jobs": 1}}
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(override))
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "workflow" / "Snakefile"), "--cores", "2",
           "--configfile", "config/dsb2018_cpu.yaml", "small.yaml"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=ENV)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = tmp_path / "results" / "dsb"
    _, meta = load_model(res / "model" / "model.pt")
    area = meta["median_object_area_px"]
    assert meta["intensity_normalisation"] == "slice-percentile" and area > 0
    unet = zarr.open_group(res / "dsb_test" / "prediction.ome.zarr", mode="r").attrs["unet"]
    assert unet["intensity_normalisation"] == "slice-percentile"
    assert unet["instance_method"] == "watershed" and unet["watershed"]["seeds"] == "distance"
    assert unet["watershed"]["h_px"] == pytest.approx(auto_h_px(area))
    assert unet["min_object_px"] == auto_min_object_px(area) and unet["median_object_area_px"] == area
    scores = json.loads((res / "dsb_test" / "evaluate" / "metrics.json").read_text())["dataset"]
    assert scores["slices"] == 2 and scores["n_true_objects"] > 0 and 0 <= scores["seg"] <= 1
