"""The GPU acceptance script runs: its --quick CPU mode executes every row's code path."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def gpu_check():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))
        sys.modules.pop("gpu_check", None)


def test_gpu_check_quick_runs_every_row_on_the_cpu(gpu_check, tmp_path: Path) -> None:
    table = gpu_check.main(["--quick", "--device", "cpu", "--markdown", str(tmp_path / "table.md")])
    names = [name for name, _ in table.rows]
    for row in ("matmul ceiling", "in memory", "unet predict", "training", "elastic deformation", "argmax"):
        assert any(n.startswith(row) for n in names), (row, names)
    assert "100.000% of pixels agree" in dict(table.rows)[next(n for n in names if n.startswith("argmax"))]
    assert (tmp_path / "table.md").read_text().startswith("| check | result |")


def test_gpu_check_without_a_gpu_says_how_to_run_it(gpu_check, monkeypatch, capsys) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_check.main([])
    assert "no CUDA GPU here" in capsys.readouterr().err


def test_bench_train_reports_steady_state_against_the_ceiling_on_the_cpu(capsys) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_train", BENCH / "bench_train.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(["--iterations", "3", "--depth", "2", "--base-channels", "4", "--tile-out", "44",
                     "--batch-size", "2", "--workers", "0", "--loss-repeats", "1", "--device", "cpu"])
    finally:
        sys.path.remove(str(BENCH))
    out = capsys.readouterr().out
    assert "3 iterations per run, the first 1 excluded" in out and "batch 2" in out
    assert re.search(r"unet train \(steady state\): [\d.]+ tiles/s = [\d.e+-]+ TFLOP/s = [\d.]+% of the fp32", out), out
    assert re.search(r"ratio unet-train/minimal: [\d.]+x", out), out
