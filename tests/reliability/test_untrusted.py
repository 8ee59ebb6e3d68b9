"""Untrusted files and values (issue 7, part 5).

* Model and training-state files load with ``torch.load(weights_only=True)``: a pickle that
  would run code when unpickled is refused with one clear line, and its code never runs, from
  ``unet predict`` (model.pt) as from ``unet train --resume`` (state.pt).
* Truncated or foreign checkpoints, and a training state from another model configuration,
  are refused with one line naming the file.
* Values from the config and the samples table reach the shell only quoted: a sample path
  holding a space, both quote characters, ``$( )`` and ``;`` works through the workflow and
  gives the same bytes as the plain path, and nothing in it is executed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from faults import assert_one_line_error, clone_run, data_digest, run_unet, snakemake, tree_state

MODEL_ARGS = ["--depth", "2", "--base-channels", "4", "--dropout", "0"]


class _Bomb:
    """Unpickling this calls os.system: a stand-in for any code hidden in a .pt file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _bomb(path: Path, marker: Path, *, like: Path) -> Path:
    """A file shaped like the real ``like`` checkpoint, with the code-running object inside."""
    data = torch.load(like, weights_only=True)
    data["metadata" if "metadata" in data else "history"] = _Bomb(marker)  # the format mark stays
    torch.save(data, path)
    return path


def test_pickle_bomb_model_is_refused_and_never_runs(reference, tmp_path):
    marker = tmp_path / "PWNED"
    bomb = _bomb(tmp_path / "bomb.pt", marker, like=reference.workdir / "results/model/model.pt")
    res = run_unet("predict", reference.workdir / "results/tiny_val/stack.ome.zarr", bomb, tmp_path / "p.zarr",
                   *MODEL_ARGS)
    line = assert_one_line_error(res, "bomb.pt", "refused")
    assert "trust" in line
    assert not marker.exists(), "the pickle's code ran"
    assert not (tmp_path / "p.zarr").exists()


def test_pickle_bomb_training_state_is_refused_and_never_runs(reference, tmp_path):
    marker = tmp_path / "PWNED"
    out = tmp_path / "model"
    out.mkdir()
    _bomb(out / "state.pt", marker, like=reference.workdir / "results/model/state.pt")
    res = run_unet("train", "--train", reference.workdir / "results/tiny_train/augment.zarr", "--out-dir", out,
                   *MODEL_ARGS, "--iterations", "6", "--batch-size", "2", "--device", "cpu", "--workers", "0",
                   "--resume")
    assert_one_line_error(res, "state.pt", "refused")
    assert not marker.exists(), "the pickle's code ran"
    assert not (out / "model.pt").exists()


def test_library_load_refuses_the_bomb_too(reference, tmp_path):
    from unet_core.common.errors import CheckpointError
    from unet_core.model.checkpoint import load_model

    marker = tmp_path / "PWNED"
    bomb = _bomb(tmp_path / "bomb.pt", marker, like=reference.workdir / "results/model/model.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_model(bomb)
    assert not marker.exists()


@pytest.mark.parametrize("keep", [pytest.param(0.5, id="half"), pytest.param(0.0, id="empty"),
                                  pytest.param(0.999, id="last-byte-missing")])
def test_truncated_checkpoint_is_refused(reference, tmp_path, keep):
    raw = (reference.workdir / "results/model/model.pt").read_bytes()
    bad = tmp_path / "model.pt"
    bad.write_bytes(raw[: int(len(raw) * keep)])
    res = run_unet("predict", reference.workdir / "results/tiny_val/stack.ome.zarr", bad, tmp_path / "p.zarr",
                   *MODEL_ARGS)
    assert_one_line_error(res, str(bad))
    assert not (tmp_path / "p.zarr").exists()


def test_foreign_torch_file_is_refused(reference, tmp_path):
    other = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7)}, other)
    res = run_unet("predict", reference.workdir / "results/tiny_val/stack.ome.zarr", other, tmp_path / "p.zarr",
                   *MODEL_ARGS)
    assert_one_line_error(res, "resnet.pt", "not a unet-pipeline")


def _nan_weights(data: dict) -> None:
    next(iter(data["state_dict"].values())).fill_(float("nan"))


