"""``unet train``: train the U-Net on augmented tiles, validate on held-out slices."""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields

from unet_core.cli.common import (
    add_model_args,
    add_threads_arg,
    choice_values,
    configure_threads,
    existing_path,
    field_default,
    finite_float,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    spec_from_args,
    worker_count,
)
from unet_core.common.errors import UserInputError
from unet_core.common.intensity import DEFAULT_NORMALISATION, Normalisation
from unet_core.common.precision import Precision
from unet_core.common.slices import parse_slices
from unet_core.train.config import TILE_OUT, ExportWeights, OptimizerKind, Schedule, TrainConfig

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the U-Net on augmented tiles (weighted cross-entropy, resumable)",
        description=(
            "Train the U-Net of Ronneberger et al. (2015) on the tiles written by 'unet augment' with the "
            "pixel-wise weighted cross-entropy, validating on held-out slices of ingested stacks. Writes "
            "OUT_DIR/model.pt, state.pt (resumable), metrics.csv, curve.png, model.ts (TorchScript) and "
            "model_card.json. With --dims 3 (the 3-D U-Net) the sets hold (Z, Y, X) tiles of "
            "'unet augment --dims 3', --val stacks are validated as whole volumes, and model.pt records the "
            "training voxel size. Uses CUDA when present (bf16 autocast, channels_last, TF32, fused optimizer); on the "
            "CPU the run is deterministic and '--resume' after a kill gives bit-identical weights. A loss or "
            "weight that becomes NaN/Inf stops the run naming the iteration and learning rate; state.pt is "
            "never written with non-finite weights."
        ),
    )
    _add_data_args(p)
    add_model_args(p)
    _add_optimisation_args(p)
    _add_run_control_args(p)
    add_threads_arg(p)
    p.set_defaults(func=run)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    """Training sets (stored or deformed on the fly), validation slices and the output folder."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--train",
        nargs="+",
        type=existing_path,
        metavar="AUG.zarr",
        default=[],
        help="augmented training sets written by 'unet augment' (image/classes/weights arrays)",
    )
    src.add_argument(
        "--train-stacks",
        nargs="+",
        metavar="STACK:WEIGHTS.zarr",
        default=[],
        help="instead of --train: ingested stacks and their weights stores, deformed on the fly "
        "(paper settings; a fresh deformation of every slice each epoch)",
    )
    p.add_argument(
        "--train-slices",
        default=None,
        metavar="SEL",
        help="with --train-stacks: z slices of every training stack, e.g. '0-19' (default: all)",
    )
    p.add_argument(
        "--tile-out",
        type=positive_int,
        default=TILE_OUT,
        help=f"with --train-stacks: network output tile size in px (default {TILE_OUT}; 388 for the paper's "
             "572 px input tiles)",
    )
    p.add_argument(
        "--val",
        nargs="+",
        default=[],
        metavar="STACK:WEIGHTS.zarr",
        help="validation pairs: an ingested stack and its weights store, joined by ':' (--dims 3: whole volumes "
        "of the training sets' voxel size, given at ingest)",
    )
    p.add_argument(
        "--val-slices",
        default=None,
        metavar="SEL",
        help="z slices of every validation stack to use, e.g. '20-29' or '0,3,5-7' (default: all; not with --dims 3)",
    )
    p.add_argument("--out-dir", required=True, help="output directory (created if missing)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT_DIR/state.pt if present (exactly; settings must be unchanged)",
    )
    p.add_argument(
        "--restart-if-changed",
        action="store_true",
        help="with --resume: if OUT_DIR/state.pt was written with other settings, data or model, "
        "start afresh instead of stopping (the workflow's choice: it reruns training only then)",
    )


def _add_optimisation_args(p: argparse.ArgumentParser) -> None:
    """Steps, batch, optimizer, learning-rate schedule, loss weighting and seed (defaults: TrainConfig's,
    the tested CPU recipe of config/isbi2012_cpu.yaml)."""
    d = lambda name: field_default(TrainConfig, name)
    g = p.add_argument_group("optimisation (defaults: the recipe of config/isbi2012_cpu.yaml)")
    g.add_argument("--iterations", type=positive_int, default=d("iterations"),
                   help=f"optimizer steps in total (default {d('iterations')})")
    g.add_argument("--batch-size", type=positive_int, default=d("batch_size"),
                   help=f"tiles per step (default {d('batch_size')}; paper: 1 large tile)")
    g.add_argument("--optimizer", choices=choice_values(OptimizerKind), default=d("optimizer"),
                   help=f"SGD with momentum (paper) or Adam (default {d('optimizer')})")
    g.add_argument(
        "--lr",
        type=finite_float,
        default=d("lr"),
        help=f"peak learning rate for the mean-over-pixels loss (default {d('lr')}; SGD momentum 0.99 diverges "
             "at 0.01 on ISBI)",
    )
    g.add_argument("--momentum", type=finite_float, default=d("momentum"),
                   help=f"SGD momentum (paper: 0.99) or Adam beta1 (default {d('momentum')})")
    g.add_argument("--weight-decay", type=nonnegative_float, default=d("weight_decay"),
                   help="L2 weight decay (paper: 0)")
    g.add_argument(
        "--schedule",
        choices=choice_values(Schedule),
        default=d("schedule"),
        help=f"learning-rate schedule after the warm-up (default {d('schedule')})",
    )
    g.add_argument(
        "--warmup-iterations",
        type=nonnegative_int,
        default=d("warmup_iterations"),
        help=f"linear warm-up from lr/100 to lr over this many iterations (default {d('warmup_iterations')}; 0: none)",
    )
    g.add_argument(
        "--lr-step-iterations",
        type=positive_int,
        default=d("lr_step_iterations"),
        help="'step' schedule: multiply the learning rate by --lr-gamma every this many iterations",
    )
    g.add_argument("--lr-gamma", type=finite_float, default=d("lr_gamma"), help="'step' schedule factor, in (0, 1]")
    g.add_argument(
        "--unweighted",
        dest="weighted",
        action="store_false",
        help="plain cross-entropy (ignore the w(x) weights of the training sets)",
    )
    g.add_argument(
        "--seed", type=nonnegative_int, default=d("seed"), help="seed for initialisation, tile order and dropout"
    )


def _add_run_control_args(p: argparse.ArgumentParser) -> None:
    """Checkpoints, validation, normalisation, export choice, device, precision, compile, workers."""
    d = lambda name: field_default(TrainConfig, name)
    r = p.add_argument_group("run control")
    r.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=d("checkpoint_every"),
        help=f"write OUT_DIR/state.pt every this many iterations (default {d('checkpoint_every')})",
    )
    r.add_argument(
        "--validate-every",
        type=positive_int,
        default=d("validate_every"),
        help=f"validate and append a metrics.csv row every this many iterations (default {d('validate_every')})",
    )
    r.add_argument(
        "--log-every",
        type=positive_int,
        default=d("log_every"),
        help="update the progress bar and the training-loss curve every this many iterations",
    )
    r.add_argument(
        "--val-tile-out",
        type=positive_int,
        default=d("val_tile_out"),
        help="validation output tile size in px (default: the training output size)",
    )
    r.add_argument(
        "--normalisation",
        choices=choice_values(Normalisation),
        default=DEFAULT_NORMALISATION.value,
        help="grey-value normalisation of the on-the-fly tiles and validation slices (--train sets must be "
        "made with the same 'unet augment --normalisation'); stored in model.pt, which 'unet predict' then uses",
    )
    r.add_argument(
        "--export-weights",
        choices=choice_values(ExportWeights),
        default=d("export_weights"),
        help="weights written to model.pt/model.ts: 'best' (default; the validation point with the lowest --val "
        "pixel error, with --val slices that are not the ones you score; without --val the last weights, with a "
        "warning) or 'last' (after the final iteration)",
    )
    r.add_argument("--device", default=d("device"), help="auto (CUDA when present), cpu, cuda or cuda:N")
    r.add_argument(
        "--precision",
        choices=choice_values(Precision),
        default=d("precision"),
        help="autocast precision on CUDA (auto: bf16 where supported); the CPU uses fp32, or bf16 "
             "where it has it natively (AMX/AVX512-BF16: about 2x faster steps, not bit-comparable to fp32)",
    )
    r.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="keep NCHW memory format (CUDA, CPU bf16)")
    r.add_argument("--compile", action="store_true", help="wrap the model in torch.compile (CUDA speed-up)")
    r.add_argument("--workers", type=worker_count, default=d("workers"),
                   help=f"data-loader worker processes (default {d('workers')})")


def run(args: argparse.Namespace) -> None:
    from unet_core.io.ngff import open_stack
    from unet_core.train.data import parse_validation_pair
    from unet_core.train.loop import train

    configure_threads(args.threads)
    spec = spec_from_args(args)  # --dims 3: (N, Z, H, W) sets from 'unet augment --dims 3', volumes validated whole
    pairs = [parse_validation_pair(text, what="--val") for text in args.val]
    train_pairs = [parse_validation_pair(text, what="--train-stacks") for text in args.train_stacks]

    def selection(text: str | None, stacks: list, what: str, needs: str) -> list[int] | None:
        if text is None:
            return None
        if not stacks:
            raise UserInputError(f"{what} {text!r}: selects slices of {needs} stacks, but none is given; "
                                 f"add {needs} or drop {what}")
        return parse_slices(text, min(open_stack(stack).shape[0] for stack, _ in stacks), what=what)

    slices = selection(args.val_slices, pairs, "--val-slices", "--val")
    train_slices = selection(args.train_slices, train_pairs, "--train-slices", "--train-stacks")
    config = TrainConfig.from_dict({f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    result = train(
        args.train,
        out_dir=args.out_dir,
        spec=spec,
        config=config,
        validation=pairs,
        val_slices=slices,
        resume=args.resume,
        restart_if_changed=args.restart_if_changed,
        train_stacks=train_pairs,
        train_slices=train_slices,
    )
    log.info("done: %d iterations on %s; last metrics %s", result.iterations, result.device, result.metrics)
