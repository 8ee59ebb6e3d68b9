"""Helpers of the fault suite (issue 7): run ``unet``/``snakemake`` as a user would, kill
process groups, check one-line errors, fingerprint what is on disk, and read the exact shell
command of every job of a workflow run.

Fault seeds: ``UNET_FAULT_SEEDS=N`` runs every kill test with seeds 0..N-1 (default: a
subset, one seed per stage, so the suite stays CI-sized).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SNAKEMAKE = BIN / "snakemake"
UNET = BIN / "unet"
SNAKEFILE = REPO / "workflow" / "Snakefile"
CONFIG = "tests/integration/config.yaml"
# jobs call `unet`: the one installed beside this interpreter
ENV = {**os.environ, "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
FAULT_SEEDS = int(os.environ.get("UNET_FAULT_SEEDS", "0"))


def fault_seeds(default: tuple[int, ...] = (0,)) -> list[int]:
    """Seeds of the kill tests: 0..UNET_FAULT_SEEDS-1 when set, else ``default``."""
    return list(range(FAULT_SEEDS)) if FAULT_SEEDS > 0 else list(default)


# ---------------------------------------------------------------- running things


def run_unet(*args: str | os.PathLike[str], cwd: Path | None = None, timeout: int = 300,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """``unet ARGS`` as a subprocess (the installed console script), text output captured."""
    return subprocess.run([str(UNET), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env or ENV)


def snakemake(workdir: Path, *args: str, configfiles: tuple[str, ...] = (), check: bool = True,
              timeout: int = 900) -> subprocess.CompletedProcess:
    """Run snakemake on the tiny config (plus ``configfiles``) in ``workdir``."""
    cmd = [str(SNAKEMAKE), "-s", str(SNAKEFILE), "--configfile", CONFIG, *configfiles, *args]
    res = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout, env=ENV)
    if check and res.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def start_in_new_group(cmd: list[str] | str, *, cwd: Path, shell: bool = False) -> subprocess.Popen:
    """Start ``cmd`` as the leader of a new process group (so the whole tree can be killed)."""
    return subprocess.Popen(cmd, cwd=cwd, env=ENV, shell=shell, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s whole process group and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate(timeout=60)


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live descendant of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                cmdline = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            found.append((child, cmdline))
            todo.append(child)
    return found


def wait_for_child(proc: subprocess.Popen, pattern: str, *, timeout: float = 300) -> int | None:
    """Wait until a descendant of ``proc`` whose command line matches ``pattern`` runs;
    its pid, or None if ``proc`` ended first."""
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while time.monotonic() < deadline and proc.poll() is None:
        for pid, cmdline in descendants(proc.pid):
            if regex.search(cmdline):
                return pid
        time.sleep(0.05)
    return None


# ---------------------------------------------------------------- user-facing errors


def assert_one_line_error(res: subprocess.CompletedProcess, *must_name: str) -> str:
    """The run failed with exit status 2 and one ``unet STAGE: error: ...`` line naming each of
    ``must_name`` (file, key, problem), and no Python traceback; returns that line."""
    err = res.stderr
    assert res.returncode == 2, f"exit {res.returncode}, expected 2\nstdout: {res.stdout[-2000:]}\nstderr: {err[-4000:]}"
    assert "Traceback" not in err + res.stdout, err[-4000:]
    lines = [line for line in err.splitlines() if ": error:" in line]
    assert len(lines) == 1, err[-4000:]
    line = lines[0]
    for name in must_name:
        assert name.lower() in line.lower(), f"{name!r} not named in: {line}"
    return line


# ---------------------------------------------------------------- fingerprints


def model_digest(path: Path) -> str:
    """sha256 of a model file's content: format, architecture, metadata and the raw bytes of
    every tensor (so equal means bit-identical weights).

    Not of the file's bytes: ``torch.save`` writes a fresh random ``.data/serialization_id``
    into every file, and pickle's memo depends on object identity, so two saves of the very
    same weights differ as files."""
    import json

    import torch

    data = torch.load(path, map_location="cpu", weights_only=True)
    digest = hashlib.sha256()
    rest = {k: v for k, v in data.items() if k != "state_dict"}
    digest.update(json.dumps(rest, sort_keys=True, default=str).encode())
    for name, tensor in sorted(data.get("state_dict", {}).items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return "model:" + digest.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of the bytes; of the content for model files (see :func:`model_digest`)."""
    if path.name == "model.pt":
        return model_digest(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(root: Path, *, skip=lambda rel: False) -> dict[str, str]:
    """{relative path: sha256} of every file below ``root`` (or of ``root`` itself)."""
    root = Path(root)
    if root.is_file():
        return {root.name: file_digest(root)}
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not path.is_symlink() and not skip(rel):
            out[rel] = file_digest(path)
    return out


def tree_state(root: Path) -> dict[str, tuple[int, int, str]]:
    """{relative path: (size, mtime_ns, sha256)} of every file below ``root``: proves inputs untouched."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            st = path.stat()
            out[path.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns,
                                                      hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def _volatile(rel: str) -> bool:
    """Files that legitimately differ between two identical runs: logs and benchmarks (timings),
    Snakemake's timestamp flags, figures and JSON/CSV reports that carry timings or paths (their
    numbers are compared by tests/integration), and the model file's metadata-bearing siblings."""
    name = rel.rsplit("/", 1)[-1]
    if rel.startswith(("results/logs/", "logs/")) or name == ".snakemake_timestamp" or name == "zarr.json":
        return True
    if "/predict/part-" in rel and (name == "COMPLETE" or "/done/" in rel):
        return True  # job summaries with timings; their data chunks are compared
    if rel.startswith("results/model/") and name != "model.pt":
        return True  # state.pt / model.ts / card / curve / metrics.csv carry timings
    return name.endswith((".png", ".csv", ".json")) and not name == "class_weights.json"


