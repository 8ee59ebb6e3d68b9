"""``unet augment``: write the elastically deformed training set of one stack."""

from __future__ import annotations

import argparse

from unet_core.cli.common import (
    add_model_args,
    add_threads_arg,
    configure_threads,
    existing_path,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    spec_from_args,
)
from unet_core.common.errors import UserInputError
from unet_core.common.intensity import DEFAULT_NORMALISATION, Normalisation
from unet_core.common.slices import parse_slices
from unet_core.train.config import TILE_OUT

#: Default deformed samples per slice (``augment.samples_per_slice``); the deformation's defaults are
#: unet_core.augment.elastic.DeformParams' (not imported here: it needs torch; test_settings_agreement checks).
SAMPLES_PER_SLICE = 8
SEED = 0
#: The warp's default device: the CPU gives the reference bytes on every machine.
DEVICE = "cpu"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "augment",
        help="write K elastically deformed training samples per slice (seeded, reproducible)",
        description=(
            "Deform each selected slice K times (the paper's augmentation: displacements drawn "
            "from N(0, sigma^2) on a coarse grid, bicubic upsampling; plus rotation, flips, "
            "shifts and grey-value changes), with the image resampled bicubically or "
            "bilinearly and the labels by nearest neighbour, mirrored at image borders as in "
            "prediction. Classes and loss weights are recomputed from the deformed instances "
            "with the weights store's recipe. Samples are network input tiles for the output "
            "size --tile-out. Sample k of slice z depends only on (seed, z, k): the output is "
            "byte-identical for the same inputs and seed. With --dims 3 (the 3-D U-Net) samples are (Z, Y, X) "
            "tiles of the whole volume: displacements drawn in µm with the stack's voxel size (which must "
            "have been given at ingest), rotation about z only, trilinear image resampling, w(x) recomputed in "
            "µm with 6-connected separation; sample k depends only on (seed, k)."
        ),
    )
    p.add_argument("stack", type=existing_path, help="ingested stack (.ome.zarr from 'unet ingest')")
    p.add_argument("weights", type=existing_path, help="weights store of that stack (.zarr from 'unet weights')")
    p.add_argument("out", help="output training set (.zarr directory; replaced atomically)")
    p.add_argument("--samples-per-slice", type=positive_int, default=SAMPLES_PER_SLICE,
                   help=f"K deformed samples per source slice; with --dims 3, samples of the whole volume "
                        f"(default: {SAMPLES_PER_SLICE})")
    p.add_argument("--tile-out", type=positive_int, default=TILE_OUT,
                   help="network output size of a sample, pixels; the stored tile is the matching "
                        f"input size (default: {TILE_OUT}, train.tile_out's: 508 px tiles for a depth-4 network; "
                        "388 gives the paper's 572 px)")
    p.add_argument("--tile-out-z", type=positive_int, default=None,
                   help="--dims 3 only: network output extent of a sample along z, slices; the stored tile is "
                        "the matching input extent (default: the smallest valid size >= 8 for the --pool-z/--kernel-z "
                        "network)")
    p.add_argument("--seed", type=nonnegative_int, default=SEED, help=f"global random seed, integer >= 0 (default: {SEED})")
    p.add_argument("--slices", default=None,
                   help="source slices, e.g. '0-19' or '0,2,5-7' (default: all slices of the stack)")
    g = p.add_argument_group("deformation (defaults: the paper's settings)")
    g.add_argument("--sigma-px", type=nonnegative_float, default=10.0,
                   help="std of the coarse-grid displacement vectors, pixels (paper: 10; 0 = no elastic deformation)")
    g.add_argument("--sigma-um", type=nonnegative_float, default=None,
                   help="--dims 3 only: std of the coarse-grid displacement vectors, µm (default: --sigma-px times "
                        "the stack's in-plane voxel size)")
    g.add_argument("--grid", type=int, default=3,
                   help="coarse grid points per axis, >= 2 (paper: 3, i.e. a 3x3 grid over the tile)")
    g.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=True,
                   help="rotate each sample by a uniform random angle in [0, 360) degrees")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="flip y and x, each with probability 1/2")
    g.add_argument("--brightness", type=nonnegative_float, default=0.1,
                   help="max grey-value offset, in units of the normalised image (the std for the "
                        "z-score modes, the 1-99.8 %% range for slice-percentile) (0 = off)")
    g.add_argument("--contrast", type=nonnegative_float, default=0.1,
                   help="contrast factor drawn log-uniformly from [1/(1+c), 1+c] (0 = off)")
    g.add_argument("--gamma", type=nonnegative_float, default=0.0,
                   help="gamma drawn log-uniformly from [1/(1+g), 1+g], applied between the tile's "
                        "min and max grey value (0 = off)")
    g.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=True,
                   help="let tiles extend beyond the image, mirrored about the border pixel as in "
                        "prediction; --no-mirror keeps every sample inside the image")
    g.add_argument("--interpolation", choices=["bicubic", "bilinear"], default="bicubic",
                   help="image resampling (labels are always nearest neighbour); --dims 3 always resamples "
                        "trilinearly (torch has no tricubic mode)")
    p.add_argument("--normalisation", choices=[m.value for m in Normalisation], default=DEFAULT_NORMALISATION.value,
                   help="grey-value normalisation of the stored tiles: stack-zscore (default), slice-zscore or "
                        "slice-percentile (1-99.8 %%, per slice); training and prediction use the same")
    p.add_argument("--device", default=DEVICE,
                   help="torch device for the warp: 'cpu' (reference bytes), 'cuda', or 'auto' "
                        "(CUDA when available) (default: cpu)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also write a PNG grid of originals vs deformed samples (label outlines, "
                        "displacement grid) for the first few samples")
    p.add_argument("--plot-samples", type=positive_int, default=4,
                   help="rows in the --plot figure (default: 4)")
    add_model_args(p)
    add_threads_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from unet_core.augment.elastic import DeformParams
    from unet_core.augment.samples import augment
    from unet_core.common.device import out_of_gpu_memory
    from unet_core.io.ngff import open_stack

    threads = configure_threads(args.threads)
    spec = spec_from_args(args)
    if spec.dims == 2 and (args.tile_out_z is not None or args.sigma_um is not None):
        raise UserInputError(f"{'--tile-out-z' if args.tile_out_z is not None else '--sigma-um'}: applies to "
                             "--dims 3 only; leave it out or add --dims 3")
    params = DeformParams(
        sigma_px=args.sigma_px, grid=args.grid, rotate=args.rotate, flip=args.flip,
        brightness=args.brightness, contrast=args.contrast, gamma=args.gamma,
        mirror=args.mirror, interpolation=args.interpolation,
    )
    slices = None
    if args.slices is not None:
        slices = parse_slices(args.slices, open_stack(args.stack).shape[0], what="--slices")
    # a GPU out of memory: one line (the set and its figure are discarded before it is printed)
    with out_of_gpu_memory(f"deforming {args.tile_out}-px output samples on {args.device}, {threads} at once",
                           "lower --threads or --tile-out (train.tile_out), or use --device cpu"):
        augment(
            args.stack, args.weights, args.out,
            samples_per_slice=args.samples_per_slice, tile_out=args.tile_out, seed=args.seed,
            spec=spec, params=params, slices=slices, device=args.device,
            plot=args.plot, plot_samples=args.plot_samples, workers=threads, normalisation=args.normalisation,
            tile_out_z=args.tile_out_z, sigma_um=args.sigma_um,
        )
