"""The 3-D mode in the workflow (issue 36): config keys, start-up checks and the commands the rules run.

``config/synth3d.yaml`` plans every stage with its 3-D options (the volumes written by the rule
synth_volume), 2-D configs plan exactly the commands they had, and each bad 3-D setting stops the
workflow before any job, in one line naming the key or the sample and file (exit 2).
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from snakemake.utils import validate

from unet_core.common.errors import ConfigError
from unet_core.model.spec import UNetSpec
from unet_core.workflow.door import VOLUME_KEYS, check_volume_settings

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "workflow/schemas/config.schema.yaml"


def resolved(overrides: dict | None = None, base: str = "config/synth3d.yaml") -> dict:
    """The effective config of ``base`` with ``overrides`` merged over it (schema defaults filled)."""
    from snakemake.utils import update_config

    config = yaml.safe_load((REPO / base).read_text())
    update_config(config, copy.deepcopy(overrides or {}))
    validate(config, schema=str(SCHEMA))
    return config


def spec_of(config: dict) -> UNetSpec:
    return UNetSpec.from_dict(config["model"])


def volume_tiff(path: Path, *, depth: int = 8, spacing: tuple[float, float, float] | None = (2.0, 0.5, 0.5)) -> str:
    """A (depth, 32, 32) ImageJ TIFF with its voxel size (None: the file gives none)."""
    data = np.zeros((depth, 32, 32), np.uint8)
    if spacing is None:
        tifffile.imwrite(path, data, photometric="minisblack")
    else:
        z, y, x = spacing
        tifffile.imwrite(path, data, imagej=True, resolution=(1 / x, 1 / y),
                         metadata={"spacing": z, "unit": "um", "axes": "ZYX"})
    return str(path)


def row(image: str, slices: str = "", voxel: str = "") -> dict[str, str]:
    return {"image": image, "labels": "", "slices": slices, "role": "predict", "voxel_size_um": voxel}


def test_the_synth3d_profile_passes_with_its_volumes(tmp_path: Path) -> None:
    config = resolved()
    check_volume_settings(config, {"v": row(volume_tiff(tmp_path / "v.tif"))}, spec_of(config),
                          table="t.tsv", trains=True)


@pytest.mark.parametrize("overrides, message", [
    ({"weights": {"sigma_um": None}}, "config weights.sigma_um: the 3-D mode"),
    ({"predict": {"watershed": {"h_um": None}}}, "config predict.watershed.h_um: distance seeds of 3-D cells"),
    ({"predict": {"min_object_px": "auto"}}, "config predict.min_object_px = auto"),
    ({"ingest": {"chunks": [3, 128, 128]}}, "config ingest.chunks z = 3 slices is not a multiple of the z pooling "
                                            "product = 2"),
    ({"predict": {"block_z": 5}}, "config predict.block_z = 5 slices"),
    ({"predict": {"tile_z": 7}}, "config predict.tile_z = 7 slices"),
    ({"train": {"tile_out_z": 0.5}}, "config train.tile_out_z"),
])
def test_bad_3d_keys_are_one_line_naming_the_key(tmp_path: Path, overrides: dict, message: str) -> None:
    config = resolved()
    config = copy.deepcopy(config)
    from snakemake.utils import update_config

    update_config(config, overrides)
    with pytest.raises(ConfigError) as err:
        check_volume_settings(config, {}, spec_of(config), table="t.tsv", trains=True)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_tile_out_z_the_network_cannot_reach_is_named() -> None:
    config = resolved({"model": {"pool_z": [2, 2, 2], "kernel_z": [3, 3, 3, 3]}, "train": {"tile_out_z": 5},
                       "ingest": {"chunks": [8, 128, 128]}})
    with pytest.raises(ConfigError, match=r"config train.tile_out_z = 5: output size 5 is not reachable"):
        check_volume_settings(config, {}, spec_of(config), table="t.tsv", trains=True)


def test_a_given_model_needs_no_training_keys() -> None:
    config = resolved({"weights": {"sigma_um": None}})
    check_volume_settings(config, {}, spec_of(config), table="t.tsv", trains=False)


@pytest.mark.parametrize("make, message", [
    (dict(depth=1), "one slice selected; the 3-D mode"),
    (dict(spacing=None), "the file gives no voxel size for axis z, y, x"),
    (dict(spacing=(0.5, 0.5, 0.5)), None),  # isotropic voxels: pooling z is right
    (dict(spacing=(2.0, 0.5, 0.5)), None),
])
def test_each_3d_sample_needs_several_slices_and_a_voxel_size(tmp_path: Path, make: dict, message: str | None) -> None:
    config = resolved()
    samples = {"v": row(volume_tiff(tmp_path / "v.tif", **make))}
    if message is None:
        check_volume_settings(config, samples, spec_of(config), table="t.tsv", trains=True)
        return
    with pytest.raises(ConfigError) as err:
        check_volume_settings(config, samples, spec_of(config), table="t.tsv", trains=True)
    assert str(err.value).startswith(f"t.tsv: sample 'v' ({tmp_path / 'v.tif'}): {message}"), str(err.value)


def test_the_table_column_gives_the_voxel_size_and_z_pooling_is_checked_against_it(tmp_path: Path) -> None:
    """A file without a voxel size passes with the table's column; pooling z on voxels 4x coarser along
    z than in the plane is refused, naming the sample (check_z_geometry)."""
    config = resolved()
    image = volume_tiff(tmp_path / "v.tif", spacing=None)
    check_volume_settings(config, {"v": row(image, voxel="2,0.5,0.5")}, spec_of(config), table="t.tsv", trains=True)
    pooled = resolved({"model": {"pool_z": [2, 2, 2], "kernel_z": [3, 3, 3, 3]}, "train": {"tile_out_z": 4}})
    with pytest.raises(ConfigError, match=r"t.tsv: sample 'v' .*pool_z \[2, 2, 2\] pools z at level 0"):
        check_volume_settings(pooled, {"v": row(image, voxel="2,0.5,0.5")}, spec_of(pooled), table="t.tsv",
                              trains=True)


def test_a_slice_selection_of_one_slice_is_refused(tmp_path: Path) -> None:
    config = resolved()
    with pytest.raises(ConfigError, match="one slice selected"):
        check_volume_settings(config, {"v": row(volume_tiff(tmp_path / "v.tif"), slices="3")}, spec_of(config),
                              table="t.tsv", trains=True)


@pytest.mark.parametrize("key", VOLUME_KEYS)
def test_a_2d_config_refuses_every_3d_key(key: str) -> None:
    section, *rest = key.split(".")
    value = {"block_z": 2, "tile_z": 2, "tile_out_z": 8}.get(rest[-1], 1.0)
    nested: dict = {rest[-1]: value}
    for part in reversed(rest[:-1]):
        nested = {part: nested}
    config = resolved({section: nested}, base="config/config.yaml")
    with pytest.raises(ConfigError, match=rf"^config {key} = {value}: a setting of the 3-D mode; this network is 2-D"):
        check_volume_settings(config, {}, spec_of(config), table="t.tsv", trains=True)
    check_volume_settings(resolved(base="config/config.yaml"), {}, spec_of(resolved(base="config/config.yaml")),
                          table="t.tsv", trains=True)


# -- the workflow itself (snakemake -n) -------------------------------------------------------------------
def _snakemake(work: Path, *args: str) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])}
    cmd = [str(bin_dir / "snakemake"), "-s", str(REPO / "workflow/Snakefile"), "-n", "-p", "--cores", "1", *args]
    return subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=300, env=env, check=False)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "config", tmp_path / "config")
    return tmp_path


def test_synth3d_plans_every_stage_with_its_3d_options(workdir: Path) -> None:
    res = _snakemake(workdir, "--configfile", "config/synth3d.yaml")
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-3000:]
    commands = [line for line in text.splitlines() if line.startswith("Shell command: unet ")]
    def of(stage: str) -> list[str]:
        return [c for c in commands if c.startswith(f"Shell command: unet {stage} ")]

    assert len(of("synth")) == 7 and all("--dims 3" in c for c in of("synth"))
    assert "--seed 0 --index 100" in " ".join(of("synth")) and "--seed 1 --index 1" in " ".join(of("synth"))
    assert all("--chunks 8,128,128" in c for c in of("ingest"))
    assert of("class-weights")[0].count("--dims 3") == 1
    assert all("--dims 3 --sigma-um 2.5" in c and "--sigma-px" not in c for c in of("weights"))
    model = "--depth 3 --base-channels 8 --n-classes 2 --padding valid --norm none --dropout 0.0 --dims 3 " \
            "--pool-z 1,1,2 --kernel-z 1,1,3,3"
    assert all(model in c and "--tile-out-z 8" in c and "--plot" in c for c in of("augment")), of("augment")
    assert model in of("train")[0]
    assert all("--block-px 128 --block-z 16 --tile-z 16" in c for c in of("predict"))
    merges = [c for c in commands if c.startswith("Shell command: unet merge ")]
    assert merges and all("--seeds distance" in c and "--seed-h-um 0.25" in c for c in merges)
    assert len(of("evaluate")) == 3 and not [c for c in of("evaluate") if "--link-slices" in c]


def test_a_bad_3d_setting_stops_the_workflow_in_one_line(workdir: Path) -> None:
    (workdir / "bad.yaml").write_text(yaml.safe_dump({"ingest": {"chunks": [3, 128, 128]}}))
    res = _snakemake(workdir, "--configfile", "config/synth3d.yaml", "bad.yaml")
    lines = [line for line in (res.stdout + res.stderr).splitlines() if "config ingest.chunks z" in line]
    assert res.returncode == 2 and len(lines) == 1, (res.stdout + res.stderr)[-3000:]
    assert "Job stats" not in res.stdout + res.stderr
