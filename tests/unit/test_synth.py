"""Tests for unet_core.synth (scene, tiffs) and ``unet synth``: determinism, labels, appearance, TIFF output."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from unet_core.cli import main
from unet_core.common.errors import UserInputError
from unet_core.synth import scene, tiffs
from unet_core.synth.scene import BorderStyle, SynthParams, iter_synth_slices, synth_slice
from unet_core.synth.tiffs import read_provenance, write_synth_tiffs

SMALL = SynthParams(height=96, width=128, cell_size_px=16)


def _touching_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of different cells that are 4-neighbours somewhere (no background between)."""
    pairs = set()
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        m = (a != b) & (a > 0) & (b > 0)
        pairs |= {(int(min(x, y)), int(max(x, y))) for x, y in zip(a[m], b[m])}
    return pairs


def _edge_masks(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pixels on a cell-cell contact, cell pixels at least 3 px from any other label)."""
    from scipy import ndimage

    contact = np.zeros(labels.shape, dtype=bool)
    for axis in (0, 1):
        a = np.moveaxis(labels, axis, 0)
        c = np.moveaxis(contact, axis, 0)
        m = (a[:-1] != a[1:]) & (a[:-1] > 0) & (a[1:] > 0)
        c[:-1] |= m
        c[1:] |= m
    edges = np.zeros(labels.shape, dtype=bool)
    for axis in (0, 1):
        edges |= np.abs(np.diff(labels.astype(np.int64), axis=axis, prepend=0)) > 0
    interior = (labels > 0) & ~ndimage.binary_dilation(edges, iterations=3)
    return contact, interior


# --------------------------------------------------------------------------- determinism
def test_same_seed_same_arrays():
    a = synth_slice(SMALL, seed=5, index=3)
    b = synth_slice(SMALL, seed=5, index=3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_slice_alone_equals_slice_in_stack():
    stack = list(iter_synth_slices(SMALL, seed=2, slices=4))
    image, labels = synth_slice(SMALL, seed=2, index=2)
    assert np.array_equal(stack[2][0], image)
    assert np.array_equal(stack[2][1], labels)
    started = list(iter_synth_slices(SMALL, seed=2, slices=2, start=2))
    assert np.array_equal(started[0][0], image)


def test_workers_do_not_change_output():
    serial = list(iter_synth_slices(SMALL, seed=1, slices=3))
    parallel = list(iter_synth_slices(SMALL, seed=1, slices=3, workers=2))
    for (i1, l1), (i2, l2) in zip(serial, parallel, strict=True):
        assert np.array_equal(i1, i2) and np.array_equal(l1, l2)


def test_workers_beyond_slices_or_cores_start_no_processes(monkeypatch):
    """--workers 100000 forked 100000 copies of the process at once (a fork start spawns the whole
    pool), exhausting the machine's memory; processes beyond the slices or cores do no work."""
    started = []

    class Recorder:  # records the pool size, starts nothing
        def __init__(self, max_workers, **kw):
            started.append(max_workers)
            raise InterruptedError

    monkeypatch.setattr(scene, "ProcessPoolExecutor", Recorder)
    monkeypatch.setattr(scene.os, "cpu_count", lambda: 8)
    for slices in (3, 20):
        with pytest.raises(InterruptedError):
            list(iter_synth_slices(SMALL, seed=1, slices=slices, workers=100000))
    assert started == [3, 8]


@pytest.mark.parametrize(
    "strip_pixels", [pytest.param(100, id="one-row-strips"), pytest.param(10**9, id="whole-slice")]
)
def test_strip_size_does_not_change_output(monkeypatch, strip_pixels):
    reference = synth_slice(SMALL, seed=4, index=1)
    monkeypatch.setattr(scene, "STRIP_PIXELS", strip_pixels)
    image, labels = synth_slice(SMALL, seed=4, index=1)
    assert np.array_equal(image, reference[0]) and np.array_equal(labels, reference[1])


