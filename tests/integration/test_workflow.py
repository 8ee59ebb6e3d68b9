"""The Snakemake workflow end to end on a tiny config (tests/integration/config.yaml).

One run in a temporary working directory serves several checks; a second, independent run
with other parallelism (--cores 1, one predict job) checks byte-identical outputs.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEFILE = REPO / "workflow" / "Snakefile"
CONFIG = Path("tests/integration/config.yaml")
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
RULES = ["synth", "ingest", "class_weights", "weights", "augment", "train", "predict", "merge", "evaluate"]
# the merge's rounds (the demo's watershed has them all): pieces per predict.merge_jobs (2 here)
MERGE = {"merge_start", "merge_seeds", "merge_number_seeds", "merge_cells", "merge_number_cells", "merge_write",
         "merge"}


# jobs call `unet`: the one installed beside this interpreter
ENV = {**os.environ, "PATH": os.pathsep.join([str(SNAKEMAKE.parent), os.environ.get("PATH", "")])}


def snakemake(
    workdir: Path, *args: str, config: dict | None = None, check: bool = True, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run snakemake on the tiny config, with ``config`` (a dict) merged over it."""
    files = [str(CONFIG)]
    if config is not None:
        extra = workdir / f"override-{hashlib.sha1(repr(config).encode()).hexdigest()[:8]}.yaml"
        extra.write_text(yaml.safe_dump(config))
        files.append(str(extra))
    cmd = [str(SNAKEMAKE), "-s", str(SNAKEFILE), "--configfile", *files, *args]
    res = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout, env=ENV)
    if check and res.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def new_workdir(tmp: Path) -> Path:
    (tmp / "tests").mkdir(parents=True)
    shutil.copytree(REPO / "tests" / "integration", tmp / "tests" / "integration")
    shutil.copytree(REPO / "config", tmp / "config")
    return tmp


def planned(res: subprocess.CompletedProcess) -> dict[str, int]:
    """{rule: count} from the dry-run's job-stats table."""
    text = res.stdout + res.stderr
    table = text.split("Job stats:", 1)[1] if "Job stats:" in text else ""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M) if m.group(1) != "total"}


