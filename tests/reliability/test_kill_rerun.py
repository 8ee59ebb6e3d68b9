"""Kill and rerun (issue 7, part 2 and 3): SIGKILL a stage at a random point, rerun, and get
the bytes of an uninterrupted run.

Two levels:

* the stage's own job: its exact shell command (taken from ``snakemake -n -p``) is started,
  its process group SIGKILLed at a random point, and the outputs checked: nothing half-written
  under a final name; rerunning the command gives the reference bytes. Training is killed at a
  random iteration and resumes from its checkpoint (``--resume``): bit-identical model.pt.
* the workflow: Snakemake (whole process group) is SIGKILLed while the stage runs; the same
  command run again (after ``--unlock`` for the stale lock, as the message says) completes and
  every data file equals the uninterrupted run's, with no temporaries left behind.

CI runs one seed per stage at the job level and one workflow kill (predict); ``UNET_FAULT_SEEDS=N``
runs every stage with seeds 0..N-1 at both levels (the workflow level is marked slow).
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest
from faults import (
    CONFIG,
    SNAKEFILE,
    SNAKEMAKE,
    Reference,
    clone_run,
    data_digest,
    fault_seeds,
    kill_group,
    snakemake,
    start_in_new_group,
    wait_for_child,
)

STAGES = ["synth", "ingest", "class_weights", "weights", "augment", "train", "predict", "merge", "evaluate"]
CLI_NAME = {"class_weights": "class-weights"}
RESUMABLE = {"predict"}  # part stores are resumed in place (per-block markers, COMPLETE last)


def _delay(reference: Reference, rule: str, rng: random.Random) -> float:
    """A random moment inside the stage's run time (its reference duration, seconds)."""
    return rng.uniform(0.05, 1.0) * max(reference.seconds.get(rule, 2.0), 0.5)


def _diff(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _check_no_partial_output(work: Path, reference: Reference, outputs: tuple[str, ...], rule: str) -> None:
    """After the kill, each output is either absent or complete (equal to the reference)."""
    for out in outputs:
        path = work / out
        if not path.exists():
            continue
        ref = {k: v for k, v in reference.digest.items() if k == out or k.startswith(out + "/")}
        got = {k: v for k, v in data_digest(work).items() if k == out or k.startswith(out + "/")}
        if rule in RESUMABLE and not (path / "COMPLETE").exists():
            # an unfinished part store: every block it marks done must already hold final bytes
            done = {p.name for p in (path / "done").iterdir()} if (path / "done").is_dir() else set()
            assert done or not any("/c/" in k for k in got), f"{out}: chunks written but no block marked done"
            continue
        assert got == ref, f"{out} exists after SIGKILL but differs from the complete output: {_diff(got, ref)[:5]}"


@pytest.mark.parametrize("seed", fault_seeds())
@pytest.mark.parametrize("rule", STAGES)
def test_killed_job_leaves_no_partial_output_and_rerun_is_identical(reference: Reference, tmp_path, rule, seed):
    job = reference.job(rule)
    work = clone_run(reference.workdir, tmp_path / "work")
    for out in job.outputs:
        path = work / out
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if rule == "train":  # a fresh training run; the kill then lands on a random iteration
        for name in ("state.pt", "metrics.csv", "model.ts"):
            (work / "results/model" / name).unlink(missing_ok=True)
    rng = random.Random(f"{rule}-{seed}")
    proc = start_in_new_group(job.command, cwd=work, shell=True)
    pid = wait_for_child(proc, rf"bin/unet {CLI_NAME.get(rule, rule)} ", timeout=120)
    if pid is not None:
        time.sleep(_delay(reference, rule, rng))
    kill_group(proc)

    _check_no_partial_output(work, reference, job.outputs, rule)

    rerun = start_in_new_group(job.command, cwd=work, shell=True)
    log, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, f"rerun of {job.command} failed: {log}"
    got = data_digest(work)
    assert _diff(got, reference.digest) == []


WORKFLOW_CI = ("predict", 0)  # the one workflow-level kill in the fast subset


@pytest.mark.parametrize(
    "rule, seed",
    [pytest.param(r, s, id=f"{r}-{s}", marks=() if (r, s) == WORKFLOW_CI else pytest.mark.slow)
     for r in STAGES for s in fault_seeds()],
)
def test_killed_workflow_reruns_to_identical_outputs(reference: Reference, tmp_path, rule, seed):
    work = clone_run(reference.workdir, tmp_path / "work")
    rng = random.Random(f"workflow-{rule}-{seed}")
    cmd = [str(SNAKEMAKE), "-s", str(SNAKEFILE), "--configfile", CONFIG, "--cores", "2", "--forcerun", rule]
    proc = start_in_new_group(cmd, cwd=work)
    pid = wait_for_child(proc, rf"bin/unet {CLI_NAME.get(rule, rule)} ", timeout=300)
    assert pid is not None, f"the {rule} job never started: {proc.communicate()[0][-3000:]}"
    time.sleep(_delay(reference, rule, rng))
    kill_group(proc)

    # the user repeats the command that was killed (Snakemake deletes a job's old outputs when
    # the job starts, so a plain rerun would leave a forced intermediate missing where its
    # dependants are still up to date)
    res = snakemake(work, "--cores", "2", "--forcerun", rule, check=False)
    if res.returncode:  # the killed Snakemake left its lock: the message says what to do
        text = res.stdout + res.stderr
        assert "--unlock" in text, text[-3000:]
        snakemake(work, "--unlock")
        snakemake(work, "--cores", "2", "--forcerun", rule)
    assert _diff(data_digest(work), reference.digest) == []


def test_workflow_start_removes_temporaries_of_killed_stages(reference: Reference, tmp_path):
    import subprocess

    from unet_core.common.atomic import _host

    work = clone_run(reference.workdir, tmp_path / "work")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = work / "resources" / "synth" / f".image.tif.tmp-{_host()}-{dead.pid}-0badf00d"
    stale.write_bytes(b"half a TIFF")
    res = snakemake(work, "--cores", "2")  # nothing to rerun: the complete outputs are kept
    assert "Nothing to be done" in res.stdout + res.stderr
    assert not stale.exists()
    assert _diff(data_digest(work), reference.digest) == []
