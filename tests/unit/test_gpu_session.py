"""scripts/gpu-session.sh, proven on the CPU before a GPU is lent (issue 34 item 4).

The dry run runs the script's own steps (prepare, check, isbi) with tiny settings: the wheels it
carries (rebuilt offline from this venv) installed with the machine's pip command, the `unet`
shim, and every stage and gpu_check.py under the import gate (only the GPU machine's packages
and the carried wheels importable).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu-session.sh"
GATE = REPO / "scripts" / "gpu_import_gate.py"


def _session(*args: str, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_dry_run_runs_the_sessions_two_commands_on_the_cpu(isbi_dir: Path, tmp_path: Path) -> None:
    run = _session("--dry-run", env={"ISBI": str(isbi_dir), "DRY_DIR": str(tmp_path)})
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert re.search(r"gpu-session --dry-run: passed in \d+ s", run.stdout), log[-2000:]
    out = tmp_path / "out"
    # the carried wheels are what the commands import (installed by the machine's pip command)
    assert "zarr 3" in run.stdout and f"from {tmp_path}/site/zarr/__init__.py" in run.stdout, log[-4000:]
    assert f"unet: {tmp_path}/bin/unet, unet-pipeline" in run.stdout
    # command 1: every row of gpu_check.py, run under the gate
    assert "import gate: gpu_check.py ran with only the standard library" in run.stdout
    rows = dict(re.findall(r"^\| (.+?) \| (.+?) \|$", (out / "gpu_check.md").read_text(), re.MULTILINE))
    for row in ("matmul ceiling", "in memory", "unet predict", "training", "elastic deformation", "argmax"):
        assert any(n.startswith(row) for n in rows), (row, list(rows))
    # command 2: each stage the workflow lists, in its order, timed, gated, ending in scores
    stages = (tmp_path / "gpu" / "isbi_stages.sh").read_text().splitlines()
    for stage in ("ingest", "class-weights", "weights", "augment", "train", "predict", "merge", "evaluate"):
        assert any(s.startswith(f"unet {stage} ") for s in stages), stage
    times = (out / "times.txt").read_text().splitlines()
    assert len(times) == len(stages) + 1 and times[-1].startswith("whole workflow: "), times
    assert [t.split("  ", 1)[1] for t in times[:-1]] == [s[:110] for s in stages]
    for stage in stages:
        log_file = Path(stage.rsplit("> ", 1)[1].removesuffix(" 2>&1"))
        assert "import gate: unet_core.cli ran with only the standard library" in log_file.read_text(), log_file
    scores = (out / "scores.txt").read_text()
    assert scores.startswith("isbi_test {'pixel_error': ") and "\nisbi_val {'pixel_error': " in scores, scores
    assert (out / "train_metrics.csv").read_text().startswith("iteration,")


def test_dry_run_without_the_isbi_data_skips_with_a_reason(tmp_path: Path) -> None:
    run = _session("--dry-run", env={"ISBI": str(tmp_path / "none"), "DRY_DIR": str(tmp_path / "dry")}, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"gpu-session --dry-run: skipped: no ISBI 2012 data at {tmp_path}/none" in run.stdout
    assert not (tmp_path / "dry").exists()


def test_the_isbi_command_is_the_profile_with_3500_iterations() -> None:
    """The second command's workflow: config/isbi2012.yaml with only the iterations lowered to fit
    10 minutes (scripts/gpu-session-isbi.yaml says why)."""
    def train_command(*configs: str) -> str:
        run = subprocess.run([str(REPO / ".venv" / "bin" / "snakemake"), "-n", "-p", "--cores", "16",
                              "--configfile", *configs, "--config", "output_dir=/tmp/unet-gpu-session-probe"],
                             cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
        return next(line for line in run.stdout.splitlines() if line.startswith("Shell command: unet train "))

    profile = train_command("config/isbi2012.yaml")
    session = train_command("config/isbi2012.yaml", "scripts/gpu-session-isbi.yaml")
    assert "--iterations 6000" in profile
    assert session == profile.replace("--iterations 6000", "--iterations 3500")
    assert "CONFIGS=(${CONFIG:-config/isbi2012.yaml scripts/gpu-session-isbi.yaml})" in SCRIPT.read_text()


def test_the_gate_runs_a_command_and_passes_its_arguments_and_exit_status(tmp_path: Path) -> None:
    """The dry run's `unet` shim: ``--module M -- ARGS`` runs ``M.main(ARGS)`` gated and exits with
    its status; a module the machine lacks is named when the command fails."""
    (tmp_path / "probe.py").write_text("import sys\n"
                                       "def main(argv):\n"
                                       "    print('args', argv)\n"
                                       "    if argv == ['yaml']:\n"
                                       "        import yaml\n"
                                       "    return int(argv[0]) if argv[0].isdigit() else 0\n")
    machine = tmp_path / "machine.txt"
    machine.write_text("numpy\n")
    base = [sys.executable, str(GATE), "--machine", str(machine), "--carried", "probe", "--module", "probe", "--"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    ok = subprocess.run([*base, "0", "a b"], env=env, capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "args ['0', 'a b']" in ok.stdout, ok.stdout + ok.stderr
    assert "import gate: probe ran with only the standard library" in ok.stdout
    failed = subprocess.run([*base, "3"], env=env, capture_output=True, text=True, check=False)
    assert failed.returncode == 3 and "import gate: probe exited 3" in failed.stdout, failed.stdout
    missing = subprocess.run([*base, "yaml"], env=env, capture_output=True, text=True, check=False)
    assert missing.returncode == 1 and "import gate: probe needs 'yaml'" in missing.stdout, missing.stdout


def test_repacked_wheels_install_with_the_machines_pip_command(tmp_path: Path) -> None:
    """The dry run's stand-in for ``pip download``: a wheel rebuilt from an installed distribution
    (here locket, tagged py2 and py3) installs with ``pip install --no-index --no-deps --target``
    and is imported from there."""
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "repack_wheels.py"), str(tmp_path / "whl"),
                          "locket", "not-a-distribution-here"], capture_output=True, text=True, check=True)
    assert re.fullmatch(r"locket-[\d.]+-py2.py3-none-any.whl\n", run.stdout), run.stdout
    assert "not-a-distribution-here is not installed here" in run.stderr
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(tmp_path / "site"), *map(str, (tmp_path / "whl").iterdir())], check=True)
    where = subprocess.run([sys.executable, "-c", "import locket; print(locket.__file__)"],
                           env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where == str(tmp_path / "site" / "locket" / "__init__.py")
