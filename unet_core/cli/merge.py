"""``unet merge``: combine the part stores of all predict jobs (the gather)."""

from __future__ import annotations

import argparse

from unet_core.cli.common import (
    nonnegative_int,
    nonnegative_int_or_auto,
    positive_float_or_auto,
    positive_int,
    unit_interval,
)
from unet_core.common.errors import UserInputError
from unet_core.infer.merge_settings import TiffContent
from unet_core.infer.instances import (
    MASK_THRESHOLD,
    SEED_EROSION_PX,
    SEED_THRESHOLD,
    WATERSHED_HALO_PX,
    InstanceMethod,
    SeedRule,
)

#: The rounds of a merge in pieces, in order (kept here so that 'unet --help' loads no merge code;
#: tests/unit/test_merge.py checks it equals unet_core.infer.merge.STEPS).
STEPS = ("start", "seeds", "number-seeds", "cells", "number-cells", "write", "finish")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge predict part stores into one OME-Zarr prediction (probabilities, labels)",
        description=(
            "Gather step of 'unet predict': checks that the parts come from one run and cover "
            "every block, then writes an OME-Zarr image of class probabilities (as predict stored "
            "them: uint8 codes by default; axes c, z, y, x, with a 2x pyramid), the argmax "
            "segmentation (labels/segmentation, uint8) and cell instances (labels/instances, "
            "uint32: 4-connected components of the cell class, or a seeded watershed within the mask "
            "of P(cell) with threshold or size-scaled distance seeds, per slice, merged across block "
            "borders), and optionally a table of cells (CSV). "
            "Every pass over pixels can run as K parallel pieces (--jobs K): without --step, all rounds "
            "run in this process; with --step STEP [--job k], one round (start; seeds, number-seeds for "
            "the watershed; cells; number-cells; write; finish), each piece a separate process or "
            "cluster job. The output is byte-identical for any number of predict jobs and merge pieces. "
            "Parts of a 3-D network (model.dims 3) give 3-D cells: one id per cell across its slices, the "
            "6-connected components of the cell class joined across block faces in z, y and x; the table of "
            "cells then has a volume (voxels, um^3), a z centroid and z bounds; --min-object-px counts voxels "
            "(give a number: auto is a 2-D area); the watershed runs in 3-D for them (erosion, distances and "
            "--seed-h-um in um, the halo as deep in um along z)."
        ),
    )
    p.add_argument("parts", nargs="+", metavar="PART", help="part stores of jobs 0..N-1, any order")
    p.add_argument("--stack", required=True, help="the stack the parts were predicted from (.ome.zarr)")
    p.add_argument("-o", "--out", required=True, help="output prediction (.ome.zarr; replaced atomically)")
    p.add_argument("--tiff", default=None, help="also export a (Z, Y, X) TIFF of --tiff-content to this file")
    p.add_argument("--tiff-content", choices=[c.value for c in TiffContent],
                   default="segmentation",
                   help="what the TIFF holds: segmentation (uint8 class), instances (uint32) or "
                        "cell-probability (float32, 0..1)")
    p.add_argument("--cells", default=None, metavar="CSV",
                   help="also write a table of cells: id, z, area (px, um^2), centroid, bounding box, mean intensity "
                        "(3-D cells: id, volume (voxels, um^3), z/y/x centroid (px, um), z/y/x bounding box, mean "
                        "intensity)")
    g = p.add_argument_group("instances")
    g.add_argument("--instances", choices=[m.value for m in InstanceMethod], default="components",
                   help="components (default): 4-connected components of the argmax cell class; watershed: "
                        "a seeded watershed of P(cell), which splits cells touching through a weak gap")
    g.add_argument("--min-object-px", type=nonnegative_int_or_auto, default=0,
                   help="instances of fewer pixels (after merging across blocks) become background: the specks "
                        "a network leaves at membranes and image borders (default 0: keep all); auto: 5 %% of the "
                        "median object area of the model's training labels")
    g.add_argument("--seeds", choices=[r.value for r in SeedRule], default="threshold",
                   help="watershed seed rule: threshold (default; P(cell) > --seed-threshold eroded by "
                        "--seed-erosion-px) or distance (h-maxima of depth --seed-h-px of the mask's smoothed "
                        "distance transform: one seed per blob whatever its size, for dense nuclei)")
    g.add_argument("--seed-h-px", type=positive_float_or_auto, default="auto",
                   help="distance seeds: depth h of the distance maxima, px; auto (default): 0.15 x the median "
                        "object radius of the model's training labels")
    g.add_argument("--seed-h-um", type=float, default=None,
                   help="distance seeds of 3-D cells (parts of a 3-D network): depth h of the distance maxima, um "
                        "(required there; e.g. 0.15 x the median cell radius); distances are then anisotropic, in um")
    g.add_argument("--seed-threshold", type=unit_interval, default=SEED_THRESHOLD,
                   help=f"watershed seeds: P(cell) above this ... (default {SEED_THRESHOLD})")
    g.add_argument("--seed-erosion-px", type=nonnegative_int, default=SEED_EROSION_PX,
                   help=f"... eroded this many px, so a thin bridge does not join two seeds (default {SEED_EROSION_PX})")
    g.add_argument("--mask-threshold", type=unit_interval, default=MASK_THRESHOLD,
                   help=f"watershed: pixels with P(cell) above this are cell (default {MASK_THRESHOLD})")
    g.add_argument("--halo-px", type=nonnegative_int, default=WATERSHED_HALO_PX,
                   help=f"watershed context around each block, px; exact for cells smaller than it "
                        f"(default {WATERSHED_HALO_PX}; 3-D cells: along z as deep in um, slices rounded up)")
    g = p.add_argument_group("pieces (large stacks, clusters)")
    g.add_argument("--jobs", type=positive_int, default=1,
                   help="K: every pass over pixels runs as K pieces, each a contiguous run of blocks (at most the "
                        "number of blocks); without --step they run one after another in this process")
    g.add_argument("--step", choices=list(STEPS), default=None,
                   help="run one round of a merge in pieces: start, seeds (watershed), number-seeds (watershed), "
                        "cells, number-cells, write, finish, in this order; seeds, cells and write run once per "
                        "piece (--job k), each as its own process or cluster job; give every step the same "
                        "arguments (default: all rounds here)")
    g.add_argument("--job", type=nonnegative_int, default=None,
                   help="the piece k (0 <= k < K) of a --step seeds, cells or write")
    g.add_argument("--work", default=None, metavar="DIR",
                   help="with --step: the folder that holds the rounds' records and the store being built "
                        "(default OUT.work; removed by finish)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from unet_core.infer.merge import MergeRequest, merge_parts, run_step
    from unet_core.infer.merge_settings import MergeSettings, WatershedSettings

    watershed = WatershedSettings(seed_threshold=args.seed_threshold, seed_erosion_px=args.seed_erosion_px,
                                  mask_threshold=args.mask_threshold, halo_px=args.halo_px, seeds=args.seeds,
                                  h_px=args.seed_h_px, h_um=args.seed_h_um)
    settings = MergeSettings(instances=args.instances, min_object_px=args.min_object_px, watershed=watershed,
                             tiff_content=args.tiff_content, jobs=args.jobs)
    if args.step is None:
        if args.job is not None or args.work is not None:
            raise UserInputError("--job and --work go with --step (without it, every round runs here)")
        merge_parts(args.parts, stack=args.stack, out=args.out, tiff=args.tiff, cells=args.cells, settings=settings)
        return
    request = MergeRequest.of(args.parts, stack=args.stack, out=args.out, tiff=args.tiff, cells=args.cells,
                              settings=settings)
    run_step(request, args.step, job=args.job, work=args.work)
