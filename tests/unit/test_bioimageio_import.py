"""bioimage.io packages as the model of ``unet predict`` (issue 35, item 3): a package of ours predicts
byte for byte as its model.pt; a foreign same-padded ONNX network with a declared halo runs through ONNX
Runtime, tiled equal to one whole-image pass of the network inside that halo's guarantee; TorchScript
runs only when trusted; what cannot be run is refused with one line, exit 2, nothing written.

Every package is built here (no downloads). Needs the optional ``bioimageio`` extra (onnx, onnxruntime,
bioimageio.spec for our export) and skips without it.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
import zarr
from test_bioimageio_export import DEPTH3, cells, trained_like, write_stack

from unet_core.cli import main
from unet_core.common.intensity import Normalisation
from unet_core.io.ngff import open_stack
from unet_core.model.onnx_network import export_onnx
from unet_core.model.package import is_package, load_predict_model

pytest.importorskip("onnxruntime", reason="needs the optional extra: pip install -e '.[bioimageio]'")
pytest.importorskip("onnx", reason="needs the optional extra: pip install -e '.[bioimageio]'")
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

HALO = 16  # the foreign net's declared halo; its receptive-field radius is 1 + 2 * 2 + 2 = 7 px
STEP = 2  # one 2x2 max-pool: inputs of even size, tile origins aligned to 2


class SamePadded(torch.nn.Module):
    """A small same-padded network with one max-pool: (N, 1, Y, X) -> (N, 1, Y, X) cell logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.a = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.c = torch.nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b(torch.nn.functional.max_pool2d(torch.relu(self.a(x)), 2)))
        return self.c(torch.nn.functional.interpolate(y, scale_factor=2.0, mode="nearest")) * 3.0


def _file(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest()}


def foreign_rdf(files: dict[str, bytes], *, weights: tuple[str, ...] = ("onnx",),
                postprocessing: str | None = "sigmoid", **change: Any) -> dict[str, Any]:
    """A format-0.5 rdf of :class:`SamePadded` (zero_mean_unit_variance over y, x; sigmoid output)."""
    space = {"size": {"min": 8, "step": STEP}, "type": "space"}
    rdf = {
        "format_version": "0.5.12", "type": "model", "name": "foreign", "description": "a test net",
        "inputs": [{"id": "input0", "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["raw"]},
                                             {"id": "y", **space}, {"id": "x", **space}],
                    "data": {"type": "float32"},
                    "preprocessing": [{"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
                                      {"id": "zero_mean_unit_variance", "kwargs": {"axes": ["y", "x"], "eps": 1e-6}}]}],
        "outputs": [{"id": "output0", "axes": [
            {"type": "batch"}, {"type": "channel", "channel_names": ["foreground"]},
            *({"id": a, "type": "space", "halo": HALO, "size": {"tensor_id": "input0", "axis_id": a}}
              for a in ("y", "x"))],
            "postprocessing": [{"id": postprocessing}] if postprocessing else []}],
        "weights": {},
    }
    if "onnx" in weights:
        rdf["weights"]["onnx"] = {"source": "net.onnx", "opset_version": 17, **_file(files["net.onnx"])}
    if "torchscript" in weights:
        rdf["weights"]["torchscript"] = {"source": "net.pt", "pytorch_version": "2.13", **_file(files["net.pt"])}
    for key, value in change.items():
        rdf[key] = value
    return rdf


def network_files() -> dict[str, bytes]:
    net = SamePadded().eval()
    onnx, script = io.BytesIO(), io.BytesIO()
    export_onnx(net, torch.zeros(1, 1, 64, 64), onnx)
    torch.jit.save(torch.jit.script(net), script)
    return {"net.onnx": onnx.getvalue(), "net.pt": script.getvalue()}


def write_package(path: Path, rdf: dict[str, Any], files: dict[str, bytes | None]) -> Path:
    """A zip of ``rdf`` as rdf.yaml and ``files`` (an entry "rdf.yaml": its bytes instead, or None: none)."""
    files = {"rdf.yaml": yaml.safe_dump(rdf).encode(), **files}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            if data is not None:
                archive.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    return write_stack(tmp_path_factory.mktemp("stack") / "s.ome.zarr", cells((2, 120, 136), seed=4))


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return network_files()


