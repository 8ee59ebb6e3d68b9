# Config and samples: validation, wildcard constraints, input functions.

import functools
import os
import re
import shlex

from snakemake.logging import logger
from snakemake.io import get_wildcard_names, regex_from_filepattern as regex_of, strip_wildcard_constraints
from snakemake.utils import validate

# the package's one door for the workflow (torch-free; tests/unit/test_architecture.py checks that
# the workflow imports nothing else of unet_core)
from unet_core.workflow.door import (
    FOLDER_RULES,
    ConfigError,
    check_devices,
    check_existing_outputs,
    check_jobs_fit_blocks,
    check_sample_stacks,
    check_volume_settings,
    code_hash,
    exact_numbers,
    load_yaml,
    model_geometry,
    read_samples,
    refusals_exit_2,
    remove_stale_tree,
    schema_problem,
    sha256_files,
    shared_slices,
)


def load_schema(name):
    return load_yaml(os.path.join(workflow.basedir, "schemas", name))


CONFIG_SCHEMA = load_schema("config.schema.yaml")
_given = [str(f) for f in workflow.overwrite_configfiles]  # --configfile: then config/config.yaml is not read
_files = [str(f) for f in workflow.configfiles if str(f) not in _given] + _given
# Bad input found while the workflow is read (config, samples table, data, model file): one line, exit 2
with refusals_exit_2():
    for _file in _files:  # Snakemake keeps the last of two equal keys (a second train: section) silently
        load_yaml(_file)
# What the user wrote, before the schema fills defaults: their --configfile(s) and --config; without
# a --configfile, config/config.yaml is theirs. With model_file these keys are checked against the
# file, so the demo's model section must not be (README: delete the model keys to take the file's).
_USER_CONFIG = workflow.config_settings.overwrite_config if _given else config
GIVEN_MODEL = dict(_USER_CONFIG["model"]) if isinstance(_USER_CONFIG.get("model"), dict) else {}
GIVEN_NORMALISATION = _USER_CONFIG.get("normalisation")
# one line naming the key and the file(s), instead of Snakemake's dump of the schema and config
with refusals_exit_2():
    _problem = schema_problem(config, CONFIG_SCHEMA, _files)
    if _problem:
        raise ConfigError(_problem)
validate(config, schema="../schemas/config.schema.yaml")  # fills the defaults
# the schema lets 400.0 pass as an integer and NaN/Inf pass every bound: integers become int
# (exactly) and non-finite numbers stop the run here, naming the key
with refusals_exit_2():
    exact_numbers(config, CONFIG_SCHEMA)


def check_output_dir(path):
    """config output_dir must be a folder, or a path where one can be made: a file there or above it
    stopped Snakemake with a traceback while it looked for the outputs."""
    above = path
    while above and not os.path.lexists(above):
        above = os.path.dirname(above)
    if above and not os.path.isdir(above):
        found = "a broken link" if os.path.islink(above) else "a file"
        where = "" if above == path else f"{above!r} "
        raise ConfigError(f"config output_dir = {path!r}: {where}is {found}, not a folder; "
                          "set output_dir to a folder for this run's results")


MODEL_FILE = config["model_file"]
with refusals_exit_2():
    check_output_dir(config["output_dir"])
    samples = read_samples(config["samples"], load_schema("samples.schema.yaml"), need_train=not MODEL_FILE)
for _warning in shared_slices(samples):
    logger.warning(f"Warning: {_warning}")


# Tile and block sizes must fit the network (its geometry, not retyped numbers): the model_file's
# network (checked against the model keys and normalisation the user's config gives), or the config's.
with refusals_exit_2():
    SPEC = model_geometry(config, model_file=MODEL_FILE, given_model=GIVEN_MODEL,
                          given_normalisation=GIVEN_NORMALISATION)
TRAIN = [n for n, r in samples.items() if r["role"] == "train"]
VAL = [n for n, r in samples.items() if r["role"] == "val"]
PREDICT = [n for n, r in samples.items() if r["role"] in ("val", "predict")]
LABELLED_PREDICT = [n for n in PREDICT if samples[n]["labels"]]
JOBS = list(range(config["predict"]["jobs"]))
MERGE_PIECES = list(range(config["predict"]["merge_jobs"]))


