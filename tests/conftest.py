"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ISBI_DIR = Path(os.environ.get("UNET_ISBI_DIR", REPO.parent / "shared" / "datasets" / "isbi2012"))
DSB_DIR = Path(os.environ.get("UNET_DSB_DIR", REPO.parent / "shared" / "datasets" / "dsb2018_fluo_256"))
HELA_DIR = Path(os.environ.get("UNET_HELA_DIR", REPO.parent / "shared" / "datasets" / "dic_hela_seq01"))


@pytest.fixture
def isbi_dir() -> Path:
    """The ISBI 2012 training data; skips the test when it is not on this machine."""
    if not (ISBI_DIR / "train-volume.tif").is_file():
        pytest.skip(f"ISBI 2012 data not found in {ISBI_DIR} (set UNET_ISBI_DIR)")
    return ISBI_DIR


@pytest.fixture(scope="session")
def dsb_dir() -> Path:
    """The DSB2018 fluorescent nuclei (256 x 256); skips the test when they are not on this machine."""
    if not (DSB_DIR / "images.tif").is_file():
        pytest.skip(f"DSB2018 data not found in {DSB_DIR} (set UNET_DSB_DIR)")
    return DSB_DIR


@pytest.fixture(scope="session")
def hela_dir() -> Path:
    """DIC-HeLa sequence 01 (CTC data, never in the repository); skips the test when it is not on this machine."""
    names = ("images.tif", "st-labels.tif", "gt-images.tif", "gt-labels.tif")
    if not all((HELA_DIR / name).is_file() for name in names):
        pytest.skip(f"DIC-HeLa sequence 01 not found in {HELA_DIR} (set UNET_HELA_DIR)")
    return HELA_DIR


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waits on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def merge_probability(tmp_path: Path, monkeypatch):
    """``merge(prob, *, block_px, jobs=1, **settings) -> (instances, stored P(cell))``: runs the
    real predict jobs and merge on a (Z, Y, X) P(cell) map (a stand-in network whose class-1 logit is
    the input pixel, fed logit(P) with z-score statistics 0 and 1; float32 storage, so no ties), so block-wise instance rules can
    be compared with their whole-slice forms. ``settings`` are :class:`MergeSettings` fields
    (``watershed`` as a dict of :class:`WatershedSettings` fields)."""
    import zarr
    from torch import nn

    import unet_core.infer.predict
    from unet_core.evaluate.scoring import open_prediction
    from unet_core.infer.merge import merge_parts
    from unet_core.infer.merge_settings import MergeSettings, WatershedSettings
    from unet_core.infer.predict import predict_job
    from unet_core.io.ngff import PyramidWriter
    from unet_core.model.spec import UNetSpec

    spec = UNetSpec(depth=2, base_channels=4, dropout=0.0)

    class StandIn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.spec = spec

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            c = spec.context
            inner = x[..., c: x.shape[-2] - c, c: x.shape[-1] - c]
            return torch.cat([torch.zeros_like(inner), inner], dim=1)

    model = tmp_path / "standin.pt"
    model.write_bytes(b"stand-in")
    monkeypatch.setattr(unet_core.infer.predict, "load_model", lambda p, expect=None, digest=None: (StandIn(), {}))
    runs = iter(range(1000))

    def merge(prob, *, block_px: int, jobs: int = 1, predict_jobs: int = 1, **settings):
        run = tmp_path / f"run{next(runs)}"
        p = np.clip(np.asarray(prob, np.float64), 1e-6, 1 - 1e-6)
        image = np.log(p / (1 - p)).astype(np.float32)
        root = zarr.open_group(run / "s.ome.zarr", mode="w")
        writer = PyramidWriter(root, image.shape, image.dtype, (1, 32, 32), (1.0, 1.0, 1.0), unit="micrometer")
        for z in range(image.shape[0]):
            writer.write_plane(z, image[z])
        writer.finish()
        root.attrs.update({"unet": {"intensity": {"mean": 0.0, "std": 1.0}}})
        parts = [run / f"part{j}" for j in range(predict_jobs)]
        for j, part in enumerate(parts):
            predict_job(run / "s.ome.zarr", model, part, job=j, jobs=predict_jobs, device="cpu",
                        block_px=block_px, tile_out=min(block_px, 64), probabilities="float32")
        if "watershed" in settings:
            settings["watershed"] = WatershedSettings(**settings["watershed"])
        merge_parts(parts, stack=run / "s.ome.zarr", out=run / "pred.ome.zarr",
                    settings=MergeSettings(jobs=jobs, **settings))
        pred = open_prediction(run / "pred.ome.zarr")
        return pred.instances[:], np.stack([pred.slice(z)[0] for z in range(image.shape[0])])

    return merge