def data_digest(workdir: Path) -> dict[str, str]:
    """sha256 of every data file the workflow wrote (see :func:`_volatile` for what is left out)."""
    return tree_digest(Path(workdir), skip=lambda rel: not rel.startswith(("results/", "resources/")) or _volatile(rel))


def leftovers(workdir: Path) -> list[str]:
    """Temporary siblings of atomic outputs (``.NAME.tmp-PID-XXXX``) anywhere under results/."""
    return sorted(p.relative_to(workdir).as_posix() for p in (Path(workdir) / "results").rglob(".*.tmp-*"))


# ---------------------------------------------------------------- the reference run


@dataclass(frozen=True)
class Job:
    rule: str
    outputs: tuple[str, ...]
    command: str


def new_workdir(path: Path) -> Path:
    """A working directory holding the tiny config (tests/integration), config/ and profiles/
    (so Snakemake applies the default profile as in a user's checkout: rerun-incomplete etc.)."""
    (path / "tests").mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "tests" / "integration", path / "tests" / "integration",
                    ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    shutil.copytree(REPO / "config", path / "config")
    shutil.copytree(REPO / "profiles", path / "profiles")
    return path


def clone_run(src: Path, dst: Path) -> Path:
    """Copy a finished working directory (modification times kept, so nothing is out of date)."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("locks", "incomplete"))
    return dst


#: The merge's rules in the order of its rounds (workflow/rules/merge.smk).
MERGE_ROUNDS = ("merge_start", "merge_seeds", "merge_number_seeds", "merge_cells", "merge_number_cells", "merge_write",
                "merge")


def parse_jobs(dry_run_text: str) -> list[Job]:
    """The jobs of ``snakemake -n -p`` output: rule, outputs, exact shell command."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", dry_run_text):
        head = re.match(r"(?:local)?rule (\w+):", block)
        cmd = re.search(r"^Shell command: (.*)$", block, re.M)
        if not head or not cmd:
            continue
        out = re.search(r"^\s+output: (.*)$", block, re.M)
        outputs = tuple(o.strip() for o in out.group(1).split(", ")) if out else ()
        jobs.append(Job(head.group(1), outputs, cmd.group(1)))
    return jobs


@dataclass(frozen=True)
class Reference:
    workdir: Path
    digest: dict[str, str]
    jobs: list[Job]
    seconds: dict[str, float]

    def job(self, rule: str) -> Job:
        """The rule's job; for ``merge``, the whole merge of the sample: its rounds (``merge_start`` ...
        ``merge`` = finish, the pieces of a round in order) chained into one command, the stage as a
        user would run it by hand (the finish round alone has nothing to finish without the others)."""
        job = next(j for j in self.jobs if j.rule == rule)
        if rule != "merge":
            return job
        rounds = [r for r in MERGE_ROUNDS if any(j.rule == r for j in self.jobs)]
        chain = [j for r in rounds for j in sorted((j for j in self.jobs if j.rule == r), key=lambda j: j.outputs)]
        return Job(rule, job.outputs, " && ".join(f"({j.command})" for j in chain))