# predict.jobs and predict.merge_jobs may not exceed a predicted sample's block count (from the TIFF
# headers, before any job, also in a dry run); only in the process the user started
if workflow.is_main_process:
    with refusals_exit_2():
        check_jobs_fit_blocks(config, samples, PREDICT, SPEC)
        # the 3-D mode's keys and samples (voxel sizes, z pooling); a 2-D config must not set them
        check_volume_settings(config, samples, SPEC, table=config["samples"], trains=not MODEL_FILE)


wildcard_constraints:
    sample="|".join(map(re.escape, samples)),
    job=r"\d+",
    piece=r"\d+",


def out(path):
    """``path`` under the run's output directory (config ``output_dir``): results and logs
    of different configs never mix."""
    return os.path.join(config["output_dir"], path)


# Temporaries of stages killed in an earlier run (host and PID in their names, the PID gone)
# are removed at start-up, also where the killed stage's old outputs were complete and it is
# not rerun. Temporaries of running processes are left alone.
for _root in ("resources", config["output_dir"]):
    remove_stale_tree(_root)


def q(value):
    """Quote a config value for the shell (paths with spaces or quotes stay intact)."""
    return shlex.quote(str(value))


MODEL = MODEL_FILE or out("model/model.pt")


@functools.cache
def model_file_sha256():
    """The given model_file's content hash (empty when the workflow trains the model): a predict
    param, so a part predicted with another model_file is redone on the next run. Its modification
    time alone misses a model replaced by an older file (mv, cp -p, rsync -t), and then every rerun of
    the merge refused the mix of parts of two models."""
    return sha256_files([MODEL_FILE]) if MODEL_FILE and os.path.exists(MODEL_FILE) else ""  # a package: a folder


def model_args():
    """The architecture flags: all of the config's model section, or with model_file only the keys
    the config gives (checked against the file by unet predict)."""
    given = GIVEN_MODEL if MODEL_FILE else config["model"]
    if not MODEL_FILE and given["dims"] == 2:  # 2-D runs keep the commands (and params) they always had
        given = {k: v for k, v in given.items() if k not in ("dims", "pool_z", "kernel_z")}
    return " ".join(f"--{k.replace('_', '-')} {_flag_value(given[k])}" for k in MODEL_KEYS
                    if given.get(k) is not None)


MODEL_KEYS = ("depth", "base_channels", "n_classes", "padding", "norm", "dropout", "dims", "pool_z", "kernel_z")


def _flag_value(value):
    """A config value as the CLI takes it: lists (pool_z, kernel_z) comma-joined."""
    return ",".join(map(str, value)) if isinstance(value, list) else value


def optional_flags(section, keys):
    """' --flag value' for each of ``keys`` ({config key: flag}) of config ``section`` (a path like
    "predict/watershed") that is set (not null): the 3-D keys, which 2-D runs leave out."""
    values = functools.reduce(lambda d, k: d[k], section.split("/"), config)
    return "".join(f" {flag} {_flag_value(values[k])}" for k, flag in keys.items() if values[k] is not None)


def dims_option():
    """' --dims 3' for the stages that take the stack as a volume (class-weights, weights, evaluate
    default to a 3-D prediction's record) where the network is 3-D; nothing in 2-D."""
    return " --dims 3" if SPEC.dims == 3 else ""


def weights_scale_options():
    """The border term's decay length: --sigma-px in 2-D, --dims 3 --sigma-um in 3-D (checked at
    start-up: check_volume_settings)."""
    w = config["weights"]
    return f"--sigma-px {w['sigma_px']}" if SPEC.dims == 2 else f"--dims 3 --sigma-um {w['sigma_um']}"


def train_options():
    t = config["train"]
    return (
        f"--iterations {t['iterations']} --batch-size {t['batch_size']}"
        f" --optimizer {t['optimizer']} --lr {t['lr']} --momentum {t['momentum']}"
        f" --schedule {t['schedule']} --warmup-iterations {t['warmup_iterations']}"
        f" --validate-every {t['validate_every']} --checkpoint-every {t['checkpoint_every']}"
        f" --seed {t['seed']} --device {t['device']} --precision {t['precision']}"
        f" --workers {t['workers']} --normalisation {config['normalisation']}"
        + (" --compile" if t["compile"] else "")
        + (f" --val-tile-out {t['val_tile_out']}" if t["val_tile_out"] else "")
    )


