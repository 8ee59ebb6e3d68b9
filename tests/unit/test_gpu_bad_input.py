"""Bad GPU input, on the CPU (issue 34): a GPU index beyond those visible, bf16 on a GPU without
it, and a GPU out of memory in training, validation, augmentation or prediction each stop the
stage with one line naming the problem (and the setting to change), exit 2, and nothing marked
complete. torch.cuda's answers and the out-of-memory error are stubbed (no GPU here); the code
under test is the product's own device, precision and error handling."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_augment import TINY_ARGS, stores  # noqa: F401  (stores: a module fixture)
from test_predict import model_file, stack  # noqa: F401  (fixtures)
from test_train import make_augmented, make_validation

from unet_core.cli import main
from unet_core.common.device import out_of_gpu_memory, resolve_device
from unet_core.common.errors import ConfigError, UserInputError
from unet_core.common.precision import Precision, resolve_precision


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n, major=9)``: torch.cuda answers as on a machine with ``n`` visible GPUs of compute
    capability ``major``.x (a Hopper, or e.g. 7 for a V100, which emulates bf16)."""

    def visible(n: int, *, major: int = 9, name: str = "NVIDIA H100") -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: SimpleNamespace(major=major, name=name))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: major >= 8 or including_emulation)

    return visible


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# -- cuda:N -------------------------------------------------------------------------------------
def test_a_gpu_index_beyond_the_visible_ones_is_refused(gpus) -> None:
    gpus(2)
    assert resolve_device("cuda:1") == torch.device("cuda:1") and resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(UserInputError, match=r"^--device cuda:2: this process sees 2 CUDA GPUs \(cuda:0 to cuda:1;"):
        resolve_device("cuda:2")
    gpus(1)
    with pytest.raises(UserInputError, match=r"^predict.device cuda:1: this process sees 1 CUDA GPU \(cuda:0;"):
        resolve_device("cuda:1", option="predict.device")


def test_predict_on_a_gpu_index_beyond_the_visible_ones_is_one_line_exit_2(gpus, stack, model_file, tmp_path,
                                                                           capsys) -> None:
    gpus(2)
    part = tmp_path / "part-0.zarr"
    code = main(["predict", str(stack), str(model_file), str(part), "--device", "cuda:2", "--block-px", "32",
                 "--tile-out", "16"])
    assert code == 2 and "--device cuda:2: this process sees 2 CUDA GPUs" in _one_line(capsys)
    assert not part.exists()


def test_train_on_a_gpu_index_beyond_the_visible_ones_is_one_line_exit_2(gpus, tmp_path, capsys) -> None:
    gpus(1)
    aug = make_augmented(tmp_path / "aug.zarr", n=1)
    code = main(["train", "--train", str(aug), "--out-dir", str(tmp_path / "run"), "--depth", "2",
                 "--base-channels", "4", "--iterations", "2", "--workers", "0", "--device", "cuda:1"])
    assert code == 2 and "train.device cuda:1: this process sees 1 CUDA GPU" in _one_line(capsys)
    assert not (tmp_path / "run").exists()


# -- bf16 where the GPU has none ----------------------------------------------------------------------
def test_bf16_on_a_gpu_without_it_is_refused_and_auto_takes_fp16(gpus) -> None:
    gpus(1, major=7, name="Tesla V100-SXM2-16GB")  # torch.cuda.is_bf16_supported() says True: emulated
    cuda = torch.device("cuda")
    with pytest.raises(UserInputError, match=r"^train.precision bf16: cuda \(Tesla V100-SXM2-16GB\) has no native "
                                             r"bf16 .*use auto \(fp16 there\) or fp32$"):
        resolve_precision("bf16", cuda, option="train.precision")
    assert resolve_precision("auto", cuda) is Precision.FP16
    assert resolve_precision("fp16", cuda) is Precision.FP16 and resolve_precision("fp32", cuda) is Precision.FP32
    gpus(1, major=9)
    assert resolve_precision("bf16", cuda) is Precision.BF16 and resolve_precision("auto", cuda) is Precision.BF16


def test_predict_in_bf16_on_a_gpu_without_it_is_one_line_exit_2(gpus, stack, model_file, tmp_path, capsys) -> None:
    gpus(1, major=7, name="Tesla V100")
    part = tmp_path / "part-0.zarr"
    code = main(["predict", str(stack), str(model_file), str(part), "--device", "cuda", "--precision", "bf16",
                 "--block-px", "32", "--tile-out", "16"])
    assert code == 2 and "--precision bf16: cuda (Tesla V100) has no native bf16" in _one_line(capsys)
    assert not part.exists()


