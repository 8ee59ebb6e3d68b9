"""``unet class-weights`` and ``unet weights``: loss weight maps w(x) of the U-Net paper."""

from __future__ import annotations

import argparse

from unet_core.cli.common import add_threads_arg, existing_path, nonnegative_float


def _positive_float(text: str) -> float:
    value = nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a number > 0")
    return value


def _scheduler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", default="threads",
                   help="Dask scheduler: threads (default), processes, synchronous, or the address of a "
                        "dask.distributed scheduler such as tcp://host:8786")
    add_threads_arg(p)


def _connectivity_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connectivity", type=int, choices=[4, 8], default=4,
                   help="pixel neighbourhood of the connected components that turn binary masks into "
                        "cells (default 4; instance labels are used as they are)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "class-weights",
        help="global class frequencies of the training stacks -> class_weights.json",
        description=(
            "Count background and cell-interior pixels over every slice of all given training stacks "
            "(a Dask reduction; separation lines between touching cells count as background) and write "
            "the class weights w_c = 1 / (2 f_c), which make the mean weight over the training pixels 1."
        ),
    )
    c.add_argument("stacks", nargs="+", type=existing_path, help="ingested training stacks (.ome.zarr) with labels")
    c.add_argument("-o", "--out", required=True, help="output JSON file, e.g. results/class_weights.json")
    _connectivity_arg(c)
    _scheduler_args(c)
    c.set_defaults(func=run_class_weights)

    p = sub.add_parser(
        "weights",
        help="loss weight map w(x) = w_c + w0 exp(-(d1+d2)^2 / 2 sigma^2) of a stack",
        description=(
            "Compute the U-Net paper's pixel-wise loss weights for every slice of an ingested stack with "
            "Dask (chunk-parallel map_overlap, halo from w0, sigma and the tolerance) and write OUT.zarr "
            "with arrays weights (float32), classes (uint8, 1 = cell interior) and instances (int32), "
            "chunked like the labels, plus a PNG of one slice next to it (labels | w_c | border term | w)."
        ),
    )
    p.add_argument("stack", type=existing_path, help="ingested stack (.ome.zarr) with labels")
    p.add_argument("out", help="output Zarr store, e.g. results/NAME/weights.zarr (replaced if it exists)")
    p.add_argument("--class-weights", type=existing_path,
                   help="class_weights.json from 'unet class-weights' (default: frequencies of this stack alone)")
    p.add_argument("--preset", choices=["paper", "fiji"],
                   help="w0 and sigma of the paper (10, 5 px) or of the Fiji U-Net plugin (50, 6 px); "
                        "--w0/--sigma-px override it")
    p.add_argument("--w0", type=nonnegative_float, help="border weight at a zero-width gap (default 10)")
    p.add_argument("--sigma-px", type=_positive_float, help="decay length of the border term, pixels (default 5)")
    p.add_argument("--tolerance", type=_positive_float, default=1e-3,
                   help="largest allowed absolute error of w versus the untruncated formula; sets the "
                        "cutoff sigma*sqrt(2 ln(w0/tolerance)) px and the Dask halo (default 1e-3)")
    p.add_argument("--border-pixels", choices=["background", "all"], default="background",
                   help="pixels that receive the border term: background as in the paper (default) or all")
    p.add_argument("--method", choices=["auto", "kdtree", "bbox"], default="auto",
                   help="d1/d2 algorithm (identical results): auto picks the faster by estimated cost")
    _connectivity_arg(p)
    p.add_argument("--plot-slice", type=int, default=0,
                   help="slice index (0-based) of the PNG written next to OUT (default 0; -1: no plot)")
    _scheduler_args(p)
    p.set_defaults(func=run)


def run_class_weights(args: argparse.Namespace) -> None:
    from unet_core.weights.blockwise import dask_scheduler, write_class_weights

    with dask_scheduler(args.scheduler, workers=args.threads):
        write_class_weights(args.stacks, args.out, connectivity=args.connectivity)


def run(args: argparse.Namespace) -> None:
    from unet_core.weights.blockwise import dask_scheduler, read_class_weights, write_weights
    from unet_core.weights.maps import PRESETS
    from unet_core.weights.recipe import WeightParams

    base = PRESETS[args.preset or "paper"]
    params = WeightParams(
        w0=base["w0"] if args.w0 is None else args.w0,
        sigma_px=base["sigma_px"] if args.sigma_px is None else args.sigma_px,
        tolerance=args.tolerance, connectivity=args.connectivity,
        border_pixels=args.border_pixels, method=args.method,
    )
    class_weights = read_class_weights(args.class_weights) if args.class_weights else None
    with dask_scheduler(args.scheduler, workers=args.threads):
        write_weights(args.stack, args.out, params=params, class_weights=class_weights,
                      plot_slice=None if args.plot_slice < 0 else args.plot_slice)
