"""bioimage.io export (issue 35, items 1-2): packages pass bioimageio.core's model test offline, a corrupted
test output fails it, the package's test output is unet-pipeline's own prediction, block-wise prediction in
bioimageio.core equals its whole-image prediction for a depth-4 net, and bad input is one line, exit 2.

The packaged network's equality with ours needs only torch; everything else needs the optional
``bioimageio`` extra (``pip install -e '.[bioimageio]'``, which ./test.sh installs) and skips without it.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from unet_core.cli import main
from unet_core.common.intensity import Normalisation, RunningStats, Scaling, slice_stats_to_attrs
from unet_core.export.bioimageio import FORMAT, geometry, packaged_network, spec_scaling
from unet_core.export.packaged_unet import PackagedUNet
from unet_core.infer.predict import predict_plane
from unet_core.io.ngff import PyramidWriter
from unet_core.model.checkpoint import STATE_FORMAT, STATE_MARK, save_model, write_torch_file
from unet_core.model.spec import UNetSpec
from unet_core.model.unet import UNet

DEPTH3 = UNetSpec(depth=3, base_channels=2, dropout=0.0)  # min input 104 px in the package, step 8
DEPTH4 = UNetSpec(depth=4, base_channels=2, dropout=0.0)  # min input 208 px, step 16
OFFSETS = [0.35, -0.35]
VALIDATION = {"iteration": 40, "lr": 0.01, "train_loss": 0.41, "val_loss": 0.38, "val_pixel_error": 0.0712,
              "val_iou": 0.81}

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),  # bioimageio.core loads TorchScript weights:
              pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")]


def _need_extra():
    pytest.importorskip("bioimageio.core", reason="needs the optional extra: pip install -e '.[bioimageio]'")
    pytest.importorskip("onnxruntime", reason="needs the optional extra: pip install -e '.[bioimageio]'")


def write_stack(path: Path, image: np.ndarray) -> Path:
    """A stack as 'unet ingest' writes it: pyramid, stack and per-slice intensity statistics."""
    root = zarr.open_group(path, mode="w")
    writer = PyramidWriter(root, image.shape, image.dtype, (1, 64, 64), (1.0, 1.0, 1.0), unit="micrometer")
    stats = RunningStats()
    for z in range(image.shape[0]):
        writer.write_plane(z, image[z])
        stats.update(image[z])
    writer.finish()
    root.attrs.update({"unet": {"intensity": stats.result().to_dict(),
                                "slice_intensity": slice_stats_to_attrs(stats.slices)}})
    return path


def cells(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Bright blobs on a darker, noisy background, brightness drifting over slices (uint16)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    image = 300.0 + 40 * z + rng.normal(0, 20, shape)
    for _ in range(12):
        cy, cx, r = rng.uniform(0, shape[1]), rng.uniform(0, shape[2]), rng.uniform(6, 14)
        image += 400.0 * (((y - cy) ** 2 + (x - cx) ** 2) < r * r)
    return np.clip(image, 0, 65535).astype(np.uint16)


def trained_like(path: Path, spec: UNetSpec, mode: str, *, validated: bool = True) -> Path:
    """A seeded model file carrying what 'unet train' records (normalisation, decision rule, scores)."""
    torch.manual_seed(3)
    metadata = {"intensity_normalisation": mode, "iterations": 40,
                "decision": {"rule": "argmax of logits + logit_offsets", "logit_offsets": OFFSETS},
                "final_metrics": VALIDATION if validated else {"iteration": 40, "train_loss": 0.41},
                "exported_weights": {"choice": "last", "iteration": 40,
                                     "metrics": VALIDATION if validated else {"iteration": 40}}}
    save_model(path, UNet(spec), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    return write_stack(tmp_path_factory.mktemp("stack") / "s.ome.zarr", cells((3, 120, 136), seed=1))


def export(model: Path, out: Path, sample: str | Path, *extra: str) -> int:
    return main(["-q", "export-bioimageio", str(model), str(out), "--sample", str(sample), "--author", "Tester",
                 *extra])


def member(package: Path, name: str) -> bytes:
    with zipfile.ZipFile(package) as archive:
        return archive.read(name)


def npy(package: Path, name: str) -> np.ndarray:
    return np.load(io.BytesIO(member(package, name)))


def failed(summary) -> list[str]:
    return [f"{d.name}: {[e.msg[:200] for e in d.errors]}" for d in summary.details if d.status == "failed"]


# -- the packaged network is ours ---------------------------------------------------------------------


@pytest.mark.parametrize("spec", [DEPTH3, UNetSpec(depth=2, base_channels=3, norm="batch", dropout=0.2)],
                         ids=["depth3", "depth2-batchnorm"])
def test_packaged_network_computes_what_unet_predict_computes(spec: UNetSpec) -> None:
    torch.manual_seed(0)
    model = UNet(spec).eval()
    packaged, kwargs = packaged_network(model, {"decision": {"logit_offsets": OFFSETS}})
    assert isinstance(packaged, PackagedUNet) and kwargs["logit_offsets"] == OFFSETS
    geo = geometry(spec)
    image = np.random.default_rng(0).normal(size=(geo.min_size + geo.step, geo.min_size + 3 * geo.step))
    image = image.astype(np.float32)
    x = torch.from_numpy(image)[None, None]
    with torch.no_grad():
        valid = torch.from_numpy(np.pad(image, ((geo.pad_before, geo.pad_after),) * 2, mode="reflect"))[None, None]
        np.testing.assert_allclose(packaged.net(valid).numpy(), model(valid).numpy(), rtol=0, atol=1e-5)
        theirs = packaged(x)[0].numpy()
    ours = predict_plane(model, image, stats=Scaling(0.0, 1.0), offsets=np.asarray(OFFSETS, np.float32),
                         tile_out=512, block_px=512)[:, 0]
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5)


def test_geometry_is_the_engines_margins_on_multiples_of_the_stride() -> None:
    geo = geometry(UNetSpec())  # the paper's net
    assert (geo.step, geo.pad_before, geo.pad_after, geo.halo, geo.min_size) == (16, 92, 96, 96, 208)
    assert geo.exact and geo.crop_edge(1000) == 256 and geo.crop_edge(207) == 0 and geo.crop_edge(230) == 224
    assert not geometry(UNetSpec(padding="same")).exact


# -- packages pass bioimageio.core's test -----------------------------------------------------------


@pytest.mark.parametrize("mode", [m.value for m in Normalisation])
def test_package_passes_the_model_test_and_holds_our_prediction(mode: str, stack: Path, tmp_path: Path) -> None:
    _need_extra()
    from bioimageio.core import test_model

    model = trained_like(tmp_path / "run" / "model.pt", DEPTH3, mode, validated=mode != "slice-zscore")
    package = tmp_path / "pkg.zip"
    assert export(model, package, f"{stack}:2", "--project-url", "https://example.org/unet-pipeline") == 0
    # every weight format (state dict + architecture source, TorchScript, ONNX) reproduces the test output;
    # one format suffices to check the two other modes' preprocessing
    summary = test_model(package, weight_format=None if mode == "slice-percentile" else "pytorch_state_dict")
    assert summary.status == "passed", failed(summary)
    # the test output is unet-pipeline's own prediction of the test input under the package's preprocessing
    test_in, test_out = npy(package, "test_input.npy"), npy(package, "test_output.npy")
    assert test_in.shape == (1, 1, 120, 136) and test_out.shape == (1, 2, 120, 136)
    net = UNet(DEPTH3)
    net.load_state_dict(torch.load(model, weights_only=True)["state_dict"])
    ours = predict_plane(net.eval(), test_in[0, 0], stats=spec_scaling(test_in[0, 0], Normalisation(mode)),
                         offsets=np.asarray(OFFSETS, np.float32), tile_out=136, block_px=136)[:, 0]
    np.testing.assert_allclose(test_out[0], ours, rtol=0, atol=1e-5)
    rdf = member(package, "rdf.yaml").decode()
    kind = "scale_range" if mode == "slice-percentile" else "zero_mean_unit_variance"
    assert f"id: {kind}" in rdf and FORMAT in rdf and "10.1007/978-3-319-24574-4_28" in rdf
    assert "https://example.org/unet-pipeline" in rdf and "halo: 48" in rdf
    docs = member(package, "README.md").decode()
    assert "## Validation" in docs
    assert ("0.0712" in docs) if mode != "slice-zscore" else ("had no validation data" in docs)
    assert ("Inexact by construction" in docs) == (mode == "stack-zscore")
    assert member(package, "cover.png").startswith(b"\x89PNG")


def test_a_model_trained_with_the_projects_api_exports_with_its_model_card(stack: Path, tmp_path: Path) -> None:
    """A few iterations of 'unet train' (depth 3, validated): the package's documentation holds the
    model card's validation scores and training record, and the TorchScript weights pass the test."""
    _need_extra()
    from bioimageio.core import test_model
    from test_train import make_augmented, make_validation, tiny_config  # tests/unit/test_train.py

    from unet_core.train.loop import train

    out = DEPTH3.valid_output_size_at_least(16)
    augmented = make_augmented(tmp_path / "aug.zarr", spec=DEPTH3, out_size=out, n=2)
    train([augmented], out_dir=tmp_path / "run", spec=DEPTH3, validation=[make_validation(tmp_path, size=48)],
          config=tiny_config(iterations=4, validate_every=2, checkpoint_every=2, tile_out=out))
    card = json.loads((tmp_path / "run" / "model_card.json").read_text())
    package = tmp_path / "pkg.zip"
    assert export(tmp_path / "run" / "model.pt", package, stack) == 0
    summary = test_model(package, weight_format="torchscript")
    assert summary.status == "passed", failed(summary)
    docs = member(package, "README.md").decode()
    score = card["metrics"]["final"]["val_pixel_error"]
    assert f"| val_pixel_error | {score:.6g} |" in docs and "iterations: 4" in docs and "val.ome.zarr" in docs


