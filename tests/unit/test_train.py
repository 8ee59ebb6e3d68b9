"""Training: data contract, overfitting a synthetic slice, exact resume after SIGKILL, bad input.

Resume seeds: ``UNET_RESUME_SEEDS=0,1,2,3`` runs the SIGKILL test for several seeds (each picks
its own kill iteration); CI runs seed 0 only.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from unet_core.common.errors import CheckpointError, ConfigError, UserInputError
from unet_core.common.intensity import IntensityStats
from unet_core.common.mirror import mirror_pad
from unet_core.common.precision import cpu_has_native_bf16
from unet_core.infer.predict import network_logits
from unet_core.io.ngff import PyramidWriter, create_array
from unet_core.model.checkpoint import load_model, safe_load
from unet_core.model.spec import UNetSpec
from unet_core.model.unet import UNet
from unet_core.train.config import TrainConfig, lr_factor
from unet_core.train.data import AugmentedTiles, IterationSampler, crop_to_output
from unet_core.train.loop import train

TINY = UNetSpec(depth=2, base_channels=4, dropout=0.0)
RESUME_SEEDS = [int(s) for s in os.environ.get("UNET_RESUME_SEEDS", "0").split(",") if s.strip()]


@pytest.fixture(autouse=True)
def _one_thread():
    """Other jobs share this machine's 2 cores; one thread is fastest for the tiny net."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _disks(rng: np.random.Generator, size: int, n: int = 6) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((size, size), np.uint8)
    for _ in range(n):
        cy, cx = rng.integers(0, size, 2)
        r = rng.integers(4, max(5, size // 6))
        out[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
    return out


def make_augmented(
    path: Path,
    *,
    spec: UNetSpec = TINY,
    out_size: int = 20,
    n: int = 4,
    seed: int = 0,
    max_class: int = 1,
    size: int | None = None,
) -> Path:
    """A training set in the contract format of 'unet augment' (bright disks on noise)."""
    size = size or spec.input_size(out_size)
    rng = np.random.default_rng(seed)
    classes = np.stack([_disks(rng, size) for _ in range(n)]) if n else np.zeros((0, size, size), np.uint8)
    if max_class > 1 and n:
        classes[0, :3, :3] = max_class
    image = (classes * 1.5 + rng.normal(0, 0.3, classes.shape)).astype(np.float32)
    weights = (1.0 + classes).astype(np.float32)
    group = zarr.open_group(path, mode="w")
    for name, arr in (
        ("image", image),
        ("classes", classes),
        ("weights", weights),
        ("instances", classes.astype(np.int32)),
    ):
        create_array(group, name, shape=arr.shape, dtype=arr.dtype, chunks=(1, size, size))[:] = arr
    create_array(group, "source", shape=(n, 2), dtype=np.int32, chunks=(max(n, 1), 2))
    group.attrs["unet"] = {"seed": seed, "tile_in": size, "tile_out": out_size}
    return path


def make_validation(tmp: Path, *, size: int = 50, slices: int = 2) -> tuple[Path, Path]:
    """An ingested-stack stand-in (OME-Zarr level 0 + intensity attrs) and its weights store."""
    rng = np.random.default_rng(7)
    classes = np.stack([_disks(rng, size) for _ in range(slices)])
    raw = (100 + 40 * classes + rng.normal(0, 8, classes.shape)).astype(np.uint16)
    stack = tmp / "val.ome.zarr"
    root = zarr.open_group(stack, mode="w")
    writer = PyramidWriter(
        root, shape=raw.shape, dtype=raw.dtype, chunks=(1, size, size), scale=(1.0, 1.0, 1.0), levels=1
    )
    for z in range(slices):
        writer.write_plane(z, raw[z])
    writer.finish()
    root.attrs["unet"] = {
        "intensity": IntensityStats(float(raw.mean()), float(raw.std())).to_dict(),
        "label_kind": "instance",
    }
    weights = tmp / "val_weights.zarr"
    group = zarr.open_group(weights, mode="w")
    for name, arr in (
        ("classes", classes),
        ("weights", (1.0 + classes).astype(np.float32)),
        ("instances", classes.astype(np.int32)),
    ):
        create_array(group, name, shape=arr.shape, dtype=arr.dtype, chunks=(1, size, size))[:] = arr
    # the recipe 'unet weights' stores (used to recompute classes/weights of on-the-fly tiles)
    group.attrs["unet"] = {
        "class_weights": [1.0, 2.0],
        "w0": 10.0,
        "sigma_px": 3.0,
        "tolerance": 1e-3,
        "border_pixels": "background",
        "separate_touching": True,
    }
    return stack, weights


def tiny_config(**kw) -> TrainConfig:
    base = {
        "iterations": 30,
        "optimizer": "adam",
        "lr": 1e-2,
        "momentum": 0.9,
        "workers": 0,
        "validate_every": 10,
        "checkpoint_every": 10,
        "log_every": 5,
        "device": "cpu",
        # pinned: the defaults' warm-up (50 steps) and cosine would change these short runs
        "schedule": "constant",
        "warmup_iterations": 0,
        "export_weights": "last",
    }
    base.update(kw)
    return TrainConfig(**base)


# -- data --------------------------------------------------------------------------------------------
def test_dataset_crops_targets_to_output(tmp_path: Path) -> None:
    aug = make_augmented(tmp_path / "aug.zarr")
    data = AugmentedTiles([aug], spec=TINY)
    image, classes, weights = data[1]
    assert (data.in_size, data.out_size) == (60, 20)
    assert image.shape == (1, 60, 60) and image.dtype == torch.float32
    assert classes.shape == (20, 20) and classes.dtype == torch.uint8  # widened on the device (loop._step)
    assert weights.shape == (20, 20) and weights.dtype == torch.float32
    group = zarr.open_group(aug, mode="r")
    ctx = TINY.context
    assert np.array_equal(classes.numpy(), group["classes"][1, ctx:-ctx, ctx:-ctx])
    assert np.array_equal(crop_to_output(np.arange(36).reshape(6, 6), context=2), [[14, 15], [20, 21]])


def test_sampler_is_a_function_of_seed_and_iteration() -> None:
    full = list(IterationSampler(7, batch_size=3, start=0, stop=10, seed=5))
    tail = list(IterationSampler(7, batch_size=3, start=4, stop=10, seed=5))
    assert tail == full[12:]
    # every epoch is a permutation of all samples
    assert sorted(full[:7]) == list(range(7)) and sorted(full[7:14]) == list(range(7))
    assert full != list(IterationSampler(7, batch_size=3, start=0, stop=10, seed=6))


def test_tiled_validation_equals_monolithic_pass() -> None:
    torch.manual_seed(0)
    spec = UNetSpec(depth=2, base_channels=4, dropout=0.0)
    model = UNet(spec).eval()
    image = np.random.default_rng(0).normal(size=(45, 70)).astype(np.float32)
    ctx = spec.context
    # one pass over the mirror-padded slice (output size 76 >= 70 covers it)
    padded = mirror_pad(image, [(ctx, ctx + 76 - 45), (ctx, ctx + 76 - 70)])
    # oneDNN picks size-dependent kernels (rounding differs by ~1e-6); the reference kernels do not
    with torch.backends.mkldnn.flags(enabled=False), torch.no_grad():
        tiled = network_logits(model, image, tile_out=20, device=torch.device("cpu"))
        whole = model(torch.from_numpy(padded)[None, None])[0].numpy()
    assert np.abs(tiled - whole[:, :45, :70]).max() == 0.0


@pytest.mark.parametrize(
    "schedule,at,expected",
    [
        pytest.param("constant", 50, 1.0, id="constant"),
        pytest.param("cosine", 100, 0.0, id="cosine-end"),
        pytest.param("cosine", 50, 0.5, id="cosine-mid"),
        pytest.param("step", 25, 0.01, id="step-two-drops"),
        pytest.param("poly", 0, 1.0, id="poly-start"),
    ],
)
def test_lr_schedule(schedule: str, at: int, expected: float) -> None:
    cfg = TrainConfig(iterations=100, schedule=schedule, lr_step_iterations=10, warmup_iterations=0)
    assert lr_factor(at, config=cfg) == pytest.approx(expected, abs=1e-9)


def test_a_set_normalised_otherwise_is_refused_naming_both(tmp_path: Path) -> None:
    aug = make_augmented(tmp_path / "aug.zarr", n=1)  # no mode recorded: a set of the stack z-score era
    with pytest.raises(UserInputError, match=r"aug\.zarr: tiles normalised with stack-zscore .* training uses "
                                             r"slice-percentile .*unet augment --normalisation slice-percentile"):
        train([aug], out_dir=tmp_path / "run", spec=TINY, config=tiny_config(normalisation="slice-percentile"))
    assert not (tmp_path / "run").exists()


def test_warmup_is_linear() -> None:
    cfg = TrainConfig(iterations=100, warmup_iterations=10)
    assert [round(lr_factor(i, config=cfg), 3) for i in (0, 5, 10)] == [0.01, 0.505, 1.0]


# -- training ----------------------------------------------------------------------------------------
def test_overfits_synthetic_slice_and_writes_outputs(tmp_path: Path) -> None:
    aug = make_augmented(tmp_path / "aug.zarr", n=1)
    group = zarr.open_group(aug, mode="r+")
    group.attrs["unet"] = {**group.attrs["unet"], "object_areas": {"area_px": [10, 30, 50], "objects": [2, 1, 1]}}
    stack, weights = make_validation(tmp_path)
    out = tmp_path / "run"
    result = train(
        [aug],
        out_dir=out,
        spec=TINY,
        config=tiny_config(iterations=80, validate_every=40),
        validation=[(stack, weights)],
        val_slices=[1],
    )
    state = safe_load(out / "state.pt")
    log = state["history"]["train_log"]
    assert log[0][0] == 5 and log[-1][0] == 80
    assert log[0][1] / log[-1][1] >= 5.0, log
    for name in ("model.pt", "state.pt", "metrics.csv", "curve.png", "model.ts", "model_card.json"):
        assert (out / name).is_file(), name
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["iteration"]) for r in rows] == [40, 80]
    assert 0 <= float(rows[-1]["val_pixel_error"]) <= 1 and 0 <= float(rows[-1]["val_iou"]) <= 1
    assert result.metrics["val_pixel_error"] == pytest.approx(float(rows[-1]["val_pixel_error"]))
    # model.pt loads with weights_only and reproduces the trained network; so does TorchScript
    model, meta = load_model(out / "model.pt", expect=TINY)
    assert meta["intensity_normalisation"] == "stack-zscore" and meta["tile_out"] == 20
    assert meta["median_object_area_px"] == 20.0  # of the objects 10, 10, 30, 50 px the set records
    # the decision rule's offsets are -log(mean weight per class) of the training pixels, centred
    means = np.asarray(meta["decision"]["mean_weight_per_class"])
    aug_group = zarr.open_group(aug, mode="r")
    inner = (slice(None), slice(TINY.context, -TINY.context), slice(TINY.context, -TINY.context))
    classes, weights = aug_group["classes"][inner], aug_group["weights"][inner]
    np.testing.assert_allclose(means, [weights[classes == c].mean() for c in (0, 1)], rtol=1e-5)
    np.testing.assert_allclose(np.diff(meta["decision"]["logit_offsets"]), np.log(means[0] / means[1]))
    x = torch.randn(1, 1, 76, 76)
    scripted = torch.jit.load(str(out / "model.ts"))
    with torch.no_grad():
        assert torch.equal(model(x), scripted(x))
    card = json.loads((out / "model_card.json").read_text())
    assert card["geometry"]["context_px"] == TINY.context and card["data"]["train_tiles"] == 1
    assert len(card["data"]["train_sha256"]) == 64 and card["versions"]["torch"] == torch.__version__
    assert card["training_labels"]["median_object_area_px"] == 20.0 and card["intensity_normalisation"] == "stack-zscore"


def test_loader_workers_do_not_change_the_weights(tmp_path: Path) -> None:
    aug = make_augmented(tmp_path / "aug.zarr", n=3)
    cfg = {"iterations": 6, "optimizer": "sgd", "validate_every": 6, "checkpoint_every": 6}
    spec = UNetSpec(depth=2, base_channels=4, dropout=0.5)
    train([aug], out_dir=tmp_path / "w0", spec=spec, config=tiny_config(**cfg, workers=0))
    train([aug], out_dir=tmp_path / "w2", spec=spec, config=tiny_config(**cfg, workers=2))
    a, b = (safe_load(tmp_path / d / "model.pt")["state_dict"] for d in ("w0", "w2"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loader_starts_at_most_one_worker_per_core(tmp_path: Path, monkeypatch) -> None:
    """train.workers 100000 forked 100000 copies of the process when the first batch was asked for."""
    from unet_core.train import loop
    from unet_core.train.data import AugmentedTiles
    from unet_core.train.runtime import resolve_runtime

    monkeypatch.setattr(loop.os, "cpu_count", lambda: 3)
    dataset = AugmentedTiles([make_augmented(tmp_path / "aug.zarr", n=2)], spec=TINY)
    config = tiny_config(workers=100000)
    assert loop._loader(dataset, config, resolve_runtime(config), start=0).num_workers == 3


def test_divergence_stops_naming_iteration_and_lr_and_keeps_the_last_finite_state(tmp_path: Path) -> None:
    """A huge learning rate: the loss turns NaN between log points; checkpoints every step must
    stop at the last finite weights (the old loop checked only at log points and saved NaN)."""
    aug = make_augmented(tmp_path / "aug.zarr", n=2)
    out = tmp_path / "nan"
    cfg = tiny_config(iterations=30, optimizer="sgd", lr=50.0, momentum=0.9, checkpoint_every=1,
                      validate_every=1000, log_every=1000)
    with pytest.raises(ConfigError) as err:
        train([aug], out_dir=out, spec=TINY, config=cfg)
    message = str(err.value)
    assert "\n" not in message
    found = re.search(r"the loss became (nan|inf|-inf) at iteration (\d+) \(learning rate 50\); lower train.lr",
                      message)
    assert found, message
    state = safe_load(out / "state.pt")
    assert 1 <= state["iteration"] == int(found.group(2)) - 1, (state["iteration"], message)
    assert f"(iteration {state['iteration']}), is kept" in message
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(torch.isfinite(v).all() for per in state["optimizer"]["state"].values() for v in per.values())
    UNet(TINY).load_state_dict(state["model"])  # loadable as it is
    assert not (out / "model.pt").exists()


def test_cli_divergence_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    from unet_core.cli import main

    aug = make_augmented(tmp_path / "aug.zarr", n=2)
    argv = ["train", "--train", str(aug), "--out-dir", str(tmp_path / "cli"), "--depth", "2", "--base-channels", "4",
            "--dropout", "0", "--iterations", "30", "--optimizer", "sgd", "--lr", "50", "--momentum", "0.9",
            "--checkpoint-every", "1", "--validate-every", "1000", "--log-every", "1000", "--workers", "0",
            "--device", "cpu", "--threads", "1", "--schedule", "constant", "--warmup-iterations", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(r"the loss became \S+ at iteration \d+ \(learning rate 50\)", err[-1]), err
    assert "Traceback" not in "\n".join(err)


def test_non_finite_weights_name_iteration_and_lr() -> None:
    from unet_core.train.state import check_finite_weights

    model = UNet(TINY)
    check_finite_weights(model, iteration=7, config=tiny_config(), kept="x")
    with torch.no_grad():
        model.head.bias[0] = float("inf")
    cfg = tiny_config(warmup_iterations=10)
    with pytest.raises(ConfigError, match=r"weights became non-finite at iteration 7 \(learning rate 0.00604\)"):
        check_finite_weights(model, iteration=7, config=cfg, kept="x")


def test_bf16_autocast_loss_equals_fp32_within_bf16_rounding(tmp_path: Path) -> None:
    """The loop's batch loss under CPU bf16 autocast vs float32, same net and fixed batch."""
    from unet_core.common.precision import Precision
    from unet_core.train.runtime import Runtime, batch_loss

    spec = UNetSpec(depth=3, base_channels=8, dropout=0.0)
    data = AugmentedTiles([make_augmented(tmp_path / "aug.zarr", spec=spec, n=2, seed=1)], spec=spec)
    image, classes, weights = (torch.stack(t) for t in zip(data[0], data[1], strict=True))
    torch.manual_seed(0)
    model = UNet(spec)
    cpu = torch.device("cpu")
    with torch.no_grad():
        fp32 = float(batch_loss(model, image, classes, weights, runtime=Runtime(cpu, Precision.FP32, False, "")))
        bf16 = float(batch_loss(model, image, classes, weights, runtime=Runtime(cpu, Precision.BF16, False, "")))
    assert bf16 != fp32  # autocast did run in bf16
    assert abs(bf16 - fp32) <= 1e-2 * abs(fp32), (bf16, fp32)


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_is_used_only_where_the_cpu_has_it_natively(monkeypatch, caplog, native: bool) -> None:
    import unet_core.common.precision as P
    from unet_core.train.runtime import resolve_runtime

    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert P.resolve_precision("auto", cpu) is P.resolve_precision("fp32", cpu) is P.Precision.FP32
    with caplog.at_level("WARNING"):
        assert P.resolve_precision("fp16", cpu) is P.Precision.FP32
        assert P.resolve_precision("bf16", cpu) is (P.Precision.BF16 if native else P.Precision.FP32)
    assert caplog.text.count("computing in float32") == (1 if native else 2)
    runtime = resolve_runtime(tiny_config(precision="bf16"))
    assert (runtime.precision, runtime.channels_last) == ((P.Precision.BF16, True) if native else (P.Precision.FP32, False))
    assert ("bf16 autocast" in runtime.description) == native
    assert resolve_runtime(tiny_config(precision="bf16", channels_last=False)).channels_last is False


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AMX or AVX512-BF16)")
def test_cpu_bf16_training_learns_and_validates_through_the_engine(tmp_path: Path) -> None:
    """The whole loop under CPU bf16 autocast and channels-last: the loss falls as in float32,
    validation runs, and the exported model is an ordinary float32 model."""
    aug = make_augmented(tmp_path / "aug.zarr", n=1)
    stack, weights = make_validation(tmp_path)
    out = tmp_path / "run"
    result = train([aug], out_dir=out, spec=TINY, config=tiny_config(iterations=80, validate_every=40, precision="bf16"),
                   validation=[(stack, weights)], val_slices=[1])
    log = safe_load(out / "state.pt")["history"]["train_log"]
    assert log[0][1] / log[-1][1] >= 5.0, log
    assert 0 <= result.metrics["val_pixel_error"] <= 0.2
    model, _ = load_model(out / "model.pt", expect=TINY)
    assert all(t.dtype == torch.float32 for t in model.state_dict().values())
    assert "bf16" in json.dumps(json.loads((out / "model_card.json").read_text()))


def test_optimizer_is_fused_on_cuda_only() -> None:
    from unet_core.common.precision import Precision
    from unet_core.train.runtime import Runtime, make_optimizer

    model = UNet(TINY)
    for kind in ("sgd", "adam"):
        cuda = make_optimizer(model, tiny_config(optimizer=kind), Runtime(torch.device("cuda"), Precision.BF16, True, ""))
        cpu = make_optimizer(model, tiny_config(optimizer=kind), Runtime(torch.device("cpu"), Precision.FP32, False, ""))
        assert cuda.defaults["fused"] is True and not cpu.defaults["fused"], kind


def test_no_host_synchronisation_between_host_points(tmp_path: Path, monkeypatch) -> None:
    """Reading a tensor on the host (item, tolist, bool, float, int) only at log/validation/checkpoint
    iterations: on a GPU each such read waits for the device."""
    aug = make_augmented(tmp_path / "aug.zarr", n=2)
    reads = [0]
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **kw):
            reads[0] += 1
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    seen: dict[int, int] = {}
    cfg = tiny_config(iterations=12, optimizer="sgd", log_every=4, validate_every=12, checkpoint_every=6)
    train([aug], out_dir=tmp_path / "run", spec=TINY, config=cfg, on_iteration=lambda i: seen.update({i: reads[0]}))
    host_points = {4, 6, 8, 12}
    quiet = [i for i in range(2, 13) if i not in host_points and seen[i] != seen[i - 1]]
    assert not quiet, f"host reads at iterations {quiet}"
    assert all(seen[i] > seen[i - 1] for i in host_points)  # the counter sees the reads that are there


def _scripted_validation(errors: dict[int, float]):
    """A stand-in for validate(): pixel errors by validation call (1st, 2nd, ...), the rest fixed."""
    calls = [0]

    def fake(*args, **kwargs) -> dict[str, float]:
        calls[0] += 1
        return {"val_loss": 1.0, "val_pixel_error": errors[calls[0]], "val_iou": 0.5}

    return fake


def test_export_best_weights_of_the_lowest_validation_error_and_resume(tmp_path: Path, monkeypatch) -> None:
    from unet_core.train import loop

    aug = make_augmented(tmp_path / "aug.zarr", n=3)
    stack, weights = make_validation(tmp_path, slices=1)
    spec = UNetSpec(depth=2, base_channels=4, dropout=0.5)
    errors = {1: 0.30, 2: 0.10, 3: 0.20, 4: 0.10, 5: 0.25}  # iterations 4, 8, 12, 16, 20: best 8 (first of a tie)
    kw = {"spec": spec, "validation": [(stack, weights)]}
    best = tiny_config(iterations=20, optimizer="sgd", validate_every=4, checkpoint_every=4, export_weights="best")
    monkeypatch.setattr(loop, "validate", _scripted_validation(errors))
    train([aug], out_dir=tmp_path / "best", config=best, **kw)
    monkeypatch.setattr(loop, "validate", _scripted_validation(errors))
    train([aug], out_dir=tmp_path / "to8", config=tiny_config(**{**vars(best), "iterations": 8,
                                                                 "export_weights": "last"}), **kw)
    got, ref = (safe_load(tmp_path / d / "model.pt") for d in ("best", "to8"))
    assert all(torch.equal(got["state_dict"][k], ref["state_dict"][k]) for k in ref["state_dict"])
    last = safe_load(tmp_path / "best" / "state.pt")["model"]
    assert not all(torch.equal(last[k], got["state_dict"][k]) for k in last)
    exported = got["metadata"]["exported_weights"]
    assert (exported["choice"], exported["iteration"], exported["metrics"]["val_pixel_error"]) == ("best", 8, 0.10)
    card = json.loads((tmp_path / "best" / "model_card.json").read_text())
    assert card["exported_weights"]["iteration"] == 8 and card["metrics"]["final"]["iteration"] == 20
    model, _ = load_model(tmp_path / "best" / "model.pt", expect=spec)
    x = torch.randn(1, 1, 60, 60)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), torch.jit.load(str(tmp_path / "best" / "model.ts"))(x))

    # killed at 14 (state.pt of 12 holds the best weights of 8), resumed: the same model.pt
    def crash(i: int) -> None:
        if i == 14:
            raise _Crash

    monkeypatch.setattr(loop, "validate", _scripted_validation(errors))
    with pytest.raises(_Crash):
        train([aug], out_dir=tmp_path / "cut", config=best, on_iteration=crash, **kw)
    assert safe_load(tmp_path / "cut" / "state.pt")["best"]["iteration"] == 8
    train([aug], out_dir=tmp_path / "cut", config=best, resume=True, **kw)
    cut = safe_load(tmp_path / "cut" / "model.pt")
    assert all(torch.equal(got["state_dict"][k], cut["state_dict"][k]) for k in ref["state_dict"])


