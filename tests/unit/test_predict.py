"""Overlap-tile inference: stitching with a stand-in model, part stores, resume, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from unet_core.cli import main
from unet_core.common.device import resolve_device
from unet_core.common.errors import CheckpointError, UserInputError
from unet_core.common.mirror import mirror_index
from unet_core.common.intensity import IntensityStats, Normalisation, RunningStats, normalize, slice_stats_to_attrs
from unet_core.common.provenance import sha256_files
from unet_core.infer.part_store import PartStore
from unet_core.common.precision import cpu_has_native_bf16, resolve_precision
from unet_core.infer.engine import Engine
from unet_core.infer.predict import job_device, predict_job, predict_plane
from unet_core.infer.tiling import Tiling, tile_read_box
from unet_core.io.ngff import PyramidWriter, open_stack
from unet_core.model.checkpoint import load_model, save_model
from unet_core.model.spec import UNetSpec
from unet_core.model.unet import UNet

TINY = UNetSpec(depth=2, base_channels=4, dropout=0.0)  # stride 4, context 20
TINY_ARGS = ["--depth", "2", "--base-channels", "4", "--dropout", "0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in tests/conftest.py


class StandIn(nn.Module):
    """Valid-padded stand-in: class-1 logit = the input pixel under the output pixel, class 0 = 0.

    Any misplaced tile, halo or flip shows on an arange image, where every pixel differs.
    """

    def __init__(self, spec: UNetSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.spec.context
        for n in x.shape[-2:]:
            self.spec.output_size(n)  # a real net rejects invalid sizes; so does the stand-in
        inner = x[..., c : x.shape[-2] - c, c : x.shape[-1] - c]
        return torch.cat([torch.zeros_like(inner), inner], dim=1)


def write_stack(path: Path, image: np.ndarray, *, chunks=(1, 32, 32)) -> Path:
    """A stack laid out as 'unet ingest' writes it (image pyramid + intensity attributes)."""
    root = zarr.open_group(path, mode="w")
    writer = PyramidWriter(root, image.shape, image.dtype, chunks, (1.0, 1.0, 1.0), unit="micrometer")
    for z in range(image.shape[0]):
        writer.write_plane(z, image[z])
    writer.finish()
    stats = {"mean": float(image.mean()), "std": float(image.std())}
    root.attrs.update({"unet": {"intensity": stats}})
    return path


@pytest.fixture
def stack(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    return write_stack(tmp_path / "stack.ome.zarr", rng.integers(0, 255, (2, 70, 90), dtype=np.uint8))


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    save_model(path, UNet(TINY))
    return path


def expected_standin(image: np.ndarray, stats: IntensityStats) -> np.ndarray:
    x = normalize(image, stats)
    p1 = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    return np.stack([1.0 - p1, p1]).astype(np.float32)


@pytest.mark.parametrize(
    ("shape", "block_px", "tile_out", "tta"),
    [
        pytest.param((1, 37, 53), 16, 8, "none", id="small-blocks"),
        pytest.param((2, 37, 53), 64, 64, "none", id="one-block"),
        pytest.param((1, 1, 29), 8, 4, "none", id="one-pixel-high"),
        pytest.param((1, 40, 33), 12, 8, "d4", id="d4"),
        pytest.param((1, 21, 30), 16, 8, "flips", id="flips"),
    ],
)
def test_stitching_with_stand_in_model(shape, block_px: int, tile_out: int, tta: str) -> None:
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    stats = IntensityStats(float(image.mean()), float(image.std()) / 4)
    out = predict_plane(StandIn(TINY), image, stats=stats, block_px=block_px, tile_out=tile_out, tta=tta)
    np.testing.assert_allclose(out, expected_standin(image, stats), rtol=0, atol=1e-6)


def test_engine_block_gives_probabilities_codes_and_argmax() -> None:
    torch.manual_seed(0)
    model = UNet(TINY).eval()
    image = np.random.default_rng(0).normal(size=(1, 30, 41)).astype(np.float32)
    tiling = Tiling(image.shape, TINY, block_px=32, tile_out=16)
    block = tiling.block((0, 0, 1))
    results = {}
    for encoding in ("float32", "float16", "uint8"):
        engine = Engine(model, tiling, stats=IntensityStats(0.0, 1.0), device=torch.device("cpu"), encoding=encoding)
        results[encoding] = engine.predict(engine.stage(image, block))()
    p = results["float32"].probabilities
    assert p.shape == (2, 1, 30, 9) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=0), 1.0, atol=1e-6)
    assert results["uint8"].probabilities.dtype == np.uint8
    codes = results["uint8"].probabilities
    np.testing.assert_array_equal(codes[1], np.floor(p[1] * np.float32(255) + np.float32(0.5)).astype(np.uint8))
    np.testing.assert_array_equal(codes[0], 255 - codes[1])  # the codes sum to 255 as the probabilities sum to 1
    assert np.abs(codes / np.float32(255) - p).max() <= 0.5 / 255 + 1e-6
    np.testing.assert_array_equal(results["float16"].probabilities, p.astype(np.float16))
    for r in results.values():  # the argmax is taken before any rounding: the same for every encoding
        np.testing.assert_array_equal(r.segmentation, p.argmax(axis=0).astype(np.uint8))


@pytest.mark.parametrize("offsets", [None, [0.3, -0.4]], ids=["raw", "offsets"])
@pytest.mark.parametrize("encoding", ["float32", "float16", "uint8"])
def test_two_class_tile_path_equals_the_general_one(encoding: str, offsets) -> None:
    # two classes without TTA are finished tile by tile from the logit margin, which the network
    # computes through its folded head; the general path (both logits, softmax per class, a
    # block-sized float canvas, argmax over classes) must agree up to float rounding
    torch.manual_seed(3)
    image = np.random.default_rng(3).normal(size=(1, 45, 38)).astype(np.float32)
    tiling = Tiling(image.shape, TINY, block_px=32, tile_out=16)  # blocks cut by the image edge
    engine = Engine(UNet(TINY).eval(), tiling, stats=IntensityStats(0.0, 1.0), device=torch.device("cpu"),
                    encoding=encoding, offsets=offsets)
    shift = 0.0 if offsets is None else offsets[1] - offsets[0]
    for block in tiling.blocks():
        staged = engine.stage(image, block)
        fast, fast_seg = engine.block_two_class(staged)
        general, seg = engine.encode(engine.block_output(staged))
        logits = engine.block_output(staged, logits=True).numpy()
        assert fast.shape == general.shape == (2, *block.plane.shape) and fast.dtype == general.dtype
        decided = np.abs(logits[1] - logits[0] + shift) > 1e-5  # not a tie within float rounding
        assert decided.mean() > 0.99
        np.testing.assert_array_equal(fast_seg.numpy()[decided], seg.numpy()[decided])
        diff = np.abs(fast.numpy().astype(np.float32) - general.numpy().astype(np.float32))
        assert diff.max() <= (1 if encoding == "uint8" else 2e-3 if encoding == "float16" else 1e-6)


def test_folded_head_margin_is_the_difference_of_the_logits() -> None:
    torch.manual_seed(4)
    net = UNet(UNetSpec(depth=2, base_channels=8, dropout=0.0)).eval()
    x = torch.randn(2, 1, 60, 52)
    with torch.no_grad():
        logits, margin = net(x), net.margin(x)
    assert margin.shape == (2, 1, *logits.shape[2:])
    torch.testing.assert_close(margin[:, 0], logits[:, 1] - logits[:, 0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="two classes"):
        UNet(UNetSpec(depth=1, base_channels=2, n_classes=3)).margin(x)


def test_uint8_codes_of_two_classes_complement_and_of_more_classes_round_each() -> None:
    from unet_core.infer.encoding import ProbabilityEncoding

    p = torch.softmax(torch.randn(3, 50, 40, generator=torch.Generator().manual_seed(0)), dim=0)
    three = ProbabilityEncoding.UINT8.encode(p.clone()).numpy()
    np.testing.assert_array_equal(three, np.floor(p.numpy() * np.float32(255) + np.float32(0.5)).astype(np.uint8))
    two = ProbabilityEncoding.UINT8.encode(torch.stack([1 - p[1], p[1]])).numpy()
    np.testing.assert_array_equal(two[1], three[1])
    np.testing.assert_array_equal(two.astype(int).sum(axis=0), 255)


class Recording(StandIn):
    """The stand-in, keeping a copy of every input batch it is given."""

    def __init__(self, spec: UNetSpec) -> None:
        super().__init__(spec)
        self.inputs: list[np.ndarray] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.extend(x[:, 0].numpy().copy())
        return super().forward(x)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 40, 37), (1, 3, 50)], ids=["blocks", "thinner-than-the-context"])
def test_network_input_is_the_mirrored_normalised_image_for_every_stored_dtype(dtype, shape) -> None:
    # blocks are read mirrored in their stored dtype, tiles cast and normalised as they are cut
    # out: the values of normalize() on the mirror-padded image, also above the sign bit
    rng = np.random.default_rng(4)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        image = rng.integers(max(info.min, -(2**40)), min(info.max, 2**40), shape, endpoint=True).astype(dtype)
    else:
        image = rng.normal(100, 30, shape).astype(dtype)
    stats = IntensityStats(float(image.mean()), float(image.std()) + 1.0)
    tiling = Tiling(shape, TINY, block_px=16, tile_out=8)
    net = Recording(TINY)
    engine = Engine(net, tiling, stats=stats, device=torch.device("cpu"), channels_last=False)
    for block in tiling.blocks():
        staged = engine.stage(image, block)
        rows, cols = (mirror_index(np.arange(a, b), n) for a, b, n in zip(staged.read.offset, staged.read.end, shape[1:]))
        pixels = staged.raw.numpy()  # uint64 is staged as float64 (exact below 2**53), uint16/32 as int16/32
        if staged.dtype in (np.uint16, np.uint32):
            pixels = pixels.view(staged.dtype)
        np.testing.assert_array_equal(pixels, image[0][np.ix_(rows, cols)])
        net.inputs.clear()
        engine.block_output(staged, logits=True)
        tiles = tiling.tiles(block)
        assert len(net.inputs) == len(tiles)
        for got, tile in zip(net.inputs, tiles, strict=True):
            box = tile_read_box(tile, TINY)
            rows, cols = (mirror_index(np.arange(a, b), n) for a, b, n in zip(box.offset, box.end, shape[1:]))
            np.testing.assert_array_equal(got, normalize(image[0][np.ix_(rows, cols)], stats))


@pytest.mark.parametrize("tta", ["none", "flips", "d4"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int16, np.float32])
def test_test_time_transforms_predict_every_stored_dtype_as_its_float32_values(dtype, tta: str) -> None:
    # issue 34: on the CPU a uint16/uint32 block was flipped as stored ('"flip_cpu" not implemented
    # for UInt16'); it is staged as its signed twin on every device and widened as tiles are cut,
    # so every dtype and transform gives the bytes of the same values stored as float32 (values
    # above the sign bit included), and the stand-in's exact probabilities
    rng = np.random.default_rng(5)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    shape = (1, 29, 38)
    if info is None:
        image = rng.normal(100, 30, shape).astype(dtype)
    else:  # the top quarter of the range: above the sign bit of the unsigned types' twins
        image = rng.integers(info.max - (info.max - max(info.min, 0)) // 4, info.max, shape, endpoint=True).astype(dtype)
    reference = image.astype(np.float32)
    stats = IntensityStats(float(reference.mean()), float(reference.std()) + 1.0)
    kw = {"stats": stats, "block_px": 16, "tile_out": 8, "tta": tta}
    got = predict_plane(StandIn(TINY), image, **kw)
    assert got.tobytes() == predict_plane(StandIn(TINY), reference, **kw).tobytes()
    np.testing.assert_allclose(got, expected_standin(reference, stats), rtol=0, atol=1e-6)


def test_engine_runs_its_own_model_channels_last_also_on_the_cpu() -> None:
    # oneDNN skips the NCHW <-> blocked reorders around each convolution in this layout (about
    # half the CPU forward time of a thin network); a caller's model is left as it is
    model = UNet(TINY).eval()
    tiling = Tiling((1, 30, 41), TINY, block_px=32, tile_out=16)
    own = Engine(model, tiling, stats=IntensityStats(0.0, 1.0), device=torch.device("cpu"))
    kernels = [p for p in own.model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
    assert own.channels_last and kernels
    assert all(k.is_contiguous(memory_format=torch.channels_last) and not k.is_contiguous() for k in kernels)
    callers = Engine(UNet(TINY).eval(), tiling, stats=IntensityStats(0.0, 1.0), device=torch.device("cpu"),
                     channels_last=False)
    assert not callers.channels_last
    assert all(p.is_contiguous() for p in callers.model.parameters())


def test_batch_size_changes_only_the_last_bits_and_is_part_of_the_run(stack, model_file, tmp_path) -> None:
    # convolution kernels pick their algorithm by batch size, so the batch is a setting of the run
    # (recorded in the part store, never sized from free memory): equal to rounding, not to the bit
    torch.manual_seed(1)
    model = UNet(TINY).eval()
    image = np.random.default_rng(1).normal(size=(1, 64, 64)).astype(np.float32)
    outs = [predict_plane(model, image, stats=IntensityStats(0.0, 1.0), block_px=64, tile_out=16, batch=b, tta="d4")
            for b in (1, 3, 16)]
    assert max(float(np.abs(o - outs[0]).max()) for o in outs) < 1e-6
    part = tmp_path / "part"
    predict_job(stack, model_file, part, block_px=32, tile_out=16, device="cpu", batch=1, expect=TINY)
    summary = predict_job(stack, model_file, part, block_px=32, tile_out=16, device="cpu", batch=2, expect=TINY)
    assert summary.skipped == 0 and json.loads((part / "part.json").read_text())["batch"] == 2


def test_each_job_takes_its_own_gpu_when_there_are_several(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [str(job_device("auto", j)) for j in range(5)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0"]
    assert str(job_device("cuda:2", 1)) == "cuda:2"  # an explicit choice is kept
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert str(job_device("auto", 3)) == "cuda"  # one visible GPU (e.g. SLURM gave this job its own)


def test_gpu_out_of_memory_names_the_settings_to_lower() -> None:
    class Hungry(StandIn):
        def forward(self, x):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    tiling = Tiling((1, 32, 32), TINY, 32, 16)
    engine = Engine(Hungry(TINY), tiling, stats=IntensityStats(0.0, 1.0), device=torch.device("cpu"), batch=4)
    with pytest.raises(UserInputError, match="out of GPU memory at tile 16 px, batch 4.*predict.batch_size"):
        engine.predict(engine.stage(np.zeros((1, 32, 32), np.float32), tiling.block((0, 0, 0))))


def read_part(part: Path) -> np.ndarray:
    return zarr.open_array(part / "probabilities", mode="r")[:]


def test_job_writes_part_store(stack: Path, model_file: Path, tmp_path: Path) -> None:
    part = tmp_path / "part0"
    summary = predict_job(stack, model_file, part, job=0, jobs=1, block_px=32, tile_out=16, device="cpu",
                          expect=TINY, probabilities="float32")
    assert summary.blocks == 2 * 3 * 3 and summary.skipped == 0 and summary.output_px == 2 * 70 * 90
    settings = json.loads((part / "part.json").read_text())
    assert settings["model_sha256"] == sha256_files([model_file])
    assert settings["tiling"]["block_px"] == 32 and settings["precision"] == "fp32"
    assert settings["probabilities"] == "float32"
    arr = zarr.open_array(part / "probabilities", mode="r")
    assert arr.shape == (2, 2, 70, 90) and arr.dtype == np.float32 and arr.chunks == (2, 1, 32, 32)
    seg = zarr.open_array(part / "segmentation", mode="r")
    assert seg.shape == (2, 70, 90) and seg.dtype == np.uint8 and seg.chunks == (1, 32, 32)
    np.testing.assert_array_equal(seg[:], arr[:].argmax(axis=0))
    assert len(list((part / "done").iterdir())) == summary.blocks
    assert (part / "COMPLETE").is_file()
    # equals the in-memory tiled prediction of the same stack
    image = zarr.open_group(stack, mode="r")["0"][:]
    model, _ = load_model(model_file)
    stats = IntensityStats.from_dict(zarr.open_group(stack, mode="r").attrs["unet"]["intensity"])
    in_memory = predict_plane(model, image, stats=stats, block_px=32, tile_out=16)
    np.testing.assert_array_equal(read_part(part), in_memory)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AMX or AVX512-BF16)")
def test_cpu_bf16_prediction_is_recorded_and_close_to_fp32(stack: Path, model_file: Path, tmp_path: Path) -> None:
    kw = dict(job=0, jobs=1, block_px=32, tile_out=16, device="cpu", expect=TINY, probabilities="float32")
    predict_job(stack, model_file, tmp_path / "fp32", **kw)
    predict_job(stack, model_file, tmp_path / "bf16", precision="bf16", **kw)
    assert json.loads((tmp_path / "bf16" / "part.json").read_text())["precision"] == "bf16"
    fp32, bf16 = read_part(tmp_path / "fp32"), read_part(tmp_path / "bf16")
    assert not np.array_equal(bf16, fp32)  # it did run in bf16
    assert np.abs(bf16 - fp32).max() < 0.05


def test_job_writes_only_its_blocks(stack: Path, model_file: Path, tmp_path: Path) -> None:
    part = tmp_path / "part1"
    predict_job(stack, model_file, part, job=1, jobs=4, block_px=32, tile_out=32, device="cpu", expect=TINY,
                probabilities="float32")
    done = sorted(p.name for p in (part / "done").iterdir())
    want = sorted(b.name for b in Tiling((2, 70, 90), TINY, 32, 32).job_blocks(1, 4))
    assert done == want
    probs = read_part(part)
    written = np.zeros(probs.shape[1:], bool)
    for name in want:
        z, by, bx = map(int, name.split("."))
        written[z, by * 32 : by * 32 + 32, bx * 32 : bx * 32 + 32] = True
    assert np.all(probs[:, ~written] == 0) and np.all(probs[:, written] > 0)


def test_killed_job_resumes_only_missing_blocks(
    stack: Path, model_file: Path, tmp_path: Path, monkeypatch
) -> None:
    part = tmp_path / "part"
    kw = dict(job=0, jobs=1, block_px=32, tile_out=32, device="cpu", expect=TINY)
    reference = tmp_path / "reference"
    predict_job(stack, model_file, reference, **kw)

    real = PartStore.mark_done
    calls = {"n": 0}

    def dying_mark_done(store, block):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt  # killed after its 5th block's chunk, before the marker
        real(store, block)

    monkeypatch.setattr(PartStore, "mark_done", dying_mark_done)
    with pytest.raises(KeyboardInterrupt):
        predict_job(stack, model_file, part, **kw)
    monkeypatch.setattr(PartStore, "mark_done", real)
    assert len(list((part / "done").iterdir())) == 5
    assert not (part / "COMPLETE").exists()
    assert not [p for p in (part / "done").iterdir() if p.name.startswith(".")]  # no half-written marker

    summary = predict_job(stack, model_file, part, **kw)
    assert summary.skipped == 5 and summary.blocks == 18
    np.testing.assert_array_equal(read_part(part), read_part(reference))
    assert (part / "COMPLETE").is_file()


def test_a_job_reads_the_model_file_once_and_records_the_hash_of_those_bytes(
        stack: Path, model_file: Path, tmp_path: Path, monkeypatch) -> None:
    # issue 34: the model was read for loading and read again for its hash (and its first bytes
    # a third time); now its bytes are read once, hashed and loaded from memory
    import builtins
    import hashlib
    import io

    opened = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if Path(str(file)) == model_file:
            opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    part = tmp_path / "part0"
    predict_job(stack, model_file, part, block_px=64, tile_out=16, device="cpu", expect=TINY)
    assert len(opened) == 1, opened
    settings = json.loads((part / "part.json").read_text())
    assert settings["model_sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest() == sha256_files([model_file])


def test_unet_predict_imports_no_other_stage_and_no_scipy_ndimage(stack: Path, model_file: Path,
                                                                   tmp_path: Path) -> None:
    # issue 34 (start-up): the parser of every stage was built for each command, and merge's
    # imported scipy.ndimage (0.15-0.3 CPU-s of 'unet predict''s start-up); now only the stage run
    import subprocess
    import sys

    code = ("import sys; from unet_core.cli import main; "
            f"rc = main(['-q', 'predict', {str(stack)!r}, {str(model_file)!r}, {str(tmp_path / 'part')!r}, "
            "'--device', 'cpu', '--block-px', '64', '--tile-out', '16']); "
            "print(rc, sorted(m for m in sys.modules if m == 'scipy.ndimage' or m.startswith('unet_core.cli.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[-2] == "0 ['unet_core.cli.common', 'unet_core.cli.predict']", out.stdout + out.stderr


def test_changed_settings_start_afresh(stack: Path, model_file: Path, tmp_path: Path) -> None:
    part = tmp_path / "part"
    predict_job(stack, model_file, part, block_px=32, tile_out=32, device="cpu", expect=TINY)
    summary = predict_job(stack, model_file, part, block_px=64, tile_out=32, device="cpu", expect=TINY)
    assert summary.skipped == 0 and summary.blocks == 2 * 2 * 2
    assert len(list((part / "done").iterdir())) == 8


def test_tiled_tta_job_matches_in_memory(stack: Path, model_file: Path, tmp_path: Path) -> None:
    part = tmp_path / "part"
    predict_job(stack, model_file, part, block_px=32, tile_out=16, device="cpu", tta="flips", expect=TINY,
                probabilities="float32")
    image = zarr.open_group(stack, mode="r")["0"][:]
    model, _ = load_model(model_file)
    stats = IntensityStats.from_dict(zarr.open_group(stack, mode="r").attrs["unet"]["intensity"])
    whole = predict_plane(model, image, stats=stats, block_px=128, tile_out=128, tta="flips")
    np.testing.assert_allclose(read_part(part), whole, atol=1e-5, rtol=0)


def test_compiled_network_gives_the_eager_result_and_is_part_of_the_run(stack: Path, tmp_path: Path) -> None:
    # predict.compile / --compile: torch.compile with static shapes (one block of one tile shape
    # here, so one compilation); equal to the eager network up to float rounding, so a part
    # store written eagerly is not resumed by a compiled job
    torch.manual_seed(0)
    model_path = tmp_path / "depth1.pt"
    save_model(model_path, UNet(UNetSpec(depth=1, base_channels=2, dropout=0.0)))
    flags = ["--block-px", "96", "--tile-out", "32", "--device", "cpu", "--threads", "1", "--probabilities", "float32"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert main(["predict", str(stack), str(model_path), str(eager), *flags]) == 0
    assert main(["predict", str(stack), str(model_path), str(compiled), *flags, "--compile"]) == 0
    np.testing.assert_allclose(read_part(compiled), read_part(eager), atol=1e-5, rtol=0)
    assert json.loads((compiled / "part.json").read_text())["compile"] is True
    assert json.loads((eager / "part.json").read_text())["compile"] is False
    summary = predict_job(stack, model_path, eager, block_px=96, tile_out=32, device="cpu",
                          probabilities="float32", compile=True)
    assert summary.skipped == 0 and summary.blocks == 2


# -- bad inputs --------------------------------------------------------------------------------
def test_missing_stack(model_file: Path, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="nope.zarr: input stack not found"):
        predict_job(tmp_path / "nope.zarr", model_file, tmp_path / "part", device="cpu")


def test_model_not_matching_config(stack: Path, model_file: Path, tmp_path: Path) -> None:
    match = "does not match the config's model.*base_channels: file 4 vs config 8"
    with pytest.raises(CheckpointError, match=match):
        predict_job(stack, model_file, tmp_path / "part", device="cpu",
                    expect=UNetSpec(depth=2, base_channels=8, dropout=0.0))
    assert not (tmp_path / "part").exists()


def test_block_size_not_multiple_of_stride(stack: Path, model_file: Path, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="block size 30 px .*nearest valid: 28 or 32"):
        predict_job(stack, model_file, tmp_path / "part", block_px=30, device="cpu", expect=TINY)


def test_device_and_precision_checks(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(UserInputError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(UserInputError, match="not a torch device"):
        resolve_device("gpu7")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"


def test_cli_predict(stack: Path, model_file: Path, tmp_path: Path, capsys) -> None:
    part = tmp_path / "p"
    assert main(["predict", str(stack), str(model_file), str(part), "--block-px", "64", "--tile-out", "32",
                 "--device", "cpu", "--threads", "1", *TINY_ARGS]) == 0
    assert (part / "COMPLETE").is_file()
    assert main(["predict", str(stack), str(model_file), str(part), "--block-px", "66", *TINY_ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "block size 66 px" in err and "64 or 68" in err
    # the architecture comes from the model file: no model flags needed ...
    fresh = tmp_path / "no-flags"
    assert main(["predict", str(stack), str(model_file), str(fresh), "--block-px", "64", "--tile-out", "32",
                 "--device", "cpu", "--threads", "1"]) == 0
    np.testing.assert_array_equal(read_part(fresh), read_part(part))
    # ... and flags that are given are checked against it
    assert main(["predict", str(stack), str(model_file), str(tmp_path / "p2"), "--base-channels", "64"]) == 2
    err = capsys.readouterr().err
    assert "does not match the config's model" in err and "base_channels: file 4 vs config 64" in err


def test_cli_predict_refuses_more_jobs_than_blocks(stack: Path, model_file: Path, tmp_path: Path, capsys) -> None:
    # 2 slices x 2 x 2 blocks of 64 px: 8 blocks, so at most 8 jobs; a 9th would have nothing to do
    flags = ["--block-px", "64", "--tile-out", "32", "--device", "cpu", "--threads", "1", *TINY_ARGS]
    part = tmp_path / "p"
    assert main(["predict", str(stack), str(model_file), str(part), "--job", "0", "--jobs", "9", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "--jobs 9 is more than the 8 block(s)" in err[0] and "use at most 8" in err[0], err
    assert not part.exists()  # refused before any work
    assert main(["predict", str(stack), str(model_file), str(part), "--job", "7", "--jobs", "8", *flags]) == 0
    assert (part / "COMPLETE").is_file() and len(list((part / "done").iterdir())) == 1


def test_decision_applies_the_models_logit_offsets(stack: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "corrected.pt"
    offsets = [-0.75, 0.75]
    save_model(path, UNet(TINY), metadata={"decision": {"logit_offsets": offsets}})
    kw = dict(job=0, jobs=1, block_px=32, tile_out=16, device="cpu", expect=TINY, probabilities="float32")
    predict_job(stack, path, tmp_path / "raw", decision="raw", **kw)
    predict_job(stack, path, tmp_path / "fixed", **kw)  # "corrected" is the default
    raw, fixed = read_part(tmp_path / "raw"), read_part(tmp_path / "fixed")
    logit_raw = np.log(raw[1]) - np.log(raw[0])
    logit_fixed = np.log(fixed[1]) - np.log(fixed[0])
    np.testing.assert_allclose(logit_fixed - logit_raw, 1.5, atol=1e-3)
    settings = json.loads((tmp_path / "fixed" / "part.json").read_text())
    assert settings["logit_offsets"] == offsets
    assert json.loads((tmp_path / "raw" / "part.json").read_text())["logit_offsets"] is None
    with pytest.raises(UserInputError, match="--decision 'best'"):
        predict_job(stack, path, tmp_path / "bad", decision="best", **kw)


# -- normalisation ----------------------------------------------------------------------------------
def _with_slice_statistics(path: Path, image: np.ndarray) -> Path:
    """Add the per-slice statistics 'unet ingest' stores."""
    running = RunningStats()
    for plane in image:
        running.update(plane)
    root = zarr.open_group(path, mode="r+")
    root.attrs["unet"] = {**root.attrs["unet"], "slice_intensity": slice_stats_to_attrs(running.slices)}
    return path


@pytest.mark.parametrize("mode", [Normalisation.SLICE_ZSCORE, Normalisation.SLICE_PERCENTILE])
@pytest.mark.parametrize(("block_px", "tile_out"), [(16, 8), (64, 32)])
def test_engine_normalises_each_slice_with_its_own_statistics(tmp_path: Path, mode, block_px, tile_out) -> None:
    # three slices of one pattern at different intensity scales: per-slice modes undo the scales
    rng = np.random.default_rng(2)
    base = rng.integers(0, 60, (37, 45))
    image = np.stack([base + 10, 3 * base + 40, 4 * base]).astype(np.uint16)
    st = open_stack(_with_slice_statistics(write_stack(tmp_path / "s.ome.zarr", image), image))
    scaler = st.scaler(mode)
    out = predict_plane(StandIn(TINY), image, stats=scaler, block_px=block_px, tile_out=tile_out)
    for z in range(3):  # blocks smaller than the slice still use the whole slice's statistics
        np.testing.assert_allclose(out[:, z], expected_standin(image[z], scaler(z)), rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[:, 0], out[:, 2], atol=1e-5 if mode is Normalisation.SLICE_ZSCORE else 0.05)


def test_predict_uses_the_models_normalisation_and_refuses_another(stack: Path, tmp_path: Path, capsys) -> None:
    image = zarr.open_group(stack, mode="r")["0"][:]
    _with_slice_statistics(stack, image)
    torch.manual_seed(0)
    model = tmp_path / "pct.pt"
    save_model(model, UNet(TINY), metadata={"intensity_normalisation": "slice-percentile"})
    args = ["--block-px", "64", "--tile-out", "32", "--device", "cpu", "--threads", "1"]
    refused = tmp_path / "refused"
    assert main(["predict", str(stack), str(model), str(refused), *args, "--normalisation", "stack-zscore"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--normalisation stack-zscore" in err[0] and "slice-percentile" in err[0]
    assert str(model) in err[0] and not refused.exists()
    # without the option (or with the model's own) the model's mode is used
    part = tmp_path / "p"
    assert main(["predict", str(stack), str(model), str(part), *args, "--probabilities", "float32"]) == 0
    assert PartStore(part).settings()["intensity_normalisation"] == "slice-percentile"
    net = load_model(model)[0]
    expected = predict_plane(net, image, stats=open_stack(stack).scaler("slice-percentile"), block_px=64, tile_out=32)
    np.testing.assert_array_equal(read_part(part), expected)


def test_per_slice_mode_on_a_stack_without_slice_statistics_asks_to_reingest(stack: Path, tmp_path: Path,
                                                                             capsys) -> None:
    model = tmp_path / "z.pt"
    save_model(model, UNet(TINY), metadata={"intensity_normalisation": "slice-zscore"})
    assert main(["predict", str(stack), str(model), str(tmp_path / "p"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ingested before per-slice intensity statistics" in err[0] and "ingest it again" in err[0]
    assert str(stack) in err[0] and not (tmp_path / "p").exists()


def test_predict_settings_parse_each_choice_once_where_they_enter() -> None:
    """One PredictSettings is what a predict job is asked to do: its closed sets are enums from the
    start (the CLI builds it once), and a bad value is one line naming the option."""
    from unet_core.common.precision import Precision
    from unet_core.infer.encoding import ProbabilityEncoding
    from unet_core.infer.predict_settings import PredictSettings
    from unet_core.infer.tiling import TTA
    from unet_core.model.decision import Decision

    Refused = UserInputError

    s = PredictSettings(tta="d4", decision="raw", probabilities="float16", precision="fp32",
                        normalisation="slice-zscore")
    assert (s.tta, s.decision, s.probabilities, s.precision, s.normalisation) == (
        TTA.D4, Decision.RAW, ProbabilityEncoding.FLOAT16, Precision.FP32, Normalisation.SLICE_ZSCORE)
    assert (s.batch_for("cpu"), s.batch_for("cuda"), PredictSettings(batch=3).batch_for("cuda")) == (1, 8, 3)
    with pytest.raises(Refused, match=r"--tta 'd8': use one of none, flips, d4"):
        PredictSettings(tta="d8")
    with pytest.raises(Refused, match=r"--tile-out 0: must be a positive integer"):
        PredictSettings(tile_out=0)


def test_predict_job_takes_the_settings_object_or_its_fields_not_both(tmp_path: Path) -> None:
    from unet_core.infer.predict_settings import PredictSettings

    with pytest.raises(TypeError, match="not both"):
        predict_job(tmp_path / "s.zarr", tmp_path / "m.pt", tmp_path / "p", PredictSettings(), tta="d4")
