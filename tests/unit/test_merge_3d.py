"""``unet merge`` of a 3-D network's part stores (issue 36, item 6): 3-D cells.

The parts are written here in the layout of a 3-D predict job (chunks (C, block_z, B, B), done
markers ``bz.by.bx``, geometry ``Tiling.to_dict()``) from a known P(cell) volume, so the merge is
checked against hand values and against one labelling of the whole volume: 6-connected components
joined across block faces in z, y and x; byte-identical for 1 and K pieces (and K predict jobs);
the cell table's volume (µm³) and z centroid; the seeded watershed in 3-D (threshold and distance
seeds, block-wise with halos along z) equal to the whole-volume watershed; the refusals.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import ndimage

from unet_core.cli import main
from unet_core.infer.instances import components_3d, distance_seeded_watershed_3d, seed_mask, seeded_watershed_3d
from unet_core.infer.merge import merge_parts
from unet_core.infer.merge_settings import MergeSettings
from unet_core.infer.part_store import COMPLETE, DONE, MANIFEST, PART_FORMAT, PROBABILITIES, SEGMENTATION, PartStore
from unet_core.infer.tiling import Tiling
from unet_core.io.ngff import PyramidWriter, create_array, open_stack
from unet_core.model.spec import UNetSpec

#: A 3-D net: in-plane stride 2, z stride 2 (blocks of 2 or 4 slices).
SPEC3 = UNetSpec(depth=1, base_channels=2, dropout=0.0, dims=3, pool_z=(2,), kernel_z=(3, 3))
VOXEL_UM = (2.0, 0.5, 0.5)


def write_stack(path: Path, image: np.ndarray, *, voxel_size_given: bool = True) -> Path:
    root = zarr.open_group(path, mode="w")
    writer = PyramidWriter(root, image.shape, image.dtype, (2, 32, 32), VOXEL_UM, unit="micrometer")
    for z in range(image.shape[0]):
        writer.write_plane(z, image[z])
    writer.finish()
    root.attrs.update({"unet": {"intensity": {"mean": float(image.mean()), "std": float(image.std())},
                                "voxel_size_given": voxel_size_given}})
    return path


def write_parts(root: Path, stack: Path, p_cell: np.ndarray, tiling: Tiling, jobs: int) -> list[Path]:
    """Part stores of ``jobs`` 3-D predict jobs holding P(cell) = ``p_cell`` (float32 encoding)
    and its argmax segmentation (ties -> class 0), in the layout of ``unet predict``."""
    probs = np.stack([1 - p_cell, p_cell]).astype(np.float32)
    seg = (p_cell > 0.5).astype(np.uint8)
    st = open_stack(stack)
    c, b, bz = 2, tiling.block_px, tiling.block_z
    paths = []
    for job in range(jobs):
        path = root / f"part{job}"
        path.mkdir(parents=True)
        group = zarr.open_group(path, mode="w")
        p_arr = create_array(group, PROBABILITIES, shape=probs.shape, dtype=np.float32, chunks=(c, bz, b, b),
                             dimension_names=list("czyx"))
        s_arr = create_array(group, SEGMENTATION, shape=seg.shape, dtype=np.uint8, chunks=(bz, b, b),
                             dimension_names=list("zyx"))
        config = {"write_empty_chunks": True}  # as predict: every finished block's chunk is there
        p_arr, s_arr = p_arr.with_config(config), s_arr.with_config(config)
        (path / DONE).mkdir()
        settings = {
            "format": PART_FORMAT, "stack": str(stack), "shape": list(seg.shape), "model_sha256": "0" * 64,
            "tiling": tiling.to_dict(), "job": job, "jobs": jobs, "tta": "none", "precision": "fp32",
            "device": "cpu", "intensity": st.intensity.to_dict(), "intensity_normalisation": "stack",
            "logit_offsets": None, "probabilities": "float32", "batch": 1, "backend": "torch",
            "cell_channel": 1, "median_object_area_px": 30.0,
        }
        (path / MANIFEST).write_text(json.dumps(settings))
        store = PartStore(path)
        for block in tiling.job_blocks(job, jobs):
            sl = block.write.to_slices()
            p_arr[(slice(None), *sl)] = probs[(slice(None), *sl)]
            s_arr[sl] = seg[sl]
            store.mark_done(block)
        store.mark_complete({"job": job})
        assert (path / COMPLETE).is_file()
        paths.append(path)
    order = list(range(jobs))
    random.Random(jobs).shuffle(order)
    return [paths[j] for j in order]


def blobs(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Smooth random P(cell) in [0, 1]: blobs of many sizes, crossing block faces everywhere."""
    noise = np.random.default_rng(seed).normal(size=shape)
    smooth = ndimage.gaussian_filter(noise, (0.8, 1.5, 1.5), mode="reflect")
    return (1 / (1 + np.exp(-(smooth / smooth.std() - 0.8) * 3))).astype(np.float32)  # ~17 % cell


