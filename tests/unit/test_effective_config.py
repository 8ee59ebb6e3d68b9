"""What each shipped profile and test config resolves to (issue 33, item 1).

A ``--configfile`` of the user's takes the keys it leaves out from the schema's defaults (the
owners' defaults, tests/unit/test_settings_agreement.py), no longer from the demo's
config/config.yaml, which is read only without a ``--configfile``. Every shipped profile and test
config resolves to the effective config it had before that change (recorded at commit a071471 in
effective_configs_a071471.json, when config/config.yaml was merged under every profile), except the
keys listed here on purpose.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "workflow/schemas/config.schema.yaml"
BEFORE = json.loads((Path(__file__).parent / "effective_configs_a071471.json").read_text())

#: Keys whose effective value changed on purpose, per config, with the reason.
CHANGED_ON_PURPOSE: dict[str, dict[str, str]] = {
    # The real-data profiles predict their own TIFFs: the synthetic sample is not in their samples
    # tables (checked below), so its keys, which came from the demo's config, are unused there.
    **{f"config/{name}.yaml": {k: "synthetic sample unused" for k in ("synth.slices", "synth.density", "synth.gap_px")}
       for name in ("isbi2012", "isbi2012_cpu", "dsb2018", "dsb2018_cpu")},
}


#: Keys added to the schema after the record: absent there, and every config must resolve them to their
#: schema default (no shipped or test config sets them).
ADDED_AFTER_THE_RECORD = {
    "predict.backend": "issue 35: ONNX Runtime as a CPU backend",
    "predict.cell_channel": "issue 35: a foreign bioimage.io package's cell channel",
    "predict.trust_torchscript": "issue 35: a bioimage.io package's TorchScript weights",
    **{key: "issue 36: the 3-D mode (model.dims 3); 2-D configs leave them at their defaults"
       for key in ("model.dims", "model.pool_z", "model.kernel_z", "weights.sigma_um", "augment.sigma_um",
                   "train.tile_out_z", "predict.block_z", "predict.tile_z", "predict.watershed.h_um",
                   "evaluate.link_slices")},
}


def _schema_default(key: str):
    node = yaml.safe_load(SCHEMA.read_text())
    for part in key.split("."):
        node = node["properties"][part]
    return node["default"]


def resolve(*files: str) -> dict:
    """The workflow's effective config of ``--configfile files`` (none: the demo's config/config.yaml):
    the files merged in order, then the schema's defaults for every key they leave out."""
    from snakemake.utils import update_config

    config: dict = {}
    for file in files or ("config/config.yaml",):
        update_config(config, yaml.safe_load((REPO / file).read_text()))
    config = copy.deepcopy(config)
    validate(config, schema=str(SCHEMA))
    return config


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_each_shipped_and_test_config_resolves_as_before(name: str) -> None:
    now = _flat(resolve() if name == "config/config.yaml" else resolve(name))
    before = _flat(BEFORE[name])
    changed = {k for k in set(now) | set(before) if now.get(k, "absent") != before.get(k, "absent")}
    changed -= {k for k in ADDED_AFTER_THE_RECORD if k not in before and now.get(k) == _schema_default(k)}
    assert changed == set(CHANGED_ON_PURPOSE.get(name, {})), {k: (before.get(k), now.get(k)) for k in changed}


@pytest.mark.parametrize("name", sorted(CHANGED_ON_PURPOSE))
def test_the_synthetic_sample_is_unused_where_its_keys_changed(name: str) -> None:
    table = (REPO / resolve(name)["samples"]).read_text()
    assert "resources/synth" not in table


#: Profiles written after the record (nothing of theirs could change): only the schema resolves them.
AFTER_THE_RECORD = {"config/dic_hela.yaml", "config/dic_hela_cpu.yaml", "config/synth3d.yaml", "config/synth3d_2d.yaml"}


def test_every_shipped_and_test_config_is_in_the_record() -> None:
    shipped = {f"config/{p.name}" for p in (REPO / "config").glob("*.yaml")}
    tests = {str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("config*.yaml")}
    assert shipped | tests == set(BEFORE) | AFTER_THE_RECORD


def test_isbi2012_cpu_without_its_train_keys_trains_the_same_model() -> None:
    """The train defaults are config/isbi2012_cpu.yaml's tested CPU recipe for every key that changes
    the sequence of weights or the exported model; only the machine's keys may differ."""
    from unet_core.train.config import TrainConfig

    profile = yaml.safe_load((REPO / "config/isbi2012_cpu.yaml").read_text())
    stripped = {k: v for k, v in profile.items() if k != "train"}
    full, default = resolve("config/isbi2012_cpu.yaml")["train"], copy.deepcopy(stripped)
    validate(default, schema=str(SCHEMA))
    default = default["train"]
    model_keys = [k for k in TrainConfig.TRAJECTORY if k in full] + ["tile_out", "tile_out_z", "validate_every", "val_tile_out",
                                                                      "export_weights"]
    assert {k: default[k] for k in model_keys} == {k: full[k] for k in model_keys}
    machine = {"device", "precision", "threads", "workers", "checkpoint_every", "runtime_min", "compile"}
    assert set(full) - set(model_keys) == machine  # every other train key is the machine's


def test_a_configfile_takes_missing_keys_from_the_schema_not_the_demo(tmp_path: Path) -> None:
    """The mechanism itself: snakemake -n -p with a --configfile that leaves synth.density and
    synth.gap_px out runs synth with the schema's 0.7 and 0 (the demo sets 0.2 and 3)."""
    config = yaml.safe_load((REPO / "tests/integration/config.yaml").read_text())
    del config["synth"]["density"], config["synth"]["gap_px"]
    config["samples"] = str(REPO / config["samples"])
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(config))
    shutil.copytree(REPO / "config", tmp_path / "config")  # the demo's config is there, and not read
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "snakemake"), "-s", str(REPO / "workflow/Snakefile"), "--configfile", "mine.yaml",
           "-n", "-p", "--cores", "1", "synth"]
    env = {**os.environ, "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])}
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--density 0.7 --gap-px 0" in res.stdout + res.stderr, (res.stdout + res.stderr)[-2000:]
