"""The gather: blockwise instance merge, OME-Zarr output, 1 job vs K jobs, bad parts."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from scipy import ndimage
from torch import nn

import unet_core.infer.predict
from unet_core.cli import main
from unet_core.common.errors import UserInputError
from unet_core.infer.block_labels import PieceLabeller, flat_index, number_labels
from unet_core.infer.merge import merge_parts
from unet_core.infer.merge_settings import MergeSettings
from unet_core.infer.predict import predict_job
from unet_core.io.ngff import PyramidWriter, downsample_plane
from unet_core.model.spec import UNetSpec

TINY = UNetSpec(depth=2, base_channels=4, dropout=0.0)  # stride 4, context 20


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in tests/conftest.py


class StandIn(nn.Module):
    """Valid-padded stand-in: class-1 logit = the input pixel (so bright pixels are 'cell')."""

    def __init__(self, spec: UNetSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.spec.context
        inner = x[..., c : x.shape[-2] - c, c : x.shape[-1] - c]
        return torch.cat([torch.zeros_like(inner), inner], dim=1)


@pytest.fixture
def stand_in_model(tmp_path: Path, monkeypatch) -> Path:
    """A model file path whose loading yields the stand-in (the file only feeds the hash)."""
    path = tmp_path / "standin.pt"
    path.write_bytes(b"stand-in")
    monkeypatch.setattr(unet_core.infer.predict, "load_model", lambda p, expect=None, digest=None: (StandIn(TINY), {}))
    return path


def write_stack(path: Path, image: np.ndarray) -> Path:
    root = zarr.open_group(path, mode="w")
    writer = PyramidWriter(root, image.shape, image.dtype, (1, 32, 32), (2.0, 0.5, 0.5), unit="micrometer")
    for z in range(image.shape[0]):
        writer.write_plane(z, image[z])
    writer.finish()
    root.attrs.update({"unet": {"intensity": {"mean": float(image.mean()), "std": float(image.std())}}})
    return path


def discs(shape: tuple[int, int, int], centres: list[tuple[int, int, int]], radius: float) -> np.ndarray:
    z, y, x = np.indices(shape)
    img = np.zeros(shape, np.uint8)
    for cz, cy, cx in centres:
        img[(z == cz) & ((y - cy) ** 2 + (x - cx) ** 2 <= radius**2)] = 200
    return img


def label_blockwise(mask: np.ndarray, *, block_px: int, pieces: int = 1) -> np.ndarray:
    """4-connected components of a (Z, Y, X) or (Y, X) bool mask per slice, computed block by
    block in ``pieces`` contiguous runs of blocks (merge's components path: PieceLabeller per
    piece, number_labels over all); ids unique over the whole array."""
    vol = mask[None] if mask.ndim == 2 else mask
    grid = (vol.shape[0], -(-vol.shape[1] // block_px), -(-vol.shape[2] // block_px))
    blocks = list(np.ndindex(*grid))
    n = len(blocks)
    local = {}
    records = []
    for k in range(pieces):
        mine = blocks[k * n // pieces:(k + 1) * n // pieces]
        labeller = PieceLabeller(grid, [flat_index(b, grid) for b in mine], 0)
        for z, by, bx in mine:
            sl = (slice(z, z + 1), slice(by * block_px, (by + 1) * block_px), slice(bx * block_px, (bx + 1) * block_px))
            labels, count = ndimage.label(vol[sl][0])
            local[(z, by, bx)] = (sl, labels)
            labeller.add((z, by, bx), labels[None], count)
        records.append(labeller.record)
    numbering = number_labels(records, grid, 0, what="cells")
    out = np.zeros(vol.shape, np.int64)
    for index, (sl, labels) in local.items():
        out[sl] = numbering.final[numbering.provisional(flat_index(index, grid), labels)][None]
    out = out.astype(np.uint32)
    return out[0] if mask.ndim == 2 else out


# -- core ----------------------------------------------------------------------------------------
def test_numbering_joins_across_faces_keeps_fixed_ids_apart_and_numbers_by_smallest_id() -> None:
    # two blocks side by side (grid 1 x 1 x 2); values <= 2 are fixed (seed) ids, never joined
    left = np.array([[[3, 1], [0, 2]]])  # own value 3 -> provisional 3
    right = np.array([[[4, 2], [2, 0]]])  # own 3, 4 -> provisional 4, 5 (offset 1)
    grid = (1, 1, 2)
    labeller = PieceLabeller(grid, [0, 1], 2)
    labeller.add((0, 0, 0), left, 1)
    labeller.add((0, 0, 1), right, 2)
    numbering = number_labels([labeller.record], grid, 2, what="cells")
    assert numbering.offsets.tolist() == [0, 1]
    # across the face: left's 1 meets right's 4 (provisional 5): joined; left's 2 meets right's 2
    assert numbering.final.tolist() == [0, 1, 2, 3, 4, 1]
    split = [PieceLabeller(grid, [b], 2) for b in (0, 1)]  # the same in two pieces: the same numbering
    split[0].add((0, 0, 0), left, 1)
    split[1].add((0, 0, 1), right, 2)
    assert number_labels([s.record for s in split], grid, 2, what="cells").final.tolist() == numbering.final.tolist()


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images split the foreground identically (ids may differ)."""
    fg = a > 0
    if not np.array_equal(fg, b > 0):
        return False
    pairs = np.unique(np.stack([a[fg], b[fg]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


@pytest.mark.parametrize(("block_px", "pieces"), [pytest.param(b, k, id=f"block-{b}-pieces-{k}")
                                                  for b, k in ((1, 7), (3, 2), (8, 1), (17, 3), (200, 1))])
def test_blockwise_labels_equal_whole_plane_labels(block_px: int, pieces: int) -> None:
    rng = np.random.default_rng(block_px)
    mask = ndimage.binary_opening(rng.random((2, 61, 75)) > 0.45)  # blobs with long snakes
    got = label_blockwise(mask, block_px=block_px, pieces=pieces)
    assert np.array_equal(got, label_blockwise(mask, block_px=block_px))  # any number of pieces: the same ids
    assert got.dtype == np.uint32
    for z in range(2):
        assert same_partition(got[z], ndimage.label(mask[z])[0])
    # ids are unique across slices and consecutive
    n = sum(ndimage.label(mask[z])[1] for z in range(2))
    assert sorted(np.unique(got[got > 0]).tolist()) == list(range(1, n + 1))


def test_cell_on_block_corner_gets_one_label() -> None:
    mask = discs((1, 64, 64), [(0, 32, 32)], 9.5)[0] > 0  # corner of four 32-px blocks
    got = label_blockwise(mask, block_px=32)
    assert np.unique(got[mask]).tolist() == [1] and got.max() == 1
    # a U shape whose arms meet only far from the block border it crosses
    u = np.zeros((40, 40), bool)
    u[5:35, 5:8] = u[5:35, 30:33] = u[32:35, 5:33] = True
    assert label_blockwise(u, block_px=16).max() == 1


# -- I/O -----------------------------------------------------------------------------------------
def run_jobs(stack: Path, model: Path, root: Path, jobs: int, **kw) -> list[Path]:
    parts = [root / f"part{j}" for j in range(jobs)]
    order = list(range(jobs))
    random.Random(jobs).shuffle(order)
    for j in order:
        predict_job(stack, model, parts[j], job=j, jobs=jobs, device="cpu", **kw)
    return parts


def store_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_one_job_and_k_jobs_give_identical_stores(tmp_path: Path, stand_in_model: Path) -> None:
    image = discs((2, 70, 90), [(0, 32, 32), (1, 10, 64), (1, 50, 20)], 8.5)
    stack = write_stack(tmp_path / "s.ome.zarr", image)
    outs = []
    for jobs in (1, 3, 7):
        parts = run_jobs(stack, stand_in_model, tmp_path / f"run{jobs}", jobs, block_px=32, tile_out=16)
        out = tmp_path / f"pred{jobs}.ome.zarr"
        merge_parts(parts[::-1], stack=stack, out=out)
        outs.append(store_bytes(out))
    assert outs[0] == outs[1] == outs[2]
    assert len(outs[0]) > 10


def test_merged_prediction_layout_and_instances(tmp_path: Path, stand_in_model: Path) -> None:
    # 2 pyramid levels need >= 512 px; a cell sits on the corner of four 128-px blocks
    image = discs((1, 520, 530), [(0, 128, 128), (0, 300, 60), (0, 384, 256)], 12.5)
    stack = write_stack(tmp_path / "s.ome.zarr", image)
    parts = run_jobs(stack, stand_in_model, tmp_path, 2, block_px=128, tile_out=128)
    out = tmp_path / "pred.ome.zarr"
    tif = tmp_path / "inst.tif"
    summary = merge_parts(parts, stack=stack, out=out, tiff=tif, settings=MergeSettings(tiff_content="instances"))
    assert summary.instances == 3
    root = zarr.open_group(out, mode="r")
    ome = root.attrs["ome"]
    assert [a["name"] for a in ome["multiscales"][0]["axes"]] == ["c", "z", "y", "x"]
    assert [d["path"] for d in ome["multiscales"][0]["datasets"]] == ["0", "1"]
    level1 = ome["multiscales"][0]["datasets"][1]
    assert level1["coordinateTransformations"][0]["scale"] == [1.0, 2.0, 1.0, 1.0]
    probs = root["0"]  # uint8 codes round(255 p), the default
    assert probs.dtype == np.uint8 and probs.shape == (2, 1, 520, 530) and probs.chunks == (1, 1, 128, 128)
    assert root["1"].shape == (2, 1, 260, 265)
    np.testing.assert_array_equal(root["1"][:], downsample_plane(probs[:], labels=False))
    assert root["labels"].attrs["ome"]["labels"] == ["segmentation", "instances"]
    seg = root["labels/segmentation/0"][:]
    inst = root["labels/instances/0"][:]
    assert seg.dtype == np.uint8 and inst.dtype == np.uint32
    np.testing.assert_array_equal(seg, (image > 0).astype(np.uint8))  # stand-in: bright = cell
    assert same_partition(inst[0], ndimage.label(image[0] > 0)[0])
    assert len(np.unique(inst[0][116:140, 116:140])) == 2  # corner cell: background + one id
    np.testing.assert_array_equal(root["labels/instances/1"][:], downsample_plane(inst, labels=True))
    assert root["labels/instances"].attrs["ome"]["image-label"]["source"] == {"image": "../../"}
    unet = root.attrs["unet"]
    assert unet["tiling"]["block_px"] == 128 and "argmax" in unet["decision_rule"] and unet["instances"] == 3
    assert unet["probabilities"] == "uint8"
    assert len(unet["model_sha256"]) == 64
    np.testing.assert_array_equal(tifffile.imread(tif), inst[0])  # one slice reads back as (Y, X)


def test_cli_merge_with_tiff(tmp_path: Path, stand_in_model: Path) -> None:
    image = discs((2, 40, 50), [(0, 16, 16), (1, 30, 30)], 6.5)
    stack = write_stack(tmp_path / "s.ome.zarr", image)
    parts = run_jobs(stack, stand_in_model, tmp_path, 2, block_px=16, tile_out=16)
    out, tif = tmp_path / "pred.ome.zarr", tmp_path / "seg.tif"
    assert main(["merge", *map(str, parts), "--stack", str(stack), "-o", str(out), "--tiff", str(tif)]) == 0
    np.testing.assert_array_equal(tifffile.imread(tif), (image > 0).astype(np.uint8))


@pytest.mark.parametrize("encoding", ["uint8", "float16", "float32"])
def test_every_probability_encoding_merges_and_scores(tmp_path: Path, stand_in_model: Path, encoding: str) -> None:
    from unet_core.evaluate.scoring import open_prediction

    image = discs((1, 48, 40), [(0, 20, 20)], 7.5)
    stack = write_stack(tmp_path / "s.ome.zarr", image)
    parts = run_jobs(stack, stand_in_model, tmp_path, 2, block_px=16, tile_out=16, probabilities=encoding)
    out = tmp_path / "pred.ome.zarr"
    merge_parts(parts, stack=stack, out=out, settings=MergeSettings(instances="watershed"))
    root = zarr.open_group(out, mode="r")
    assert root["0"].dtype == np.dtype(encoding) and root.attrs["unet"]["probabilities"] == encoding
    ws = root.attrs["unet"]["watershed"]["as_stored"]
    assert ws == ({"seed": "code >= 230", "mask": "code >= 128"} if encoding == "uint8"
                  else {"seed": "value > 0.9", "mask": "value > 0.5"})
    cell, seg = open_prediction(out).slice(0)
    assert cell.dtype == np.float32 and 0.0 <= cell.min() and cell.max() <= 1.0
    np.testing.assert_array_equal(seg, (image[0] > 0).astype(np.uint8))
    assert root.attrs["unet"]["instances"] == 1


def test_part_of_an_older_version_is_refused_naming_it(two_parts, tmp_path: Path) -> None:
    stack, parts = two_parts
    manifest = parts[0] / "part.json"
    settings = json.loads(manifest.read_text())
    settings["format"] = "unet-pipeline/predict-part/1"
    manifest.write_text(json.dumps(settings))
    with pytest.raises(UserInputError, match="part format 'unet-pipeline/predict-part/1' written by .*rerun 'unet predict'"):
        merge_parts(parts, stack=stack, out=tmp_path / "o.zarr")


# -- bad parts -----------------------------------------------------------------------------------
@pytest.fixture
def two_parts(tmp_path: Path, stand_in_model: Path) -> tuple[Path, list[Path]]:
    stack = write_stack(tmp_path / "s.ome.zarr", discs((1, 40, 40), [(0, 20, 20)], 5.5))
    return stack, run_jobs(stack, stand_in_model, tmp_path, 2, block_px=16, tile_out=16)


def test_missing_job_part(two_parts, tmp_path: Path) -> None:
    stack, parts = two_parts
    with pytest.raises(UserInputError, match=r"2-job run: missing job\(s\) \[1\]"):
        merge_parts(parts[:1], stack=stack, out=tmp_path / "o.zarr")
    with pytest.raises(UserInputError, match=r"job\(s\) \[0\] given twice"):
        merge_parts([parts[0], parts[0], parts[1]], stack=stack, out=tmp_path / "o.zarr")
    assert not (tmp_path / "o.zarr").exists()


def test_unfinished_part(two_parts, tmp_path: Path) -> None:
    stack, parts = two_parts
    (parts[1] / "COMPLETE").unlink()
    with pytest.raises(UserInputError, match="part1: job 1 did not finish"):
        merge_parts(parts, stack=stack, out=tmp_path / "o.zarr")
    (parts[1] / "COMPLETE").write_text("{}")
    next((parts[1] / "done").iterdir()).unlink()
    with pytest.raises(UserInputError, match="part1: 1 block.* not finished"):
        merge_parts(parts, stack=stack, out=tmp_path / "o.zarr")


def test_parts_of_different_runs(two_parts, tmp_path: Path) -> None:
    stack, parts = two_parts
    manifest = parts[1] / "part.json"
    settings = json.loads(manifest.read_text())
    settings["model_sha256"] = "0" * 64
    manifest.write_text(json.dumps(settings))
    with pytest.raises(UserInputError, match="from another run .*model_sha256"):
        merge_parts(parts, stack=stack, out=tmp_path / "o.zarr")


def test_wrong_stack_or_not_a_part(two_parts, tmp_path: Path) -> None:
    stack, parts = two_parts
    other = write_stack(tmp_path / "other.ome.zarr", np.zeros((1, 41, 40), np.uint8))
    with pytest.raises(UserInputError, match="shape .* differs from the predicted stack"):
        merge_parts(parts, stack=other, out=tmp_path / "o.zarr")
    with pytest.raises(UserInputError, match="not a 'unet predict' part store"):
        merge_parts([other], stack=stack, out=tmp_path / "o.zarr")
    with pytest.raises(UserInputError, match="lies inside the input"):  # the output inside a part given
        merge_parts([tmp_path], stack=stack, out=tmp_path / "o.zarr")
    with pytest.raises(UserInputError, match="no part stores"):
        merge_parts([], stack=stack, out=tmp_path / "o.zarr")


def _same_partition_any(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to a relabelling of the non-zero ids (0 stays 0)."""
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


@pytest.mark.parametrize(("jobs", "block_px"), [pytest.param(1, 64, id="1job-64"), pytest.param(3, 32, id="3jobs-32"),
                                                pytest.param(2, 16, id="2jobs-16")])
def test_cli_watershed_equals_whole_slice_watershed(tmp_path: Path, stand_in_model: Path, jobs: int,
                                                     block_px: int) -> None:
    from unet_core.evaluate.scoring import open_prediction
    from unet_core.infer.instances import seeded_watershed

    # two discs touching through a weak neck, one disc on the corner of four blocks, one alone
    image = discs((2, 64, 64), [(0, 20, 20), (0, 20, 36), (0, 32, 48), (1, 32, 32)], 8.5)
    image[0, 18:23, 26:31] = 120  # a dimmer neck between the first two: two seeds, one mask
    stack = write_stack(tmp_path / "s.ome.zarr", image)
    parts = run_jobs(stack, stand_in_model, tmp_path, jobs, block_px=block_px, tile_out=16)
    out, cells = tmp_path / "pred.ome.zarr", tmp_path / "cells.csv"
    assert main(["merge", *map(str, parts), "--stack", str(stack), "-o", str(out), "--instances", "watershed",
                 "--seed-threshold", "0.8", "--halo-px", "64", "--cells", str(cells)]) == 0
    pred = open_prediction(out)
    unet = zarr.open_group(out, mode="r").attrs["unet"]
    assert unet["instance_method"] == "watershed" and unet["watershed"]["seed_threshold"] == 0.8
    for z in range(2):
        whole = seeded_watershed(pred.slice(z)[0], seed_threshold=0.8)
        assert _same_partition_any(pred.instances_slice(z), whole), f"slice {z}"
    assert unet["instances"] == len(np.unique(pred.instances[:])) - 1
    # the table of cells: one row per instance, sums independent of the blocks
    import csv as csv_module

    rows = list(csv_module.DictReader(open(cells)))
    inst = pred.instances[:]
    assert [int(r["id"]) for r in rows] == sorted(np.unique(inst[inst > 0]).tolist())
    for r in rows:
        z, mask = int(r["z"]), inst == int(r["id"])
        yy, xx = np.nonzero(mask[z])
        assert mask[z].sum() == mask.sum() == int(r["area_px"])
        assert float(r["area_um2"]) == pytest.approx(mask.sum() * 0.25)  # pixels of 0.5 x 0.5 um
        assert float(r["centroid_y_px"]) == pytest.approx(yy.mean(), abs=1e-3)
        assert (int(r["bbox_y0"]), int(r["bbox_x1"])) == (yy.min(), xx.max() + 1)
        assert float(r["mean_intensity"]) == pytest.approx(image[z][mask[z]].mean(), rel=1e-5)


@pytest.mark.parametrize("method", ["components", "watershed"])
def test_small_objects_are_dropped_after_merging_across_blocks(tmp_path: Path, stand_in_model: Path,
                                                              method: str) -> None:
    # a 5x5 speck (25 px) alone, and a big cell cut by block faces into pieces smaller than the
    # threshold: only the speck goes, the cell is measured whole
    image = discs((1, 64, 64), [(0, 32, 32)], 10.5)
    image[0, 4:9, 4:9] = 200
    stack = write_stack(tmp_path / "s.ome.zarr", image)
    parts = run_jobs(stack, stand_in_model, tmp_path, 2, block_px=16, tile_out=16)
    out = tmp_path / "pred.ome.zarr"
    summary = merge_parts(parts, stack=stack, out=out, settings=MergeSettings(instances=method, min_object_px=30))
    inst = zarr.open_group(out, mode="r")["labels/instances/0"][0]
    assert summary.instances == 1 and inst.max() == 1
    assert inst[6, 6] == 0 and inst[32, 32] == 1 and (inst == 1).sum() > 300
    assert zarr.open_group(out, mode="r").attrs["unet"]["min_object_px"] == 30


@pytest.mark.parametrize(("jobs", "block_px"), [pytest.param(1, 64, id="1job-64"), pytest.param(2, 16, id="2jobs-16"),
                                                pytest.param(3, 32, id="3jobs-32")])
def test_cli_distance_seeds_with_auto_settings_equal_whole_slice(tmp_path: Path, monkeypatch, jobs: int,
                                                                 block_px: int) -> None:
    """--seeds distance with h and the smallest object derived from the model's median object area
    (which predict copies into the part settings): equal to the whole-slice distance watershed."""
    from unet_core.evaluate.scoring import open_prediction
    from unet_core.infer.instances import auto_h_px, distance_seeded_watershed

    model = tmp_path / "m.pt"
    model.write_bytes(b"stand-in")
    monkeypatch.setattr(unet_core.infer.predict, "load_model",
                        lambda p, expect=None, digest=None: (StandIn(TINY), {"median_object_area_px": 200.0}))
    # two overlapping discs of different sizes (one mask, a neck), one on a block corner, a 3x3 speck
    image = discs((2, 64, 64), [(0, 20, 18), (0, 20, 36), (0, 48, 48), (1, 32, 32)], 8.5)
    image |= discs((2, 64, 64), [(0, 20, 18)], 11.0)
    image[1, 5:8, 5:8] = 200
    stack = write_stack(tmp_path / "s.ome.zarr", image)
    parts = run_jobs(stack, model, tmp_path, jobs, block_px=block_px, tile_out=16)
    out = tmp_path / "pred.ome.zarr"
    assert main(["merge", *map(str, parts), "--stack", str(stack), "-o", str(out), "--instances", "watershed",
                 "--seeds", "distance", "--seed-h-px", "auto", "--min-object-px", "auto", "--halo-px", "64"]) == 0
    unet = zarr.open_group(out, mode="r").attrs["unet"]
    h = auto_h_px(200.0)
    assert unet["watershed"]["seeds"] == "distance" and unet["watershed"]["h_px"] == pytest.approx(h)
    assert unet["min_object_px"] == 10 and unet["median_object_area_px"] == 200.0
    assert "h-maxima of depth h = " in unet["decision_rule"]
    pred = open_prediction(out)
    for z in range(2):
        whole = distance_seeded_watershed(pred.slice(z)[0], h_px=h)
        sizes = np.bincount(whole.ravel())
        whole[(sizes < 10)[whole] & (whole > 0)] = 0  # the 9-px speck goes
        assert _same_partition_any(pred.instances_slice(z), whole), f"slice {z}"
    assert pred.instances_slice(0)[20, 12] != pred.instances_slice(0)[20, 40]  # the overlapping discs split
    assert unet["instances"] == 4


def test_auto_settings_need_a_model_that_stores_the_median_area(tmp_path: Path, stand_in_model: Path,
                                                                capsys) -> None:
    stack = write_stack(tmp_path / "s.ome.zarr", discs((1, 32, 32), [(0, 16, 16)], 6.5))
    parts = run_jobs(stack, stand_in_model, tmp_path, 1, block_px=32, tile_out=16)
    for extra in (["--min-object-px", "auto"], ["--instances", "watershed", "--seeds", "distance"]):
        out = tmp_path / "pred.ome.zarr"
        assert main(["merge", *map(str, parts), "--stack", str(stack), "-o", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "auto scales with the median object area" in err[0] and "retrain" in err[0]
        assert not out.exists()


# -- pieces (--jobs K, --step) ---------------------------------------------------------------------
METHODS = {
    "components": [],
    "threshold": ["--instances", "watershed", "--seed-threshold", "0.8", "--halo-px", "16"],
    "distance": ["--instances", "watershed", "--seeds", "distance", "--seed-h-px", "1.5", "--halo-px", "16"],
}


def _stack_and_parts(tmp_path: Path, model: Path) -> tuple[Path, list[Path]]:
    # discs touching through necks, on block corners, specks; 2 slices of 70 x 90 px, 16-px blocks
    rng = np.random.default_rng(5)
    centres = [(z, int(y), int(x)) for z in range(2) for y, x in rng.integers(0, 80, (9, 2))]
    image = discs((2, 70, 90), centres, 7.5)
    image[:, 3:5, 3:5] = 200
    stack = write_stack(tmp_path / "s.ome.zarr", image)
    return stack, run_jobs(stack, model, tmp_path / "parts", 2, block_px=16, tile_out=16)


def _merge_args(stack: Path, parts: list[Path], out: Path, method: str, jobs: int) -> list[str]:
    return ["merge", *map(str, parts), "--stack", str(stack), "-o", str(out / "p.ome.zarr"), "--cells",
            str(out / "cells.csv"), "--tiff", str(out / "t.tif"), "--tiff-content", "instances",
            "--min-object-px", "5", *METHODS[method], "--jobs", str(jobs)]


def _outputs(out: Path) -> dict[str, bytes]:
    return {**store_bytes(out / "p.ome.zarr"), "cells": (out / "cells.csv").read_bytes(),
            "tiff": (out / "t.tif").read_bytes()}


def run_in_pieces(args: list[str], *, steps: tuple[str, ...], jobs: int, order_seed: int) -> None:
    order = random.Random(order_seed)
    for step in steps:
        if step in ("seeds", "cells", "write"):
            pieces = list(range(jobs))
            order.shuffle(pieces)
            for k in pieces:
                assert main([*args, "--step", step, "--job", str(k)]) == 0
        else:
            assert main([*args, "--step", step]) == 0


@pytest.mark.parametrize("method", list(METHODS))
def test_any_number_of_pieces_in_any_order_gives_the_same_bytes(tmp_path: Path, stand_in_model: Path,
                                                                method: str) -> None:
    from unet_core.infer.merge import STEPS, steps_for
    from unet_core.cli.merge import STEPS as CLI_STEPS

    assert CLI_STEPS == STEPS
    stack, parts = _stack_and_parts(tmp_path, stand_in_model)
    (tmp_path / "one").mkdir()
    assert main(_merge_args(stack, parts, tmp_path / "one", method, 1)) == 0
    reference = _outputs(tmp_path / "one")
    assert len(reference) > 10 and reference["cells"].count(b"\n") > 5
    steps = steps_for(MergeSettings(instances="components" if method == "components" else "watershed"))
    for jobs in (2, 5):
        out = tmp_path / f"k{jobs}"
        out.mkdir()
        run_in_pieces(_merge_args(stack, parts[::-1], out, method, jobs), steps=steps, jobs=jobs, order_seed=jobs)
        assert _outputs(out) == reference, f"{jobs} pieces"
        assert not (out / "p.ome.zarr.work").exists()  # finish removes the work folder
    (tmp_path / "k3").mkdir()
    assert main(_merge_args(stack, parts, tmp_path / "k3", method, 3)) == 0  # all rounds in one process
    assert _outputs(tmp_path / "k3") == reference


def test_a_killed_piece_reruns_alone_and_a_finished_step_does_nothing(tmp_path: Path, stand_in_model: Path,
                                                                      monkeypatch, capsys) -> None:
    import unet_core.infer.merge as merge

    stack, parts = _stack_and_parts(tmp_path, stand_in_model)
    out = tmp_path / "o"
    out.mkdir()
    args = _merge_args(stack, parts, out, "distance", 3)
    for step, job in (("start", None), ("seeds", 0), ("seeds", 1), ("seeds", 2), ("number-seeds", None),
                      ("cells", 0)):
        assert main([*args, "--step", step, *([] if job is None else ["--job", str(job)])]) == 0
    work = out / "p.ome.zarr.work"
    done = (work / "cells-0.npz").stat().st_mtime_ns
    calls = []
    real = merge.block_rows

    def dies_on_the_second_block(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill: no record is written
        return real(*a, **kw)

    monkeypatch.setattr(merge, "block_rows", dies_on_the_second_block)
    assert main([*args, "--step", "cells", "--job", "1"]) != 0
    monkeypatch.setattr(merge, "block_rows", real)
    assert not (work / "cells-1.npz").exists() and not (work / ".piece-1.lock").exists()
    assert not (work / "cells-1.rows").exists() and sorted(work.glob(".*tmp*")) == []
    assert main([*args, "--step", "number-cells"]) == 2  # piece 1 is not finished: one line naming it
    assert "cells-1.npz: missing; run 'unet merge --step cells --job 1'" in capsys.readouterr().err
    assert main([*args, "--step", "cells", "--job", "0"]) == 0  # done already: nothing to do
    assert (work / "cells-0.npz").stat().st_mtime_ns == done
    for step, job in (("cells", 1), ("cells", 2), ("number-cells", None), ("write", 0), ("write", 1),
                      ("write", 2), ("finish", None)):
        assert main([*args, "--step", step, *([] if job is None else ["--job", str(job)])]) == 0
    (tmp_path / "ref").mkdir()
    assert main(_merge_args(stack, parts, tmp_path / "ref", "distance", 1)) == 0
    assert _outputs(out) == _outputs(tmp_path / "ref")


def test_specks_inside_a_block_are_dropped_there_and_own_labels_renumbered_in_order() -> None:
    from unet_core.infer.cells import block_rows
    from unet_core.infer.merge import _without_specks

    n_fixed = 3  # 1..3: numbered seeds (kept whatever their size)
    labels = np.zeros((8, 10), np.uint32)
    labels[0, 0] = 4  # own speck on the block's edge: kept (it may join a neighbour's label)
    labels[2:4, 2:4] = 5  # own speck inside: dropped
    labels[5:8, 4:8] = 6  # own object, 12 px: kept
    labels[2, 7] = 7  # own speck inside: dropped
    labels[3, 8] = 2  # a seed's single pixel: kept
    labels[6, 1] = 8  # own speck inside: dropped
    rows = block_rows(0, 0, (0, 0), labels, None, n_fixed=n_fixed, slots=np.full(n_fixed + 1, -1, np.int64))
    out, kept, n = _without_specks(labels, rows, n_fixed, 5, min_px=5)
    assert n == 2
    expected = np.zeros_like(labels)
    expected[0, 0], expected[5:8, 4:8], expected[3, 8] = 4, 5, 2
    assert np.array_equal(out, expected)
    assert sorted(kept["value"].tolist()) == [2, 4, 5] and kept[kept["value"] == 5]["area"][0] == 12
    assert labels[2, 2] == 5  # the caller's array is left as it was
    same = _without_specks(labels, rows, n_fixed, 5, min_px=0)  # no smallest size: nothing dropped
    assert same[0] is labels and same[2] == 5


def test_cell_table_streamed_in_small_chunks_and_id_ranges_gives_the_same_bytes(tmp_path: Path,
                                                                                stand_in_model: Path,
                                                                                monkeypatch, capsys) -> None:
    """The serial round reads the pieces' rows a chunk at a time and combines the table a range of ids
    at a time: any chunk and range size gives the same table (integer sums; float sums in row order)."""
    import unet_core.infer.cells as cells

    stack, parts = _stack_and_parts(tmp_path, stand_in_model)
    (tmp_path / "ref").mkdir()
    assert main(_merge_args(stack, parts, tmp_path / "ref", "distance", 2)) == 0
    monkeypatch.setattr(cells, "ROWS_PER_READ", 3)
    monkeypatch.setattr(cells, "IDS_PER_PASS", 4)
    monkeypatch.setattr(cells, "_LINES_PER_WRITE", 5)
    out = tmp_path / "small"
    out.mkdir()
    args = _merge_args(stack, parts, out, "distance", 2)
    run_in_pieces(args, steps=("start", "seeds", "number-seeds", "cells"), jobs=2, order_seed=1)
    reference = _outputs(tmp_path / "ref")
    assert reference["cells"].count(b"\n") > 2 * 4  # several ranges of ids
    rows = out / "p.ome.zarr.work" / "cells-1.rows"
    good = rows.read_bytes()
    rows.write_bytes(good[:-8])  # a damaged record: one line naming the fix
    assert main([*args, "--step", "number-cells"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cells-1.rows" in err[0] and "--step cells" in err[0], err
    assert not (out / "p.ome.zarr.work" / "cell-ids.npz").exists()
    rows.write_bytes(good)
    run_in_pieces(args, steps=("number-cells", "write", "finish"), jobs=2, order_seed=2)
    assert _outputs(out) == reference


def test_steps_refuse_other_runs_and_steps_out_of_order_in_one_line(tmp_path: Path, stand_in_model: Path,
                                                                    capsys) -> None:
    stack, parts = _stack_and_parts(tmp_path, stand_in_model)
    out = tmp_path / "o"
    out.mkdir()
    args = _merge_args(stack, parts, out, "components", 2)

    def refused(extra: list[str], expected: str, base: list[str] = args) -> None:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err

    refused(["--step", "cells", "--job", "0"], "no merge was started here")
    assert main([*args, "--step", "start"]) == 0
    refused(["--step", "seeds", "--job", "0"], "not a step of a merge with --instances components")
    refused(["--step", "cells"], "give --job k (0 <= k < 2)")
    refused(["--step", "cells", "--job", "2"], "--job must be in [0, 2)")
    refused(["--step", "number-cells"], "cells-0.npz: missing; run 'unet merge --step cells --job 0'")
    other_k = _merge_args(stack, parts, out, "components", 3)
    refused(["--step", "cells", "--job", "0"], "started with other inputs or settings than this --step cells "
            "(differs in jobs)", base=other_k)
    refused(["--min-object-px", "7", "--step", "cells", "--job", "0"], "differs in result.settings")
    refused(["--job", "1"], "--job and --work go with --step")
    refused(["--jobs", "1000", "--step", "cells", "--job", "0"], "merge --jobs 1000")
    assert not (out / "p.ome.zarr").exists() and not (out / "cells.csv").exists()


def test_two_merges_into_one_output_at_once_are_refused(tmp_path: Path, stand_in_model: Path, capsys) -> None:
    import json
    import subprocess

    from unet_core.common.atomic import host_name, process_start

    stack, parts = _stack_and_parts(tmp_path, stand_in_model)
    out = tmp_path / "o"
    out.mkdir()
    args = _merge_args(stack, parts, out, "components", 2)
    other = subprocess.Popen(["sleep", "60"])  # stands for a merge that writes the output now
    try:
        lock = out / ".p.ome.zarr.merge-lock"
        lock.write_text(json.dumps({"host": host_name(), "pid": other.pid, "started": process_start(other.pid)}))
        for extra in ([], ["--step", "start"]):
            assert main([*args, *extra]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"another 'unet merge' (pid {other.pid}" in err[0], err
        assert sorted(p.name for p in out.iterdir()) == [".p.ome.zarr.merge-lock"]
    finally:
        other.kill()
        other.wait()
    assert main(args) == 0  # the lock of a process that is gone is taken over
    assert (out / "p.ome.zarr").is_dir() and not lock.exists()


def test_more_ids_than_uint32_holds_is_one_line_before_any_id_is_written() -> None:
    from unet_core.infer.block_labels import PieceLabels

    huge = PieceLabels(blocks=[0, 1], counts=[2**31, 2**31 + 5])
    with pytest.raises(UserInputError, match=r"4294967301 cells \(counted per block, before joining across "
                                             r"block faces\): more than 2\*\*32 - 1"):
        number_labels([huge], (1, 1, 2), 0, what="cells")


def test_a_rerun_of_a_finished_merge_does_nothing_and_a_foreign_record_is_refused(tmp_path: Path,
                                                                                 stand_in_model: Path,
                                                                                 capsys) -> None:
    stack, parts = _stack_and_parts(tmp_path, stand_in_model)
    out = tmp_path / "o"
    out.mkdir()
    args = _merge_args(stack, parts, out, "components", 2)
    run_in_pieces(args, steps=("start", "cells", "number-cells", "write", "finish"), jobs=2, order_seed=0)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    for extra in ([], ["--step", "finish"]):
        assert main([*args, *extra]) == 0  # nothing to do: nothing written
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    # a record of another run (other settings) in this run's work folder: one line naming it
    other = tmp_path / "other"
    other.mkdir()
    other_args = _merge_args(stack, parts, other, "components", 2)
    assert main([*other_args, "--min-object-px", "9", "--step", "start"]) == 0
    assert main([*other_args, "--min-object-px", "9", "--step", "cells", "--job", "0"]) == 0
    again = tmp_path / "again"
    again.mkdir()
    again_args = _merge_args(stack, parts, again, "components", 2)
    assert main([*again_args, "--step", "start"]) == 0
    (again / "p.ome.zarr.work" / "cells-0.npz").write_bytes((other / "p.ome.zarr.work" / "cells-0.npz").read_bytes())
    assert main([*again_args, "--step", "cells", "--job", "1"]) == 0
    capsys.readouterr()
    assert main([*again_args, "--step", "number-cells"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cells-0.npz: a record of another merge run" in err[0], err
