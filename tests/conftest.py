"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ISBI_DIR = Path(os.environ.get("UNET_ISBI_DIR", REPO.parent / "shared" / "datasets" / "isbi2012"))
DSB_DIR = Path(os.environ.get("UNET_DSB_DIR", REPO.parent / "shared" / "datasets" / "dsb2018_fluo_256"))


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


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waits on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
