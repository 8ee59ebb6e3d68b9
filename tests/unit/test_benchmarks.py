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


def test_bench_scale_quick_runs_every_stage_and_deletes_its_stores(tmp_path: Path, capsys) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_scale", BENCH / "bench_scale.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_scale"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        result = module.main(["--quick", "--workdir", str(tmp_path / "work"), "--markdown", str(tmp_path / "t.md")])
    finally:
        sys.path.remove(str(BENCH))
        sys.modules.pop("bench_scale", None)
    names = [row.name for row in result.rows]
    merge = ([f"merge {step}" for step, _ in module.MERGE_STEPS] if result.merge_form.startswith("stepwise")
             else ["merge (one command)"])
    assert names == ["ingest", "predict (K=2)", *merge, "total"], names
    assert all(row.wall_s > 0 and row.peak_rss_mib > 0 for row in result.rows)
    out = capsys.readouterr().out
    for name in names:
        assert name in out and f"| {name} |" in (tmp_path / "t.md").read_text().replace("**", ""), name
    assert result.work is not None and not result.work.exists()
    assert list((tmp_path / "work").iterdir()) == []


def test_bench_scale_refuses_in_one_line_when_the_disk_is_short(tmp_path: Path, monkeypatch, capsys) -> None:
    import collections
    import shutil

    spec = importlib.util.spec_from_file_location("bench_scale", BENCH / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = module
    try:
        spec.loader.exec_module(module)
        usage = collections.namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**30, 2**30))
        with pytest.raises(SystemExit) as exc:
            module.main(["--slices", "8", "--workdir", str(tmp_path)])
    finally:
        sys.modules.pop("bench_scale", None)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "GiB free" in err, err
    assert list(tmp_path.iterdir()) == []