def val_option(stacks, weights):
    """--val STACK:WEIGHTS ... for the held-out samples (nothing when there are none)."""
    pairs = [q(f"{s}:{w}") for s, w in zip(stacks, weights)]
    return "--val " + " ".join(pairs) if pairs else ""


def get_ingest_inputs(wildcards):
    row = samples[wildcards.sample]
    inputs = {"image": row["image"]}
    if row["labels"]:
        inputs["labels"] = row["labels"]
    return inputs


def voxel_option(row):
    """ --voxel-size-um z,y,x from the samples table's optional column (nothing where it is empty)."""
    size = row["voxel_size_um"].replace(" ", "")
    return f" --voxel-size-um {q(size)}" if size else ""


def get_labels_option(wildcards, input):
    return f"--labels {q(input.labels)}" if "labels" in input.keys() else ""


def watershed_options():
    w = config["predict"]["watershed"]
    return (
        f"--seeds {w['seeds']} --seed-h-px {w['h_px']}"
        f" --seed-threshold {w['seed_threshold']} --seed-erosion-px {w['seed_erosion_px']}"
        f" --mask-threshold {w['mask_threshold']} --halo-px {w['halo_px']}"
        + optional_flags("predict/watershed", {"h_um": "--seed-h-um"})
    )


def predict_batch_option():
    """--batch for unet predict where the config sets predict.batch_size; nothing for null (the
    default), so predict picks its per-device batch (1 on the CPU, 8 on a GPU)."""
    batch = config["predict"]["batch_size"]
    return f"--batch {batch}" if batch is not None else ""


def predict_package_options():
    """--cell-channel and --trust-torchscript for unet predict where the config sets them (a foreign
    bioimage.io package as model_file); nothing otherwise."""
    p = config["predict"]
    return (f"--cell-channel {q(p['cell_channel'])}" if p["cell_channel"] is not None else "") + (
        " --trust-torchscript" if p["trust_torchscript"] else "")


def export_sample():
    """The ingested stack whose middle slice gives the bioimage.io package's test tensors and cover
    (rules/export.smk): the first predicted sample that is not a training sample (the package's
    documentation then states its argmax agreement with unet predict on a stack the model was not
    trained on), else the first sample."""
    held_out = [n for n in PREDICT if n not in TRAIN]
    return out(f"{(held_out or list(samples))[0]}/stack.ome.zarr")


def predict_normalisation():
    """--normalisation for unet predict: the config's when it sets one (checked against the model,
    which predict always follows); nothing otherwise (a given model_file brings its own)."""
    if MODEL_FILE and GIVEN_NORMALISATION is None:
        return ""
    return f"--normalisation {config['normalisation']}"


def merge_inputs(wildcards):
    """What every merge round reads: the stack and the finished predict parts (their markers)."""
    return {"stack": out(f"{wildcards.sample}/stack.ome.zarr"),
            "parts": [out(f"{wildcards.sample}/predict/part-{job}.zarr/COMPLETE") for job in JOBS]}


def merge_seed_ids(wildcards):
    """The numbered seeds a cells piece floods from (the watershed only)."""
    return [out(f"{wildcards.sample}/merge/seed-ids.npz")] if config["predict"]["instances"] == "watershed" else []


def merge_args(wildcards):
    """The arguments every round of a sample's merge gets (unet merge checks they stay the same)."""
    return _merge_args(wildcards.sample)


@functools.lru_cache(maxsize=None)
def _merge_args(sample):
    """merge_args of ``sample``, made once: every merge job of a sample (3 x merge_jobs + 4) gets the
    same string of all predict.jobs parts (was O(merge_jobs x jobs) per workflow start)."""
    parts = " ".join(q(out(f"{sample}/predict/part-{job}.zarr")) for job in JOBS)
    tiff = config["predict"]["tiff"]  # true: the segmentation, merge's default content
    content = f" --tiff-content {tiff}" if tiff not in (True, "segmentation") else ""
    tiff_args = f" --tiff {q(out(f'{sample}/segmentation.tif'))}{content}" if tiff else ""
    return (
        f"{parts} --stack {q(out(f'{sample}/stack.ome.zarr'))} -o {q(out(f'{sample}/prediction.ome.zarr'))}"
        f" --cells {q(out(f'{sample}/cells.csv'))}{tiff_args}"
        f" --instances {config['predict']['instances']} --min-object-px {config['predict']['min_object_px']}"
        f" {watershed_options()} --jobs {config['predict']['merge_jobs']} --work {q(out(f'{sample}/merge'))}"
    )


