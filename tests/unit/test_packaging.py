"""Packaging: pyproject.toml and environment.yml agree; the quick start is mechanical."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _spec(req: str) -> str:
    req = re.sub(r"\[.*?\]", "", req)
    return req[len(_name(req)):].strip()


def test_environment_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_name(r): _spec(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    conda, pip = {}, {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip.update({_name(r): _spec(r) for r in dep["pip"] if not r.startswith("-")})
        else:
            conda[_name(dep)] = _spec(dep)
    conda.pop("python"), conda.pop("pip")
    # torch comes from pip (pinned build); pyproject declares a range that admits the pin
    assert pip.pop("torch") == "==2.13.0" and wanted.pop("torch") == ">=2.4"
    assert conda == wanted
    assert pip == {}


def test_quick_start_is_two_commands_run_first():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```[a-z]*\n(.*?)```", section, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert commands == ["./run.sh", "./test.sh"]
    assert "bash ./test.sh" in (REPO / ".ci/run").read_text()
    assert "--cores all" in (REPO / "run.sh").read_text()
    assert "torch==2.13.0" in (REPO / "scripts/setup-venv.sh").read_text()


def test_python_dash_m_runs_the_cli():
    """``python -m unet_core`` is the ``unet`` command where no console script is installed."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "unet_core", "--version"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0 and res.stdout.startswith("unet-pipeline "), res.stderr
    res = subprocess.run([sys.executable, "-m", "unet_core", "merge"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 2 and "usage: unet merge" in res.stderr, res.stderr
