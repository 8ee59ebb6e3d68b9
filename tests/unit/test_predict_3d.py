"""`unet predict` of a 3-D model (issue 36, items 2 and 5): (Z, Y, X) blocks of several slices into
a part store chunked (C, block_z, B, B), equal to one pass of the network over the whole
mirror-padded volume, byte-identical for 1 and K jobs and after a resume; every refusal one line,
exit 2, nothing written.

A tiny 3-D U-Net (z stride 2, z context 8) on a 7 x 29 x 23 stack (odd in every axis) stored in
z chunks of 3 slices: the default block_z is 4 (the chunk rounded up to the z stride), so blocks
straddle chunks and the last z block is clipped (3 slices).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from unet_core.cli import main
from unet_core.common.errors import UserInputError
from unet_core.common.intensity import RunningStats, slice_stats_to_attrs
from unet_core.common.mirror import mirror_pad
from unet_core.infer.part_store import PartStore, open_parts
from unet_core.infer.predict import predict_job, predict_plane
from unet_core.infer.tiling import Tiling
from unet_core.io.ngff import PyramidWriter, open_stack
from unet_core.model.checkpoint import load_model, save_model
from unet_core.model.spec import UNetSpec
from unet_core.model.unet import UNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in tests/conftest.py

TOL = 1e-5
SPEC = UNetSpec(depth=2, base_channels=2, dropout=0.0, dims=3, pool_z=(1, 2), kernel_z=(3, 3, 3))
SHAPE = (7, 29, 23)
FLAGS = ["--block-px", "12", "--tile-out", "8", "--device", "cpu", "--threads", "1"]


def write_stack(path: Path, image: np.ndarray, *, chunks=(3, 16, 16), voxel_size_given: bool = True) -> Path:
    """A stack as 'unet ingest --chunks 3,16,16 --voxel-size-um 2,0.5,0.5' writes it (without
    ``voxel_size_given``: as ingest writes one whose voxel size it was not given)."""
    root = zarr.open_group(path, mode="w")
    writer = PyramidWriter(root, image.shape, image.dtype, chunks, (2.0, 0.5, 0.5), unit="micrometer")
    stats = RunningStats()
    for z in range(image.shape[0]):
        writer.write_plane(z, image[z])
        stats.update(image[z])
    writer.finish()
    root.attrs.update({"unet": {"intensity": stats.result().to_dict(),
                                "slice_intensity": slice_stats_to_attrs(stats.slices),
                                "voxel_size_given": voxel_size_given}})
    return path


@pytest.fixture
def stack(tmp_path: Path) -> Path:
    image = np.random.default_rng(3).integers(0, 255, SHAPE, dtype=np.uint8)
    return write_stack(tmp_path / "stack.ome.zarr", image)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "model3d.pt"
    save_model(path, UNet(SPEC), metadata={"voxel_size_um": [2.0, 0.5, 0.5]})  # the stack's: accepted
    return path


def whole_volume_prediction(stack: Path, model_file: Path) -> np.ndarray:
    """One network pass over the whole normalised volume mirror-padded by the context per axis (+ up
    to a valid size): the reference of tests/property/test_seamless_3d.py, normalised with the
    stack's statistics as the model's (stack z-score) mode does."""
    st = open_stack(stack)
    model, _ = load_model(model_file)
    scaling = st.scaler("stack-zscore")
    volume = st.image[:].astype(np.float32)
    for z in range(volume.shape[0]):
        volume[z] = (volume[z] - np.float32(scaling(z).offset)) / np.float32(scaling(z).scale)
    pads = [(a.context, a.context + a.valid_output_size_at_least(n) - n) for a, n in zip(SPEC.axes, volume.shape)]
    x = torch.from_numpy(mirror_pad(volume, pads))[None, None]
    with torch.inference_mode():
        probs = torch.softmax(model.eval()(x), dim=1)[0].numpy()
    return probs[(slice(None), *(slice(0, n) for n in volume.shape))]


def predict(stack: Path, model_file: Path, part: Path, *extra: str) -> int:
    return main(["-q", "predict", str(stack), str(model_file), str(part), *FLAGS, *extra])


def assembled(parts: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """The probabilities and segmentation of a run's parts, each block taken from the part that
    finished it (the rest of each part's arrays is never written)."""
    tiling = Tiling.from_dict(PartStore(parts[0]).settings()["tiling"])
    first = PartStore(parts[0])
    probs = np.zeros(first.probabilities().shape, first.probabilities().dtype)
    seg = np.zeros(first.segmentation().shape, np.uint8)
    seen = []
    for path in parts:
        store = PartStore(path)
        p, s = store.probabilities()[:], store.segmentation()[:]
        for block in tiling.blocks():
            if store.is_done(block):
                where = block.write.to_slices()
                probs[(slice(None), *where)], seg[where] = p[(slice(None), *where)], s[where]
                seen.append(block.name)
    assert sorted(seen) == sorted(b.name for b in tiling.blocks())  # every block exactly once
    return probs, seg


# -- the prediction ---------------------------------------------------------------------------------
def test_3d_predict_equals_one_pass_over_the_whole_volume(stack: Path, model_file: Path, tmp_path: Path) -> None:
    part = tmp_path / "part"
    assert predict(stack, model_file, part, "--probabilities", "float32") == 0
    settings = json.loads((part / "part.json").read_text())
    tiling = settings["tiling"]
    assert (tiling["block_z"], tiling["tile_z"], tiling["z_stride"]) == (4, 4, 2)  # z chunk 3 rounded up to 2
    assert tiling["spec"]["dims"] == 3
    store = PartStore(part)
    assert store.probabilities().chunks == (2, 4, 12, 12) and store.segmentation().chunks == (4, 12, 12)
    assert sorted(store.done_blocks()) == sorted(f"{z}.{y}.{x}" for z in range(2) for y in range(3) for x in range(2))
    want = whole_volume_prediction(stack, model_file)
    got = store.probabilities()[:]
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    np.testing.assert_array_equal(store.segmentation()[:], np.argmax(got, axis=0))
    assert (part / "COMPLETE").is_file()


def test_predict_plane_of_a_3d_model_is_the_jobs_result(stack: Path, model_file: Path, tmp_path: Path) -> None:
    part = tmp_path / "part"
    predict_job(stack, model_file, part, block_px=12, tile_out=8, device="cpu", probabilities="float32")
    st = open_stack(stack)
    model, _ = load_model(model_file)
    whole = predict_plane(model, st.image[:], stats=st.scaler("stack-zscore"), block_px=32, tile_out=32)
    np.testing.assert_allclose(PartStore(part).probabilities()[:], whole, atol=TOL, rtol=0)


@pytest.mark.parametrize(("jobs", "extra"), [(5, ["--block-z", "2"]), (4, ["--tile-z", "2", "--tta", "flips"])],
                         ids=["5-jobs-block-z-2", "4-jobs-tile-z-2-flips"])
def test_one_and_k_jobs_are_byte_identical(stack: Path, model_file: Path, tmp_path: Path, jobs: int,
                                           extra: list[str]) -> None:
    extra = [*extra, "--probabilities", "float32"]
    assert predict(stack, model_file, tmp_path / "one", *extra) == 0
    parts = [tmp_path / f"part{k}" for k in range(jobs)]
    for k in reversed(range(jobs)):  # any order
        assert predict(stack, model_file, parts[k], "--job", str(k), "--jobs", str(jobs), *extra) == 0
    one_p, one_s = assembled([tmp_path / "one"])
    k_p, k_s = assembled(parts)
    assert one_p.dtype == np.float32 and one_p.tobytes() == k_p.tobytes() and one_s.tobytes() == k_s.tobytes()
    assert open_parts(parts)[1] == Tiling.from_dict(PartStore(tmp_path / "one").settings()["tiling"])  # one run


def test_a_killed_job_resumes_to_the_same_bytes(stack: Path, model_file: Path, tmp_path: Path, monkeypatch) -> None:
    kw = dict(block_px=12, tile_out=8, device="cpu")  # uint8 codes, the default storage
    reference = tmp_path / "reference"
    predict_job(stack, model_file, reference, **kw)
    part = tmp_path / "part"
    real, calls = PartStore.mark_done, {"n": 0}

    def dying_mark_done(store, block):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt  # killed after its 6th block's chunks, before the marker
        real(store, block)

    monkeypatch.setattr(PartStore, "mark_done", dying_mark_done)
    with pytest.raises(KeyboardInterrupt):
        predict_job(stack, model_file, part, **kw)
    monkeypatch.setattr(PartStore, "mark_done", real)
    assert len(PartStore(part).done_blocks()) == 5 and not (part / "COMPLETE").exists()
    summary = predict_job(stack, model_file, part, **kw)
    assert (summary.blocks, summary.skipped) == (12, 5)
    assert assembled([part])[0].tobytes() == assembled([reference])[0].tobytes()
    assert assembled([part])[1].tobytes() == assembled([reference])[1].tobytes()

    # a block whose marker and chunks are lost (a damaged copy) is recomputed, alone
    (part / "done" / "1.2.1").unlink()
    for name, lead in (("probabilities", "c/0/"), ("segmentation", "c/")):
        (part / name / f"{lead}1/2/1").unlink()
    summary = predict_job(stack, model_file, part, **kw)
    assert (summary.blocks, summary.skipped) == (12, 11)
    for ours, theirs in zip(assembled([part]), assembled([reference])):
        assert ours.tobytes() == theirs.tobytes()


def test_parts_of_other_z_blocking_neither_resume_nor_merge(stack: Path, model_file: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert predict(stack, model_file, a, "--job", "0", "--jobs", "2") == 0
    assert predict(stack, model_file, b, "--job", "1", "--jobs", "2", "--block-z", "2") == 0
    with pytest.raises(UserInputError, match="differs in tiling"):
        open_parts([a, b])
    summary = predict_job(stack, model_file, a, job=0, jobs=2, block_px=12, tile_out=8, device="cpu", block_z=2)
    assert summary.skipped == 0  # another z blocking: started afresh
    assert PartStore(a).probabilities().chunks == (2, 2, 12, 12)
    assert open_parts([a, b])[1].block_z == 2


def test_a_2d_part_store_keeps_its_layout(tmp_path: Path) -> None:
    """2-D: chunks (C, 1, B, B), a tiling description without z keys (part stores as before)."""
    image = np.random.default_rng(0).integers(0, 255, (2, 20, 20), dtype=np.uint8)
    stack = write_stack(tmp_path / "s2.ome.zarr", image, chunks=(1, 16, 16))
    model = tmp_path / "m2.pt"
    save_model(model, UNet(UNetSpec(depth=1, base_channels=2, dropout=0.0)))
    predict_job(stack, model, tmp_path / "p2", block_px=8, tile_out=8, device="cpu")
    store = PartStore(tmp_path / "p2")
    assert store.probabilities().chunks == (2, 1, 8, 8) and store.segmentation().chunks == (1, 8, 8)
    assert not {"block_z", "tile_z"} & set(store.settings()["tiling"])


# -- refusals: one line naming the setting or file, exit 2, nothing written ----------------------------
def refused(capsys, tmp_path: Path, argv: list[str], *needles: str) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(["-q", "predict", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(n in err[0] for n in needles), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize(("option", "value"), [("--block-z", "3"), ("--tile-z", "5")])
def test_z_sizes_not_a_multiple_of_the_z_stride_are_refused(stack, model_file, tmp_path, capsys, option,
                                                            value) -> None:
    refused(capsys, tmp_path, [str(stack), str(model_file), str(tmp_path / "part"), *FLAGS, option, value],
            f"{option} {value} slices is not a multiple of the z pooling product = 2")


@pytest.mark.parametrize("option", ["--block-z", "--tile-z"])
def test_z_sizes_for_a_2d_model_are_refused(stack, tmp_path, capsys, option) -> None:
    model = tmp_path / "m2.pt"
    save_model(model, UNet(UNetSpec(depth=1, base_channels=2, dropout=0.0)))
    refused(capsys, tmp_path, [str(stack), str(model), str(tmp_path / "part"), *FLAGS, option, "2"],
            f"{option} 2", str(model), "2-D model")


def test_a_3d_model_on_a_single_slice_is_refused(model_file, tmp_path, capsys) -> None:
    one = write_stack(tmp_path / "one.ome.zarr", np.zeros((1, 20, 20), np.uint8), chunks=(1, 16, 16))
    refused(capsys, tmp_path, [str(one), str(model_file), str(tmp_path / "part"), *FLAGS],
            str(one), "single slice", "3-D model")


def test_a_3d_model_on_a_stack_without_a_given_voxel_size_is_refused(model_file, tmp_path, capsys) -> None:
    """ingest's record ``voxel_size_given`` False (or absent: ingested before the record) is refused."""
    image = np.zeros((4, 20, 20), np.uint8)
    unknown = write_stack(tmp_path / "unknown.ome.zarr", image, voxel_size_given=False)
    refused(capsys, tmp_path, [str(unknown), str(model_file), str(tmp_path / "part"), *FLAGS],
            str(unknown), "voxel size", "--voxel-size-um")


def test_a_3d_model_trained_at_another_voxel_size_is_refused(stack, tmp_path, capsys) -> None:
    model = tmp_path / "coarse.pt"
    save_model(model, UNet(SPEC), metadata={"voxel_size_um": [4.0, 0.5, 0.5]})
    refused(capsys, tmp_path, [str(stack), str(model), str(tmp_path / "part"), *FLAGS],
            str(stack), str(model), "voxel size [2.0, 0.5, 0.5]", "[4.0, 0.5, 0.5]")


def test_onnxruntime_refuses_a_3d_model(stack, model_file, tmp_path, capsys) -> None:
    refused(capsys, tmp_path, [str(stack), str(model_file), str(tmp_path / "part"), *FLAGS,
                               "--backend", "onnxruntime"], str(model_file), "3-D model", "--backend torch")