def data_digests(root: Path) -> dict[str, str]:
    """sha256 of every data file under results/ (Zarr chunks, TIFFs, JSON/CSV tables,
    model), leaving out Zarr metadata (attributes) and the per-job predict parts."""
    out = {}
    for path in sorted((root / "results").rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or path.name == "zarr.json" or "/predict/" in rel or rel.startswith("results/logs/"):
            continue
        if path.name in ("state.pt", "model.ts"):
            continue  # zip containers with a random serialisation id: compared by content below
        if path.suffix in (".png", ".csv", ".json") and ("model" in rel or "evaluate" in rel or "class_weights" in rel):
            continue  # figures and tables carry timings or paths; their numbers are compared below
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    work = new_workdir(tmp_path_factory.mktemp("wf_a"))
    snakemake(work, "--cores", "2")
    return work


def test_lint_is_clean():
    res = subprocess.run([str(SNAKEMAKE), "--lint"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Congratulations" in res.stdout + res.stderr


def test_dry_run_lists_every_stage(tmp_path):
    work = new_workdir(tmp_path)
    jobs = planned(snakemake(work, "-n", "--cores", "2"))
    assert {r: jobs.get(r) for r in RULES} == {
        "synth": 1, "ingest": 2, "class_weights": 1, "weights": 2, "augment": 1, "train": 1,
        "predict": 2, "merge": 1, "evaluate": 1,
    }
    assert {r: jobs.get(r) for r in sorted(MERGE - {"merge"})} == {
        "merge_cells": 2, "merge_number_cells": 1, "merge_number_seeds": 1, "merge_seeds": 2, "merge_start": 1,
        "merge_write": 2}
    one_piece = {"predict": {"instances": "components", "merge_jobs": 1}}
    components = planned(snakemake(work, "-n", "--cores", "2", config=one_piece))
    assert "merge_seeds" not in components and components["merge_cells"] == components["merge_write"] == 1


@pytest.mark.parametrize(
    "override, message",
    [
        pytest.param({"weights": {"w0": "ten"}}, "w0", id="wrong-type"),
        pytest.param({"predict": {"jobz": 2}}, "jobz", id="unknown-key"),
        pytest.param({"model": {"depth": 0}}, "depth", id="out-of-range"),
        pytest.param({"train": {"tile_out": 37}}, "tile", id="invalid-tile-size"),
        pytest.param({"train": {"val_tile_out": 37}}, "config train.val_tile_out = 37", id="invalid-val-tile-size"),
    ],
)
def test_bad_config_names_the_key(tmp_path, override, message):
    work = new_workdir(tmp_path)
    res = snakemake(work, "-n", "--cores", "1", config=override, check=False)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]  # bad input: exit 2, as the stages
    assert message in res.stdout + res.stderr


@pytest.mark.parametrize("tiff, flags", [(True, "--tiff "), ("instances", "--tiff-content instances"),
                                         ("cell-probability", "--tiff-content cell-probability")])
def test_tiff_content_reaches_merge(tmp_path, tiff, flags):
    work = new_workdir(tmp_path)
    res = snakemake(work, "-n", "-p", "--cores", "1", config={"predict": {"tiff": tiff}})
    merge = [line for line in res.stdout.splitlines() if line.startswith("Shell command: unet merge")]
    assert merge and all(flags in line and "segmentation.tif" in line for line in merge), merge
    assert tiff is not True or not any("--tiff-content" in line for line in merge)


def test_bad_samples_table_names_the_problem(tmp_path):
    work = new_workdir(tmp_path)
    table = work / "tests/integration/samples.tsv"
    table.write_text(table.read_text().replace("\tval\n", "\tvalidate\n"))
    res = snakemake(work, "-n", "--cores", "1", check=False)
    assert res.returncode == 2 and "validate" in res.stdout + res.stderr


def test_full_run_outputs_and_nothing_to_do(run_a):
    results = run_a / "results"
    for rel in ["model/model.pt", "model/curve.png", "model/model_card.json", "tiny_train/weights.png",
                "tiny_train/augment.png", "tiny_val/prediction.ome.zarr/zarr.json", "tiny_val/segmentation.tif",
                "tiny_val/cells.csv",
                "tiny_val/evaluate/metrics.csv", "tiny_val/evaluate/overlays.png"]:
        assert (results / rel).is_file(), rel
    res = snakemake(run_a, "--cores", "2")
    assert "Nothing to be done" in res.stdout + res.stderr


def test_parameter_change_reruns_exactly_its_dependants(run_a):
    jobs = planned(snakemake(run_a, "-n", "--cores", "2", config={"weights": {"w0": 12}}))
    assert set(jobs) == {"weights", "augment", "train", "predict", "evaluate", "all"} | MERGE
    jobs = planned(snakemake(run_a, "-n", "--cores", "2", config={"predict": {"tta": "flips"}}))
    assert set(jobs) == {"predict", "evaluate", "all"} | MERGE
    jobs = planned(snakemake(run_a, "-n", "--cores", "2", config={"predict": {"merge_jobs": 1}}))
    assert set(jobs) == {"evaluate", "all"} | MERGE  # the cells are the same, but the merge runs again
    res = snakemake(run_a, "-n", "-p", "--cores", "2", config={"augment": {"gamma": 0.5, "contrast": 0.3}})
    assert set(planned(res)) == {"augment", "train", "predict", "evaluate", "all"} | MERGE
    assert "--contrast 0.3 --gamma 0.5" in res.stdout + res.stderr  # the grey-value keys reach unet augment
    res = snakemake(run_a, "-n", "-p", "--cores", "2", config={"predict": {"compile": True}})
    assert set(planned(res)) == {"predict", "evaluate", "all"} | MERGE
    assert " --compile " in res.stdout + res.stderr


def test_code_change_reruns_the_stage_that_imports_it(run_a, tmp_path):
    # a copy of the package, first on PYTHONPATH, with one ingest module edited
    copy = tmp_path / "pkg"
    shutil.copytree(REPO / "unet_core", copy / "unet_core", ignore=shutil.ignore_patterns("__pycache__"))
    module = copy / "unet_core" / "io" / "tiff.py"
    module.write_text(module.read_text() + "\n# an edit\n")
    env = {**ENV, "PYTHONPATH": str(copy)}
    cmd = [str(SNAKEMAKE), "-s", str(SNAKEFILE), "--configfile", str(CONFIG), "-n", "--cores", "2"]  # noqa: E501
    res = subprocess.run(cmd, cwd=run_a, capture_output=True, text=True, env=env, timeout=300)
    jobs = planned(res)
    assert "ingest" in jobs and "synth" not in jobs, res.stdout[-2000:]


def test_reproducible_with_other_parallelism(run_a, tmp_path):
    work_b = new_workdir(tmp_path / "b")
    snakemake(work_b, "--cores", "1", config={"predict": {"jobs": 1, "merge_jobs": 1}})
    a, b = data_digests(run_a), data_digests(work_b)
    assert a.keys() == b.keys() and len(a) > 20
    differing = [k for k in a if a[k] != b[k]]
    assert differing == [], differing
    # the numbers in the tables too (their files also hold timings)
    import csv

    def rows(root):
        with open(root / "results/tiny_val/evaluate/metrics.csv") as fh:
            return list(csv.DictReader(fh))

    assert rows(run_a) == rows(work_b)
    import torch

    def tensors(root):
        state = torch.load(root / "results/model/state.pt", weights_only=True)["model"]
        script = torch.jit.load(root / "results/model/model.ts").state_dict()
        return state, script

    for (s_a, t_a), (s_b, t_b) in [(tensors(run_a), tensors(work_b))]:
        assert s_a.keys() == s_b.keys() and all(torch.equal(s_a[k], s_b[k]) for k in s_a)
        assert t_a.keys() == t_b.keys() and all(torch.equal(t_a[k], t_b[k]) for k in t_a)


def test_a_given_model_file_skips_training_and_predicts_new_stacks(run_a, tmp_path):
    """model_file: a facility reprocesses stacks with the model it has; nothing is trained."""
    work = new_workdir(tmp_path)
    model = run_a / "results" / "model" / "model.pt"
    res = snakemake(work, "--cores", "2", config={"model_file": str(model), "output_dir": "again"})
    assert (work / "again" / "tiny_val" / "evaluate" / "metrics.csv").is_file()
    assert not (work / "again" / "model").exists() and not (work / "again" / "tiny_train").exists()
    jobs = planned(snakemake(work, "-n", "--cores", "2", "--forceall", config={"model_file": str(model)}))
    assert "train" not in jobs and "augment" not in jobs and jobs.get("predict") == 2, res.stdout[-500:]
    # a model section that disagrees with the file is refused before any work, naming the key
    bad = snakemake(work, "-n", "--cores", "1", config={"model_file": str(model), "model": {"base_channels": 64}},
                    check=False)
    assert bad.returncode == 2 and "base_channels" in bad.stdout + bad.stderr
