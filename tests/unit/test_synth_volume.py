"""Tests for unet_core.synth.volume (the 3-D synthetic generator), its TIFF writer and
``unet synth --dims 3``: determinism, 3-D ids, connectivity, the statistics the docstring states,
anisotropy in µm, optics, and the TIFF round trip through ingest's reader with the voxel size."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from unet_core.cli import main
from unet_core.common.errors import UserInputError
from unet_core.synth import volume
from unet_core.synth.volume import VolumeParams, synth_volume

DEFAULT = VolumeParams()
SMALL = VolumeParams(depth=12, height=48, width=40)


@functools.lru_cache(maxsize=8)
def _volume(seed: int, index: int = 0, params: VolumeParams = DEFAULT) -> tuple[np.ndarray, np.ndarray]:
    """Cached: several tests measure the same default volumes (arrays are made read-only)."""
    image, labels = synth_volume(params, seed=seed, index=index)
    image.flags.writeable = labels.flags.writeable = False
    return image, labels


# --------------------------------------------------------------------------- measurements
def touching_fraction(labels: np.ndarray) -> float:
    """Fraction of the ids that are 6-neighbours of another id somewhere (no background between)."""
    touching = set()
    for axis in range(labels.ndim):
        a = np.moveaxis(labels, axis, 0)
        lo, hi = a[:-1], a[1:]
        m = (lo != hi) & (lo > 0) & (hi > 0)
        touching |= set(np.unique(lo[m]).tolist()) | set(np.unique(hi[m]).tolist())
    return len(touching) / max(int(labels.max()), 1)


def density_per_1000um3(labels: np.ndarray, spacing_um: tuple[float, ...]) -> float:
    """Miles-Lantuéjoul estimate of the number density: every object that touches no face of the
    volume, weighted by 1 / the volume of the positions its bounding box could take without
    touching a face ((n - k - 1) voxels along an axis of n where it spans k)."""
    spacing = np.asarray(spacing_um)
    shape = np.asarray(labels.shape)
    total = 0.0
    for box in ndimage.find_objects(labels):
        if box is None or any(s.start == 0 or s.stop == n for s, n in zip(box, labels.shape)):
            continue
        span = np.array([s.stop - s.start for s in box])
        total += 1.0 / float(np.prod((shape - span - 1) * spacing))
    return 1000.0 * total


def signal_to_noise(image: np.ndarray, labels: np.ndarray, spacing_um: tuple[float, ...]) -> float:
    """(mean nucleus grey value - mean background) / std of the background, background = voxels at
    least 3 µm from every nucleus (the definition the module docstring states)."""
    far = ndimage.distance_transform_edt(labels == 0, sampling=spacing_um) >= 3.0
    background = image[far].astype(np.float64)
    return (image[labels > 0].astype(np.float64).mean() - background.mean()) / background.std()


def z_to_plane_ratio(labels: np.ndarray, spacing_um: tuple[float, ...]) -> float:
    """Mean over the objects touching no face of std(z) / rms(std(y), std(x)) of their voxel
    positions in the units of ``spacing_um`` (1 = round, < 1 = flattened along z)."""
    ratios = []
    for i, box in enumerate(ndimage.find_objects(labels), 1):
        if box is None or any(s.start == 0 or s.stop == n for s, n in zip(box, labels.shape)):
            continue
        sd = (np.argwhere(labels[box] == i) * np.asarray(spacing_um)).std(axis=0)
        ratios.append(sd[0] / math.sqrt((sd[1] ** 2 + sd[2] ** 2) / 2))
    return float(np.mean(ratios))


def pieces_per_id(labels: np.ndarray) -> np.ndarray:
    """Number of 6-connected pieces of every id 1..max (0 for an absent id)."""
    six = ndimage.generate_binary_structure(3, 1)
    out = np.zeros(int(labels.max()), dtype=int)
    for i, box in enumerate(ndimage.find_objects(labels), 1):
        if box is not None:
            out[i - 1] = ndimage.label(labels[box] == i, structure=six)[1]
    return out


def test_the_measurements_see_what_they_measure():
    """Hand-made cases: each measurement would fail a generator that got it wrong."""
    labels = np.zeros((6, 8, 8), dtype=np.uint16)
    labels[1:3, 1:3, 1:3] = 1
    labels[1:3, 1:3, 3:5] = 2  # touches 1
    labels[4, 5:7, 5:7] = 3  # alone
    assert touching_fraction(labels) == pytest.approx(2 / 3)
    labels[4, 1, 1] = 3  # a second, diagonal-free piece of id 3
    assert pieces_per_id(labels).tolist() == [1, 1, 2]
    flat = np.zeros((8, 16, 16), dtype=np.uint16)
    flat[3:5, 4:12, 4:12] = 1
    assert z_to_plane_ratio(flat, (1.0, 1.0, 1.0)) < 0.3 < z_to_plane_ratio(flat, (4.0, 1.0, 1.0))


# --------------------------------------------------------------------------- determinism, ids
def test_same_seed_and_index_give_the_same_volume_and_others_differ():
    image, labels = synth_volume(SMALL, seed=4, index=2)
    again = synth_volume(SMALL, seed=4, index=2)
    assert np.array_equal(image, again[0]) and np.array_equal(labels, again[1])
    for seed, index in ((5, 2), (4, 3)):
        other_image, other_labels = synth_volume(SMALL, seed=seed, index=index)
        assert not np.array_equal(image, other_image) and not np.array_equal(labels, other_labels)


def test_shapes_dtypes_and_camera_range():
    image, labels = _volume(0)
    assert image.shape == labels.shape == (32, 128, 128) == DEFAULT.shape
    assert image.dtype == np.uint16 and labels.dtype == DEFAULT.label_dtype == np.uint16
    assert image.max() <= 4095 and image.min() >= 0
    assert np.mean(image == 4095) < 1e-3  # (nearly) no saturation


@pytest.mark.parametrize("seed", [0, 1])
def test_labels_are_consecutive_3d_ids_each_one_6_connected_piece(seed: int):
    _, labels = _volume(seed)
    assert np.array_equal(np.unique(labels), np.arange(int(labels.max()) + 1))
    assert set(pieces_per_id(labels).tolist()) == {1}
    # one id per nucleus across its slices: ids do not restart per slice, most span several
    slices_per_id = np.array([box[0].stop - box[0].start for box in ndimage.find_objects(labels)])
    assert np.median(slices_per_id) >= 4
    per_slice = sum(len(np.unique(plane)) - 1 for plane in labels)
    assert labels.max() < per_slice / 3


def test_pieces_cut_off_by_coarse_voxels_are_repaired():
    """At 2.5 x 1.5 x 1.5 µm voxels, seed 0 samples one nucleus in two 6-connected pieces (found by
    generating without the repair); the repair leaves every id one piece and the ids consecutive."""
    coarse = VolumeParams(depth=12, height=48, width=48, spacing_um=(2.5, 1.5, 1.5))
    _, labels = synth_volume(coarse, seed=0, index=0)
    assert set(pieces_per_id(labels).tolist()) == {1}
    assert np.array_equal(np.unique(labels), np.arange(int(labels.max()) + 1))


def test_stated_statistics_hold_on_generated_volumes():
    """Mean of three default volumes against the values (and tolerances) the docstring states."""
    spacing = DEFAULT.spacing_um
    measured = {"density": [], "foreground": [], "touching": [], "snr": []}
    for seed in (0, 1, 2):
        image, labels = _volume(seed)
        measured["density"].append(density_per_1000um3(labels, spacing))
        measured["foreground"].append(float(np.mean(labels > 0)))
        measured["touching"].append(touching_fraction(labels))
        measured["snr"].append(signal_to_noise(image, labels, spacing))
    mean = {k: float(np.mean(v)) for k, v in measured.items()}
    assert DEFAULT.nuclei_per_1000um3 == volume.STATED_DENSITY_PER_1000UM3
    assert mean["density"] == pytest.approx(volume.STATED_DENSITY_PER_1000UM3, rel=0.15), mean
    assert mean["foreground"] == pytest.approx(volume.STATED_FOREGROUND_FRACTION, abs=0.05), mean
    assert mean["touching"] == pytest.approx(volume.STATED_TOUCHING_FRACTION, abs=0.08), mean
    assert mean["snr"] == pytest.approx(volume.STATED_SNR, rel=0.15), mean


def test_the_docstring_states_the_checked_values():
    doc = volume.__doc__
    for value in (volume.STATED_DENSITY_PER_1000UM3, volume.STATED_FOREGROUND_FRACTION,
                  volume.STATED_TOUCHING_FRACTION, volume.STATED_SNR):
        assert f"{value:g}" in doc


def test_density_follows_the_parameter():
    """The estimate tracks nuclei_per_1000um3 (so the stated density is the generator's, not luck)."""
    sparse = VolumeParams(nuclei_per_1000um3=0.3)
    estimates = [density_per_1000um3(synth_volume(sparse, seed=s, index=0)[1], sparse.spacing_um)
                 for s in (0, 1)]
    assert np.mean(estimates) == pytest.approx(0.3, rel=0.2)


# --------------------------------------------------------------------------- geometry in µm, optics
@pytest.mark.parametrize(("spacing", "voxel_ratio"), [
    pytest.param((2.0, 0.5, 0.5), 0.25, id="z-4x"),
    pytest.param((1.0, 0.5, 0.5), 0.5, id="z-2x"),
])
def test_nuclei_are_round_in_um_and_flattened_in_voxels(spacing, voxel_ratio):
    params = VolumeParams(depth=round(64 / spacing[0]), spacing_um=spacing)
    _, labels = _volume(0, 0, params)
    assert z_to_plane_ratio(labels, spacing) == pytest.approx(1.0, abs=0.1)
    assert z_to_plane_ratio(labels, (1.0, 1.0, 1.0)) == pytest.approx(voxel_ratio, rel=0.12)


def _blurred_point_widths_um(params: VolumeParams, z: int) -> tuple[float, float]:
    """(z, in-plane) standard deviation in µm of the blurred image of one bright voxel at slice z."""
    signal = np.zeros(params.shape, dtype=np.float32)
    signal[z, params.height // 2, params.width // 2] = 1.0
    out = volume._depth_blur(signal, params).astype(np.float64)
    coords = np.indices(params.shape).reshape(3, -1) * np.asarray(params.spacing_um)[:, None]
    weights = out.ravel() / out.sum()
    mean = coords @ weights
    var = ((coords - mean[:, None]) ** 2) @ weights
    return math.sqrt(var[0]), math.sqrt(var[2])


def test_the_psf_is_wider_along_z_and_grows_with_depth():
    params = VolumeParams(depth=40, height=64, width=64)
    shallow_z, shallow_xy = _blurred_point_widths_um(params, 8)
    deep_z, deep_xy = _blurred_point_widths_um(params, 32)
    assert shallow_z > 2 * shallow_xy and deep_z > 2 * deep_xy
    assert deep_xy > 1.3 * shallow_xy and deep_z > 1.3 * shallow_z
    want_z, want_xy = volume.psf_sigma_um(params, np.array([8 * 2.0, 32 * 2.0]))
    assert shallow_xy == pytest.approx(want_xy[0], rel=0.1) and deep_xy == pytest.approx(want_xy[1], rel=0.1)


def test_the_z_kernel_sums_to_one_and_mirrors_at_the_faces():
    matrix = volume._z_kernel_matrix(np.array([0.0, 1.0, 1.0, 1.0, 1.0]))
    assert np.allclose(matrix.sum(axis=1), 1.0)
    assert matrix[0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]  # width 0: the slice itself
    # slice 4 (the last) mirrors its neighbour 3 onto itself: weight of 3 = 2 x exp(-1/2) / norm
    assert matrix[4, 3] == pytest.approx(2 * math.exp(-0.5) * matrix[4, 4], rel=1e-5)


def test_the_signal_attenuates_with_depth():
    image, labels = _volume(0)
    offset = 100  # scene.CAMERA_OFFSET["uint16"]
    top = [image[z][labels[z] > 0].mean() - offset for z in range(2, 10)]
    bottom = [image[z][labels[z] > 0].mean() - offset for z in range(22, 30)]
    expected = math.exp(-(20 * DEFAULT.spacing_um[0]) / DEFAULT.attenuation_length_um)  # 20 slices deeper
    assert np.mean(bottom) / np.mean(top) == pytest.approx(expected, rel=0.2)


def test_too_dense_or_bad_sizes_are_refused_with_the_option():
    with pytest.raises(UserInputError, match="--nuclei-per-1000um3"):
        VolumeParams(nuclei_per_1000um3=5.0)
    with pytest.raises(UserInputError, match="--voxel-size-um"):
        VolumeParams(spacing_um=(0.0, 0.5, 0.5))
    with pytest.raises(UserInputError, match="--slices / --size"):
        VolumeParams(depth=1)


# --------------------------------------------------------------------------- TIFF files, ingest, CLI
def test_tiff_round_trip_through_ingests_reader_keeps_voxels_and_voxel_size(tmp_path):
    from unet_core.io.tiff import open_tiff_stack
    from unet_core.synth.tiffs import read_provenance, write_synth_volume_tiffs

    params = VolumeParams(depth=10, height=40, width=48, spacing_um=(1.5, 0.25, 0.3))
    image, labels = synth_volume(params, seed=3, index=1)
    result = write_synth_volume_tiffs(tmp_path / "image.tif", tmp_path / "labels.tif", params,
                                      seed=3, index=1)
    assert result.shape == (10, 40, 48) and result.cells == labels.max()
    for name, want in (("image.tif", image), ("labels.tif", labels)):
        with open_tiff_stack(tmp_path / name) as stack:
            assert stack.shape == want.shape and stack.dtype == want.dtype
            assert stack.spacing_um == pytest.approx((1.5, 0.25, 0.3))
            assert all(np.array_equal(stack.read_slice(z), want[z]) for z in range(want.shape[0]))
        meta = read_provenance(tmp_path / name)
        recorded = (meta["dims"], meta["seed"], meta["volume"], meta["voxel_size_um"])
        assert recorded == (3, 3, 1, [1.5, 0.25, 0.3])
    # an earlier 'unet synth' file is replaced, anything else refused
    write_synth_volume_tiffs(tmp_path / "image.tif", None, params, seed=3, index=1)
    tifffile.imwrite(tmp_path / "foreign.tif", image[0])
    with pytest.raises(UserInputError, match="foreign.tif"):
        write_synth_volume_tiffs(tmp_path / "foreign.tif", None, params, seed=3, index=1)


def test_ingest_stores_the_volume_with_its_voxel_size(tmp_path, caplog):
    from unet_core.io.ingest import ingest
    from unet_core.io.ngff import open_stack
    from unet_core.synth.tiffs import write_synth_volume_tiffs

    write_synth_volume_tiffs(tmp_path / "image.tif", tmp_path / "labels.tif", SMALL, seed=0, index=0)
    with caplog.at_level("WARNING"):
        ingest(tmp_path / "image.tif", tmp_path / "stack.ome.zarr", labels=tmp_path / "labels.tif")
    assert "voxel size" not in caplog.text  # no 1 µm fallback
    stack = open_stack(tmp_path / "stack.ome.zarr", require_labels=True)
    assert tuple(stack.scale) == pytest.approx(SMALL.spacing_um)
    assert np.array_equal(stack.labels[:], synth_volume(SMALL, seed=0, index=0)[1])


def test_cli_dims_3_writes_a_volume_with_3d_defaults_and_given_options(tmp_path):
    image, labels = tmp_path / "image.tif", tmp_path / "labels.tif"
    argv = ["synth", "--dims", "3", "--image", str(image), "--labels", str(labels), "--seed", "2",
            "--index", "1", "--size", "40", "--slices", "8"]
    assert main(argv) == 0
    want = synth_volume(VolumeParams(depth=8, height=40, width=40), seed=2, index=1)
    assert np.array_equal(tifffile.imread(image), want[0])
    assert np.array_equal(tifffile.imread(labels), want[1])
    assert main(["synth", "--dims", "3", "--image", str(image), "--width", "24", "--slices", "4"]) == 0
    assert tifffile.imread(image).shape == (4, 128, 24)  # height: the 3-D default, not the 2-D 512
    assert tifffile.imread(image).dtype == np.uint16


@pytest.mark.parametrize(("argv", "message"), [
    pytest.param(["--dims", "3", "--border", "dark"], "--border: applies to --dims 2 only", id="2d-option"),
    pytest.param(["--dims", "3", "--workers", "2"], "--workers: applies to --dims 2 only", id="workers"),
    pytest.param(["--index", "1"], "--index: applies to --dims 3 only", id="3d-option"),
    pytest.param(["--dims", "3", "--nuclei-per-1000um3", "9"], "--nuclei-per-1000um3", id="too-dense"),
    pytest.param(["--dims", "3", "--index", "-1"], "--index: -1", id="negative-index"),
])
def test_cli_refuses_options_of_the_other_mode_in_one_line(tmp_path, capsys, argv, message):
    rc = main(["synth", "--image", str(tmp_path / "image.tif"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]
    assert list(tmp_path.iterdir()) == []


def test_cli_volume_defaults_match_params_and_help_explains_dims(capsys):
    from unet_core.cli import synth as cli_synth

    assert cli_synth.VOLUME_DEFAULTS == VolumeParams().to_dict()
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--dims" in text and "3-D volume" in text and "--voxel-size-um" in text