def merge_tiff_output():
    """The merge rule's segmentation TIFF as a declared output when the config asks for it (so
    Snakemake removes it before a rerun and knows who writes it)."""
    return {"tiff": out("{sample}/segmentation.tif")} if config["predict"]["tiff"] else {}


def get_final_outputs():
    outputs = []
    if not MODEL_FILE:  # with a given model nothing is trained
        outputs += [out("model/model.pt"), out("model/curve.png")]
        outputs += expand(out("{sample}/weights.png"), sample=TRAIN)
        outputs += expand(out("{sample}/augment.png"), sample=TRAIN)
    outputs += expand(out("{sample}/prediction.ome.zarr"), sample=PREDICT)
    outputs += expand(out("{sample}/evaluate/metrics.csv"), sample=LABELLED_PREDICT)
    return outputs


# Snakemake deletes a job's declared outputs before the job runs, before its stage can check
# them. So before any job (onstart), every declared output that exists must be the workflow's own:
# its stage's mark (unet_core.common.outputs), an object the door gives for each rule's output
# (output_mark), importing the stage module only for outputs that exist (some import torch).
def declared_outputs():
    """{path: (rule, output name)} of every output the rules declare, for every sample and job (None
    for a rule's one unnamed output); for the rules of FOLDER_RULES the folder their outputs lie in."""
    found, values = {}, {"sample": list(samples), "job": JOBS, "piece": MERGE_PIECES}
    for step in workflow.rules:
        named = dict(step.output.items()) or ({None: step.output[0]} if len(step.output) else {})
        for key, pattern in named.items():
            pattern = strip_wildcard_constraints(str(pattern))
            # only the wildcards the pattern has: a per-sample output is not expanded once per job
            names = get_wildcard_names(pattern)
            asked = {k: v for k, v in values.items() if k in names}
            paths = (expand(pattern, **asked) if set(asked) == names  # else the synthetic volumes the table names
                     else [p for p in sample_files() if re.fullmatch(regex_of(pattern), p)])
            for path in paths:
                if step.name in FOLDER_RULES:
                    found[os.path.dirname(path)] = (step.name, None)
                else:
                    found[path] = (step.name, key)
    return found


def check_declared_outputs():
    """Refuse, before any job, a declared output path holding what its stage did not write. Only in
    the process the user started: jobs that a cluster runs read the workflow again while other jobs
    write their outputs."""
    if not workflow.is_main_process:
        return
    with refusals_exit_2():
        check_existing_outputs(declared_outputs(), remedy="set another output_dir in the config")


def sample_files():
    """Every image and labels path of the samples table."""
    return [row[c] for row in samples.values() for c in ("image", "labels") if row[c]]


def check_samples_data():
    """Each sample's files exist (or a rule of this workflow writes them) and hold the slices its row
    names: checked when the workflow is read, before Snakemake builds the jobs (a missing file
    was its MissingInputException) and before any row is ingested. Only in the process the user
    started."""
    if not workflow.is_main_process:
        return
    made = [path for path in sample_files() if any(step.is_producer(path) for step in workflow.rules)]  # synth rules
    with refusals_exit_2():
        check_sample_stacks(samples, table=config["samples"], made=made)


def check_cuda_here():
    """A CUDA device the config asks for (cuda or cuda:N) must exist where the jobs run. Called by
    onstart (after the DAG, before any job; not in a dry run) where the jobs run on this machine, so a
    missing GPU costs seconds, not the stages before training; not where a cluster executor sends
    the jobs to other machines (the executor is known only then, not while the Snakefile is read)."""
    stages = ["predict", "augment"] + ([] if MODEL_FILE else ["train"])
    asked = {s: config[s]["device"] for s in stages if str(config[s]["device"]).startswith("cuda")}
    if not asked or workflow.non_local_exec:
        return
    with refusals_exit_2():
        check_devices(asked)