def predict(stack: Path, model: Path, out: Path, *extra: str) -> int:
    return main(["-q", "predict", str(stack), str(model), str(out), "--block-px", "64", "--tile-out", "32",
                 "--probabilities", "float32", *extra])


def probabilities(part: Path) -> np.ndarray:
    return zarr.open_group(part, mode="r")["probabilities"][:]


def whole_image_reference(stack: Path) -> np.ndarray:
    """(Z, Y, X) P(cell) of one pass of the network over each slice mirrored by the halo (numpy
    reflect, the project's convention), normalised with the slice's stored statistics."""
    st = open_stack(stack)
    scaler, net = st.scaler(Normalisation.SLICE_ZSCORE), SamePadded().eval()
    out = []
    for z in range(st.shape[0]):
        s = scaler(z)
        x = (np.asarray(st.image[z], np.float32) - np.float32(s.offset)) / np.float32(s.scale)
        pad = np.pad(x, HALO, mode="reflect")
        with torch.no_grad():
            logits = net(torch.from_numpy(pad)[None, None])[0, 0, HALO:-HALO, HALO:-HALO]
        out.append(torch.sigmoid(logits).numpy())
    return np.stack(out)


# -- our own packages ------------------------------------------------------------------------------


def test_our_package_predicts_byte_for_byte_as_its_model_pt(tmp_path: Path, stack: Path) -> None:
    pytest.importorskip("bioimageio.spec", reason="needs the optional extra: pip install -e '.[bioimageio]'")
    model = trained_like(tmp_path / "model.pt", DEPTH3, "slice-percentile")
    package = tmp_path / "unet.zip"
    assert main(["-q", "export-bioimageio", str(model), str(package), "--sample", str(stack)]) == 0
    folder = tmp_path / "unpacked"
    zipfile.ZipFile(package).extractall(folder)
    assert is_package(package) and is_package(folder) and not is_package(model)
    assert predict(stack, model, tmp_path / "a") == 0
    for source, part in ((package, "b"), (folder, "c"), (folder / "rdf.yaml", "d")):
        assert predict(stack, source, tmp_path / part) == 0
        assert np.array_equal(probabilities(tmp_path / "a"), probabilities(tmp_path / part)), source
    _, metadata = load_predict_model(package)
    _, original = load_predict_model(model)
    assert metadata["intensity_normalisation"] == original["intensity_normalisation"]
    assert metadata["decision"]["logit_offsets"] == original["decision"]["logit_offsets"]


# -- foreign packages ------------------------------------------------------------------------------


def test_foreign_onnx_package_tiled_equals_one_whole_image_pass_inside_its_halo(tmp_path: Path, stack: Path,
                                                                                files: dict[str, bytes]) -> None:
    package = write_package(tmp_path / "foreign.zip", foreign_rdf(files), {"net.onnx": files["net.onnx"]})
    assert predict(stack, package, tmp_path / "a", "--jobs", "1") == 0
    probs = probabilities(tmp_path / "a")
    want = whole_image_reference(stack)
    # 64-px blocks of 32-px tiles, each read grown by the 16-px halo: one pass of the network over the
    # mirrored slice to float rounding (ONNX Runtime's sums vs torch's)
    assert np.abs(probs[1] - want).max() <= 1e-6
    assert np.abs(probs[0] - (1 - want)).max() <= 1e-6
    seg = zarr.open_group(tmp_path / "a", mode="r")["segmentation"][:]
    assert np.array_equal(seg.astype(bool), probs[1] > probs[0])
    _, metadata = load_predict_model(package)
    assert metadata["package"] == {"weights": "onnx", "cell_channel": "foreground", "halo_px": HALO, "step_px": STEP}


