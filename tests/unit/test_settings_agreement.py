"""One source of truth for every setting (issue 33, item 1).

A setting's default and its allowed values are written once, in the settings object (dataclass,
enum or constant) of the stage that owns it. This test holds the workflow's schema
(workflow/schemas/config.schema.yaml), the ``unet <stage>`` options and config/README.md to those
objects, for every stage: synth, ingest, weights (and class-weights), augment, train, predict, merge
and evaluate. A disagreement fails here, naming the key; the intended differences are listed below,
each with its reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())

#: Schema keys no package object owns: the workflow's own (where files are, cluster requests,
#: how many jobs and threads it runs). Each is documented in config/README.md all the same.
WORKFLOW_ONLY = {
    "samples": "the samples table's path",
    "output_dir": "where the run's results go",
    "model_file": "a given model instead of training (the workflow skips stages)",
    "train.threads": "fixed in the config: float sums depend on the thread count (CLI: all cores)",
    "train.runtime_min": "a cluster's wall-time request",
    "predict.jobs": "how many predict jobs the workflow runs per sample (CLI --jobs: 1, the whole stack)",
    "predict.threads": "threads per predict job; parallelism comes from jobs (CLI: all cores)",
    "predict.tiff": "whether merge writes a TIFF (CLI: --tiff PATH) and of what (--tiff-content)",
}

#: (stage, option dest) -> why its default differs from the schema's on purpose.
INTENDED_CLI_DIFFERENCES = {
    ("predict", "jobs"): "one job does the whole stack by hand; the workflow runs predict.jobs",
    ("predict", "normalisation"): "None = the model's own; the workflow passes the config's only where set",
    ("weights", "w0"): "None = --preset's value; the default preset 'paper' is WeightParams' default",
    ("weights", "sigma_px"): "None = --preset's value; the default preset 'paper' is WeightParams' default",
    ("predict", "threads"): "all cores by hand; the workflow fixes predict.threads",
    ("train", "threads"): "all cores by hand; the workflow fixes train.threads",
}

#: (stage, option dest) -> why its choices differ from the schema's enum on purpose.
INTENDED_CHOICE_DIFFERENCES = {
    ("augment", "device"): "any torch device by hand (cuda:N); the schema offers cpu, auto and cuda",
    **{(stage, "dims"): "--dims takes 2 or 3 through its type (one message naming both), not a choices list"
       for stage in ("augment", "train", "class-weights", "weights")},
}


def _field(owner: type, name: str) -> Any:
    value = next(f for f in dataclasses.fields(owner) if f.name == name)
    return value.default_factory() if value.default is dataclasses.MISSING else value.default


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


def owners() -> dict[str, tuple[Any, type[Enum] | None]]:
    """Schema key -> (the owner's default, the enum that owns its choices, or None)."""
    from unet_core.augment.elastic import DeformParams
    from unet_core.augment.samples import augment
    from unet_core.cli import augment as cli_augment
    from unet_core.evaluate.scoring import evaluate
    from unet_core.common.intensity import DEFAULT_NORMALISATION, Normalisation
    from unet_core.common.precision import Precision
    from unet_core.infer.encoding import ProbabilityEncoding
    from unet_core.infer.instances import InstanceMethod, SeedRule
    from unet_core.infer.merge_settings import MergeSettings, WatershedSettings
    from unet_core.infer.predict_settings import Backend, PredictSettings
    from unet_core.infer.tiling import TTA
    from unet_core.io.ingest import DEFAULT_CHUNKS
    from unet_core.model.decision import Decision
    from unet_core.model.spec import Norm, Padding, UNetSpec
    from unet_core.synth import scene
    from unet_core.train.config import TILE_OUT, ExportWeights, OptimizerKind, Schedule, TrainConfig
    from unet_core.weights.maps import BorderPixels
    from unet_core.weights.recipe import WeightParams

    found: dict[str, tuple[Any, type[Enum] | None]] = {"normalisation": (DEFAULT_NORMALISATION, Normalisation)}
    found |= {
        "synth.slices": (scene.SLICES, None), "synth.seed": (scene.SEED, None),
        "synth.size_px": (_field(scene.SynthParams, "height"), None),
        "synth.density": (_field(scene.SynthParams, "density"), None),
        "synth.gap_px": (_field(scene.SynthParams, "gap_px"), None),
        "ingest.chunks": (DEFAULT_CHUNKS, None),
    }
    enums = {"padding": Padding, "norm": Norm}
    found |= {f"model.{k}": (_field(UNetSpec, k), enums.get(k))
              for k in ("depth", "base_channels", "n_classes", "padding", "norm", "dropout", "dims", "pool_z",
                        "kernel_z")}
    found |= {f"weights.{k}": (_field(WeightParams, k), BorderPixels if k == "border_pixels" else None)
              for k in ("w0", "sigma_px", "tolerance", "connectivity", "border_pixels")}
    found |= {f"augment.{k}": (_field(DeformParams, k), None) for k in ("grid", "sigma_px", "brightness", "contrast", "gamma")}
    # the 3-D mode's keys (issue 36): None = not given (2-D runs leave them out)
    found["weights.sigma_um"] = (None, None)  # required with dims 3: VolumeWeightParams.sigma_um has no default
    augment_defaults = inspect.signature(augment).parameters
    found["augment.sigma_um"] = (augment_defaults["sigma_um"].default, None)
    found["train.tile_out_z"] = (augment_defaults["tile_out_z"].default, None)  # the stored tiles' z extent
    found |= {f"predict.{k}": (_field(PredictSettings, k), None) for k in ("block_z", "tile_z")}
    found["predict.watershed.h_um"] = (_field(WatershedSettings, "h_um"), None)
    found["evaluate.link_slices"] = (inspect.signature(evaluate).parameters["link_slices"].default, None)
    found |= {"augment.samples_per_slice": (cli_augment.SAMPLES_PER_SLICE, None),
              "augment.seed": (cli_augment.SEED, None), "augment.device": (cli_augment.DEVICE, None)}
    enums = {"optimizer": OptimizerKind, "schedule": Schedule, "precision": Precision, "export_weights": ExportWeights}
    found |= {f"train.{k}": (_field(TrainConfig, k), enums.get(k))
              for k in ("iterations", "batch_size", "optimizer", "lr", "momentum", "schedule", "warmup_iterations",
                        "validate_every", "checkpoint_every", "val_tile_out", "export_weights", "seed", "device",
                        "precision", "compile", "workers")}
    found["train.tile_out"] = (_field(TrainConfig, "tile_out"), None)
    assert _field(TrainConfig, "normalisation") is DEFAULT_NORMALISATION and TILE_OUT == _field(TrainConfig, "tile_out")
    enums = {"precision": Precision, "tta": TTA, "decision": Decision, "probabilities": ProbabilityEncoding,
             "backend": Backend}
    found |= {f"predict.{k}": (_field(PredictSettings, k), enums.get(k))
              for k in ("tile_out", "block_px", "device", "precision", "tta", "compile", "decision", "probabilities",
                        "backend", "cell_channel", "trust_torchscript")}
    found["predict.batch_size"] = (_field(PredictSettings, "batch"), None)
    found["predict.merge_jobs"] = (_field(MergeSettings, "jobs"), None)
    found["predict.instances"] = (_field(MergeSettings, "instances"), InstanceMethod)
    found["predict.min_object_px"] = (_field(MergeSettings, "min_object_px"), None)
    watershed = {"seeds": "seeds", "h_px": "h_px", "seed_threshold": "seed_threshold",
                 "seed_erosion_px": "seed_erosion_px", "mask_threshold": "mask_threshold", "halo_px": "halo_px"}
    found |= {f"predict.watershed.{k}": (_field(WatershedSettings, v), SeedRule if k == "seeds" else None)
              for k, v in watershed.items()}
    return found


def schema_keys(schema: dict = SCHEMA, prefix: str = "") -> dict[str, dict]:
    """Every leaf key of the schema (``train.lr``, ``predict.watershed.h_px``) -> its subschema."""
    out = {}
    for key, sub in schema["properties"].items():
        if sub.get("type") == "object" and "properties" in sub:
            out |= schema_keys(sub, f"{prefix}{key}.")
        else:
            out[prefix + key] = sub
    return out


#: The model keys augment and train take as options (--depth ... --kernel-z).
MODEL = ("depth", "base_channels", "n_classes", "padding", "norm", "dropout", "dims", "pool_z", "kernel_z")

#: (stage, option dest) -> the schema key the workflow passes to it.
CLI_KEYS = {
    "synth": {"slices": "synth.slices", "size": "synth.size_px", "seed": "synth.seed", "density": "synth.density",
              "gap_px": "synth.gap_px"},
    "ingest": {"chunks": "ingest.chunks"},
    "class-weights": {"connectivity": "weights.connectivity", "dims": "model.dims"},
    "weights": {"w0": "weights.w0", "sigma_px": "weights.sigma_px", "tolerance": "weights.tolerance",
                "connectivity": "weights.connectivity", "border_pixels": "weights.border_pixels",
                "dims": "model.dims", "sigma_um": "weights.sigma_um"},
    "augment": {"samples_per_slice": "augment.samples_per_slice", "tile_out": "train.tile_out",
                "grid": "augment.grid", "sigma_px": "augment.sigma_px", "brightness": "augment.brightness",
                "contrast": "augment.contrast", "gamma": "augment.gamma", "seed": "augment.seed",
                "device": "augment.device", "normalisation": "normalisation", "tile_out_z": "train.tile_out_z",
                "sigma_um": "augment.sigma_um", **{k: f"model.{k}" for k in MODEL}},
    "train": {"tile_out": "train.tile_out", "normalisation": "normalisation", "threads": "train.threads",
              **{k: f"train.{k}" for k in ("iterations", "batch_size", "optimizer", "lr", "momentum", "schedule",
                                           "warmup_iterations", "validate_every", "checkpoint_every", "val_tile_out",
                                           "export_weights", "seed", "device", "precision", "compile", "workers")},
              **{k: f"model.{k}" for k in MODEL}},
    "predict": {"jobs": "predict.jobs", "tile_out": "predict.tile_out", "block_px": "predict.block_px",
                "batch": "predict.batch_size", "device": "predict.device", "precision": "predict.precision",
                "tta": "predict.tta", "compile": "predict.compile", "decision": "predict.decision",
                "probabilities": "predict.probabilities", "threads": "predict.threads",
                "normalisation": "normalisation", "backend": "predict.backend", "cell_channel": "predict.cell_channel",
                "trust_torchscript": "predict.trust_torchscript", "block_z": "predict.block_z",
                "tile_z": "predict.tile_z"},
    "merge": {"instances": "predict.instances", "min_object_px": "predict.min_object_px",
              "seeds": "predict.watershed.seeds", "seed_h_px": "predict.watershed.h_px",
              "seed_threshold": "predict.watershed.seed_threshold",
              "seed_erosion_px": "predict.watershed.seed_erosion_px",
              "mask_threshold": "predict.watershed.mask_threshold", "halo_px": "predict.watershed.halo_px",
              "jobs": "predict.merge_jobs", "seed_h_um": "predict.watershed.h_um"},
    "evaluate": {"link_slices": "evaluate.link_slices"},  # evaluate's other choices are checked below
}

#: Minimal command lines: each stage's defaults as argparse applies them (string defaults typed).
ARGV = {
    "synth": ["--image", "i.tif"], "ingest": ["i.tif", "o.zarr"], "class-weights": [".", "-o", "o.json"],
    "weights": [".", "o.zarr"], "augment": [".", ".", "o.zarr"], "train": ["--train", ".", "--out-dir", "o"],
    "predict": ["s", "m", "o"], "merge": ["p", "--stack", "s", "-o", "o"], "evaluate": [".", ".", "-o", "o"],
}


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from unet_core.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _closed_sets() -> dict[tuple[str, str], list[Any]]:
    """(stage, option dest) -> the values of the enum (or owner's closed set) its choices must equal."""
    from unet_core.augment.elastic import Interpolation
    from unet_core.common.labels import AUTO_KIND, LabelKind
    from unet_core.infer.merge import STEPS
    from unet_core.infer.merge_settings import TiffContent
    from unet_core.model.spec import Norm, Padding
    from unet_core.synth.scene import BorderStyle
    from unet_core.weights.maps import PRESETS, DistanceMethod

    connectivity = [4, 8]  # 4- or 8-connected pixels: WeightParams and the ISBI scoring scripts
    return {
        ("synth", "border"): [b.value for b in BorderStyle], ("synth", "dtype"): ["uint8", "uint16"],
        ("ingest", "label_kind"): [AUTO_KIND, *(k.value for k in LabelKind)],
        ("class-weights", "connectivity"): connectivity, ("weights", "connectivity"): connectivity,
        ("weights", "preset"): list(PRESETS), ("weights", "method"): [m.value for m in DistanceMethod],
        ("augment", "interpolation"): [i.value for i in Interpolation],
        ("merge", "tiff_content"): [c.value for c in TiffContent], ("merge", "step"): list(STEPS),
        ("evaluate", "connectivity"): connectivity,
        ("predict", "padding"): [p.value for p in Padding], ("predict", "norm"): [n.value for n in Norm],
    }


# -- the schema against the owners ---------------------------------------------------------------
def test_every_schema_key_has_an_owner_or_is_the_workflows() -> None:
    keys = set(schema_keys())
    assert keys - set(owners()) - set(WORKFLOW_ONLY) == set(), "schema keys without an owner"
    assert (set(owners()) | set(WORKFLOW_ONLY)) - keys == set(), "owners of keys the schema lacks"


@pytest.mark.parametrize("key", sorted(schema_keys()))
def test_schema_default_and_choices_are_the_owners(key: str) -> None:
    if key in WORKFLOW_ONLY:
        pytest.skip(WORKFLOW_ONLY[key])
    sub = schema_keys()[key]
    default, kind = owners()[key]
    assert sub.get("default") == _plain(default), f"schema {key} default {sub.get('default')!r} != owner {default!r}"
    if kind is not None:
        # the same values (their order is presentation)
        assert set(sub.get("enum")) == {k.value for k in kind}, f"schema {key} enum {sub.get('enum')} != {kind.__name__}"


def test_the_predict_tiff_choices_are_false_true_and_tiffcontent() -> None:
    from unet_core.infer.merge_settings import TiffContent

    assert schema_keys()["predict.tiff"]["enum"] == [False, True, *(c.value for c in TiffContent)]


def test_the_weights_presets_paper_is_weightparams_default() -> None:
    from unet_core.weights.maps import PRESETS
    from unet_core.weights.recipe import WeightParams

    assert PRESETS["paper"] == {"w0": WeightParams().w0, "sigma_px": WeightParams().sigma_px}


# -- the command line against the schema (and so the owners) ---------------------------------------
@pytest.mark.parametrize("stage", sorted(CLI_KEYS))
def test_cli_defaults_and_choices_are_the_schemas(stage: str) -> None:
    parser = _parsers()[stage]
    args = vars(parser.parse_args(ARGV[stage]))
    actions = {a.dest: a for a in parser._actions}
    keys = schema_keys()
    for dest, key in CLI_KEYS[stage].items():
        assert dest in actions, f"unet {stage} has no option for {key} (dest {dest})"
        if (stage, dest) in INTENDED_CLI_DIFFERENCES:
            continue
        want = keys[key].get("default")
        assert _plain(args[dest]) == want, f"unet {stage} --{dest}: default {args[dest]!r}, schema {key}: {want!r}"
        choices = actions[dest].choices
        if "enum" in keys[key] and (stage, dest) not in INTENDED_CHOICE_DIFFERENCES:
            assert set(choices or []) == set(keys[key]["enum"]), f"unet {stage} --{dest}: choices {choices}, schema {key}"


@pytest.mark.parametrize("stage", sorted(CLI_KEYS))
def test_every_cli_choice_list_is_an_owned_closed_set(stage: str) -> None:
    """Literal choices=[...] lists repeat an enum; each must equal the enum (or owner's set) it repeats."""
    parser = _parsers()[stage]
    keys, closed = schema_keys(), _closed_sets()
    for action in parser._actions:
        if not action.choices or isinstance(action, argparse._SubParsersAction):
            continue
        key = CLI_KEYS[stage].get(action.dest)
        want = keys[key]["enum"] if key and "enum" in keys[key] else closed.get((stage, action.dest))
        assert want is not None, f"unet {stage} --{action.dest}: choices {action.choices} with no owner in this test"
        assert set(action.choices) == set(want), f"unet {stage} --{action.dest}: {action.choices} != {want}"


def test_the_train_options_are_trainconfigs_fields() -> None:
    """Every TrainConfig field is an option of unet train with the field's default (the CLI builds
    the object from them by name)."""
    from unet_core.train.config import TrainConfig

    args = vars(_parsers()["train"].parse_args(ARGV["train"]))
    for f in dataclasses.fields(TrainConfig):
        assert f.name in args, f"TrainConfig.{f.name} has no unet train option"
        assert args[f.name] == _plain(f.default), f"unet train --{f.name}: {args[f.name]!r} != {f.default!r}"


def test_the_synth_and_augment_signatures_take_the_owned_defaults() -> None:
    from unet_core.augment.samples import augment
    from unet_core.cli import augment as cli_augment

    assert inspect.signature(augment).parameters["device"].default == cli_augment.DEVICE


# -- the documentation -----------------------------------------------------------------------------
@pytest.mark.parametrize("key", sorted(schema_keys()))
def test_every_schema_key_is_documented_in_config_readme(key: str) -> None:
    text = (REPO / "config/README.md").read_text()
    assert f"`{key}`" in text, f"config/README.md does not document `{key}`"
