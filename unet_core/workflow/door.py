"""The workflow's door into the package: everything ``workflow/Snakefile`` and
``workflow/rules/*.smk`` use from ``unet_core``, and the only module they import
(``tests/unit/test_architecture.py`` checks it).

Snakemake reads the workflow at every call, a dry run included, so what this module imports at
its top is paid by every ``snakemake -n``: no torch, no jsonschema, no zarr, no stage module
(a test imports it in a fresh interpreter and looks). What needs them is imported inside the
function that needs it, and called only where it is needed: a given ``model_file`` (torch),
the CUDA devices a config asks for (torch), the marks of declared outputs that exist (the stage
modules), the TIFF headers that bound ``predict.jobs`` (tifffile), the schema check of a config
(jsonschema, inside :func:`schema_problem`).

What the workflow gets here:

* config and samples: :func:`load_yaml`, :func:`schema_problem`, :func:`exact_numbers`,
  :func:`read_samples`, :func:`shared_slices`, :class:`ConfigError`;
* the samples' data: :func:`check_sample_stacks` (files exist, selections within their slices);
* geometry checks: :func:`model_geometry` (tile and block sizes against the network),
  :func:`check_jobs_fit_blocks` (``predict.jobs`` and ``predict.merge_jobs`` against the blocks),
  :func:`check_volume_settings` (the 3-D mode's keys and samples);
* output marks as objects: :func:`output_mark` (each rule's outputs to the mark of the stage
  that writes them), :data:`FOLDER_RULES`, :func:`check_existing_outputs`;
* :func:`code_hash` (a rule's param: the rule reruns when its stage's code changes),
  :func:`sha256_files` (a given model file's content, a predict param);
* :func:`remove_stale_tree` (temporaries of killed stages), :func:`check_devices`;
* :func:`refusals_exit_2`: the workflow's own checks stop as the stages do (one line, exit 2).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from unet_core.common import provenance
from unet_core.common.atomic import remove_stale_tree
from unet_core.common.config_values import exact_numbers, load_yaml, schema_problem
from unet_core.common.errors import ConfigError, UserInputError
from unet_core.common.outputs import Mark, check_replaceable
from unet_core.common.provenance import sha256_files
from unet_core.common.samples import read_samples, shared_slices
from unet_core.infer.tiling import Tiling, check_multiple_of_stride, default_block_z
from unet_core.model.spec import UNetSpec

__all__ = [
    "FOLDER_RULES",
    "ConfigError",
    "check_devices",
    "check_existing_outputs",
    "check_jobs_fit_blocks",
    "check_sample_stacks",
    "check_volume_settings",
    "code_hash",
    "exact_numbers",
    "load_yaml",
    "model_geometry",
    "output_mark",
    "read_samples",
    "refusals_exit_2",
    "remove_stale_tree",
    "schema_problem",
    "sha256_files",
    "shared_slices",
]

#: The rules of a sample's merge rounds (their records lie in ``{sample}/merge/``).
MERGE_ROUNDS = tuple(f"merge_{step}" for step in
                     ("start", "seeds", "number_seeds", "cells", "number_cells", "write"))
#: Rules whose outputs are files in a folder the stage owns: the folder is what carries the mark.
FOLDER_RULES = frozenset({"train", "predict", "evaluate", *MERGE_ROUNDS})


@contextlib.contextmanager
def refusals_exit_2() -> Iterator[None]:
    """Turn a :class:`UserInputError` raised in the block (a bad config value, samples table, data
    file or model file) into its one line on stderr and exit status 2, as every ``unet`` stage does.

    Snakemake would print it as a multi-line report naming our rules file and exit 1; users and
    scripts tell bad input (2) from failures (1) by the status. Used around the checks that run
    while Snakemake reads the workflow and in ``onstart``, before any job: nothing is written yet.
    """
    try:
        yield
    except UserInputError as error:
        print(error, file=sys.stderr, flush=True)
        sys.exit(2)


@functools.cache
def code_hash(stage: str) -> str:
    """The code hash of ``stage`` (:func:`unet_core.common.provenance.code_hash`), computed once
    per reading of the workflow (its 15 rules share 8 stages)."""
    return provenance.code_hash(stage)


def model_geometry(config: Mapping[str, Any], *, model_file: str, given_model: Mapping[str, Any],
                   given_normalisation: str | None) -> UNetSpec:
    """The network's geometry, with the config's tile and block sizes checked against it.

    With ``model_file`` the network is the file's, checked against the model keys the user's
    config gives (``given_model``), and ``given_normalisation`` (where the config sets one)
    against the model's; without, the config's model section. Checked when the workflow is read,
    before any stage runs, so a mistake costs seconds, not the ingest and augmentation before the
    stage that fails.

    Raises:
        ConfigError: a tile or block size the network cannot take.
        UserInputError: a model file that is not one, or does not match the given keys.
    """
    if model_file:
        from unet_core.infer.predict import checked_normalisation  # torch: only with a model file
        from unet_core.model.package import load_predict_model

        # a model.pt or a bioimage.io package (README "Sharing models"), loaded as unet predict loads it
        model, metadata = load_predict_model(model_file, expect=dict(given_model),
                                             trust_torchscript=config["predict"]["trust_torchscript"],
                                             cell_channel=config["predict"]["cell_channel"])
        if given_normalisation is not None:
            checked_normalisation(metadata, given_normalisation, model=model_file)
        spec = model.spec
    else:
        spec = UNetSpec.from_dict(config["model"])
        for key in ("tile_out", "val_tile_out"):
            size = config["train"][key]
            try:
                spec.input_size(size or config["train"]["tile_out"])
            except ValueError as err:
                raise ConfigError(f"config train.{key} = {size}: {err}") from None
    for key in ("tile_out", "block_px"):
        check_multiple_of_stride(config["predict"][key], spec, what=f"config predict.{key} =")
    return spec


def check_jobs_fit_blocks(config: Mapping[str, Any], samples: Mapping[str, Mapping[str, str]],
                          predicted: Iterable[str], spec: UNetSpec) -> None:
    """``predict.jobs`` (and ``predict.merge_jobs``) may not exceed any predicted sample's block
    count: the extra jobs would have nothing to do, yet each is planned and tracked
    (``predict.jobs: 100000`` on 3 blocks was a 148 s, 2.1 GB dry run).

    The count comes from the TIFF header (no pixels read), the row's slice selection and
    ``predict.block_px``; a sample whose image a rule still has to write (synth), or that ingest
    will refuse, is skipped here.

    Raises:
        ConfigError: more jobs than a sample has blocks, naming the key and the sample.
    """
    asked = {key: config["predict"].get(key) for key in ("jobs", "merge_jobs")}
    asked = {key: k for key, k in asked.items() if isinstance(k, int) and k > 1}
    if not asked:
        return
    for name in predicted:
        found = _selected_shape(name, samples[name])
        if found is None:
            continue
        tiling = Tiling(found, spec, config["predict"]["block_px"], config["predict"]["tile_out"],
                        *_z_blocking(config, spec, found[0]))
        for key, k in asked.items():
            try:
                tiling.check_jobs(k, option=f"config predict.{key} =", of=f"sample {name!r} ({samples[name]['image']})")
            except UserInputError as err:
                raise ConfigError(str(err)) from None


def _z_blocking(config: Mapping[str, Any], spec: UNetSpec, depth: int) -> tuple[int, int | None]:
    """(block_z, tile_z) that ``unet predict`` uses on a stack of ``depth`` slices: 1 and None for a
    2-D network; ``predict.block_z``, else :func:`unet_core.infer.tiling.default_block_z` of the
    stored z chunk (``ingest.chunks`` z, at most the depth)."""
    if spec.dims == 2:
        return 1, None
    block_z = config["predict"]["block_z"]
    if block_z is None:
        block_z = default_block_z(min(config["ingest"]["chunks"][0], depth), spec)
    return block_z, config["predict"]["tile_z"]


def _selected_depth(name: str, row: Mapping[str, str], depth: int) -> int:
    """Slices of a stack of ``depth`` slices that the row's selection keeps (0: none).

    Raises:
        UserInputError: a malformed selection (ingest names it).
    """
    from unet_core.common.slices import count, merged, slice_ranges

    ranges = slice_ranges(row["slices"], what=name)
    return depth if ranges is None else count(merged([(lo, min(hi, depth - 1)) for lo, hi in ranges if lo < depth]))


def _selected_shape(name: str, row: Mapping[str, str]) -> tuple[int, int, int] | None:
    """(Z, Y, X) of a sample's image after its row's slice selection, from the TIFF header (no
    pixels read); None where a rule still has to write the image (synth), or where ingest will
    refuse it (it names the problem) or nothing is selected."""
    if not os.path.exists(row["image"]):
        return None
    from unet_core.io.tiff import open_tiff_stack  # tifffile: only where a file is looked at

    try:
        with open_tiff_stack(row["image"]) as stack:
            z, y, x = stack.shape
        z = _selected_depth(name, row, z)
    except UserInputError:
        return None
    return (z, y, x) if z >= 1 else None


#: Config keys of the 3-D mode only (model.dims 3); a 2-D config that sets one is refused.
VOLUME_KEYS = ("weights.sigma_um", "augment.sigma_um", "train.tile_out_z", "predict.block_z", "predict.tile_z",
               "predict.watershed.h_um")


def _value(config: Mapping[str, Any], key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config


def check_volume_settings(config: Mapping[str, Any], samples: Mapping[str, Mapping[str, str]], spec: UNetSpec,
                          *, table: str, trains: bool) -> None:
    """The 3-D mode's settings and samples, before any job (also in a dry run), so a mistake costs
    seconds, not the stages before the one that would refuse it.

    A 2-D network: none of :data:`VOLUME_KEYS` may be set. A 3-D network (``model.dims: 3`` or a
    3-D ``model_file``): ``weights.sigma_um`` where the workflow trains; ``predict.watershed.h_um``
    for distance seeds; no ``predict.min_object_px: auto`` (a 2-D area); the z chunk of
    ``ingest.chunks``, ``predict.block_z`` and ``predict.tile_z`` multiples of the network's z stride;
    ``train.tile_out_z`` an output size the network reaches; and every sample a stack of several
    slices whose voxel size is given (the samples table's ``voxel_size_um`` column, else the file's)
    and coarse enough along z for ``model.pool_z`` (:func:`unet_core.model.spec.check_z_geometry`).
    Samples whose image a rule still writes are left to the stages.

    Raises:
        ConfigError: one line naming the key, or the samples table, sample and file.
    """
    if spec.dims == 2:
        given = [key for key in VOLUME_KEYS if _value(config, key) is not None]
        if given:
            raise ConfigError(f"config {given[0]} = {_value(config, given[0])}: a setting of the 3-D mode; this "
                              "network is 2-D (model.dims 2): remove it, or set model.dims: 3")
        return
    _check_volume_keys(config, spec, trains=trains)
    for name, row in samples.items():
        _check_volume_sample(name, row, spec, table=table)


def _check_volume_keys(config: Mapping[str, Any], spec: UNetSpec, *, trains: bool) -> None:
    """The config keys of a 3-D run (see :func:`check_volume_settings`)."""
    predict, watershed = config["predict"], config["predict"]["watershed"]
    if trains and config["weights"]["sigma_um"] is None:
        raise ConfigError("config weights.sigma_um: the 3-D mode (model.dims 3) needs the border term's decay "
                          "length in µm (weights.sigma_px is the 2-D key; the paper's 5 px are 5 x the in-plane "
                          "voxel size)")
    if predict["instances"] == "watershed" and watershed["seeds"] == "distance" and watershed["h_um"] is None:
        raise ConfigError("config predict.watershed.h_um: distance seeds of 3-D cells need their depth in µm "
                          "(e.g. 0.15 x the median nucleus radius); h_px is the 2-D key")
    if predict["min_object_px"] == "auto":
        raise ConfigError("config predict.min_object_px = auto: auto is 5 % of a median 2-D area; 3-D cells need "
                          "a number of voxels")
    try:
        check_multiple_of_stride(config["ingest"]["chunks"][0], spec, what="config ingest.chunks z =", z=True)
        for key in ("block_z", "tile_z"):
            if predict[key] is not None:
                check_multiple_of_stride(predict[key], spec, what=f"config predict.{key} =", z=True)
    except UserInputError as err:
        raise ConfigError(str(err)) from None
    tile_out_z = config["train"]["tile_out_z"]
    if trains and tile_out_z is not None:
        try:
            spec.z_axis.input_size(tile_out_z, what="U-Net along z")
        except ValueError as err:
            raise ConfigError(f"config train.tile_out_z = {tile_out_z}: {err}") from None


def _check_volume_sample(name: str, row: Mapping[str, str], spec: UNetSpec, *, table: str) -> None:
    """One sample of a 3-D run: several slices, a given voxel size, z coarse enough for pool_z (one
    reading of the TIFF header; a file a rule still writes, or that ingest will refuse, is skipped)."""
    if not os.path.exists(row["image"]):
        return
    from unet_core.io.ingest import voxel_size  # zarr: only for a 3-D run
    from unet_core.io.tiff import open_tiff_stack
    from unet_core.model.spec import check_z_geometry

    column = row.get("voxel_size_um", "").replace(" ", "")
    try:
        with open_tiff_stack(row["image"]) as stack:
            depth = _selected_depth(name, row, stack.shape[0])
            spacing, missing = voxel_size(stack, tuple(map(float, column.split(","))) if column else None)
    except UserInputError:
        return  # ingest names the problem
    if depth == 0:
        return  # nothing selected: ingest names it
    where = f"{table}: sample {name!r} ({row['image']})"
    if depth == 1:
        raise ConfigError(f"{where}: one slice selected; the 3-D mode (model.dims 3) needs a volume of several "
                          "slices (select more, or use model.dims 2)")
    if missing:
        raise ConfigError(f"{where}: the file gives no voxel size for axis {', '.join(missing)}, and the 3-D "
                          "mode measures in µm: give it in the samples table's voxel_size_um column (z,y,x)")
    check_z_geometry(spec, spacing, where=where)


def check_sample_stacks(samples: Mapping[str, Mapping[str, str]], *, table: str,
                        made: Iterable[str] = ()) -> None:
    """Every sample's image and labels exist and hold the slices its row names, before any job.

    Otherwise the workflow stopped later: a missing file as Snakemake's MissingInputException
    (many lines), a selection beyond the stack's slices in ``unet ingest``, after the other rows had
    been ingested. The slice count comes from the TIFF header (no pixels read); a file a rule of
    the workflow writes (``made``, e.g. the synthetic sample) is not looked for, and a file that is
    not a readable stack is left to ingest, which names the problem.

    Raises:
        ConfigError: one line naming the samples table, the sample and the file.
    """
    made = {os.path.normpath(p) for p in made}
    for name, row in samples.items():
        for column in ("image", "labels"):
            path = row[column]
            if not path or os.path.normpath(path) in made:
                continue  # the demo's synthetic sample: tifffile is not imported for it
            if not os.path.exists(path):
                raise ConfigError(f"{table}: sample {name!r}: {column} {path}: no such file or directory "
                                  "(paths are relative to the directory snakemake runs in)")
            from unet_core.common.slices import parse_slices
            from unet_core.io.tiff import open_tiff_stack  # tifffile: only where a file is looked at

            try:
                with open_tiff_stack(path) as stack:
                    n_slices = stack.shape[0]
            except UserInputError:
                continue  # ingest names the problem
            try:
                parse_slices(row["slices"], n_slices, what=f"{table}: sample {name!r}: {column} {path}")
            except UserInputError as err:
                raise ConfigError(str(err)) from None


def output_mark(rule: str, output: str | None) -> Mark | None:
    """The mark of output ``output`` of ``rule`` (None: a rule's one unnamed output; for the
    rules of :data:`FOLDER_RULES` the mark of the folder their outputs lie in), or None where
    the output has none.

    Imports only the stage module that holds the mark (some import torch): called for outputs
    that exist, never in a dry run.
    """
    match rule, output:
        case "synth" | "synth_volume", "image" | "labels":
            from unet_core.synth.tiffs import SYNTH_TIFF_MARK as mark
        case "ingest", None:
            from unet_core.io.ingest import STACK_MARK as mark
        case "class_weights", None:
            from unet_core.weights.blockwise import CLASS_WEIGHTS_MARK as mark
        case "weights", "weights":
            from unet_core.weights.blockwise import WEIGHTS_MARK as mark
        case "weights", "plot":
            from unet_core.weights.blockwise import WEIGHTS_PLOT_MARK as mark
        case "augment", "samples":
            from unet_core.augment.samples import AUGMENT_MARK as mark
        case "augment", "plot":
            from unet_core.augment.samples import AUGMENT_PLOT_MARK as mark
        case "merge", "prediction":
            from unet_core.infer.merge import PREDICTION_MARK as mark
        case "merge", "tiff":
            from unet_core.infer.tiff_export import TIFF_MARK as mark
        case "merge", "cells":
            from unet_core.infer.cells import CELLS_MARK as mark
        case "train", _:
            from unet_core.train.outputs import OUT_DIR_MARK as mark
        case "predict", _:
            from unet_core.infer.part_store import PART_MARK as mark
        case "evaluate", _:
            from unet_core.evaluate.scoring import OUT_DIR_MARK as mark
        case "export_bioimageio", None:
            from unet_core.export.bioimageio import PACKAGE_MARK as mark
        case _ if rule in MERGE_ROUNDS:  # the merge rounds' records
            from unet_core.infer.merge_work import WORK_MARK as mark
        case _:
            return None
    return mark


def check_existing_outputs(declared: Mapping[str, tuple[str, str | None]], *, remedy: str) -> None:
    """Refuse a declared output path that holds what its stage did not write.

    Snakemake deletes a job's declared outputs before the job runs, before its stage can check
    them; so before any job, every declared output that exists must carry its stage's mark
    (:mod:`unet_core.common.outputs`).

    Args:
        declared: ``{path: (rule, output name)}``; for the rules of :data:`FOLDER_RULES` the
            folder their outputs lie in.
        remedy: what the user can do, for the message.

    Raises:
        UserInputError: something else stands at a declared path (one line naming it).
        AssertionError: an output of a rule that :func:`output_mark` does not know.
    """
    for path, (rule, output) in sorted(declared.items()):
        if os.path.lexists(path):
            mark = output_mark(rule, output)
            if mark is None:
                raise AssertionError(f"no mark for output {output or 0} of the rule {rule} in output_mark")
            check_replaceable(path, mark, remedy=remedy)


def check_devices(asked: Mapping[str, str]) -> None:
    """Each CUDA device the config asks for (``{stage: device}``) must exist here.

    Raises:
        UserInputError: no such device, naming the config key.
    """
    from unet_core.common.device import resolve_device  # torch: only where CUDA is asked for

    for stage, device in sorted(asked.items()):
        resolve_device(device, option=f"config {stage}.device =")