# -- out of GPU memory -----------------------------------------------------------------------------
def _oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_gpu_memory_becomes_the_error_it_names_and_nothing_else_does() -> None:
    with pytest.raises(ConfigError, match=r"^out of GPU memory training here; lower x$"), \
            out_of_gpu_memory("training here", "lower x", error=ConfigError):
        _oom()
    with pytest.raises(RuntimeError, match="not memory"), out_of_gpu_memory("w", "r"):
        raise RuntimeError("not memory")


def _train_argv(tmp_path: Path, *extra: str) -> list[str]:
    aug = make_augmented(tmp_path / "aug.zarr", n=2)
    return ["train", "--train", str(aug), "--out-dir", str(tmp_path / "run"), "--depth", "2", "--base-channels", "4",
            "--dropout", "0", "--iterations", "6", "--validate-every", "3", "--checkpoint-every", "2",
            "--workers", "0", "--device", "cpu", "--threads", "1", "--export-weights", "last", *extra]


def test_training_out_of_gpu_memory_is_one_line_exit_2_and_no_model(tmp_path: Path, monkeypatch, capsys) -> None:
    import unet_core.train.loop as loop

    steps = []
    real = loop.batch_loss

    def fills_up(*args, **kwargs):  # the third step's forward runs out of memory
        steps.append(1)
        return _oom() if len(steps) == 3 else real(*args, **kwargs)

    monkeypatch.setattr(loop, "batch_loss", fills_up)
    assert main(_train_argv(tmp_path)) == 2
    line = _one_line(capsys)
    assert line.endswith("out of GPU memory training on cpu (batch 1 of 60-px tiles); lower train.batch_size, "
                         "then train.tile_out"), line
    run = tmp_path / "run"
    assert (run / "state.pt").is_file()  # iteration 2's checkpoint: resumable, not a finished run
    assert not any((run / name).exists() for name in ("model.pt", "model.ts", "model_card.json"))


def test_validation_out_of_gpu_memory_names_val_tile_out(tmp_path: Path, monkeypatch, capsys) -> None:
    import unet_core.train.loop as loop

    monkeypatch.setattr(loop, "validate", _oom)
    stack, weights = make_validation(tmp_path)
    assert main(_train_argv(tmp_path, "--val", f"{stack}:{weights}", "--val-tile-out", "20")) == 2
    line = _one_line(capsys)
    assert line.endswith("out of GPU memory validating on cpu (20-px tiles); lower train.val_tile_out"), line
    assert not (tmp_path / "run" / "model.pt").exists()


def test_augmentation_out_of_gpu_memory_is_one_line_exit_2_and_no_set(stores, tmp_path: Path,  # noqa: F811
                                                                      monkeypatch, capsys) -> None:
    from unet_core.augment import samples

    monkeypatch.setattr(samples, "deform_tiles", _oom)
    stack, weights = stores
    out = tmp_path / "new"
    out.mkdir()
    code = main(["augment", str(stack), str(weights), str(out / "aug.zarr"), "--samples-per-slice", "1",
                 "--slices", "0", "--plot", str(out / "aug.png"), "--threads", "1", *TINY_ARGS])
    line = _one_line(capsys)
    assert code == 2 and line.endswith("out of GPU memory deforming 44-px output samples on cpu, 1 at once; lower "
                                       "--threads or --tile-out (train.tile_out), or use --device cpu"), line
    assert list(out.iterdir()) == []


def test_prediction_out_of_gpu_memory_leaves_the_part_incomplete(stack, model_file, tmp_path: Path,  # noqa: F811
                                                                 monkeypatch, capsys) -> None:
    from unet_core.infer.engine import Engine

    monkeypatch.setattr(Engine, "_network", _oom)  # every network pass
    part = tmp_path / "part-0.zarr"
    code = main(["predict", str(stack), str(model_file), str(part), "--device", "cpu", "--block-px", "32",
                 "--tile-out", "16", "--batch", "4"])
    line = _one_line(capsys)
    assert code == 2 and "out of GPU memory at tile 16 px, batch 4, tta none; lower predict.batch_size" in line, line
    assert not (part / "COMPLETE").exists()
