"""U-Net geometry against the paper, invalid sizes, parameter count and He initialisation."""

from __future__ import annotations

import math
import re

import pytest
import torch

from unet_core.common.errors import ConfigError
from unet_core.model.spec import UNetSpec
from unet_core.model.unet import UNet


@pytest.mark.parametrize(
    ("depth", "in_size", "out_size"),
    [
        pytest.param(4, 572, 388, id="paper-572-388"),
        pytest.param(4, 188, 4, id="paper-min-188-4"),
        pytest.param(4, 204, 20, id="paper-204-20"),
        pytest.param(4, 700, 516, id="paper-700-516"),
        # depth 2: context 6*4-4 = 20 px per side; min input 44 -> 4
        pytest.param(2, 44, 4, id="d2-min-44-4"),
        pytest.param(2, 60, 20, id="d2-60-20"),
        # depth 1: context 8; 18: conv 16, conv 14, pool 7, conv 5, conv 3, up 6, conv 4, conv 2
        pytest.param(1, 18, 2, id="d1-18-2"),
    ],
)
def test_output_size_table(depth: int, in_size: int, out_size: int) -> None:
    spec = UNetSpec(depth=depth)
    assert spec.output_size(in_size) == out_size
    assert spec.input_size(out_size) == in_size
    assert in_size - out_size == 2 * spec.context


def test_paper_geometry_constants() -> None:
    spec = UNetSpec()
    assert (spec.context, spec.stride, spec.min_input_size) == (92, 16, 188)
    valid = [n for n in range(100, 700) if spec.is_valid_input(n)]
    assert valid == list(range(188, 700, 16))


@pytest.mark.parametrize(
    ("in_size", "nearest"),
    [
        pytest.param(570, (556, 572), id="between"),
        pytest.param(100, (188,), id="below-min"),
        pytest.param(573, (572, 588), id="just-above"),
    ],
)
def test_invalid_input_names_nearest(in_size: int, nearest: tuple[int, ...]) -> None:
    spec = UNetSpec()
    with pytest.raises(ValueError, match="nearest: " + str(nearest).replace("(", r"\(").replace(")", r"\)")):
        spec.output_size(in_size)


def test_invalid_output_size_names_nearest() -> None:
    with pytest.raises(ValueError, match=r"nearest valid output sizes: \(372, 388\)"):
        UNetSpec().input_size(380)


def test_forward_shape_matches_spec() -> None:
    spec = UNetSpec(depth=2, base_channels=4, n_classes=3)
    model = UNet(spec).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 1, 76, 92))
    assert tuple(out.shape) == (2, 3, spec.output_size(76), spec.output_size(92))


def test_spec_rejects_size_torch_would_floor() -> None:
    # an odd size before a max-pool silently floors in torch; the spec is what must refuse it
    spec = UNetSpec(depth=2, base_channels=4)
    with pytest.raises(ValueError, match="nearest"):
        spec.output_size(62)


def test_default_parameter_count() -> None:
    model = UNet(UNetSpec())
    assert sum(p.numel() for p in model.parameters()) == 31_030_658


def test_he_init_std() -> None:
    torch.manual_seed(0)
    model = UNet(UNetSpec(depth=3, base_channels=32))
    # 3x3 conv 64 -> 64 at level 1: N = 9 * 64 incoming nodes
    conv = model.downs[0][1][3]
    assert conv.in_channels == 64 and conv.kernel_size == (3, 3)
    expected = math.sqrt(2 / (9 * 64))
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.03)
    assert conv.weight.mean().item() == pytest.approx(0.0, abs=0.05 * expected)
    assert torch.count_nonzero(conv.bias) == 0
    # 2x2 stride-2 up-convolution: each output pixel sees one tap per input channel
    up = model.ups[0].up
    assert up.weight.std().item() == pytest.approx(math.sqrt(2 / up.in_channels), rel=0.03)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"depth": 0}, id="depth-0"),
        pytest.param({"n_classes": 1}, id="one-class"),
        pytest.param({"dropout": 1.0}, id="dropout-1"),
        pytest.param({"padding": "full"}, id="bad-padding"),
    ],
)
def test_bad_spec_raises_config_error(kwargs: dict) -> None:
    with pytest.raises((ConfigError, ValueError)):
        UNetSpec(**kwargs)


