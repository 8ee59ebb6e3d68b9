"""``unet predict``: one job of the chunk-parallel overlap-tile inference (the scatter)."""

from __future__ import annotations

import argparse

from unet_core.cli.common import (
    add_model_args,
    add_threads_arg,
    choice_values,
    configure_threads,
    expected_model,
    field_default,
    positive_int,
)
from unet_core.common.intensity import Normalisation
from unet_core.common.precision import Precision
from unet_core.infer.encoding import ProbabilityEncoding
from unet_core.infer.predict_settings import DEFAULT_BATCH, Backend, PredictSettings
from unet_core.infer.tiling import TTA
from unet_core.model.decision import Decision


def _d(name: str):
    """The default of a :class:`PredictSettings` field (written there once)."""
    return field_default(PredictSettings, name)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="predict class probabilities for one job's share of a stack's blocks",
        description=(
            "Overlap-tile inference (Ronneberger et al. 2015): each output tile is predicted from "
            "an input tile grown by the network's context, mirrored at the image border; tile "
            "origins are multiples of 2**depth, so the result equals one pass over the whole "
            "mirror-padded image. A 3-D model (model.dims 3) predicts (Z, Y, X) tiles the same way, "
            "mirrored along z too, in blocks of --block-z slices (test-time augmentation flips and rotates "
            "in the plane only; torch backend only). The stack is cut into chunk-aligned blocks; job I of N predicts "
            "its contiguous share and writes it to its own part store OUT_PART (resumable: a "
            "rerun redoes only unfinished blocks). Combine all parts with 'unet merge'."
        ),
    )
    p.add_argument("stack", help="ingested stack (.ome.zarr written by 'unet ingest')")
    p.add_argument("model", help="model file (model.pt from 'unet train'), or a bioimage.io model package (.zip or "
                                 "folder; unet export-bioimageio writes one; see README 'Sharing models')")
    p.add_argument("out_part", metavar="OUT_PART",
                   help="this job's part store (directory; created or resumed)")
    p.add_argument("--job", type=int, default=0, help="index I of this job, 0 <= I < N (default 0)")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="number N of jobs the blocks are shared by (default 1)")
    p.add_argument("--block-px", type=positive_int, default=_d("block_px"),
                   help=f"block edge in px, a multiple of 2**depth; also the output chunk edge (default {_d('block_px')})")
    p.add_argument("--tile-out", type=positive_int, default=_d("tile_out"),
                   help="largest output tile per network pass in px, a multiple of 2**depth; larger = "
                        f"less overlap FLOPs, more memory (default {_d('tile_out')}: 1.13x the ideal FLOPs for the "
                        "paper's net)")
    p.add_argument("--block-z", type=positive_int, default=_d("block_z"), metavar="SLICES",
                   help="3-D models only (model.dims 3): slices per block, a multiple of the network's z stride (the "
                        "product of its z pooling); also the output z chunk. Default: the stack's z chunk rounded up "
                        "to a multiple of the z stride. Refused for a 2-D model, which predicts one slice at a time")
    p.add_argument("--tile-z", type=positive_int, default=_d("tile_z"), metavar="SLICES",
                   help="3-D models only: largest output tile extent along z per network pass, slices, a multiple of "
                        "the z stride; larger = less z context recomputed, more memory (default: --block-z)")
    p.add_argument("--batch", type=positive_int, default=_d("batch"),
                   help=f"tiles per network pass (default: {DEFAULT_BATCH['cpu']} on the CPU, {DEFAULT_BATCH['cuda']} "
                        "on a GPU); memory grows with it")
    p.add_argument("--device", default=_d("device"),
                   help=f"auto (GPU if available), cpu, cuda or cuda:N (default {_d('device')})")
    p.add_argument("--precision", choices=choice_values(Precision), default=_d("precision"),
                   help="arithmetic: auto = bf16 autocast on a GPU, fp32 on the CPU; bf16 is honoured on a CPU "
                        "with native bf16 (AMX/AVX512-BF16), else fp32 with a warning")
    p.add_argument("--tta", choices=choice_values(TTA), default=_d("tta"),
                   help="test-time augmentation averaged per tile: none, flips (4) or d4 "
                        "(8 rotations/mirrors)")
    p.add_argument("--decision", choices=choice_values(Decision), default=_d("decision"),
                   help="corrected (default): add the model's weight-prior logit offsets (stored by "
                        "'unet train'; undo the bias that w(x) gives the argmax toward the heavily "
                        "weighted border class); raw: the network's plain softmax")
    p.add_argument("--probabilities", choices=choice_values(ProbabilityEncoding), default=_d("probabilities"),
                   help="storage of the probabilities: uint8 (default; round(255 p), 1 byte per class and "
                        "pixel), float16 (2 bytes) or float32 (4 bytes); the segmentation is always the "
                        "argmax of the full-precision probabilities")
    p.add_argument("--normalisation", choices=choice_values(Normalisation), default=_d("normalisation"),
                   help="grey-value normalisation; always the model's (stored in model.pt): a different "
                        "value is refused (default: the model's)")
    p.add_argument("--compile", action="store_true",
                   help="run the network through torch.compile: one graph per tile shape, compiled on first "
                        "use (tens of seconds); the same probabilities up to float rounding. Off by default: "
                        "benchmarks/gpu_check.py measures whether it pays on your GPU")
    p.add_argument("--backend", choices=choice_values(Backend), default=_d("backend"),
                   help="what runs the network: torch (default) or onnxruntime (the network exported to ONNX and "
                        "run by ONNX Runtime; CPU and fp32 only; needs the [bioimageio] extra; the same "
                        "probabilities up to float rounding). A foreign bioimage.io package's ONNX weights always "
                        "run on ONNX Runtime")
    p.add_argument("--cell-channel", default=_d("cell_channel"), metavar="NAME",
                   help="with a foreign bioimage.io package as MODEL: the name of its output channel that is the "
                        "cell class (default: the only channel of a one-channel output)")
    p.add_argument("--trust-torchscript", action="store_true",
                   help="run a bioimage.io package's TorchScript weights where it has no ONNX weights or state dict "
                        "of our architecture; TorchScript is code: only for packages you trust (default: refused)")
    add_threads_arg(p)
    add_model_args(p, check_only=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from unet_core.infer.predict import predict_job

    configure_threads(args.threads)
    settings = PredictSettings.from_options(args)  # each choice parsed once, here
    predict_job(args.stack, args.model, args.out_part, settings, job=args.job, jobs=args.jobs,
                expect=expected_model(args))
