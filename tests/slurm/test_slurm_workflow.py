"""The default workflow through profiles/slurm on a real one-node SLURM cluster.

`test_workflow_under_slurm_equals_local_run` starts a private SLURM cluster on this machine
(tests/slurm/start_local_slurm.sh: Debian's munge + slurmctld + slurmd, daemons started by
hand, stopped by PID in teardown), runs the default workflow in a temporary copy of the
working tree twice, side by side -- once locally (`snakemake`, profiles/default) and once through
profiles/slurm -- with a small config override so it stays fast, and checks that

* every Zarr chunk file and every TIFF of the SLURM run is byte-identical to the local run's
  (Zarr metadata files, which carry provenance with timestamps, are left out); both runs use
  the same threads per rule (the local run gets the SLURM run's set-threads), because
  thread-count invariance is not what this test is about;
* every rule ran as its own SLURM job and every job COMPLETED (the controller's job
  completion log), and the predict scatter ran as `predict.jobs` separate SLURM jobs, at least
  two of them at the same time.

It runs only as root on Debian/Ubuntu with apt-get (it may install packages), or when
UNET_SLURM_TEST=1 (still as root, packages already installed); UNET_SLURM_TEST=0 skips it.
Test-only settings live in a derived copy of the profile, made by `_test_profile`: no
accounting here, so `slurm-status-command: squeue`; a shorter first status poll; no GPU; CPUs
and memory capped to this node. Everything else is profiles/slurm as users get it.

`test_slurm_profile_covers_every_rule` checks the shipped profile itself and runs everywhere.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
BIN = Path(sys.executable).parent  # snakemake and unet are installed beside this interpreter
MERGE_RULES = ("merge_start", "merge_seeds", "merge_number_seeds", "merge_cells", "merge_number_cells", "merge_write",
               "merge")
OPTIONAL_RULES = ("export_bioimageio", "synth_volume")  # in the profile, not run by the demo config
RULES = ("synth", "ingest", "class_weights", "weights", "augment", "train", "predict", *MERGE_RULES, "evaluate",
         *OPTIONAL_RULES)
THREADED_RULES = ("class_weights", "weights", "augment", "train", "predict")  # take --threads
GPU_RULES = ("train", "predict")

PREDICT_JOBS = 2  # the 2 validation slices make at least 2 blocks: work for each job
MERGE_JOBS = 2  # the merge's passes over pixels as 2 pieces each (seeds, cells, write)
# Small but complete: every stage runs, on 8 synthetic 384 px slices, with a short training.
# Given after config/config.yaml; keys missing from it are left out (see _override), so a renamed
# optional key does not break the test.
OVERRIDE = {
    "synth": {"size_px": 384},
    "augment": {"samples_per_slice": 2},
    "train": {"iterations": 20, "validate_every": 10, "val_every": 10, "checkpoint_every": 10,
              "runtime_min": 30},
    "predict": {"jobs": PREDICT_JOBS, "merge_jobs": MERGE_JOBS},
}
REQUIRED_OVERRIDE = {("synth", "size_px"), ("train", "iterations"), ("predict", "jobs"), ("predict", "merge_jobs")}
START_TIMEOUT_S = 900  # includes apt-get install on a fresh machine
STOP_TIMEOUT_S = 120
LOCAL_TIMEOUT_S = 1200
SLURM_TIMEOUT_S = 1800
ZARR_META = {"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"}


def _skip_reason() -> str | None:
    flag = os.environ.get("UNET_SLURM_TEST", "")
    if flag == "0":
        return "UNET_SLURM_TEST=0 switches the SLURM integration test off"
    if os.geteuid() != 0:
        return "needs root: starts munged/slurmctld/slurmd and may apt-get install them"
    if flag != "1":
        os_release = Path("/etc/os-release")
        text = os_release.read_text().lower() if os_release.is_file() else ""
        if not re.search(r"^id(_like)?=.*\b(debian|ubuntu)\b", text, re.MULTILINE):
            return "needs Debian/Ubuntu (installs Debian's slurm-wlm packages); set UNET_SLURM_TEST=1 to force"
        if shutil.which("apt-get") is None:
            return "needs apt-get to install munge/slurm; set UNET_SLURM_TEST=1 if they are installed"
    etc_conf = Path("/etc/slurm/slurm.conf")
    if etc_conf.exists() and not etc_conf.is_symlink():
        return f"{etc_conf} exists (a real SLURM installation): not starting a private test cluster here"
    return None


def _run(cmd: list[str], *, log: Path, timeout: float, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> tuple[int, float]:
    """Run cmd in its own process group with output to log; on timeout kill the whole group.

    Returns (exit code, seconds). A timed-out command returns exit code -9 after its process
    group got SIGTERM and, 15 s later, SIGKILL (a stuck snakemake may ignore SIGTERM).
    """
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = -9
        except BaseException:  # pytest-timeout, Ctrl-C: never leave the group running
            _kill_group(proc)
            raise
    return rc, time.monotonic() - t0


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of proc, SIGKILL it 15 s later if it is still there."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, n: int = 60) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join(lines[-n:])


@dataclass(frozen=True)
class Cluster:
    state_dir: Path
    conf: Path
    cpus: int
    mem_mb: int
    start_seconds: float

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "UNET_SLURM_DIR": str(self.state_dir), "SLURM_CONF": str(self.conf),
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}{os.pathsep}/usr/sbin"}


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A running one-node SLURM cluster, stopped (by recorded PIDs) when the module is done."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm-state")
    env = {**os.environ, "UNET_SLURM_DIR": str(state)}
    logs = tmp_path_factory.mktemp("slurm-logs")
    try:
        rc, seconds = _run(["bash", str(HERE / "start_local_slurm.sh")], log=logs / "start.log",
                           timeout=START_TIMEOUT_S, env=env)
        if rc != 0:
            pytest.fail(f"start_local_slurm.sh failed (exit {rc}):\n{_tail(logs / 'start.log')}")
        conf = state / "slurm.conf"
        node = subprocess.run(["sinfo", "-h", "-N", "-o", "%c %m"], env={**env, "SLURM_CONF": str(conf)},
                              capture_output=True, text=True, timeout=30, check=True).stdout.split()
        yield Cluster(state_dir=state, conf=conf, cpus=int(node[0]), mem_mb=int(node[1]),
                      start_seconds=seconds)
    finally:
        rc, _ = _run(["bash", str(HERE / "stop_local_slurm.sh")], log=logs / "stop.log",
                     timeout=STOP_TIMEOUT_S, env=env)
        assert rc == 0, f"stop_local_slurm.sh failed (exit {rc}):\n{_tail(logs / 'stop.log')}"


def _copy_working_tree(dest: Path) -> Path:
    """The repository's working tree (tracked + untracked, not ignored; no tests/benchmarks)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if rel.split("/")[0] in ("tests", "benchmarks") or not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    (dest / "test_override.yaml").write_text(yaml.safe_dump(_override(dest / "config" / "config.yaml")))
    return dest