def test_same_padding_keeps_size() -> None:
    spec = UNetSpec(depth=2, base_channels=4, padding="same")
    model = UNet(spec).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 32, 48)).shape[-2:] == (32, 48)
    with pytest.raises(ValueError, match=r"nearest: \(28, 32\)"):
        spec.output_size(30)


def test_model_files_of_version_0_1_still_load(tmp_path) -> None:
    """The model-file layout of unet-pipeline 0.1 (written here by hand, key by key) loads, and
    its architecture comes from the file: what an old model.pt needs to keep predicting."""
    from unet_core.model.checkpoint import load_model

    spec = UNetSpec(depth=2, base_channels=4, dropout=0.0)
    torch.manual_seed(0)
    net = UNet(spec)
    payload = {
        "format": "unet-pipeline/model/1",
        "spec": {"depth": 2, "base_channels": 4, "in_channels": 1, "n_classes": 2, "padding": "valid",
                 "norm": "none", "dropout": 0.0},
        "state_dict": {k: v.clone() for k, v in net.state_dict().items()},
        "metadata": {"intensity_normalisation": "stack z-score", "decision": {"logit_offsets": [0.5, -0.5]}},
    }
    torch.save(payload, tmp_path / "old.pt")
    model, metadata = load_model(tmp_path / "old.pt", expect={"base_channels": 4})
    assert model.spec == spec and metadata["decision"]["logit_offsets"] == [0.5, -0.5]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), net.state_dict().values()))


def test_loading_a_model_draws_no_weights_and_keeps_the_files_bits(tmp_path, monkeypatch) -> None:
    """Issue 34: load_model He-initialised all weights (31 M for the paper net) only to overwrite
    them; the network is now built on the meta device and takes the file's tensors. The weights,
    dtypes and layout, and so the predictions, are the bits of the network that was saved."""
    import numpy as np

    from unet_core.common.intensity import IntensityStats
    from unet_core.infer.predict import predict_plane
    from unet_core.model.checkpoint import load_model, save_model

    spec = UNetSpec(depth=2, base_channels=4, dropout=0.0)
    torch.manual_seed(3)
    net = UNet(spec).eval()
    save_model(tmp_path / "m.pt", net)
    drawn = []
    real_normal = torch.nn.init.normal_
    monkeypatch.setattr(torch.nn.init, "normal_", lambda t, *a, **k: drawn.append(t.shape) or real_normal(t, *a, **k))
    model, _ = load_model(tmp_path / "m.pt")
    monkeypatch.undo()
    assert drawn == []
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and not any(t.is_meta for t in tensors)
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in model.parameters())
    for (k, a), b in zip(model.state_dict().items(), net.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and a.is_contiguous() and torch.equal(a, b), k
    image = np.random.default_rng(0).normal(size=(40, 44)).astype(np.float32)
    kw = {"stats": IntensityStats(0.0, 1.0), "block_px": 32, "tile_out": 16}
    assert predict_plane(model, image, **kw).tobytes() == predict_plane(net, image, **kw).tobytes()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", [0, -1, 1001])
def test_weights_with_one_non_finite_value_are_refused(value: float, where: int) -> None:
    # the check reads each tensor's extremes (one fast reduction): one NaN or ±Inf anywhere is found
    from unet_core.common.errors import CheckpointError
    from unet_core.model.checkpoint import check_weights

    spec = UNetSpec(depth=2, base_channels=4, dropout=0.0)
    state = {k: v.clone() for k, v in UNet(spec).state_dict().items()}
    check_weights(spec, state, path="m.pt")
    key = "downs.1.1.3.weight"  # 2304 values, (16, 16, 3, 3)
    state[key].view(-1)[where] = value
    with pytest.raises(CheckpointError, match=f"weights {re.escape(key)} hold NaN or Inf"):
        check_weights(spec, state, path="m.pt")


def test_loading_a_model_does_not_start_torchs_compiler(tmp_path):
    """load_model checks the file's shapes on a network built on the meta device; its He init drew
    normal_ there, which imports torch._dynamo: 0.8 CPU-s in every process that loads a model (it
    took 'unet predict' on the host benchmark from 1.28 to 2.0 CPU-s). A fresh process, as a job is."""
    import subprocess
    import sys

    from unet_core.model.checkpoint import save_model

    save_model(tmp_path / "m.pt", UNet(UNetSpec(depth=2, base_channels=4)))
    code = ("import sys; from unet_core.model.checkpoint import load_model; "
            f"load_model({str(tmp_path / 'm.pt')!r}); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
