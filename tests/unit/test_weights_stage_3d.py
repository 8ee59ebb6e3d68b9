"""The weights stage in 3-D (issue 36, items 2-3): ``unet weights --dims 3 --sigma-um S`` and
``unet class-weights --dims 3`` on an ingested stack, chunk-parallel and equal to the
whole-volume kernels byte for byte (z chunks that do not divide Z, a z halo wider than a
chunk), and the refusals: one line naming the file or option, exit 2, nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import zarr
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from unet_core.cli import main
from unet_core.weights import maps as W
from unet_core.weights import blockwise as WD
from unet_core.common.labels import split_label_id
from unet_core.weights.blockwise import volume_blocks
from unet_core.weights.recipe import VolumeWeightRecipe

SPACING = (2.0, 0.5, 0.5)  # µm, as the synthetic 3-D profile: z steps 4x the in-plane ones
SHAPE = (7, 21, 19)


def touching_cells(shape=SHAPE, n: int = 6, *, seed: int = 5) -> np.ndarray:
    """Nearest-seed cells in µm (touching along z and in the plane), ids shuffled, a background margin."""
    rng = np.random.default_rng(seed)
    extent = np.array(shape) * np.array(SPACING)
    seeds = rng.uniform(0, 1, (n, 3)) * extent
    grid = np.indices(shape).reshape(3, -1).T * np.array(SPACING)
    dist, index = cKDTree(seeds).query(grid)
    labels = ((rng.permutation(n) + 1) * 3)[index].reshape(shape).astype(np.uint16)
    labels[dist.reshape(shape) > 4.0] = 0
    return labels


def write_tiffs(tmp_path, labels: np.ndarray, *, voxel_size: bool = True):
    image = np.random.default_rng(1).integers(100, 4000, labels.shape, dtype=np.uint16)
    image_path, labels_path = tmp_path / "image.tif", tmp_path / "labels.tif"
    for path, data in ((image_path, image), (labels_path, labels)):
        if voxel_size:
            tifffile.imwrite(path, data, photometric="minisblack", imagej=True,
                             resolution=(1 / SPACING[2], 1 / SPACING[1]),
                             metadata={"spacing": SPACING[0], "unit": "um", "axes": "ZYX"})
        else:
            tifffile.imwrite(path, data, photometric="minisblack")
    return image_path, labels_path


def ingest(tmp_path, labels: np.ndarray, *, voxel_size: bool = True, chunks: str = "3,16,16", kind=()):
    image_path, labels_path = write_tiffs(tmp_path, labels, voxel_size=voxel_size)
    stack = tmp_path / "stack.ome.zarr"
    assert main(["ingest", str(image_path), str(stack), "--labels", str(labels_path), "--chunks", chunks,
                 *kind]) == 0
    return stack


def unet(*args: object) -> int:
    return main([*map(str, args), "--threads", "2"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("volume")
    labels = touching_cells()
    return ingest(tmp, labels), labels


def whole_volume(labels: np.ndarray, params: W.VolumeWeightParams, class_weights=None):
    classes = W.class_map_3d(labels, separate_touching=True)
    if class_weights is None:
        cells = int(classes.astype(np.int64).sum())
        class_weights = W.class_weights_from_counts(np.array([classes.size - cells, cells]))
    weights = W.weight_map_3d(labels, classes, class_weights=tuple(class_weights), params=params,
                              spacing_um=SPACING).astype(np.float32)
    return classes, weights, np.where(classes == 1, labels, 0).astype(np.int32)


@pytest.mark.parametrize(
    "sigma_um, block_voxels",
    [
        # blocks = the stack's chunks (3, 16, 16): 3 z chunks, the last of one slice, 2 x 2 in the plane
        pytest.param(0.8, 1, id="z-halo-3-stack-chunks"),
        pytest.param(1.5, 1, id="z-halo-wider-than-chunk"),
        pytest.param(0.8, 6 * 21 * 19, id="grouped-chunks"),  # blocks (6, 21, 19): 2 z chunks, whole planes
        pytest.param(1.5, None, id="cli-default-blocks"),  # one block: the whole volume
    ],
)
def test_3d_weights_equal_the_whole_volume_byte_for_byte(tmp_path, stack, sigma_um, block_voxels):
    path, labels = stack
    params = W.VolumeWeightParams(sigma_um=sigma_um)
    assert params.halo_voxels(SPACING)[0] >= 3  # every z chunk (3 slices) needs its neighbours
    out = tmp_path / "weights.zarr"
    if block_voxels is None:
        assert unet("weights", path, out, "--dims", 3, "--sigma-um", sigma_um) == 0
    else:
        with WD.dask_scheduler("threads", workers=2):
            WD.write_weights(path, out, params=params, block_voxels=block_voxels, batch_slices=3)
    root = zarr.open_group(out, mode="r")
    attrs = dict(root.attrs)["unet"]
    classes, weights, cells = whole_volume(labels, params, attrs["class_weights"])
    assert weights.max() > max(attrs["class_weights"]) + 1  # the border term is there
    assert root["weights"][:].tobytes() == weights.tobytes()
    assert root["classes"][:].tobytes() == classes.tobytes()
    assert root["instances"][:].tobytes() == cells.tobytes()
    assert tuple(root["weights"].chunks) == (3, 16, 16)
    assert attrs["dims"] == 3 and attrs["spacing_um"] == list(SPACING) and attrs["sigma_um"] == sigma_um
    assert attrs["halo_voxels"] == list(params.halo_voxels(SPACING)) and "sigma_px" not in attrs
    # the stored recipe recomputes the same maps (what a 3-D augmentation will do on deformed volumes)
    got_classes, got_weights = VolumeWeightRecipe.from_attrs(attrs, where=str(out)).apply(labels)
    assert got_weights.tobytes() == weights.tobytes() and got_classes.tobytes() == classes.tobytes()
    assert (tmp_path / "weights.png").is_file()


def test_3d_class_weights_count_the_3d_classes(tmp_path, stack):
    path, labels = stack
    out = tmp_path / "class_weights.json"
    assert unet("class-weights", path, "-o", out, "--dims", 3) == 0
    record = json.loads(out.read_text())
    classes = W.class_map_3d(labels, separate_touching=True)
    cells = int(classes.astype(np.int64).sum())
    assert record["counts"] == [classes.size - cells, cells] and record["dims"] == 3
    # the 2-D count differs: a z contact cuts no voxel there
    assert unet("class-weights", path, "-o", tmp_path / "cw2.json") == 0
    assert json.loads((tmp_path / "cw2.json").read_text())["counts"] != record["counts"]
    # given the file, the stage uses it: the same maps as counting the stack alone
    assert unet("weights", path, tmp_path / "a.zarr", "--dims", 3, "--sigma-um", 1, "--class-weights", out) == 0
    assert unet("weights", path, tmp_path / "b.zarr", "--dims", 3, "--sigma-um", 1, "--plot-slice", -1) == 0
    a, b = (zarr.open_group(tmp_path / n, mode="r") for n in ("a.zarr", "b.zarr"))
    assert a["weights"][:].tobytes() == b["weights"][:].tobytes()
    assert a.attrs["unet"]["class_weights_file"] == str(out)


def test_a_volume_thinner_than_the_z_halo(tmp_path):
    labels = touching_cells((3, 21, 19), 4, seed=9)
    path = ingest(tmp_path, labels, chunks="2,16,16")
    params = W.VolumeWeightParams(sigma_um=2.5)
    assert params.halo_voxels(SPACING) == (7, 23, 23)  # beyond the volume along every axis
    assert unet("weights", path, tmp_path / "w.zarr", "--dims", 3, "--sigma-um", 2.5, "--plot-slice", -1) == 0
    root = zarr.open_group(tmp_path / "w.zarr", mode="r")
    _, weights, _ = whole_volume(labels, params, root.attrs["unet"]["class_weights"])
    assert root["weights"][:].tobytes() == weights.tobytes()


def test_2d_weights_keep_their_attributes(tmp_path, stack):
    # a slice (21 x 19 px) narrower than the 2-D halo (23 px at sigma 5): the halo is clipped to it
    path, labels = stack
    assert unet("weights", path, tmp_path / "w.zarr", "--plot-slice", -1) == 0
    root = zarr.open_group(tmp_path / "w.zarr", mode="r")
    attrs = dict(root.attrs)["unet"]
    assert "dims" not in attrs and attrs["sigma_px"] == 5.0 and attrs["halo_px"] == 23
    params = W.WeightParams()
    for z in range(labels.shape[0]):
        inst = labels[z].astype(np.int32)
        classes = W.class_map(inst, separate_touching=True)
        want = W.weight_map(inst, classes, class_weights=tuple(attrs["class_weights"]), params=params)
        assert root["weights"][z].tobytes() == want.astype(np.float32).tobytes()


def _refused(tmp_path, capsys, args, *names):
    out = tmp_path / "refused.zarr"
    assert unet("weights", *args[:1], out, *args[1:]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for name in names:
        assert str(name) in err, err
    assert not out.exists() and not (tmp_path / "refused.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".refused")]
    return err


@pytest.mark.parametrize(
    "options, names",
    [
        pytest.param(["--sigma-um", 1], ["--sigma-um", "--dims 3"], id="sigma-um-in-2d"),
        pytest.param(["--dims", 3, "--sigma-um", 1, "--sigma-px", 5], ["--sigma-px"], id="sigma-px-in-3d"),
        pytest.param(["--dims", 3, "--sigma-um", 1, "--preset", "fiji"], ["--preset"], id="preset-in-3d"),
        pytest.param(["--dims", 3], ["--sigma-um"], id="3d-without-sigma-um"),
    ],
)
def test_options_of_the_other_mode_are_refused(tmp_path, capsys, stack, options, names):
    _refused(tmp_path, capsys, [stack[0], *options], *names)


def test_2d_class_weights_are_refused_in_3d(tmp_path, capsys, stack):
    path, _ = stack
    cw = tmp_path / "cw.json"
    assert unet("class-weights", path, "-o", cw) == 0
    _refused(tmp_path, capsys, [path, "--dims", 3, "--sigma-um", 1, "--class-weights", cw], cw, "--dims 3")


def test_a_single_slice_stack_is_refused(tmp_path, capsys):
    path = ingest(tmp_path, touching_cells()[2:3], chunks="1,16,16")
    _refused(tmp_path, capsys, [path, "--dims", 3, "--sigma-um", 1], path, "single slice")
    assert unet("class-weights", path, "-o", tmp_path / "cw.json", "--dims", 3) == 2
    assert not (tmp_path / "cw.json").exists()


def test_a_stack_without_a_given_voxel_size_is_refused(tmp_path, capsys):
    path = ingest(tmp_path, touching_cells(), voxel_size=False)
    _refused(tmp_path, capsys, [path, "--dims", 3, "--sigma-um", 1], path, "--voxel-size-um")


def test_ids_restarting_on_every_slice_are_refused(tmp_path, capsys):
    labels = touching_cells()
    per_slice = np.stack([ndi.label(plane > 0)[0] for plane in W.class_map_3d(labels, separate_touching=True)])
    path = ingest(tmp_path, per_slice.astype(np.uint16))
    err = _refused(tmp_path, capsys, [path, "--dims", 3, "--sigma-um", 1], path, "label id 1", "slices")
    assert "6-connected pieces" in err
    assert unet("weights", path, tmp_path / "two_d.zarr", "--plot-slice", -1) == 0  # valid in 2-D


def test_binary_labels_are_refused(tmp_path, capsys):
    path = ingest(tmp_path, (touching_cells() > 0).astype(np.uint8) * 255)
    _refused(tmp_path, capsys, [path, "--dims", 3, "--sigma-um", 1], path, "instance labels")


def _planes(volume):
    return iter(np.asarray(volume))


def test_split_label_id_hand_made():
    # id 5 in slices 0-1 (overlapping) and again in slice 3: two pieces; id 2 is a U whose two
    # in-plane pieces of slice 1 are joined through slice 0: one piece
    v = np.zeros((4, 5, 6), np.int32)
    v[0:2, 0:2, 0:2] = 5
    v[3, 0:2, 0:2] = 5
    v[0, 3, 1:6] = 2
    v[1, 3, 1] = 2
    v[1, 3, 5] = 2
    assert split_label_id(_planes(v)) == (5, [[0, 1], [3]])
    v[3] = 0
    assert split_label_id(_planes(v)) is None
    # touching different ids do not join; the same id diagonal across slices is two pieces
    w = np.zeros((2, 3, 3), np.int32)
    w[0, 0, 0], w[1, 1, 1] = 4, 4
    w[0, 1, 1] = 7
    assert split_label_id(_planes(w)) == (4, [[0], [1]])
    assert split_label_id(_planes(np.zeros((3, 4, 4), np.int32))) is None


def test_the_slice_recipe_refuses_a_3d_store(tmp_path, stack):
    from unet_core.common.errors import UserInputError
    from unet_core.weights.recipe import WeightRecipe

    path, _ = stack
    assert unet("weights", path, tmp_path / "w3.zarr", "--dims", 3, "--sigma-um", 1, "--plot-slice", -1) == 0
    attrs = dict(zarr.open_group(tmp_path / "w3.zarr", mode="r").attrs)["unet"]
    with pytest.raises(UserInputError, match="3-D weights store"):
        WeightRecipe.from_attrs(attrs, where="w3.zarr")
    assert unet("weights", path, tmp_path / "w2.zarr", "--plot-slice", -1) == 0
    attrs2 = dict(zarr.open_group(tmp_path / "w2.zarr", mode="r").attrs)["unet"]
    with pytest.raises(UserInputError, match="2-D weights store"):
        VolumeWeightRecipe.from_attrs(attrs2, where="w2.zarr")


@pytest.mark.parametrize(
    "max_voxels, block",
    [
        # chunks (8, 64, 64) of a (32, 128, 128) volume, halo (7, 23, 23): y and x reach the whole
        # axis (64 < 4 * 23), z grows 8 -> 16 -> 24 -> 32 (24 < 4 * 7 = 28)
        pytest.param(2**21, (32, 128, 128), id="whole"),
        pytest.param(16 * 128 * 128, (16, 128, 128), id="bounded"),  # 24 slices would exceed it
        pytest.param(1, (8, 64, 64), id="chunks"),
    ],
)
def test_volume_blocks_group_whole_chunks(max_voxels, block):
    assert volume_blocks((8, 64, 64), (32, 128, 128), (7, 23, 23), max_voxels=max_voxels) == block
    # chunks larger than 4 halos stay as they are
    assert volume_blocks((8, 256, 256), (64, 1024, 1024), (2, 23, 23)) == (8, 256, 256)