def _predicted_samples(table: Path) -> int:
    """Rows of a samples table whose stacks are predicted (roles val and predict)."""
    rows = [line.split("\t") for line in table.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return sum(1 for row in rows[1:] if row[-1].strip() in ("val", "predict"))


def _override(config_file: Path) -> dict:
    """OVERRIDE restricted to the keys the default config has (the required ones must exist)."""
    config = yaml.safe_load(config_file.read_text())
    for section, key in REQUIRED_OVERRIDE:
        assert key in config.get(section, {}), f"{config_file}: no {section}.{key} (the test needs it)"
    return {section: {k: v for k, v in values.items() if k in config.get(section, {})}
            for section, values in OVERRIDE.items()}


def _test_profile(cluster: Cluster, dest: Path) -> Path:
    """profiles/slurm with the test-only changes this one-node cluster needs (see module doc)."""
    prof = yaml.safe_load(PROFILE.read_text())
    prof["slurm-status-command"] = "squeue"  # no slurmdbd here, so sacct fails (MinJobAge=300 s)
    # First poll 1 s after a submission, not 40 s (the plugin adds 10 s per poll that finds nothing
    # finished and starts over when one finishes): the chain's jobs of 2-12 s are then seen after
    # 12 s, not 20 s, over about 14 steps.
    prof["slurm-init-seconds-before-status-checks"] = 1
    mem_cap = cluster.mem_mb // (PREDICT_JOBS + 1)
    prof["default-resources"]["mem_mb"] = min(prof["default-resources"]["mem_mb"], mem_cap)
    for rule, res in prof["set-resources"].items():
        # Let the K predict jobs share the node, so the scatter really runs side by side.
        cap = max(1, cluster.cpus // PREDICT_JOBS) if rule == "predict" else cluster.cpus
        res["cpus_per_task"] = min(res["cpus_per_task"], cap)
        if rule in prof.get("set-threads", {}):
            prof["set-threads"][rule] = res["cpus_per_task"]
        res["mem_mb"] = min(res["mem_mb"], mem_cap)
        for key in ("gpu", "gpu_model", "gres"):
            res.pop(key, None)  # no GPU on this node: device "auto" runs on the CPU
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(prof, sort_keys=False))
    return dest


def _chunk_and_tiff_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every Zarr chunk file (files under a Zarr array, metadata excluded) and TIFF."""
    arrays = set()
    for meta in root.rglob("zarr.json"):
        if json.loads(meta.read_text()).get("node_type") == "array":
            arrays.add(meta.parent)
    arrays.update(p.parent for p in root.rglob(".zarray"))
    hashes = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or ".snakemake" in path.parts or path.name in ZARR_META:
            continue
        in_array = any(parent in arrays for parent in path.parents)
        if in_array or path.suffix.lower() in (".tif", ".tiff"):
            hashes[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_(\w+)/")
JOBCOMP = re.compile(r"JobId=(\d+) .*?JobState=(\S+) .*?StartTime=(\S+) EndTime=(\S+)")


def _submitted_jobs(log: Path) -> dict[str, list[int]]:
    jobs: dict[str, list[int]] = {}
    for jobid, rule in SUBMITTED.findall(log.read_text(errors="replace")):
        jobs.setdefault(rule, []).append(int(jobid))
    return jobs


def _completed_jobs(jobcomp_log: Path) -> dict[int, tuple[str, dt.datetime, dt.datetime]]:
    records = {}
    for jobid, state, start, end in JOBCOMP.findall(jobcomp_log.read_text()):
        records[int(jobid)] = (state, dt.datetime.fromisoformat(start), dt.datetime.fromisoformat(end))
    return records


def test_slurm_profile_covers_every_rule() -> None:
    prof = yaml.safe_load(PROFILE.read_text())
    assert prof["executor"] == "slurm"
    for key in ("jobs", "latency-wait", "default-resources", "set-resources", "set-threads"):
        assert key in prof, f"profiles/slurm/config.yaml lacks {key!r}"
    for key in ("mem_mb", "runtime", "cpus_per_task"):
        assert key in prof["default-resources"], f"default-resources lacks {key}"
    assert set(prof["set-resources"]) == set(RULES)
    for rule, res in prof["set-resources"].items():
        assert isinstance(res["mem_mb"], int) and res["mem_mb"] > 0, rule
        assert isinstance(res["cpus_per_task"], int) and res["cpus_per_task"] >= 1, rule
        # train's wall-clock limit comes from config train.runtime_min (set by the rule)
        assert ("runtime" in res) == (rule != "train"), rule
        # the program must use the CPUs SLURM allocates: threads == cpus_per_task
        assert prof["set-threads"].get(rule, 1) == res["cpus_per_task"], rule
        if rule in GPU_RULES:
            # plugin 2.x: integer `gpu` -> --gpus=N; never both gpu and gres (two flags)
            assert isinstance(res.get("gpu"), int) and res["gpu"] >= 1, rule
            assert "gres" not in res, rule
        else:
            assert not {"gpu", "gres", "gpu_model"} & set(res), rule
    assert set(prof["set-threads"]) == set(THREADED_RULES)


def test_slurm_profile_rules_exist_in_workflow() -> None:
    out = subprocess.run([str(BIN / "snakemake"), "--list-rules"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    workflow_rules = set(out.stdout.split()) - {"all"}
    assert workflow_rules == set(RULES), "profiles/slurm must list exactly the workflow's rules"


@pytest.mark.slurm
@pytest.mark.timeout(START_TIMEOUT_S + LOCAL_TIMEOUT_S + SLURM_TIMEOUT_S + 2 * STOP_TIMEOUT_S)
def test_workflow_under_slurm_equals_local_run(slurm_cluster: Cluster, tmp_path: Path) -> None:
    env = slurm_cluster.env
    snakemake = str(BIN / "snakemake")
    # the demo's config, then the override on top (a --configfile alone takes the keys it leaves out
    # from the schema's defaults, not from config/config.yaml)
    common = ["--configfile", "config/config.yaml", "test_override.yaml"]

    profile = _test_profile(slurm_cluster, tmp_path / "profile")
    # The same threads per rule in both runs: this test compares executors. (Whether results
    # are independent of the thread count is the reproducibility test's business.)
    threads = yaml.safe_load((profile / "config.yaml").read_text())["set-threads"]
    local = _copy_working_tree(tmp_path / "local")
    on_slurm = _copy_working_tree(tmp_path / "slurm")
    # The local run goes beside the SLURM run, which mostly waits on submissions and status polls:
    # about a minute less for the suite; neither run's bytes depend on the other (fixed threads).
    with ThreadPoolExecutor(1) as pool:
        local_run = pool.submit(_run, [snakemake, "--set-threads", *(f"{r}={n}" for r, n in threads.items()),
                                       *common], cwd=local, env=env, log=tmp_path / "local.log",
                                timeout=LOCAL_TIMEOUT_S)
        rc, slurm_s = _run([snakemake, "--workflow-profile", str(profile), *common], cwd=on_slurm, env=env,
                           log=tmp_path / "slurm.log", timeout=SLURM_TIMEOUT_S)
        local_rc, local_s = local_run.result()
    assert local_rc == 0, f"the LOCAL run failed (exit {local_rc}; not a SLURM problem):\n{_tail(tmp_path / 'local.log')}"
    assert rc == 0, f"the SLURM run failed (exit {rc}):\n{_tail(tmp_path / 'slurm.log')}"

    timings = {"cluster_start_s": round(slurm_cluster.start_seconds, 1), "local_run_s": round(local_s, 1),
               "slurm_run_s": round(slurm_s, 1), "node_cpus": slurm_cluster.cpus}
    print(f"\nSLURM workflow timings: {json.dumps(timings)}")

    # Same bytes in every chunk and TIFF.
    expected = _chunk_and_tiff_hashes(local)
    got = _chunk_and_tiff_hashes(on_slurm)
    assert any("prediction.ome.zarr" in p for p in expected), "the local run wrote no prediction chunks"
    assert any(p.endswith(".tif") for p in expected), "the local run wrote no TIFF"
    assert sorted(got) == sorted(expected), "the SLURM run wrote a different set of chunk/TIFF files"
    differing = [p for p in expected if got[p] != expected[p]]
    assert not differing, f"{len(differing)} of {len(expected)} files differ, e.g. {differing[:5]}"

    # Every default rule ran as SLURM jobs, all COMPLETED; the predict scatter as PREDICT_JOBS jobs.
    submitted = _submitted_jobs(tmp_path / "slurm.log")
    assert set(submitted) == set(RULES) - set(OPTIONAL_RULES), f"rules submitted to SLURM: {sorted(submitted)}"
    records = _completed_jobs(slurm_cluster.state_dir / "log" / "jobcomp.log")
    for rule, ids in submitted.items():
        for jobid in ids:
            assert jobid in records, f"SLURM job {jobid} ({rule}) is not in the controller's job log"
            assert records[jobid][0] == "COMPLETED", f"SLURM job {jobid} ({rule}): {records[jobid][0]}"
    predict_ids = submitted["predict"]
    predicted = _predicted_samples(REPO / "config" / "samples.tsv")
    assert len(set(predict_ids)) == PREDICT_JOBS * predicted, f"predict ran as SLURM jobs {predict_ids}"
    spans = sorted(records[j][1:] for j in predict_ids)
    overlapping = any(later[0] < earlier[1] for i, earlier in enumerate(spans) for later in spans[i + 1:])
    assert overlapping, f"no two predict jobs ran at the same time: {spans}"
    # the merge ran in pieces: each pass over pixels as MERGE_JOBS SLURM jobs per predicted sample
    for rule in ("merge_seeds", "merge_cells", "merge_write"):
        assert len(set(submitted[rule])) == MERGE_JOBS * predicted, f"{rule} ran as SLURM jobs {submitted[rule]}"