def test_a_corrupted_test_output_fails_the_model_test(stack: Path, tmp_path: Path) -> None:
    _need_extra()
    from bioimageio.core import test_model

    package = tmp_path / "pkg.zip"
    assert export(trained_like(tmp_path / "model.pt", DEPTH3, "slice-percentile"), package, stack) == 0
    folder = tmp_path / "unpacked"
    with zipfile.ZipFile(package) as archive:
        archive.extractall(folder)
    old = hashlib.sha256((folder / "test_output.npy").read_bytes()).hexdigest()
    corrupted = np.load(folder / "test_output.npy")
    corrupted[:, :, 20:60, 30:70] = corrupted[:, ::-1, 20:60, 30:70]  # swap the classes in a patch
    np.save(folder / "test_output.npy", corrupted)
    new = hashlib.sha256((folder / "test_output.npy").read_bytes()).hexdigest()
    rdf = folder / "rdf.yaml"
    assert old in rdf.read_text()  # the checksum is updated: the failure is the reproduction's, not the file's
    rdf.write_text(rdf.read_text().replace(old, new))
    summary = test_model(rdf, weight_format="pytorch_state_dict")
    assert summary.status != "passed"  # "valid-format": the description is valid, its test is not passed
    assert [d.name for d in summary.details if d.status == "failed"] == [
        "Reproduce test outputs from test inputs (pytorch_state_dict)"], failed(summary)