def test_export_best_without_validation_exports_the_last_and_needs_a_state_that_kept_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    aug = make_augmented(tmp_path / "aug.zarr", n=1)
    with caplog.at_level(logging.WARNING):  # 'best' is the default: without validation, the last weights
        train([aug], out_dir=tmp_path / "none", spec=TINY, config=tiny_config(iterations=2, export_weights="best"))
    assert [r.message for r in caplog.records if "picks the weights on validation slices" in r.message]
    assert json.loads((tmp_path / "none" / "model_card.json").read_text())["exported_weights"]["choice"] == "last"
    stack, weights = make_validation(tmp_path, slices=1)
    kw = {"spec": TINY, "validation": [(stack, weights)], "out_dir": tmp_path / "run"}
    train([aug], config=tiny_config(iterations=4, validate_every=2), **kw)
    with pytest.raises(CheckpointError, match="did not keep the best validation weights"):
        train([aug], config=tiny_config(iterations=4, validate_every=2, export_weights="best"), resume=True, **kw)


def test_validation_metrics_are_exact_for_known_prediction(tmp_path: Path) -> None:
    from unet_core.train.validation import pixel_metrics

    logits = np.zeros((2, 2, 2), np.float32)
    logits[1] = [[1, 1], [-1, -1]]  # predicts class 1 on the top row
    classes = np.array([[1, 0], [1, 0]], np.uint8)
    m = pixel_metrics(logits, classes, None)
    assert m["errors"] == 2 and m["pixels"] == 4
    assert (m["inter_1"], m["union_1"]) == (1, 3)


