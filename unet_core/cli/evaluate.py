"""``unet evaluate``: score a prediction against the stack's ground truth."""

from __future__ import annotations

import argparse
import math

from unet_core.cli.common import existing_path, finite_float, positive_int
from unet_core.common.slices import parse_slices
from unet_core.infer.slice_linking import LINK_MIN_IOU


def _thresholds(text: str) -> list[float]:
    """``0,0.1,...`` or ``START:STOP:STEP`` (inclusive) -> thresholds in [0, 1]."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if not (step > 0 and stop >= start and math.isfinite(start + stop + step)) or (stop - start) / step > 10000:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            values = [round(start + k * step, 10) for k in range(count)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected thresholds like 0:1:0.1 or 0.3,0.5,0.7, got {text!r}"
        ) from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"thresholds must lie in [0, 1], got {text!r}")
    return values


def _dims(text: str) -> int:
    """``2`` or ``3``."""
    if text.strip() not in ("2", "3"):
        raise argparse.ArgumentTypeError(f"expected 2 or 3, got {text!r}")
    return int(text)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a prediction against ground truth (pixel, IoU, Rand, objects, warping)",
        description=(
            "Score the prediction written by 'unet merge' against the ground-truth labels of the stack it "
            "was made on, slice by slice: pixel error, IoU per class and of the foreground, Dice, the ISBI "
            "2012 foreground-restricted Rand error and pixel error (best over thresholds of P(cell)), "
            "skimage's adapted Rand error, object precision/recall/F1 at IoU > 0.5, the cell tracking "
            "challenge's SEG and the warping error (Jain et al. 2010). Writes OUT_DIR/metrics.csv (per "
            "slice), OUT_DIR/metrics.json (dataset + per slice + the decision rule of every score) and "
            "OUT_DIR/overlays.png (worst and best slices). Binary labels: objects are the connected "
            "components of the foreground; instance labels: touching cells are separated by a 1-px "
            "background line as in training."
        ),
    )
    p.add_argument("prediction", type=existing_path,
                   help="prediction OME-Zarr from 'unet merge' (probabilities (c, z, y, x) + labels/segmentation)")
    p.add_argument("stack", type=existing_path,
                   help="the ingested stack (OME-Zarr with labels) the prediction was made on")
    p.add_argument("-o", "--out-dir", required=True,
                   help="output directory for metrics.csv, metrics.json and overlays.png (created if missing)")
    p.add_argument("--slices", default="all",
                   help="slices of the ingested stack to score, 0-based within it (not the source "
                        "file's numbers: a stack ingested from file slices 20-29 has slices 0-9), "
                        "e.g. 0-9 or 0,3,5-7 (default: all)")
    p.add_argument("--thresholds", type=_thresholds, default=None,
                   help="thresholds of P(cell) for the swept ISBI scores, as START:STOP:STEP (inclusive) or a "
                        "comma list, each in [0, 1] (default 0:1:0.1 as the ISBI 2012 Fiji script)")
    p.add_argument("--connectivity", type=int, choices=[4, 8], default=4,
                   help="pixel adjacency of connected components (cells); the background uses the other one "
                        "in the warping error (default 4, as the ISBI 2012 scripts)")
    p.add_argument("--no-warping", dest="warping", action="store_false",
                   help="skip the warping error (the slowest score: about 0.05 s per 512 x 512 slice and threshold)")
    p.add_argument("--overlays", type=positive_int, default=2,
                   help="number of worst and of best slices drawn in overlays.png (default 2 each)")
    p.add_argument("--rank-by", default="adapted_rand_error",
                   help="per-slice score that ranks slices for overlays.png (default adapted_rand_error; "
                        "any metrics.csv column, e.g. pixel_error, rand_error_fg, foreground_iou)")
    g = p.add_argument_group("3-D objects (volumes)")
    g.add_argument("--dims", type=_dims, default=None,
                   help="3: also score 3-D objects over the scored slices (one contiguous run of at least 2): "
                        "object precision/recall/F1 and SEG of (z, y, x) objects, an id being one cell across "
                        "its slices (names ending in _3d in metrics.json and the log; the per-slice scores keep "
                        "their names; metrics.csv and overlays.png stay per slice). The stack's instance ids must "
                        "each be one 6-connected piece (ids restarting on every slice are refused). 2: per slice "
                        "only. Default: the prediction's record (a 3-D merge writes dims 3), else 2")
    g.add_argument("--link-slices", action="store_true",
                   help="with --dims 3: also link the per-slice 2-D instances of a 2-D prediction (its "
                        "labels/instances, else the per-slice components of the argmax) into 3-D ids by mutual "
                        "best IoU between consecutive slices and score them as 3-D objects (*_linked_3d): the "
                        "2-D per-slice mode with linking, to compare with the 3-D mode")
    g.add_argument("--link-min-iou", type=finite_float, default=LINK_MIN_IOU,
                   help="IoU above which --link-slices joins two footprints in consecutive slices, in [0, 1) "
                        f"(default {LINK_MIN_IOU}, as Cellpose's stitch3D)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from unet_core.evaluate.score_inputs import ISBI_THRESHOLDS
    from unet_core.evaluate.scoring import evaluate
    from unet_core.io.ngff import open_stack

    slices = None
    if args.slices not in (None, "", "all"):
        n = open_stack(args.stack).shape[0]
        slices = parse_slices(args.slices, n, what=f"--slices for {args.stack}")
    evaluate(
        args.prediction, args.stack, args.out_dir,
        slices=slices,
        thresholds=args.thresholds if args.thresholds is not None else ISBI_THRESHOLDS,
        connectivity=args.connectivity,
        warping=args.warping,
        overlay_count=args.overlays,
        rank_by=args.rank_by,
        dims=args.dims,
        link_slices=args.link_slices,
        link_min_iou=args.link_min_iou,
    )
