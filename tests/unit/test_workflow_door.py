"""The workflow's door (unet_core/workflow/door.py): its output marks are the stages' own objects,
its geometry checks name the config key."""

from __future__ import annotations

import pytest

from unet_core.augment import samples as augment
from unet_core.common.errors import ConfigError
from unet_core.evaluate import scoring
from unet_core.export import bioimageio
from unet_core.infer import cells, merge, merge_work, part_store, tiff_export
from unet_core.io import ingest
from unet_core.synth import tiffs
from unet_core.train import outputs as train_outputs
from unet_core.weights import blockwise
from unet_core.workflow.door import (
    FOLDER_RULES,
    MERGE_ROUNDS,
    check_existing_outputs,
    check_sample_stacks,
    model_geometry,
    output_mark,
)

#: (rule, output) -> the mark its stage writes (the table the workflow held as "module:NAME" strings)
MARKS = {
    ("synth", "image"): tiffs.SYNTH_TIFF_MARK,
    ("synth", "labels"): tiffs.SYNTH_TIFF_MARK,
    ("ingest", None): ingest.STACK_MARK,
    ("class_weights", None): blockwise.CLASS_WEIGHTS_MARK,
    ("weights", "weights"): blockwise.WEIGHTS_MARK,
    ("weights", "plot"): blockwise.WEIGHTS_PLOT_MARK,
    ("augment", "samples"): augment.AUGMENT_MARK,
    ("augment", "plot"): augment.AUGMENT_PLOT_MARK,
    ("merge", "prediction"): merge.PREDICTION_MARK,
    ("merge", "tiff"): tiff_export.TIFF_MARK,
    ("merge", "cells"): cells.CELLS_MARK,
    ("train", None): train_outputs.OUT_DIR_MARK,
    ("predict", None): part_store.PART_MARK,
    ("evaluate", None): scoring.OUT_DIR_MARK,
    ("export_bioimageio", None): bioimageio.PACKAGE_MARK,
    **{(rule, None): merge_work.WORK_MARK for rule in MERGE_ROUNDS},
}


@pytest.mark.parametrize(("rule", "output"), sorted(MARKS, key=str))
def test_each_output_gets_its_stages_mark(rule: str, output: str | None) -> None:
    assert output_mark(rule, output) is MARKS[rule, output]


def test_folder_rules_are_the_rules_with_folder_marks() -> None:
    assert FOLDER_RULES == {"train", "predict", "evaluate", *MERGE_ROUNDS}
    assert output_mark("ingest", "other") is None and output_mark("all", None) is None


def test_existing_outputs_of_an_unknown_rule_are_refused(tmp_path) -> None:
    (tmp_path / "x").write_text("")
    check_existing_outputs({str(tmp_path / "missing"): ("nope", None)}, remedy="r")  # absent: fine
    with pytest.raises(AssertionError, match="no mark for output 0 of the rule nope"):
        check_existing_outputs({str(tmp_path / "x"): ("nope", None)}, remedy="r")


def test_a_foreign_file_at_a_declared_output_is_refused(tmp_path) -> None:
    (tmp_path / "image.tif").write_text("mine")
    with pytest.raises(Exception, match="image.tif"):
        check_existing_outputs({str(tmp_path / "image.tif"): ("synth", "image")}, remedy="r")


def test_model_geometry_names_the_key() -> None:
    config = {"model": {"depth": 2, "base_channels": 4, "n_classes": 2, "padding": "valid", "norm": "none",
                        "dropout": 0.0},
              "train": {"tile_out": 36, "val_tile_out": None},
              "predict": {"tile_out": 64, "block_px": 64}}
    spec = model_geometry(config, model_file="", given_model={}, given_normalisation=None)
    assert spec.depth == 2
    with pytest.raises(ConfigError, match="config train.tile_out = 37"):
        model_geometry({**config, "train": {"tile_out": 37, "val_tile_out": None}}, model_file="",
                       given_model={}, given_normalisation=None)
    with pytest.raises(Exception, match=r"config predict.block_px = 66"):
        model_geometry({**config, "predict": {"tile_out": 64, "block_px": 66}}, model_file="",
                       given_model={}, given_normalisation=None)


def _row(image: str, labels: str, slices: str) -> dict[str, str]:
    return {"image": image, "labels": labels, "slices": slices, "role": "train", "voxel_size_um": ""}


def test_sample_stacks_must_exist_and_hold_the_rows_slices(tmp_path) -> None:
    """A 3-slice TIFF: slices 0-2 are fine, 2-4 name 3 and 4; a missing labels file is named; a file
    a rule writes (``made``) is not looked for; an unreadable file is left to ingest."""
    import numpy as np
    import tifffile

    stack = tmp_path / "s.tif"
    tifffile.imwrite(stack, np.zeros((3, 16, 16), np.uint8), photometric="minisblack")
    check_sample_stacks({"a": _row(str(stack), str(stack), "0-2")}, table="t.tsv")
    check_sample_stacks({"a": _row(str(stack), "", "all")}, table="t.tsv")
    with pytest.raises(ConfigError, match=r"^t.tsv: sample 'a': image .*s.tif: slice\(s\) 3, 4 out of range "
                                          r"for a stack of 3 slices \(0-2\)$"):
        check_sample_stacks({"a": _row(str(stack), str(stack), "2-4")}, table="t.tsv")
    with pytest.raises(ConfigError, match=r"^t.tsv: sample 'a': labels .*nope.tif: no such file or directory"):
        check_sample_stacks({"a": _row(str(stack), str(tmp_path / "nope.tif"), "0")}, table="t.tsv")
    made = str(tmp_path / "made" / "image.tif")
    check_sample_stacks({"a": _row(made, "", "0-9")}, table="t.tsv", made=[made])
    (tmp_path / "junk.tif").write_bytes(b"not a tiff")
    check_sample_stacks({"a": _row(str(tmp_path / "junk.tif"), "", "0")}, table="t.tsv")