def test_sgd_momentum_099_reduces_loss(tmp_path: Path) -> None:
    aug = make_augmented(tmp_path / "aug.zarr", n=2)
    train(
        [aug],
        out_dir=tmp_path / "sgd",
        spec=TINY,
        config=tiny_config(iterations=60, optimizer="sgd", lr=0.01, momentum=0.99, validate_every=60),
    )
    log = safe_load(tmp_path / "sgd" / "state.pt")["history"]["train_log"]
    assert log[-1][1] < 0.5 * log[0][1], log


# -- exact resume after SIGKILL -------------------------------------------------------------------
DRIVER = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from pathlib import Path
    from unet_core.model.spec import UNetSpec
    from unet_core.train.config import TrainConfig
    from unet_core.train import loop
    from unet_core.train.loop import train
    aug, out, stack, weights, resume, background = sys.argv[1:7]
    if background == "1":  # state.pt from a snapshot on a background thread, as on CUDA
        loop.background_checkpoints = lambda runtime: True
    spec = UNetSpec(depth=2, base_channels=4, dropout=0.5)
    cfg = TrainConfig(iterations=30, optimizer="sgd", lr=0.01, momentum=0.99, workers=0, validate_every=7,
                      checkpoint_every=5, log_every=3, device="cpu", seed=11, schedule="constant",
                      warmup_iterations=0, export_weights="last")
    def tick(i):
        print(i, flush=True)
    train([aug], out_dir=out, spec=spec, config=cfg, validation=[(Path(stack), Path(weights))],
          resume=resume == "1", on_iteration=tick)
    """
)


def _run_driver(script: Path, args: list[str], *, kill_at: int | None = None) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    for line in proc.stdout:
        if kill_at is not None and int(line) >= kill_at:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.stdout.close()
    return proc.wait(timeout=300)


@pytest.mark.parametrize("background", [pytest.param("0", id="sync"), pytest.param("1", id="background")])
@pytest.mark.parametrize("seed", [pytest.param(s, id=f"seed{s}") for s in RESUME_SEEDS])
def test_sigkill_then_resume_is_bit_identical(tmp_path: Path, seed: int, background: str) -> None:
    """Killed at a random iteration, resumed: the same weights. ``background``: state.pt written on a
    background thread (the CUDA path, :func:`unet_core.train.loop.background_checkpoints`), the
    uninterrupted reference synchronously."""
    aug = make_augmented(tmp_path / "aug.zarr", n=3)
    stack, weights = make_validation(tmp_path, slices=1)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    common = [str(aug)]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert _run_driver(script, [*common, str(ref), str(stack), str(weights), "0", "0"]) == 0
    kill_at = int(np.random.default_rng(seed).integers(1, 23))
    rc = _run_driver(script, [*common, str(cut), str(stack), str(weights), "1", background], kill_at=kill_at)
    assert rc == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (cut / "model.pt").exists()
    assert _run_driver(script, [*common, str(cut), str(stack), str(weights), "1", background]) == 0
    a, b = safe_load(ref / "model.pt")["state_dict"], safe_load(cut / "model.pt")["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after kill at iteration {kill_at}"
    sa, sb = safe_load(ref / "state.pt"), safe_load(cut / "state.pt")
    for key, value in sa["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], sb["optimizer"]["state"][key]["momentum_buffer"])
    keep = ("iteration", "lr", "train_loss", "val_loss", "val_pixel_error", "val_iou")
    rows = [[{k: r[k] for k in keep} for r in csv.DictReader((d / "metrics.csv").open())] for d in (ref, cut)]
    assert rows[0] == rows[1]
    assert sa["history"]["train_log"] == sb["history"]["train_log"]


class _Crash(Exception):
    pass


def test_on_the_fly_augmentation_trains_and_resumes_exactly(tmp_path: Path) -> None:
    stack, weights = make_validation(tmp_path, size=64, slices=2)
    spec = UNetSpec(depth=2, base_channels=4, dropout=0.5)
    cfg = tiny_config(iterations=6, optimizer="sgd", checkpoint_every=2, validate_every=3, tile_out=20)
    kw = {
        "spec": spec,
        "config": cfg,
        "train_stacks": [(stack, weights)],
        "train_slices": [0, 1],
    }
    ref = train([], out_dir=tmp_path / "ref", **kw)
    assert ref.iterations == 6

    def crash(i: int) -> None:
        if i == 5:
            raise _Crash

    with pytest.raises(_Crash):
        train([], out_dir=tmp_path / "cut", on_iteration=crash, **kw)
    assert safe_load(tmp_path / "cut" / "state.pt")["iteration"] == 4
    train([], out_dir=tmp_path / "cut", resume=True, **kw)
    a, b = (safe_load(tmp_path / d / "model.pt")["state_dict"] for d in ("ref", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    card = json.loads((tmp_path / "ref" / "model_card.json").read_text())
    assert card["data"]["on_the_fly"]["tile_out"] == 20 and card["data"]["train_tiles"] == 2
    with pytest.raises(ConfigError, match="not both"):
        train([tmp_path / "x.zarr"], out_dir=tmp_path / "both", **kw)


def test_resume_with_changed_settings_is_refused(tmp_path: Path) -> None:
    aug = make_augmented(tmp_path / "aug.zarr", n=1)
    train([aug], out_dir=tmp_path / "run", spec=TINY, config=tiny_config(iterations=5))
    with pytest.raises(CheckpointError, match=r"lr: checkpoint 0.01 vs now 0.02"):
        train(
            [aug], out_dir=tmp_path / "run", spec=TINY, config=tiny_config(iterations=5, lr=0.02), resume=True
        )


def test_restart_if_changed_starts_afresh_like_a_new_run(tmp_path: Path) -> None:
    aug = make_augmented(tmp_path / "aug.zarr", n=1)
    train([aug], out_dir=tmp_path / "run", spec=TINY, config=tiny_config(iterations=5))
    new = tiny_config(iterations=5, lr=0.02)
    train([aug], out_dir=tmp_path / "run", spec=TINY, config=new, resume=True, restart_if_changed=True)
    train([aug], out_dir=tmp_path / "fresh", spec=TINY, config=new)
    a, b = (safe_load(tmp_path / d / "model.pt")["state_dict"] for d in ("run", "fresh"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_finished_run_changes_nothing(tmp_path: Path) -> None:
    aug = make_augmented(tmp_path / "aug.zarr", n=1)
    out = tmp_path / "run"
    train([aug], out_dir=out, spec=TINY, config=tiny_config(iterations=5))
    before = safe_load(out / "model.pt")["state_dict"]
    result = train([aug], out_dir=out, spec=TINY, config=tiny_config(iterations=5), resume=True)
    after = safe_load(out / "model.pt")["state_dict"]
    assert result.iterations == 5 and all(torch.equal(before[k], after[k]) for k in before)


# -- bad input -----------------------------------------------------------------------------------------
def test_invalid_tile_size_names_nearest(tmp_path: Path) -> None:
    aug = make_augmented(tmp_path / "aug.zarr", spec=UNetSpec(depth=2, base_channels=4), out_size=20)
    # the set's 60 px tiles are valid at depth 2 but not at depth 4 (188 + 16k)
    with pytest.raises(UserInputError, match=r"tile size 60 px.*nearest valid input sizes: \(188,\)"):
        AugmentedTiles([aug], spec=UNetSpec(depth=4, base_channels=4))
    odd = make_augmented(tmp_path / "odd.zarr", size=62)  # depth 2: valid inputs are 44 + 4k
    with pytest.raises(UserInputError, match=r"tile size 62 px.*nearest valid input sizes: \(60, 64\)"):
        AugmentedTiles([odd], spec=TINY)


def test_empty_training_set(tmp_path: Path) -> None:
    aug = make_augmented(tmp_path / "aug.zarr", n=0)
    with pytest.raises(UserInputError, match="hold no tiles"):
        AugmentedTiles([aug], spec=TINY)
    with pytest.raises(UserInputError, match="no training set"):
        AugmentedTiles([], spec=TINY)


def test_more_classes_than_the_model(tmp_path: Path) -> None:
    aug = make_augmented(tmp_path / "aug.zarr", max_class=3)
    with pytest.raises(UserInputError, match=r"class 3 but the model has n_classes=2.*--n-classes 4"):
        AugmentedTiles([aug], spec=TINY)


def test_not_an_augmented_set(tmp_path: Path) -> None:
    group = zarr.open_group(tmp_path / "x.zarr", mode="w")
    create_array(group, "image", shape=(1, 60, 60), dtype=np.float32, chunks=(1, 60, 60))
    with pytest.raises(UserInputError, match=r"missing arrays \['classes', 'weights'\]"):
        AugmentedTiles([tmp_path / "x.zarr"], spec=TINY)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        pytest.param({"optimizer": "rmsprop"}, "train.optimizer", id="optimizer"),
        pytest.param({"iterations": 0}, "train.iterations", id="iterations"),
        pytest.param({"lr": -1.0}, "train.lr", id="lr"),
        pytest.param({"momentum": 1.0}, "train.momentum", id="momentum"),
    ],
)
def test_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kwargs)


def test_cli_train_end_to_end(tmp_path: Path, capsys) -> None:
    from unet_core.cli import main

    aug = make_augmented(tmp_path / "aug.zarr", n=1)
    stack, weights = make_validation(tmp_path)
    argv = [
        "train",
        "--train",
        str(aug),
        "--val",
        f"{stack}:{weights}",
        "--val-slices",
        "0",
        "--out-dir",
        str(tmp_path / "cli"),
        "--depth",
        "2",
        "--base-channels",
        "4",
        "--iterations",
        "4",
        "--validate-every",
        "2",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--export-weights",
        "best",
        "--threads",
        "1",
    ]
    assert main(argv) == 0
    assert (tmp_path / "cli" / "model.pt").is_file()
    card = json.loads((tmp_path / "cli" / "model_card.json").read_text())
    assert card["exported_weights"]["choice"] == "best" and card["exported_weights"]["iteration"] in (2, 4)
    rows = list(csv.DictReader((tmp_path / "cli" / "metrics.csv").open()))
    assert [r["iteration"] for r in rows] == ["2", "4"] and rows[0]["val_pixel_error"] != ""
    capsys.readouterr()
    assert main([*argv, "--depth", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "tile size 60 px" in err[-1] and "nearest valid input sizes: (188,)" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert main([*argv[:-2], "--val-slices", "9"]) == 2
    assert "--val-slices: slice(s) 9 out of range" in capsys.readouterr().err


@pytest.mark.parametrize(
    "device,match",
    [
        pytest.param("gpu", "train.device 'gpu': not a torch device", id="not-a-device"),
        pytest.param("meta", "train.device 'meta': not supported", id="unsupported"),
        pytest.param("cuda", "train.device cuda: CUDA is not available", id="no-cuda"),
    ],
)
def test_bad_device_names_the_key(device: str, match: str) -> None:
    from unet_core.train.runtime import resolve_runtime

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=match):
        resolve_runtime(tiny_config(device=device))


def test_a_state_from_before_tile_out_and_normalisation_were_settings_resumes_exactly(tmp_path: Path) -> None:
    """TrainConfig holds tile_out and normalisation now; a state.pt written before (its config
    without them) resumes, and gives the weights of an uninterrupted run."""
    aug = make_augmented(tmp_path / "aug.zarr", n=1)
    cfg = tiny_config(iterations=6, checkpoint_every=2, validate_every=3)
    ref = train([aug], out_dir=tmp_path / "ref", spec=TINY, config=cfg)

    def crash(i: int) -> None:
        if i == 5:
            raise _Crash

    with pytest.raises(_Crash):
        train([aug], out_dir=tmp_path / "cut", spec=TINY, config=cfg, on_iteration=crash)
    path = tmp_path / "cut" / "state.pt"
    state = safe_load(path)
    for key in ("tile_out", "normalisation"):
        del state["config"][key]
    torch.save(state, path)
    cut = train([aug], out_dir=tmp_path / "cut", spec=TINY, config=cfg, resume=True)
    assert cut.iterations == ref.iterations == 6
    a, b = safe_load(tmp_path / "ref" / "model.pt"), safe_load(tmp_path / "cut" / "model.pt")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