def test_blockwise_equals_whole_image_for_a_depth4_net(tmp_path: Path) -> None:
    """Inner blocks start on multiples of 16 (the halo 96 and the block sizes 208 + 16k are), the last
    one shifted back to end at the image's end; the sample border is reflected like ours.

    bioimageio.core 0.11.0's whole-image path pads the image by the halo *before* computing the
    preprocessing's statistics (percentiles of the padded image), its block-wise path computes them on
    the image: the geometry is compared on normalised input, and each path with its own statistics."""
    _need_extra()
    from bioimageio.core import load_description, predict

    image = cells((1, 304, 304), seed=4)
    sample = write_stack(tmp_path / "big.ome.zarr", image)
    package = tmp_path / "pkg.zip"
    assert export(trained_like(tmp_path / "model.pt", DEPTH4, "slice-percentile"), package, sample) == 0
    descr = load_description(package)
    blocks = {"raw": {"y": 304, "x": 304}}  # inner 112 px: 3 x 3 blocks, the last ones starting at 192

    def probabilities(x: np.ndarray, **kw) -> np.ndarray:
        result = predict(model=descr, inputs={"raw": x[None, None].astype(np.float32)}, **kw)  # a copy: core
        return result.members["probabilities"].data.values[0]  # normalises its input in place

    scaling = spec_scaling(image[0], Normalisation.SLICE_PERCENTILE)
    normalised = (image[0] - np.float32(scaling.offset)) / np.float32(scaling.scale)
    whole = probabilities(normalised, skip_preprocessing=True)
    assert whole.shape == (2, 304, 304)
    np.testing.assert_allclose(probabilities(normalised, skip_preprocessing=True, input_block_shape=blocks), whole,
                               rtol=0, atol=1e-5)
    # with the package's preprocessing: block-wise is unet predict's with the image's percentiles (+ eps)
    net = UNet(DEPTH4)
    net.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"])

    def ours(statistics_of: np.ndarray) -> np.ndarray:
        stats = spec_scaling(statistics_of, Normalisation.SLICE_PERCENTILE)
        return predict_plane(net.eval(), image[0], stats=stats, offsets=np.asarray(OFFSETS, np.float32),
                             tile_out=304, block_px=304)[:, 0]

    np.testing.assert_allclose(probabilities(image[0], input_block_shape=blocks), ours(image[0]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(probabilities(image[0]), ours(np.pad(image[0], 96, mode="reflect")), rtol=0, atol=1e-5)


# -- bad input: one line naming the file, exit 2, nothing written ---------------------------------------


def _one_line(capsys, *names: object) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert all(str(n) in err[0] for n in names), err[0]
    return err[0]


def _state_file(path: Path) -> Path:
    payload = {"format": STATE_FORMAT, "spec": DEPTH3.to_dict(), "model": UNet(DEPTH3).state_dict()}
    write_torch_file(path, payload, own=STATE_MARK)
    return path


@pytest.mark.parametrize("case", ["missing", "truncated", "tiff", "state", "sample-missing", "sample-slice",
                                  "sample-not-stack", "sample-too-small", "out-not-zip", "out-foreign",
                                  "out-unwritable"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, stack: Path, tmp_path: Path, capsys) -> None:
    _need_extra()
    model = trained_like(tmp_path / "model.pt", DEPTH3, "slice-zscore")
    out, sample, named = tmp_path / "out" / "pkg.zip", str(stack), None
    out.parent.mkdir()
    if case == "missing":
        model = named = tmp_path / "nothing.pt"
    elif case == "truncated":
        (tmp_path / "cut.pt").write_bytes(model.read_bytes()[:2000])
        model = named = tmp_path / "cut.pt"
    elif case == "tiff":
        (tmp_path / "image.tif").write_bytes(b"II*\x00" + bytes(100))
        model = named = tmp_path / "image.tif"
    elif case == "state":
        model = named = _state_file(tmp_path / "state.pt")
    elif case == "sample-missing":
        sample = named = tmp_path / "none.ome.zarr"
    elif case == "sample-slice":
        sample, named = f"{stack}:7", stack
    elif case == "sample-not-stack":
        (tmp_path / "folder").mkdir()
        sample = named = tmp_path / "folder"
    elif case == "sample-too-small":
        sample = named = write_stack(tmp_path / "small.ome.zarr", cells((1, 90, 200), seed=2))
    elif case == "out-not-zip":
        out = named = tmp_path / "out" / "pkg.tar"
    elif case == "out-foreign":
        out.write_text("someone's file")
        named = out
    elif case == "out-unwritable":
        out.parent.chmod(0o500)
        named = out
        if _writable(out.parent):  # root writes into a read-only folder: make its parent a file instead
            out.parent.chmod(0o700)
            (tmp_path / "afile").write_text("")
            out = tmp_path / "afile" / "pkg.zip"
            named = tmp_path / "afile"
    try:
        assert export(model, out, sample) == 2
    finally:
        if out.parent.is_dir():
            out.parent.chmod(0o700)
    _one_line(capsys, named)
    if out.parent.is_dir():
        assert sorted(p.name for p in out.parent.iterdir()) == (["pkg.zip"] if case == "out-foreign" else [])
    if case == "out-foreign":
        assert out.read_text() == "someone's file"


def _writable(folder: Path) -> bool:
    probe = folder / ".probe"
    try:
        probe.touch()
    except OSError:
        return False
    probe.unlink()
    return True


@pytest.mark.parametrize(("option", "value"), [("--author", "a/b"), ("--license", "NOT-A-LICENSE"),
                                               ("--project-url", "not a url")])
def test_a_value_the_spec_refuses_is_one_line(option: str, value: str, stack: Path, tmp_path: Path, capsys) -> None:
    _need_extra()
    model = trained_like(tmp_path / "model.pt", DEPTH3, "slice-zscore")
    assert export(model, tmp_path / "pkg.zip", stack, option, value) == 2
    assert value in _one_line(capsys, model, option) and list(tmp_path.iterdir()) == [model]


def test_a_rerun_replaces_its_own_package(stack: Path, tmp_path: Path) -> None:
    _need_extra()
    model = trained_like(tmp_path / "model.pt", DEPTH3, "stack-zscore")
    out = tmp_path / "pkg.zip"
    assert export(model, out, stack, "--name", "first") == 0
    assert export(model, out, f"{stack}:0", "--name", "second") == 0
    assert "name: second" in member(out, "rdf.yaml").decode()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    config = json.dumps(member(out, "rdf.yaml").decode())
    assert "argmax_agreement_with_unet_predict" in config


def test_sample_argument_takes_an_optional_slice() -> None:
    from unet_core.export.bioimageio import parse_sample

    assert parse_sample("a/s.ome.zarr:3") == (Path("a/s.ome.zarr"), 3)
    assert parse_sample("a/s.ome.zarr") == (Path("a/s.ome.zarr"), None)
    assert parse_sample("C:/x/s.ome.zarr") == (Path("C:/x/s.ome.zarr"), None)


def test_without_the_extra_export_says_how_to_install(monkeypatch, stack: Path, tmp_path: Path, capsys) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "bioimageio.spec", None)  # import fails as if not installed
    model = trained_like(tmp_path / "model.pt", DEPTH3, "slice-zscore")
    assert export(model, tmp_path / "pkg.zip", stack) == 2
    assert "unet-pipeline[bioimageio]" in _one_line(capsys) and not (tmp_path / "pkg.zip").exists()


def test_package_files_are_not_left_behind(stack: Path, tmp_path: Path) -> None:
    """The package's sources are staged in a temporary folder that is removed (also on success)."""
    _need_extra()
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("unet-bioimageio-*"))
    assert export(trained_like(tmp_path / "model.pt", DEPTH3, "slice-zscore"), tmp_path / "p.zip", stack) == 0
    assert set(Path(tempfile.gettempdir()).glob("unet-bioimageio-*")) == before
    shutil.rmtree(tmp_path, ignore_errors=True)
