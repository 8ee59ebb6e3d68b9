"""Network passes filled across blocks and slices (issue 34, item 3).

Small images (one tile per block) reached ``predict.batch_size`` only if a pass could take tiles
of several blocks; before, each block ran its own passes, so batch 4 ran one tile per pass.
Every pass now has exactly the batch size (a partial one padded with zero tiles): a tile's bytes
then do not depend on which blocks share its pass, so one job equals K jobs, any block order, a
resumed job, and each block predicted by itself, byte for byte.
"""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest
import torch

from unet_core.common.intensity import Scaling
from unet_core.infer.engine import Engine, run_blocks
from unet_core.infer.tiling import Block, Tiling, transforms
from unet_core.model.spec import UNetSpec
from unet_core.model.unet import UNet

TINY = UNetSpec(depth=2, base_channels=4, dropout=0.0)  # stride 4, context 20
THREE = UNetSpec(depth=2, base_channels=4, dropout=0.0, n_classes=3)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in tests/conftest.py


def _per_slice(z: int) -> Scaling:
    """Different statistics per slice, so a pass mixing slices must normalise each row with its own."""
    return Scaling(90.0 + 7.0 * z, 25.0 + 3.0 * z)


def _engine(model: torch.nn.Module, tiling: Tiling, **kw) -> Engine:
    return Engine(model, tiling, stats=_per_slice, device=torch.device("cpu"), **kw)


def _run(engine: Engine, image: np.ndarray, blocks: list[Block]) -> dict[tuple, bytes]:
    """Each block's (probabilities, segmentation) bytes, predicted by run_blocks in one stream."""
    out: dict[tuple, bytes] = {}
    lock = threading.Lock()

    def write(result) -> None:
        with lock:
            out[result.block.index] = result.probabilities.tobytes() + result.segmentation.tobytes()

    run_blocks(engine, image, blocks, write, desc="test", readers=2)
    assert len(out) == len(blocks)
    return out


def _alone(engine: Engine, image: np.ndarray, blocks: list[Block]) -> dict[tuple, bytes]:
    """Each block predicted by itself (its own passes, the last one padded)."""
    out = {}
    for block in blocks:
        r = engine.predict(engine.stage(image, block))()
        out[block.index] = r.probabilities.tobytes() + r.segmentation.tobytes()
    return out


@pytest.fixture
def passes(monkeypatch) -> list[int]:
    """The batch size (rows of the network input) of every network pass."""
    seen: list[int] = []
    real = Engine._network

    def recording(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        seen.append(x.shape[0])
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(Engine, "_network", recording)
    return seen


def _passes_per_block(tiling: Tiling, blocks: list[Block], tta: str, batch: int) -> int:
    """Passes that blocks batched each by themselves need: per block and group of transforms
    (transposed or not), ceil(tiles x transforms / batch)."""
    groups = Counter(tr.transpose for tr in transforms(tta))
    return sum(-(-len(tiling.tiles(b)) * n // batch) for b in blocks for n in groups.values())


def _image(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(3).normal(100, 30, shape).astype(np.float32)


def test_passes_fill_the_batch_across_one_tile_blocks_and_slices(passes) -> None:
    # 3 slices x 2 x 2 blocks of one 16-px tile each: batch 4 ran 12 passes of one tile, now 3 of
    # four tiles (each pass mixing blocks; the stream crosses slices); 10 blocks: 4 + 4 + 2 padded
    image = _image((3, 32, 32))
    tiling = Tiling(image.shape, TINY, block_px=16, tile_out=16)
    blocks = list(tiling.blocks())
    assert len(blocks) == 12 and all(len(tiling.tiles(b)) == 1 for b in blocks)
    torch.manual_seed(0)
    engine = _engine(UNet(TINY), tiling, batch=4, encoding="float32")
    batched = _run(engine, image, blocks)
    assert passes == [4] * 3, passes
    passes.clear()
    assert _run(engine, image, blocks[:10]) == {b.index: batched[b.index] for b in blocks[:10]}
    assert passes == [4] * 3, passes  # the last one: two tiles and two rows of zeros


@pytest.mark.parametrize(("spec", "tta", "encoding", "batch"), [
    (TINY, "none", "float32", 4), (TINY, "none", "uint8", 6), (TINY, "flips", "float16", 5),
    (THREE, "d4", "float32", 3), (THREE, "none", "uint8", 2),
], ids=["two-class", "two-class-uint8", "flips", "three-class-d4", "three-class"])
def test_batched_blocks_equal_each_block_alone_any_jobs_order_and_resume(passes, spec, tta, encoding,
                                                                         batch) -> None:
    # edge blocks (tiles of 12 x 12, 12 x 8, 8 x 12, 8 x 8 px; d4 also transposed: a block's
    # second group of transforms waits for its first) and two slices: passes span blocks, and
    # every block's bytes equal those of the block by itself, of 1, 2 or 3 jobs, of the blocks in
    # reverse order and of a job resumed after half its blocks
    image = _image((2, 45, 38))
    tiling = Tiling(image.shape, spec, block_px=32, tile_out=12)
    blocks = list(tiling.blocks())
    torch.manual_seed(0)
    engine = _engine(UNet(spec), tiling, batch=batch, tta=tta, encoding=encoding)
    whole = _run(engine, image, blocks)
    assert set(passes) == {batch}, passes  # every pass has the batch size
    assert len(passes) < _passes_per_block(tiling, blocks, tta, batch)  # passes span blocks
    assert _alone(engine, image, blocks) == whole
    for jobs in (2, 3):
        parts: dict[tuple, bytes] = {}
        for job in range(jobs):
            parts |= _run(engine, image, tiling.job_blocks(job, jobs))
        assert parts == whole, jobs
    assert _run(engine, image, blocks[::-1]) == whole
    assert _run(engine, image, blocks[len(blocks) // 2:]) == {b.index: whole[b.index] for b in blocks[len(blocks) // 2:]}


def test_batched_probabilities_equal_batch_one_to_float_rounding() -> None:
    # a tile's network output differs in its last bits between a pass of one tile and of several
    # (oneDNN picks another algorithm for batch 1; measured max 8e-6 on the logits of this net),
    # not between passes of the same size: batch 1 stays today's bytes, batch 4 within rounding.
    # The probabilities differ by < 1e-6 on an AVX-512 CPU and by 2.2e-6 on an AVX2-only one (AMD
    # EPYC Zen 3, 2026-12-07: other oneDNN kernels): the project's float bound, 1e-5
    image = _image((3, 32, 32))
    tiling = Tiling(image.shape, THREE, block_px=16, tile_out=16)
    torch.manual_seed(0)
    model = UNet(THREE)
    probs = {}
    for batch in (1, 4):
        out = _run(_engine(model, tiling, batch=batch, encoding="float32"), image, list(tiling.blocks()))
        probs[batch] = np.frombuffer(b"".join(v[: 3 * 16 * 16 * 4] for _, v in sorted(out.items())), np.float32)
    assert np.abs(probs[4] - probs[1]).max() < 1e-5
