"""Concurrency (issue 7, part 4).

* K predict jobs run at the same time, each writing its share of the blocks, merge to the
  same bytes as the reference run's prediction (made by 2 jobs one after the other).
* The same job started twice at once on one part store (a resubmitted cluster job) still
  gives a complete part with the reference bytes.
* Two Snakemake runs in one working directory: the second is refused by the lock, with a
  message saying how to proceed (``--unlock``), and the first finishes unharmed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess

from faults import (
    CONFIG,
    ENV,
    SNAKEFILE,
    SNAKEMAKE,
    UNET,
    clone_run,
    data_digest,
    descendants,
    kill_group,
    snakemake,
    start_in_new_group,
    tree_digest,
    wait_for_child,
)

MODEL_ARGS = ["--depth", "2", "--base-channels", "4", "--dropout", "0"]


def _predict_cmd(reference, part, job: int, jobs: int) -> list[str]:
    # run in the reference directory with the workflow's relative paths (parts record them)
    return [str(UNET), "predict", "results/tiny_val/stack.ome.zarr", "results/model/model.pt", str(part),
            "--job", str(job), "--jobs", str(jobs), "--tile-out", "64", "--block-px", "64", "--batch", "1",
            "--device", "cpu", "--threads", "1", *MODEL_ARGS]


def _data(root) -> dict[str, str]:
    """Chunks and marker-free content of a store (attributes hold the job layout and timings)."""
    return tree_digest(root, skip=lambda rel: rel.endswith("zarr.json") or rel.endswith(".snakemake_timestamp"))


def _merge(reference, parts, out) -> None:
    res = subprocess.run([str(UNET), "merge", *map(str, parts), "--stack", "results/tiny_val/stack.ome.zarr",
                          "-o", str(out)], capture_output=True, text=True, env=ENV, timeout=300,
                         cwd=reference.workdir)
    assert res.returncode == 0, res.stderr


def test_parallel_predict_jobs_equal_the_reference_bytes(reference, tmp_path):
    k = 4  # one 64-px block each on the 128 x 128 validation slice
    parts = [tmp_path / f"part-{i}.zarr" for i in range(k)]
    procs = [subprocess.Popen(_predict_cmd(reference, p, i, k), env=ENV, cwd=reference.workdir, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i, p in enumerate(parts)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    _merge(reference, parts, tmp_path / "prediction.ome.zarr")
    want = _data(reference.workdir / "results/tiny_val/prediction.ome.zarr")
    assert _data(tmp_path / "prediction.ome.zarr") == want and len(want) > 5


def test_same_job_started_twice_at_once_gives_one_complete_part(reference, tmp_path):
    part = tmp_path / "part-0.zarr"
    procs = [subprocess.Popen(_predict_cmd(reference, part, 0, 2), env=ENV, cwd=reference.workdir, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert any(p.returncode == 0 for p in procs), errors
    for p, err in zip(procs, errors):  # a loser may refuse, but only with one clear line
        assert p.returncode == 0 or ("Traceback" not in err and p.returncode == 2), err
    assert (part / "COMPLETE").is_file()
    ref_part = reference.workdir / "results/tiny_val/predict/part-0.zarr"
    only_data = lambda rel: rel.endswith("zarr.json") or rel in ("COMPLETE", "part.json") or rel.startswith("done/")  # noqa: E731, E501
    assert tree_digest(part, skip=only_data) == tree_digest(ref_part, skip=only_data)
    assert sorted(p.name for p in (part / "done").iterdir()) == sorted(p.name for p in (ref_part / "done").iterdir())
    _merge(reference, [part, reference.workdir / "results/tiny_val/predict/part-1.zarr"], tmp_path / "pred.ome.zarr")
    assert _data(tmp_path / "pred.ome.zarr") == _data(reference.workdir / "results/tiny_val/prediction.ome.zarr")


def test_second_workflow_run_in_one_directory_is_refused_by_the_lock(reference, tmp_path):
    work = clone_run(reference.workdir, tmp_path / "work")
    first = start_in_new_group([str(SNAKEMAKE), "-s", str(SNAKEFILE), "--configfile", CONFIG, "--cores", "1",
                                "--forcerun", "merge"], cwd=work)
    paused: list[int] = []
    try:
        assert wait_for_child(first, r"bin/unet merge ", timeout=300), "the first run never started merge"
        # hold the first run inside merge (its lock held) for as long as the second one takes to
        # start: a merge of the tiny stacks can end sooner than snakemake starts on a busy machine
        paused = [pid for pid, cmd in descendants(first.pid) if re.search(r"unet merge ", cmd)]
        for pid in paused:
            os.kill(pid, signal.SIGSTOP)
        second = snakemake(work, "--cores", "1", "--forcerun", "evaluate", check=False)
        text = second.stdout + second.stderr
        assert second.returncode != 0
        assert "lock" in text.lower() and "--unlock" in text, text[-3000:]
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
        out, _ = first.communicate(timeout=600)
        assert first.returncode == 0, out[-3000:]
    finally:
        for pid in paused:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if first.poll() is None:
            kill_group(first)
    assert data_digest(work) == reference.digest
