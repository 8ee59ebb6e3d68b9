"""The engine raises glibc's malloc thresholds for 2-D blocks only (issue 36, peak RSS of 3-D jobs).

:func:`unet_core.common.memory.reuse_freed_memory` keeps freed memory below 1 GiB in the process,
which pays for 2-D blocks (tensors of tens of MB, page-faulted afresh otherwise). A 3-D network's
activations are hundreds of MB a pass; kept and carved from one heap they fragment it, and a job's
peak RSS grew from 1.33 to 1.77-1.86 GB from the second pass on (benchmarks/RESULTS.md, "3-D peak
RSS of predict and merge"). So a 3-D tiling leaves the thresholds as they are; the probabilities do
not depend on it.
"""

from __future__ import annotations

import numpy as np
import torch

from unet_core.common.intensity import IntensityStats
from unet_core.infer import engine
from unet_core.infer.predict import predict_plane
from unet_core.model.spec import UNetSpec
from unet_core.model.unet import UNet


def calls(monkeypatch) -> list[int]:
    seen: list[int] = []
    monkeypatch.setattr(engine, "reuse_freed_memory", lambda: seen.append(1) or True)
    return seen


def test_a_3d_prediction_leaves_the_malloc_thresholds_and_a_2d_one_raises_them(monkeypatch) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    stats = IntensityStats(0.0, 1.0)
    seen = calls(monkeypatch)
    net3 = UNet(UNetSpec(depth=1, base_channels=2, dropout=0.0, dims=3, pool_z=(2,), kernel_z=(3, 3)))
    out3 = predict_plane(net3, rng.normal(size=(4, 16, 16)).astype(np.float32), stats=stats, block_px=16,
                         tile_out=8, block_z=2)
    assert out3.shape == (2, 4, 16, 16) and seen == []
    net2 = UNet(UNetSpec(depth=1, base_channels=2, dropout=0.0))
    out2 = predict_plane(net2, rng.normal(size=(16, 16)).astype(np.float32), stats=stats, block_px=16, tile_out=8)
    assert out2.shape == (2, 1, 16, 16) and seen == [1]