# model files shaped like ours with one thing wrong: (edit, what the one line must say)
CRAFTED_MODELS = {
    # an architecture no memory holds: refused before anything is allocated (was a traceback)
    "architecture-beyond-memory": (lambda d: d["spec"].update(base_channels=10**12), "do not fit"),
    # a depth far beyond the stored weights (a depth of 10**6 took minutes and gigabytes to build)
    "depth-beyond-the-weights": (lambda d: d["spec"].update(depth=40), "do not fit"),
    # non-finite weights would give NaN probabilities without a word
    "nan-weights": (_nan_weights, "NaN"),
    # metadata prediction and merge use: tracebacks, or silently wrong probabilities before
    "metadata-not-a-dict": (lambda d: d.update(metadata=[1, 2]), "not a dictionary"),
    "unknown-normalisation": (lambda d: d["metadata"].update(intensity_normalisation="bogus"),
                              "intensity_normalisation"),
    "nan-logit-offset": (lambda d: d["metadata"]["decision"].update(logit_offsets=[float("nan"), 0.0]),
                         "logit_offsets"),
    "logit-offsets-of-three-classes": (
        lambda d: d["metadata"]["decision"].update(logit_offsets=[0.0, 1.0, 2.0]), "logit_offsets"),
    "nan-median-object-area": (lambda d: d["metadata"].update(median_object_area_px=float("nan")),
                               "median_object_area_px"),
}


@pytest.mark.parametrize("case", list(CRAFTED_MODELS))
def test_crafted_model_file_is_refused_with_one_line(reference, tmp_path, case):
    edit, says = CRAFTED_MODELS[case]
    data = torch.load(reference.workdir / "results/model/model.pt", weights_only=True)
    edit(data)
    crafted = tmp_path / "crafted.pt"
    torch.save(data, crafted)
    before = tree_state(tmp_path)
    res = run_unet("predict", reference.workdir / "results/tiny_val/stack.ome.zarr", crafted, tmp_path / "p.zarr",
                   "--tile-out", "64", "--block-px", "64", "--device", "cpu", timeout=120)
    assert_one_line_error(res, "crafted.pt", says)
    assert tree_state(tmp_path) == before


def test_resume_from_another_model_configuration_is_refused(reference, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(reference.workdir / "results/model", out)
    before = tree_state(out)
    res = run_unet("train", "--train", reference.workdir / "results/tiny_train/augment.zarr", "--out-dir", out,
                   "--depth", "2", "--base-channels", "8", "--dropout", "0", "--iterations", "6",
                   "--batch-size", "2", "--device", "cpu", "--workers", "0", "--resume")
    assert_one_line_error(res, "state.pt")
    assert tree_state(out) == before, "a refused resume changed the training directory"


WEIRD = "in put/it's a \"stack\" $(touch INJECTED); `touch INJECTED2` & more"


def test_paths_with_spaces_quotes_and_shell_syntax_work_through_the_workflow(reference, tmp_path):
    work = clone_run(reference.workdir, tmp_path / "work dir with 'quotes'")
    shutil.rmtree(work / "results")
    shutil.rmtree(work / ".snakemake", ignore_errors=True)
    folder = work / WEIRD
    folder.mkdir(parents=True)
    for name in ("image", "labels"):
        shutil.copy(reference.workdir / f"resources/synth/{name}.tif", folder / f"{name} 'x'.tif")
    table = work / "tests/integration/samples.tsv"
    text = table.read_text()
    for name in ("image", "labels"):
        text = text.replace(f"resources/synth/{name}.tif", f"{WEIRD}/{name} 'x'.tif")
    table.write_text(text)
    targets = ["results/tiny_train/stack.ome.zarr", "results/tiny_val/stack.ome.zarr"]
    snakemake(work, "--cores", "2", *targets)
    assert not list(work.rglob("INJECTED*")) and not list(Path.cwd().glob("INJECTED*")), "shell syntax was executed"
    got = {k: v for k, v in data_digest(work).items() if k.startswith("results/")}
    want = {k: v for k, v in reference.digest.items() if k.startswith(tuple(targets))}
    assert got == want
