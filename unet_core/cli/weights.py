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


def _dims(text: str) -> int:
    if text.strip() not in ("2", "3"):
        raise argparse.ArgumentTypeError(f"expected 2 or 3, got {text!r}")
    return int(text)


def _dims_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--dims", type=_dims, default=2,
                   help=f"2 (default): {what} slice by slice, as the paper; 3: the stack as one (Z, Y, X) "
                        "volume (the 3-D U-Net): separation surfaces where two cells share a voxel face "
                        "(6-connectivity). Needs a stack of several slices whose voxel size was given at "
                        "ingest, and instance labels with one id per cell across its slices")


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
    _dims_arg(c, "classes")
    _scheduler_args(c)
    c.set_defaults(func=run_class_weights)

    p = sub.add_parser(
        "weights",
        help="loss weight map w(x) = w_c + w0 exp(-(d1+d2)^2 / 2 sigma^2) of a stack",
        description=(
            "Compute the U-Net paper's pixel-wise loss weights for every slice of an ingested stack with "
            "Dask (chunk-parallel map_overlap, halo from w0, sigma and the tolerance) and write OUT.zarr "
            "with arrays weights (float32), classes (uint8, 1 = cell interior) and instances (int32), "
            "chunked like the labels, plus a PNG of one slice next to it (labels | w_c | border term | w). "
            "With --dims 3 the stack is one volume: classes with separation surfaces between cells that "
            "share a voxel face, w(x) with d1, d2 in µm from the stack's voxel size and --sigma-um, chunk by "
            "chunk with a z halo, equal to one pass over the whole volume."
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
    p.add_argument("--sigma-px", type=_positive_float, help="decay length of the border term, pixels (default 5; "
                                                            "2-D only)")
    p.add_argument("--sigma-um", type=_positive_float,
                   help="decay length of the border term in micrometres, with --dims 3 (required there): d1, d2 "
                        "and the cutoff are measured in µm with the stack's voxel size (the paper's 5 px are "
                        "5 times the in-plane voxel size)")
    p.add_argument("--tolerance", type=_positive_float, default=1e-3,
                   help="largest allowed absolute error of w versus the untruncated formula; sets the "
                        "cutoff sigma*sqrt(2 ln(w0/tolerance)) (px; µm with --dims 3) and the Dask halo (default 1e-3)")
    p.add_argument("--border-pixels", choices=["background", "all"], default="background",
                   help="pixels that receive the border term: background as in the paper (default) or all")
    p.add_argument("--method", choices=["auto", "kdtree", "bbox"], default="auto",
                   help="d1/d2 algorithm (identical results): auto picks the faster by estimated cost")
    _connectivity_arg(p)
    _dims_arg(p, "w(x)")
    p.add_argument("--plot-slice", type=int, default=0,
                   help="slice index (0-based) of the PNG written next to OUT (default 0; -1: no plot)")
    _scheduler_args(p)
    p.set_defaults(func=run)


def run_class_weights(args: argparse.Namespace) -> None:
    from unet_core.weights.blockwise import dask_scheduler, write_class_weights

    with dask_scheduler(args.scheduler, workers=args.threads):
        write_class_weights(args.stacks, args.out, connectivity=args.connectivity, dims=args.dims)


def weight_params(args: argparse.Namespace):  # -> WeightParams | VolumeWeightParams
    """The w(x) parameters the options ask for: px in 2-D, µm with --dims 3.

    Raises:
        UserInputError: an option of the other mode (one line naming it).
    """
    from unet_core.common.errors import UserInputError
    from unet_core.weights.maps import PRESETS, VolumeWeightParams
    from unet_core.weights.recipe import WeightParams

    if args.dims == 3:
        for option, value in (("--sigma-px", args.sigma_px), ("--preset", args.preset)):
            if value is not None:
                raise UserInputError(f"{option}: a 2-D setting (pixels); with --dims 3 give --sigma-um")
        if args.sigma_um is None:
            raise UserInputError("--dims 3 needs --sigma-um (the border term's decay length in µm)")
        return VolumeWeightParams(sigma_um=args.sigma_um, w0=WeightParams.w0 if args.w0 is None else args.w0,
                                  tolerance=args.tolerance, border_pixels=args.border_pixels, method=args.method)
    if args.sigma_um is not None:
        raise UserInputError("--sigma-um: a 3-D setting (µm); give it with --dims 3, or --sigma-px in 2-D")
    base = PRESETS[args.preset or "paper"]
    return WeightParams(
        w0=base["w0"] if args.w0 is None else args.w0,
        sigma_px=base["sigma_px"] if args.sigma_px is None else args.sigma_px,
        tolerance=args.tolerance, connectivity=args.connectivity,
        border_pixels=args.border_pixels, method=args.method,
    )


def run(args: argparse.Namespace) -> None:
    from unet_core.weights.blockwise import dask_scheduler, read_class_weights, write_weights

    params = weight_params(args)
    class_weights = read_class_weights(args.class_weights) if args.class_weights else None
    with dask_scheduler(args.scheduler, workers=args.threads):
        write_weights(args.stack, args.out, params=params, class_weights=class_weights,
                      plot_slice=None if args.plot_slice < 0 else args.plot_slice)