def test_foreign_torchscript_runs_only_when_trusted(tmp_path: Path, stack: Path, files: dict[str, bytes],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    package = write_package(tmp_path / "ts.zip", foreign_rdf(files, weights=("torchscript",)),
                            {"net.pt": files["net.pt"]})
    assert predict(stack, package, tmp_path / "refused") == 2
    err = capsys.readouterr().err.strip()
    assert "TorchScript, which is code" in err and "--trust-torchscript" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "refused").exists()
    assert predict(stack, package, tmp_path / "trusted", "--trust-torchscript") == 0
    assert np.abs(probabilities(tmp_path / "trusted")[1] - whole_image_reference(stack)).max() <= 1e-6


def test_the_cell_channel_of_a_softmax_output_is_chosen_by_name(tmp_path: Path, stack: Path) -> None:
    """Two output channels under a softmax: the one named by --cell-channel is the cell class."""

    class TwoChannels(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = SamePadded()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logit = self.net(x)
            return torch.cat([logit, -logit], dim=1)  # softmax: channel 0 = sigmoid(2 * logit)

    onnx = io.BytesIO()
    export_onnx(TwoChannels().eval(), torch.zeros(1, 1, 64, 64), onnx)
    rdf = foreign_rdf({"net.onnx": onnx.getvalue()}, postprocessing="softmax")
    rdf["outputs"][0]["axes"][1]["channel_names"] = ["cells", "rest"]
    package = write_package(tmp_path / "two.zip", rdf, {"net.onnx": onnx.getvalue()})
    assert predict(stack, package, tmp_path / "none") == 2  # two channels: which one is not guessed
    assert not (tmp_path / "none").exists()
    assert predict(stack, package, tmp_path / "a", "--cell-channel", "cells") == 0
    assert predict(stack, package, tmp_path / "b", "--cell-channel", "rest") == 0
    st = open_stack(stack)
    scaler, net = st.scaler(Normalisation.SLICE_ZSCORE), SamePadded().eval()
    want = []
    for z in range(st.shape[0]):
        s = scaler(z)
        x = np.pad((np.asarray(st.image[z], np.float32) - np.float32(s.offset)) / np.float32(s.scale), HALO, "reflect")
        with torch.no_grad():
            want.append(torch.sigmoid(2 * net(torch.from_numpy(x)[None, None])[0, 0, HALO:-HALO, HALO:-HALO]).numpy())
    assert np.abs(probabilities(tmp_path / "a")[1] - np.stack(want)).max() <= 2e-6
    assert np.abs(probabilities(tmp_path / "b")[1] - (1 - np.stack(want))).max() <= 2e-6


def _edit(rdf: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``rdf`` with the value at ``path`` (dots; list indices as numbers) replaced."""
    *head, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = rdf
    for key in head:
        node = node[key]
    node[last] = value
    return rdf


SPACE_Z = {"id": "z", "type": "space", "size": {"min": 1, "step": 1}}
REFUSED = [
    pytest.param(lambda r: _edit(r, "format_version", "0.4.10"), {}, "format_version", id="format-0.4"),
    pytest.param(lambda r: _edit(r, "type", "dataset"), {}, "not a model", id="not-a-model"),
    pytest.param(lambda r: _edit(r, "inputs.0.axes", [*r["inputs"][0]["axes"], SPACE_Z]), {}, "'z'", id="z-axis"),
    pytest.param(lambda r: _edit(r, "inputs.0.axes.1.channel_names", ["r", "g", "b"]), {}, "3 channels",
                 id="rgb-input"),
    pytest.param(lambda r: _edit(r, "inputs.0.axes.2.size", 64), {}, "size min + step", id="fixed-size"),
    pytest.param(lambda r: _edit(r, "inputs.0.axes.2.size", {"min": 33, "step": 3}), {}, "power of two",
                 id="step-3"),
    pytest.param(lambda r: _edit(r, "outputs.0.axes.2.size", {"tensor_id": "input0", "axis_id": "y", "offset": -8}),
                 {}, "input's size", id="cropped-output"),
    pytest.param(lambda r: _edit(r, "inputs.0.preprocessing", [{"id": "scale_linear", "kwargs": {"gain": 2.0}}]),
                 {}, "preprocessing scale_linear", id="scale-linear"),
    pytest.param(lambda r: _edit(r, "inputs.0.preprocessing", []), {}, "preprocessing none", id="no-preprocessing"),
    pytest.param(lambda r: _edit(r, "outputs.0.postprocessing", [{"id": "binarize", "kwargs": {"threshold": 0.5}}]),
                 {}, "postprocessing binarize", id="binarize"),
    pytest.param(lambda r: _edit(r, "weights", {}), {}, "names no weights", id="no-weights"),
    pytest.param(lambda r: _edit(r, "weights", {"keras_hdf5": {"source": "net.h5", "tensorflow_version": "2.1"}}),
                 {}, "no weights that run", id="keras-only"),
    pytest.param(lambda r: _edit(r, "weights.onnx.sha256", "0" * 64), {}, "does not match its sha256", id="sha256"),
    pytest.param(lambda r: _edit(r, "weights.onnx.source", "https://example.org/net.onnx"), {}, "nothing is downloaded",
                 id="url"),
    pytest.param(lambda r: _edit(r, "weights.onnx.source", "../net.onnx"), {}, "outside the package", id="dotdot"),
    pytest.param(lambda r: r, {"net.onnx": None}, "is missing", id="missing-weights-file"),
    pytest.param(lambda r: r, {"net.onnx": b"not onnx"}, "ONNX Runtime cannot load", id="damaged-onnx"),
    pytest.param(lambda r: r, {"../evil.txt": b"x"}, "path traversal", id="zip-traversal"),
    pytest.param(lambda r: r, {"rdf.yaml": None}, "without rdf.yaml", id="no-rdf"),
    pytest.param(lambda r: r, {"rdf.yaml": b"inputs: [unclosed"}, "not valid YAML", id="bad-yaml"),
    pytest.param(lambda r: _edit(r, "outputs.0.axes.1.channel_names", ["a", "b"]), {}, "predict.cell_channel",
                 id="two-channels-unnamed"),
    pytest.param(lambda r: _edit(r, "outputs.0.axes", [r["outputs"][0]["axes"][i] for i in (0, 2, 3)]), {},
                 "an output of 4 axes, its rdf names 3", id="axes-not-the-networks"),
    pytest.param(lambda r: _edit(r, "inputs.0.axes", r["inputs"][0]["axes"][1:]), {}, "its network fails",
                 id="input-rank-not-the-networks"),
]


@pytest.mark.parametrize(("edit", "members", "says"), REFUSED)
def test_what_cannot_be_run_is_one_line_exit_2_nothing_written(tmp_path: Path, stack: Path, files: dict[str, bytes],
                                                               capsys: pytest.CaptureFixture[str], edit, members,
                                                               says: str) -> None:
    contents = {"net.onnx": files["net.onnx"], **members}
    rdf = edit(foreign_rdf(files))
    if members.get("net.onnx") is not None and "net.onnx" in members:  # damaged on purpose: its sha256 matches
        rdf["weights"]["onnx"]["sha256"] = hashlib.sha256(members["net.onnx"]).hexdigest()
    package = write_package(tmp_path / "p.zip", rdf, contents)
    assert predict(stack, package, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(package) in err and says in err, err
    assert not (tmp_path / "out").exists()


def test_a_zip_expanding_past_the_bound_is_refused(tmp_path: Path, stack: Path, files: dict[str, bytes],
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from unet_core.model import package as package_module

    package = write_package(tmp_path / "p.zip", foreign_rdf(files), {"net.onnx": files["net.onnx"],
                                                                      "padding.bin": bytes(1 << 20)})
    monkeypatch.setattr(package_module, "MAX_UNPACKED_BYTES", 1 << 20)  # the real bound is 4 GiB
    assert predict(stack, package, tmp_path / "out") == 2
    assert "more than the" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_auto_merge_settings_need_explicit_values_for_a_foreign_model(tmp_path: Path, stack: Path,
                                                                      files: dict[str, bytes],
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    package = write_package(tmp_path / "foreign.zip", foreign_rdf(files), {"net.onnx": files["net.onnx"]})
    assert predict(stack, package, tmp_path / "part") == 0
    capsys.readouterr()
    assert main(["-q", "merge", str(tmp_path / "part"), "--stack", str(stack), "-o", str(tmp_path / "p.ome.zarr"),
                 "--min-object-px", "auto"]) == 2
    assert "auto" in capsys.readouterr().err
    assert not (tmp_path / "p.ome.zarr").exists()
    assert main(["-q", "merge", str(tmp_path / "part"), "--stack", str(stack), "-o", str(tmp_path / "p.ome.zarr"),
                 "--min-object-px", "20"]) == 0


def test_the_workflow_takes_a_package_as_model_file(tmp_path: Path, files: dict[str, bytes]) -> None:
    """model_file's start-up check loads a package as unet predict does: its geometry, its refusals."""
    from unet_core.common.errors import UserInputError
    from unet_core.workflow.door import model_geometry

    package = write_package(tmp_path / "foreign.zip", foreign_rdf(files), {"net.onnx": files["net.onnx"]})
    config = {"predict": {"tile_out": 32, "block_px": 64, "trust_torchscript": False, "cell_channel": None}}
    spec = model_geometry(config, model_file=str(package), given_model={}, given_normalisation=None)
    assert (spec.stride, spec.halo_px) == (STEP, HALO)
    assert model_geometry(config, model_file=str(package), given_model={},
                          given_normalisation="slice-zscore") == spec
    with pytest.raises(UserInputError, match="normalisation"):  # the package's preprocessing is slice-zscore
        model_geometry(config, model_file=str(package), given_model={}, given_normalisation="slice-percentile")
    script = write_package(tmp_path / "ts.zip", foreign_rdf(files, weights=("torchscript",)), {"net.pt": files["net.pt"]})
    with pytest.raises(UserInputError, match="trust-torchscript"):
        model_geometry(config, model_file=str(script), given_model={}, given_normalisation=None)
    config["predict"]["trust_torchscript"] = True
    assert model_geometry(config, model_file=str(script), given_model={}, given_normalisation=None) == spec


class ChannelsLast(torch.nn.Module):
    """:class:`SamePadded` taking and giving (batch, y, x, channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = SamePadded()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class Plane(torch.nn.Module):
    """:class:`SamePadded` taking one (y, x) image, giving (channel, y, x)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = SamePadded()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[None, None])[0]


@pytest.mark.parametrize(("network", "inputs", "outputs"), [
    pytest.param(ChannelsLast, ("batch", "y", "x", "channel"), ("batch", "y", "x", "channel"), id="byxc"),
    pytest.param(Plane, ("y", "x"), ("channel", "y", "x"), id="yx-no-batch"),
])
def test_the_packages_axis_order_is_followed(tmp_path: Path, stack: Path, network, inputs, outputs) -> None:
    script = io.BytesIO()
    torch.jit.save(torch.jit.script(network().eval()), script)
    rdf = foreign_rdf({"net.pt": script.getvalue()}, weights=("torchscript",))
    by_name = {a.get("id", a["type"]): a for a in rdf["inputs"][0]["axes"]}
    rdf["inputs"][0]["axes"] = [by_name[a] for a in inputs]
    by_name = {a.get("id", a["type"]): a for a in rdf["outputs"][0]["axes"]}
    rdf["outputs"][0]["axes"] = [by_name[a] for a in outputs]
    package = write_package(tmp_path / "p.zip", rdf, {"net.pt": script.getvalue()})
    assert predict(stack, package, tmp_path / "a", "--trust-torchscript", "--batch", "3") == 0
    assert np.abs(probabilities(tmp_path / "a")[1] - whole_image_reference(stack)).max() <= 1e-6


def test_output_channels_the_network_does_not_give_are_refused(tmp_path: Path, stack: Path, files: dict[str, bytes],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    rdf = foreign_rdf(files)
    rdf["outputs"][0]["axes"][1]["channel_names"] = ["cells", "rest"]  # the network gives one channel
    package = write_package(tmp_path / "p.zip", rdf, {"net.onnx": files["net.onnx"]})
    assert predict(stack, package, tmp_path / "out", "--cell-channel", "cells") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gives (1, 1, 34, 34) for a 34 x 34 input, not the (1, 2, 34, 34)" in err
    assert not (tmp_path / "out").exists()