def store_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    fg = a > 0
    if not np.array_equal(fg, b > 0):
        return False
    pairs = np.unique(np.stack([a[fg], b[fg]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


@pytest.fixture
def volume_case(tmp_path: Path) -> tuple[Path, np.ndarray, Tiling]:
    shape = (9, 23, 21)  # odd sizes: clipped edge blocks along every axis
    p = blobs(shape, 0)
    image = (p * 1000).astype(np.uint16)
    stack = write_stack(tmp_path / "s.ome.zarr", image)
    return stack, p, Tiling(shape, SPEC3, block_px=8, tile_out=4, block_z=2)


# -- components in 3-D ---------------------------------------------------------------------------
def test_k_pieces_and_k_jobs_give_the_bytes_of_one_and_the_whole_volume_components(
    tmp_path: Path, volume_case
) -> None:
    stack, p, tiling = volume_case
    assert tiling.grid == (5, 3, 3)
    outputs = []
    for jobs, pieces in ((1, 1), (3, 4), (7, 13)):
        parts = write_parts(tmp_path / f"run{jobs}", stack, p, tiling, jobs)
        out = tmp_path / f"pred{pieces}.ome.zarr"
        cells = tmp_path / f"cells{pieces}.csv"
        merge_parts(parts, stack=stack, out=out, cells=cells, settings=MergeSettings(jobs=pieces))
        outputs.append({**store_bytes(out), "cells": cells.read_bytes()})
    assert outputs[0] == outputs[1] == outputs[2]
    root = zarr.open_group(tmp_path / "pred1.ome.zarr", mode="r")
    inst = root["labels/instances/0"][:]
    want = components_3d(p > 0.5)
    assert same_partition(inst, want)
    assert inst.max() == want.max() > 15  # ids 1..K, as many as the whole volume's
    # a cell spanning several z blocks keeps one id (6-connected across z faces: not per slice)
    spans = [len({z // tiling.block_z for z in np.nonzero(want == i)[0]}) for i in range(1, want.max() + 1)]
    assert max(spans) >= 3
    np.testing.assert_array_equal(root["labels/segmentation/0"][:], (p > 0.5).astype(np.uint8))
    np.testing.assert_array_equal(root["0"][:][1], p)  # float32 parts copied as they are
    unet = root.attrs["unet"]
    assert unet["dims"] == 3 and unet["voxel_size"] == list(VOXEL_UM)
    assert "6-connected" in unet["decision_rule"] and unet["instances"] == int(want.max())
    assert root["0"].chunks == (1, 1, 8, 8)  # the prediction store keeps today's layout


def test_a_rod_through_every_z_block_face_keeps_one_id(tmp_path: Path) -> None:
    shape = (8, 8, 8)
    p = np.zeros(shape, np.float32)
    p[:, 3, 3] = 1.0  # one voxel wide: crosses the faces z = 2, 4, 6 and nothing else
    p[1:7, 5:8, 0:2] = 1.0  # a second cell crossing z and y faces
    p[4, 0, 6] = 1.0  # touching the rod along no face: its own cell
    stack = write_stack(tmp_path / "s.ome.zarr", (p * 100).astype(np.uint16))
    tiling = Tiling(shape, SPEC3, block_px=4, tile_out=4, block_z=2)
    out = tmp_path / "p.ome.zarr"
    summary = merge_parts(write_parts(tmp_path, stack, p, tiling, 2), stack=stack, out=out,
                          settings=MergeSettings(jobs=3))
    inst = zarr.open_group(out, mode="r")["labels/instances/0"][:]
    assert summary.instances == 3
    assert len(set(inst[:, 3, 3].tolist())) == 1 and inst[0, 3, 3] > 0
    assert len(np.unique(inst[1:7, 5:8, 0:2])) == 1
    assert len(np.unique(inst[inst > 0])) == 3


def test_cells_table_of_3d_cells_against_hand_values(tmp_path: Path) -> None:
    shape = (7, 10, 10)
    p = np.zeros(shape, np.float32)
    p[1:5, 2:5, 3:7] = 1.0  # 4 x 3 x 4 = 48 voxels across the z faces 2, 4 and the x face 4
    p[6, 8, 8] = 1.0  # a one-voxel cell in the last (clipped) z block
    image = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
    stack = write_stack(tmp_path / "s.ome.zarr", image)
    tiling = Tiling(shape, SPEC3, block_px=4, tile_out=4, block_z=2)
    parts = write_parts(tmp_path, stack, p, tiling, 3)
    tables = []
    for pieces in (1, 5):
        cells = tmp_path / f"cells{pieces}.csv"
        merge_parts(parts, stack=stack, out=tmp_path / f"p{pieces}.ome.zarr", cells=cells,
                    settings=MergeSettings(jobs=pieces))
        tables.append(cells.read_bytes())
    assert tables[0] == tables[1]
    rows = list(csv.DictReader((tmp_path / "cells1.csv").open()))
    assert list(rows[0]) == ["id", "volume_vox", "volume_um3", "centroid_z_px", "centroid_y_px", "centroid_x_px",
                             "centroid_z_um", "centroid_y_um", "centroid_x_um", "bbox_z0", "bbox_y0", "bbox_x0",
                             "bbox_z1", "bbox_y1", "bbox_x1", "mean_intensity"]
    box, dot = rows
    assert box["id"] == "1" and box["volume_vox"] == "48"
    assert float(box["volume_um3"]) == 48 * 2.0 * 0.5 * 0.5  # 24 µm³
    assert float(box["centroid_z_px"]) == 2.5 and float(box["centroid_z_um"]) == 5.0  # (1+2+3+4)/4 slices x 2 µm
    assert float(box["centroid_y_px"]) == 3.0 and float(box["centroid_x_um"]) == 4.5 * 0.5
    assert [int(box[k]) for k in ("bbox_z0", "bbox_y0", "bbox_x0", "bbox_z1", "bbox_y1", "bbox_x1")] == [1, 2, 3, 5, 5, 7]
    assert float(box["mean_intensity"]) == pytest.approx(image[1:5, 2:5, 3:7].mean(), rel=1e-6)
    assert dot["volume_vox"] == "1" and float(dot["centroid_z_um"]) == 12.0 and dot["bbox_z1"] == "7"


def test_small_3d_objects_are_dropped_after_joining_across_z(tmp_path: Path) -> None:
    """--min-object-px counts voxels of the whole 3-D cell: a rod of 8 voxels, 2 in each z block,
    stays with 5; a 4-voxel cell inside one block goes."""
    shape = (8, 8, 8)
    p = np.zeros(shape, np.float32)
    p[:, 1, 1] = 1.0
    p[5:7, 5:7, 5] = 1.0  # 4 voxels, inside block (2, 1, 1)
    stack = write_stack(tmp_path / "s.ome.zarr", (p * 100).astype(np.uint16))
    tiling = Tiling(shape, SPEC3, block_px=4, tile_out=4, block_z=4)
    out = tmp_path / "p.ome.zarr"
    merge_parts(write_parts(tmp_path, stack, p, tiling, 2), stack=stack, out=out,
                settings=MergeSettings(min_object_px=5, jobs=2))
    inst = zarr.open_group(out, mode="r")["labels/instances/0"][:]
    assert set(np.unique(inst).tolist()) == {0, 1} and (inst[:, 1, 1] == 1).all()


def test_cli_3d_merge_in_steps_and_pieces_gives_the_same_bytes(tmp_path: Path, volume_case) -> None:
    stack, p, tiling = volume_case
    parts = write_parts(tmp_path / "parts", stack, p, tiling, 2)

    def args(out: Path, jobs: int) -> list[str]:
        out.mkdir()
        return ["merge", *map(str, parts), "--stack", str(stack), "-o", str(out / "p.ome.zarr"),
                "--cells", str(out / "cells.csv"), "--tiff", str(out / "t.tif"), "--tiff-content", "instances",
                "--min-object-px", "3", "--jobs", str(jobs)]

    def outputs(out: Path) -> dict[str, bytes]:
        return {**store_bytes(out / "p.ome.zarr"), "cells": (out / "cells.csv").read_bytes(),
                "tiff": (out / "t.tif").read_bytes()}

    assert main(args(tmp_path / "one", 1)) == 0
    base = args(tmp_path / "k4", 4)
    for step in ("start", "cells", "number-cells", "write", "finish"):
        if step in ("cells", "write"):
            for k in (3, 0, 2, 1):
                assert main([*base, "--step", step, "--job", str(k)]) == 0
        else:
            assert main([*base, "--step", step]) == 0
    assert outputs(tmp_path / "k4") == outputs(tmp_path / "one")


# -- the seeded watershed in 3-D ------------------------------------------------------------------
WATERSHED_RULES = {
    "threshold": (["--seed-threshold", "0.7", "--seed-erosion-px", "1", "--mask-threshold", "0.5"],
                  lambda p: seeded_watershed_3d(p, spacing_um=VOXEL_UM, seed_threshold=0.7, seed_erosion_px=1,
                                                mask_threshold=0.5)),
    "distance": (["--seeds", "distance", "--seed-h-um", "0.3", "--mask-threshold", "0.5"],
                 lambda p: distance_seeded_watershed_3d(p, spacing_um=VOXEL_UM, h_um=0.3, mask_threshold=0.5)),
}


def balls(shape: tuple[int, int, int], seed: int, r_um: float = 2.2) -> np.ndarray:
    """P(cell) of nuclei of radius ``r_um`` (mask P > 0.5) on a jittered lattice (4 slices, 10 px
    apart), many touching: chains of them are single components, each ball smaller than 8 px and
    2 slices of 2 µm around its centre."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    p = np.zeros(shape, np.float32)
    for cz in range(1, shape[0], 4):
        for cy in range(4, shape[1], 10):
            for cx in range(4, shape[2], 10):
                jz, jy, jx = rng.integers(-1, 2), rng.integers(-2, 3), rng.integers(-2, 3)
                d = np.sqrt(((z - cz - jz) * VOXEL_UM[0]) ** 2 + ((y - cy - jy) * VOXEL_UM[1]) ** 2
                            + ((x - cx - jx) * VOXEL_UM[2]) ** 2)
                p = np.maximum(p, np.clip(1 - d / (2 * r_um), 0, 1))  # no plateau: few ties to flood
    return p


@pytest.mark.parametrize("rule", list(WATERSHED_RULES))
def test_3d_watershed_in_pieces_equals_the_whole_volume_watershed(tmp_path: Path, rule: str) -> None:
    """With a halo of 8 px (4 µm: 2 slices of 2 µm along z), deeper than the cells, the block-wise
    seeds and flood equal the whole volume's although each window is a part of the volume; 1 and
    5 pieces give the same bytes. (As in 2-D, a cell larger than the halo may be flooded otherwise
    than in the whole volume.)"""
    shape = (13, 37, 35)
    halo = 8
    p = balls(shape, 0)
    stack = write_stack(tmp_path / "s.ome.zarr", (p * 1000).astype(np.uint16))
    tiling = Tiling(shape, SPEC3, block_px=8, tile_out=4, block_z=2)
    parts = write_parts(tmp_path / "parts", stack, p, tiling, 2)
    extra, whole = WATERSHED_RULES[rule]
    outputs = []
    for jobs in (1, 5):
        out = tmp_path / f"k{jobs}"
        out.mkdir()
        assert main(["merge", *map(str, parts), "--stack", str(stack), "-o", str(out / "p.ome.zarr"), "--cells",
                     str(out / "c.csv"), "--instances", "watershed", "--halo-px", str(halo), "--jobs", str(jobs),
                     *extra]) == 0
        outputs.append({**store_bytes(out / "p.ome.zarr"), "cells": (out / "c.csv").read_bytes()})
    assert outputs[0] == outputs[1]
    root = zarr.open_group(tmp_path / "k1" / "p.ome.zarr", mode="r")
    inst = root["labels/instances/0"][:]
    want = whole(p)
    assert same_partition(inst, want)
    assert want.max() > components_3d(p > 0.5).max() + 5  # touching nuclei split: not the components
    unet = root.attrs["unet"]
    assert unet["dims"] == 3 and "3-D cells, 6-connected" in unet["decision_rule"]
    if rule == "distance":
        assert unet["watershed"]["h_um"] == 0.3 and "h = 0.300 µm" in unet["decision_rule"]


def test_3d_threshold_seeds_eroded_along_z_are_the_whole_volume_seeds_at_any_cell_size(tmp_path: Path) -> None:
    """Seeds eroded 4 px of 0.5 µm in-plane and so 1 slice of 2 µm along z: each block's seeds,
    from its window grown by the erosion (and 1 slice), equal the whole volume's seeds."""
    shape = (13, 37, 35)
    p = balls(shape, 0, 3.2)
    stack = write_stack(tmp_path / "s.ome.zarr", (p * 1000).astype(np.uint16))
    tiling = Tiling(shape, SPEC3, block_px=8, tile_out=4, block_z=2)
    parts = write_parts(tmp_path / "parts", stack, p, tiling, 1)
    work = tmp_path / "work"
    args = ["merge", *map(str, parts), "--stack", str(stack), "-o", str(tmp_path / "p.ome.zarr"), "--instances",
            "watershed", "--seed-threshold", "0.5", "--seed-erosion-px", "4", "--jobs", "3", "--work", str(work)]
    assert main([*args, "--step", "start"]) == 0
    for k in (2, 0, 1):
        assert main([*args, "--step", "seeds", "--job", str(k)]) == 0
    seeds = zarr.open_array(work / "store.ome.zarr" / "_scratch" / "seeds", mode="r")[:] > 0
    want = seed_mask(p, seed_threshold=0.5, seed_erosion_px=4, mask_threshold=0.5, spacing_um=VOXEL_UM)
    in_plane = seed_mask(p, seed_threshold=0.5, seed_erosion_px=4, mask_threshold=0.5, spacing_um=(4.0, 0.5, 0.5))
    assert 50 < want.sum() < in_plane.sum()  # eroded along z too (a z spacing of 4 µm: 0 slices)
    np.testing.assert_array_equal(seeds, want)


def test_3d_threshold_seeds_split_two_cells_touching_across_a_z_block_face(tmp_path: Path) -> None:
    """Two balls touching through a thin neck that crosses the z face between blocks: components
    join them, the threshold watershed keeps two ids, each one id across its slices."""
    shape = (8, 12, 12)
    z, y, x = np.indices(shape)
    p = np.zeros(shape, np.float32)
    for cz, cy in ((3, 3), (4, 8)):  # centres on either side of the z face 4
        d = np.sqrt(((z - cz) * 2.0) ** 2 + ((y - cy) * 0.5) ** 2 + ((x - 6) * 0.5) ** 2)  # µm
        p = np.maximum(p, np.clip(1.2 - d / 2.5, 0, 1))
    stack = write_stack(tmp_path / "s.ome.zarr", (p * 100).astype(np.uint16))
    tiling = Tiling(shape, SPEC3, block_px=4, tile_out=4, block_z=4)
    parts = write_parts(tmp_path, stack, p, tiling, 2)
    out = tmp_path / "o"
    out.mkdir()
    assert main(["merge", *map(str, parts), "--stack", str(stack), "-o", str(out / "p.ome.zarr"),
                 "--instances", "watershed", "--seed-threshold", "0.9", "--seed-erosion-px", "0",
                 "--mask-threshold", "0.3", "--halo-px", "16", "--jobs", "3"]) == 0
    inst = zarr.open_group(out / "p.ome.zarr", mode="r")["labels/instances/0"][:]
    assert components_3d(p > 0.3).max() == 1
    assert inst.max() == 2 and inst[3, 3, 6] != inst[4, 8, 6] and inst[3, 3, 6] > 0 and inst[4, 8, 6] > 0
    assert len(np.unique(inst[2:6][inst[2:6] > 0])) == 2 and {1, 2} <= set(np.unique(inst[3])) | set(np.unique(inst[4]))
    assert same_partition(inst, seeded_watershed_3d(p, spacing_um=VOXEL_UM, seed_threshold=0.9, seed_erosion_px=0,
                                                    mask_threshold=0.3))


# -- refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("extra", "expected"), [
    pytest.param(["--instances", "watershed", "--seeds", "distance", "--seed-h-px", "2"],
                 "distance seeds need --seed-h-um", id="distance-seeds-without-h-um"),
    pytest.param(["--instances", "watershed", "--seeds", "distance", "--seed-h-um", "0"],
                 "--seed-h-um 0.0: must be a number of µm > 0", id="h-um-zero"),
    pytest.param(["--min-object-px", "auto"], "--min-object-px auto", id="auto-min-size"),
])
def test_what_3d_parts_do_not_do_is_refused_in_one_line(tmp_path: Path, capsys, extra: list[str],
                                                        expected: str) -> None:
    shape = (4, 8, 8)
    p = blobs(shape, 1)
    stack = write_stack(tmp_path / "s.ome.zarr", (p * 100).astype(np.uint16))
    parts = write_parts(tmp_path, stack, p, Tiling(shape, SPEC3, block_px=4, tile_out=4, block_z=2), 1)
    out = tmp_path / "p.ome.zarr"
    cells = tmp_path / "c.csv"
    assert main(["merge", *map(str, parts), "--stack", str(stack), "-o", str(out), "--cells", str(cells),
                 *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists() and not cells.exists() and not list(tmp_path.glob("*.work"))


def test_a_stack_without_a_voxel_size_is_refused_for_3d_parts(tmp_path: Path, capsys) -> None:
    shape = (4, 8, 8)
    p = blobs(shape, 2)
    stack = write_stack(tmp_path / "s.ome.zarr", (p * 100).astype(np.uint16), voxel_size_given=False)
    parts = write_parts(tmp_path, stack, p, Tiling(shape, SPEC3, block_px=4, tile_out=4, block_z=2), 1)
    out = tmp_path / "p.ome.zarr"
    assert main(["merge", *map(str, parts), "--stack", str(stack), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "voxel size was not given at ingest" in err[0] and "--voxel-size-um" in err[0], err
    assert not out.exists()


# -- through 'unet predict' ----------------------------------------------------------------------
def test_parts_of_unet_predict_with_a_3d_model_merge_into_3d_cells(tmp_path: Path) -> None:
    """A tiny 3-D U-Net's parts from 'unet predict' (1 and 3 jobs): the same merged bytes; the
    segmentation is the parts'; the cells are the whole volume's 6-connected components of it."""
    import torch

    from unet_core.infer.predict import predict_job
    from unet_core.model.checkpoint import save_model
    from unet_core.model.unet import UNet

    shape = (7, 21, 19)
    image = (balls(shape, 1) * 200 + np.random.default_rng(1).integers(0, 40, shape)).astype(np.uint8)
    stack = write_stack(tmp_path / "s.ome.zarr", image)
    spec = UNetSpec(depth=1, base_channels=2, dropout=0.0, dims=3, pool_z=(2,), kernel_z=(3, 3))
    torch.manual_seed(0)
    model = tmp_path / "m.pt"
    save_model(model, UNet(spec), metadata={"voxel_size_um": list(VOXEL_UM)})
    stores = {}
    for jobs in (1, 3):
        parts = [tmp_path / f"run{jobs}" / f"part{j}" for j in range(jobs)]
        for j in reversed(range(jobs)):
            predict_job(stack, model, parts[j], job=j, jobs=jobs, device="cpu", block_px=8, tile_out=4, block_z=2)
        out = tmp_path / f"p{jobs}.ome.zarr"
        merge_parts(parts, stack=stack, out=out, cells=tmp_path / f"c{jobs}.csv", settings=MergeSettings(jobs=jobs))
        stores[jobs] = {**store_bytes(out), "cells": (tmp_path / f"c{jobs}.csv").read_bytes()}
    assert stores[1] == stores[3]
    root = zarr.open_group(tmp_path / "p1.ome.zarr", mode="r")
    seg = root["labels/segmentation/0"][:]
    np.testing.assert_array_equal(seg, zarr.open_array(tmp_path / "run1" / "part0" / "segmentation", mode="r")[:])
    inst = root["labels/instances/0"][:]
    assert 0 < (seg == 1).mean() < 1
    assert same_partition(inst, components_3d(seg == 1)) and root.attrs["unet"]["dims"] == 3