@pytest.mark.parametrize(
    "other",
    [
        pytest.param({"seed": 1, "index": 0}, id="other-seed"),
        pytest.param({"seed": 0, "index": 1}, id="other-slice"),
    ],
)
def test_different_seed_or_slice_differs(other):
    image0, labels0 = synth_slice(SMALL, seed=0, index=0)
    image1, labels1 = synth_slice(SMALL, seed=other["seed"], index=other["index"])
    assert not np.array_equal(image0, image1)
    assert not np.array_equal(labels0, labels1)


def test_same_seed_same_tiff_bytes(tmp_path):
    for run in ("a", "b"):
        out = tmp_path / run
        write_synth_tiffs(out / "image.tif", out / "labels.tif", SMALL, seed=9, slices=2)
    for name in ("image.tif", "labels.tif"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# --------------------------------------------------------------------------- labels
@pytest.mark.parametrize(
    "params",
    [
        pytest.param(SynthParams(height=160, width=200, cell_size_px=20), id="default-shape"),
        pytest.param(
            SynthParams(height=128, width=128, cell_size_px=14, irregularity=1.0, density=1.0),
            id="max-irregular",
        ),
        pytest.param(
            SynthParams(height=100, width=90, cell_size_px=24, irregularity=0.0, density=0.3),
            id="sparse-straight",
        ),
    ],
)
def test_labels_are_consecutive_connected_cells(params):
    measure = pytest.importorskip("skimage.measure")
    for index in range(6):
        image, labels = synth_slice(params, seed=11, index=index)
        assert image.shape == labels.shape == (params.height, params.width)
        assert labels.dtype == np.uint16
        n = int(labels.max())
        assert n > 0
        assert np.array_equal(np.unique(labels[labels > 0]), np.arange(1, n + 1))  # ids 1..n
        # every id is exactly one 4-connected region (ids unique per cell)
        components = measure.label(labels, connectivity=1, background=0).max()
        assert components == n, f"slice {index}: {components} regions for {n} ids"


def test_cells_touch_and_leave_background():
    image, labels = synth_slice(SynthParams(height=256, width=256), seed=0, index=0)
    n = int(labels.max())
    pairs = _touching_pairs(labels)
    assert len(pairs) >= n  # a dense culture: most cells touch several neighbours
    touching_cells = {c for pair in pairs for c in pair}
    assert len(touching_cells) >= 0.9 * n
    background = float((labels == 0).mean())
    assert 0.002 < background < 0.3
    # about one cell per cell_size_px**2 of area
    assert 0.5 < n / (256 * 256 / 32.0**2) < 1.5


def test_density_controls_background():
    _, dense = synth_slice(SynthParams(height=128, width=128, density=1.0), seed=3, index=0)
    _, sparse = synth_slice(SynthParams(height=128, width=128, density=0.3), seed=3, index=0)
    assert (dense == 0).mean() < 0.01
    assert (sparse == 0).mean() > 0.2


def test_label_dtype_widens_for_many_cells():
    assert SynthParams(height=512, width=512).label_dtype == np.uint16
    assert SynthParams(height=4096, width=4096, cell_size_px=8).label_dtype == np.uint32


def test_repair_fragments_splits_and_merges():
    labels = np.array(
        [
            [1, 1, 2, 2, 0],
            [1, 1, 2, 2, 0],
            [2, 2, 1, 0, 0],  # the lone 1 touches the big 1 only diagonally
            [0, 0, 0, 0, 3],
            [3, 3, 0, 3, 3],  # 3 enters the image twice; the 2-px piece is big enough for an id
        ],
        dtype=np.uint16,
    )
    out = scene._repair_fragments(labels.copy(), min_piece_px=2)
    assert out[2, 2] == 2  # the one-pixel tip joins the cell it touches most
    assert out[4, 0] == out[4, 1] == 4  # smaller piece -> new id
    assert out[3, 4] == out[4, 3] == out[4, 4] == 3  # the largest piece keeps its id
    assert out[0, 0] == 1 and out[0, 2] == 2


# --------------------------------------------------------------------------- appearance
@pytest.mark.parametrize(
    "border", [pytest.param(BorderStyle.BRIGHT, id="bright"), pytest.param(BorderStyle.DARK, id="dark")]
)
def test_borders_between_touching_cells_are_visible(border):
    params = SynthParams(height=192, width=192, border=border, photons=400.0)
    image, labels = synth_slice(params, seed=7, index=0)
    contact, interior = _edge_masks(labels)
    edge_mean = float(image[contact].mean())
    inside_mean = float(image[interior].mean())
    spread = float(image[interior].std())
    if border is BorderStyle.BRIGHT:
        assert edge_mean > inside_mean + 0.5 * spread
    else:
        assert edge_mean < inside_mean - 0.5 * spread


def test_image_has_noise_texture_and_shading():
    params = SynthParams(height=256, width=256)
    image, labels = synth_slice(params, seed=0, index=0)
    assert image.dtype == np.uint8
    assert image.min() < 40 and image.max() > 150  # uses the range
    smooth, _ = synth_slice(
        SynthParams(height=256, width=256, texture=0.0, photons=1e6, read_noise=0.0, illumination=0.0),
        seed=0, index=0,
    )
    # The noiseless, textureless rendering is much smoother inside cells.
    _, interior = _edge_masks(labels)
    rough = np.abs(np.diff(image.astype(float), axis=1))[interior[:, 1:]].mean()
    calm = np.abs(np.diff(smooth.astype(float), axis=1))[interior[:, 1:]].mean()
    assert rough > 2 * calm
    # Uneven illumination: the brightest and darkest quarter of the field differ.
    shaded, _ = synth_slice(SynthParams(height=256, width=256, illumination=0.8), seed=0, index=0)
    quarters = [shaded[y:y + 128, x:x + 128].mean() for y in (0, 128) for x in (0, 128)]
    flat = [smooth[y:y + 128, x:x + 128].mean() for y in (0, 128) for x in (0, 128)]
    assert np.ptp(quarters) > np.ptp(flat)


def test_uint16_is_twelve_bit():
    params = SynthParams(height=64, width=64, dtype="uint16", border_contrast=5.0)
    image, _ = synth_slice(params, seed=0, index=0)
    assert image.dtype == np.uint16
    assert image.max() <= 4095 and image.max() > 1000


# --------------------------------------------------------------------------- TIFF output
def test_tiff_round_trip(tmp_path):
    result = write_synth_tiffs(tmp_path / "image.tif", tmp_path / "labels.tif", SMALL, seed=3, slices=3)
    images = tifffile.imread(tmp_path / "image.tif")
    labels = tifffile.imread(tmp_path / "labels.tif")
    assert images.shape == labels.shape == (3, SMALL.height, SMALL.width)
    assert images.dtype == np.uint8 and labels.dtype == np.uint16
    for z in range(3):
        image, label = synth_slice(SMALL, seed=3, index=z)
        assert np.array_equal(images[z], image) and np.array_equal(labels[z], label)
    with tifffile.TiffFile(tmp_path / "image.tif") as tif:
        assert len(tif.pages) == 3 and not tif.is_bigtiff
    meta = read_provenance(tmp_path / "labels.tif")
    assert meta["seed"] == 3 and meta["slices"] == 3 and meta["label_kind"] == "instance"
    assert SynthParams(**meta["params"]) == SMALL
    assert result.shape == (3, SMALL.height, SMALL.width) and result.cells == sum(
        int(synth_slice(SMALL, seed=3, index=z)[1].max()) for z in range(3)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.tif", "labels.tif"]  # no temporaries


def test_image_only(tmp_path):
    result = write_synth_tiffs(tmp_path / "image.tif", None, SMALL, seed=0, slices=1)
    assert result.labels_path is None
    assert [p.name for p in tmp_path.iterdir()] == ["image.tif"]


@pytest.mark.parametrize(
    ("bigtiff", "threshold", "expected"),
    [
        pytest.param(True, tiffs.BIGTIFF_THRESHOLD, True, id="forced"),
        pytest.param(None, tiffs.BIGTIFF_THRESHOLD, False, id="auto-small"),
        pytest.param(None, 1000, True, id="auto-above-threshold"),
    ],
)
def test_bigtiff(tmp_path, monkeypatch, bigtiff, threshold, expected):
    monkeypatch.setattr(tiffs, "BIGTIFF_THRESHOLD", threshold)
    write_synth_tiffs(tmp_path / "i.tif", tmp_path / "l.tif", SMALL, seed=0, slices=2, bigtiff=bigtiff)
    for name in ("i.tif", "l.tif"):
        with tifffile.TiffFile(tmp_path / name) as tif:
            assert tif.is_bigtiff is expected
            assert tif.series[0].shape == (2, SMALL.height, SMALL.width)


def test_classic_tiff_refused_when_too_large(tmp_path):
    params = SynthParams(height=4096, width=4096, dtype="uint16")
    with pytest.raises(UserInputError, match="does not fit a classic TIFF"):
        write_synth_tiffs(tmp_path / "i.tif", tmp_path / "l.tif", params, seed=0, slices=200, bigtiff=False)
    assert list(tmp_path.iterdir()) == []


def test_failure_leaves_no_partial_output(tmp_path, monkeypatch):
    real = scene.synth_slice

    def fail_on_second_slice(params, *, seed, index):
        if index == 1:
            raise RuntimeError("disk vanished")
        return real(params, seed=seed, index=index)

    monkeypatch.setattr(scene, "synth_slice", fail_on_second_slice)
    with pytest.raises(RuntimeError, match="disk vanished"):
        write_synth_tiffs(tmp_path / "image.tif", tmp_path / "labels.tif", SMALL, seed=0, slices=3)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- CLI and errors
def test_cli_writes_stack(tmp_path, capsys):
    rc = main([
        "synth", "--image", str(tmp_path / "o" / "image.tif"), "--labels", str(tmp_path / "o" / "labels.tif"),
        "--slices", "2", "--size", "64", "--width", "80", "--seed", "4", "--dtype", "uint16",
        "--border", "dark", "--cell-size-px", "12",
    ])
    assert rc == 0
    image = tifffile.imread(tmp_path / "o" / "image.tif")
    assert image.shape == (2, 64, 80) and image.dtype == np.uint16
    expected = synth_slice(
        SynthParams(height=64, width=80, dtype="uint16", border="dark", cell_size_px=12), seed=4, index=1
    )
    assert np.array_equal(image[1], expected[0])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--density", "0"], "--density", id="zero-density"),
        pytest.param(["--size", "8"], "too small", id="tiny-slice"),
        pytest.param(["--cell-size-px", "2"], "--cell-size-px", id="tiny-cells"),
        pytest.param(["--illumination", "0.95"], "--illumination", id="illumination"),
        pytest.param(["--photons", "0"], "--photons", id="no-photons"),
        pytest.param(["--seed", "-1"], "--seed", id="negative-seed"),
        pytest.param(["--labels", "SAME"], "different files", id="same-file"),
    ],
)
def test_cli_bad_arguments_one_line_exit_2(tmp_path, capsys, argv, message):
    image = tmp_path / "image.tif"
    argv = [str(image) if a == "SAME" else a for a in argv]
    rc = main(["synth", "--image", str(image), "--size", "32", *argv] if "--size" not in argv
              else ["synth", "--image", str(image), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert list(tmp_path.iterdir()) == []


def test_cli_defaults_match_params():
    import dataclasses

    from unet_core.cli import synth as cli_synth

    expected = SynthParams().to_dict()
    assert cli_synth.DEFAULTS == expected
    assert set(cli_synth.BORDER_STYLES) == {b.value for b in BorderStyle}
    assert {f.name for f in dataclasses.fields(SynthParams)} == set(expected)


@pytest.mark.parametrize(
    ("field", "value"),
    [pytest.param("border", "glow", id="border"), pytest.param("dtype", "float32", id="dtype"),
     pytest.param("texture", 1.5, id="texture"), pytest.param("blur_px", -1.0, id="blur")],
)
def test_params_reject_bad_values(field, value):
    with pytest.raises(UserInputError, match=field.split("_")[0]):
        SynthParams(**{field: value})
