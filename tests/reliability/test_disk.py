"""Full disk and read-only output (issue 7, part 6).

A tiny tmpfs (``mount -t tmpfs -o size=...``, needs root or CAP_SYS_ADMIN; skipped with the
reason otherwise) stands for a full file system, a read-only tmpfs for a read-only output
directory. Each stage must stop with one line saying what happened, leave no output (and no
temporary files eating the little space there is), and leave its inputs untouched. (Root ignores
file permissions, so ``chmod`` cannot make a read-only directory here; the mount can.)
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from faults import assert_one_line_error, run_unet, tree_state

MODEL_ARGS = ["--depth", "2", "--base-channels", "4", "--dropout", "0"]


@contextmanager
def tmpfs(path: Path, *, size_kb: int, read_only: bool = False) -> Iterator[Path]:
    """Mount a ``size_kb`` tmpfs at ``path`` for the duration (skip the test if not permitted)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size_kb}k" + (",ro" if read_only else "")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or 'mount failed'}): needs root/CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _stage_args(reference, out: Path) -> dict[str, list]:
    r = reference.workdir / "results"
    return {
        "ingest": ["ingest", reference.workdir / "resources/synth/image.tif", out / "stack.ome.zarr",
                   "--labels", reference.workdir / "resources/synth/labels.tif", "--chunks", "1,64,64"],
        "weights": ["weights", r / "tiny_train/stack.ome.zarr", out / "weights.zarr", "--plot-slice", "-1"],
        "augment": ["augment", r / "tiny_train/stack.ome.zarr", r / "tiny_train/weights.zarr", out / "augment.zarr",
                    "--tile-out", "36", "--samples-per-slice", "2", *MODEL_ARGS],
        "train": ["train", "--train", r / "tiny_train/augment.zarr", "--out-dir", out / "model", *MODEL_ARGS,
                  "--iterations", "2", "--batch-size", "2", "--device", "cpu", "--workers", "0"],
        "predict": ["predict", r / "tiny_val/stack.ome.zarr", r / "model/model.pt", out / "part-0.zarr",
                    "--tile-out", "64", "--block-px", "64", "--device", "cpu", *MODEL_ARGS],
        "merge": ["merge", r / "tiny_val/predict/part-0.zarr", r / "tiny_val/predict/part-1.zarr",
                  "--stack", r / "tiny_val/stack.ome.zarr", "-o", out / "prediction.ome.zarr"],
        "evaluate": ["evaluate", r / "tiny_val/prediction.ome.zarr", r / "tiny_val/stack.ome.zarr",
                     "-o", out / "evaluate"],
    }


STAGES = ["ingest", "weights", "augment", "train", "predict", "merge", "evaluate"]
# outputs that are resumable by design (kept so a rerun with more space continues): a part
# store or a training directory (state.pt, metrics.csv) may remain, its completion marker not
RESUMABLE = {"predict": "part-0.zarr/COMPLETE", "train": "model/model.pt"}


def _fill(mount: Path, *, leave_kb: int) -> None:
    """Fill the file system until only about ``leave_kb`` KiB are free."""
    import os

    st = os.statvfs(mount)
    free = st.f_bavail * st.f_frsize
    with open(mount / "ballast", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave_kb * 1024))


@pytest.mark.parametrize("stage", STAGES)
def test_full_disk_gives_one_line_and_leaves_nothing(reference, tmp_path, stage):
    before = tree_state(reference.workdir / "results")
    with tmpfs(tmp_path / "disk", size_kb=1024) as mount:
        _fill(mount, leave_kb=8)
        res = run_unet(*_stage_args(reference, mount)[stage])
        assert_one_line_error(res, "no space left")
        left = sorted(p.relative_to(mount).as_posix() for p in mount.rglob("*")
                      if p.name != "ballast" and not p.is_dir())  # empty output folders may stay
        if stage in RESUMABLE:
            assert not (mount / RESUMABLE[stage]).exists(), left
        else:
            assert left == [], left
    assert tree_state(reference.workdir / "results") == before, "inputs changed"


def _tiff_args(reference, mount: Path, elsewhere: Path) -> dict[str, list]:
    """Stages writing TIFFs (through numpy's ``tofile``, which loses the errno of a short write):
    synth, and merge's --tiff on the full disk beside a prediction written ``elsewhere``."""
    r = reference.workdir / "results/tiny_val"
    return {
        "synth": ["synth", "--image", mount / "image.tif", "--labels", mount / "labels.tif", "--slices", "2",
                  "--size", "64"],
        "merge-tiff": ["merge", r / "predict/part-0.zarr", r / "predict/part-1.zarr", "--stack",
                       r / "stack.ome.zarr", "-o", elsewhere / "prediction.ome.zarr",
                       "--tiff", mount / "segmentation.tif"],
    }


@pytest.mark.parametrize("stage", ["synth", "merge-tiff"])
def test_full_disk_under_a_tiff_names_it(reference, tmp_path, stage):
    """Was 'unet merge: error: 9216 requested and 3648 written' (no file, no cause) and, for synth,
    'no space left on device' without the file."""
    with tmpfs(tmp_path / "disk", size_kb=256) as mount:
        _fill(mount, leave_kb=8)
        res = run_unet(*_tiff_args(reference, mount, tmp_path)[stage])
        line = assert_one_line_error(res, "no space left", str(mount))
        assert ".tif: no space left" in line and ".tmp-" not in line, line
        assert sorted(p.name for p in mount.iterdir()) == ["ballast"]
    # merge: no prediction either (it was put in place before the TIFF was written)
    assert not (tmp_path / "prediction.ome.zarr").exists() and not list(tmp_path.glob(".prediction*"))


@pytest.mark.parametrize("stage", STAGES)
def test_read_only_output_directory_gives_one_line(reference, tmp_path, stage):
    before = tree_state(reference.workdir / "results")
    with tmpfs(tmp_path / "ro", size_kb=64, read_only=True) as mount:
        res = run_unet(*_stage_args(reference, mount)[stage])
        assert_one_line_error(res, str(mount))
        assert list(mount.iterdir()) == []
    assert tree_state(reference.workdir / "results") == before, "inputs changed"
