"""``unet merge``: combine the part stores of all predict jobs (the gather)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge predict part stores into one OME-Zarr prediction (probabilities, labels)",
        description=(
            "Gather step of 'unet predict': checks that the parts come from one run and cover "
            "every block, then writes an OME-Zarr image of class probabilities (float32, axes "
            "c, z, y, x, with a 2x pyramid), the argmax segmentation (labels/segmentation, "
            "uint8) and instance labels (labels/instances, uint32: 4-connected components of the "
            "cell class per slice, merged across block borders). Output is identical for any "
            "number of jobs."
        ),
    )
    p.add_argument("parts", nargs="+", metavar="PART", help="part stores of jobs 0..N-1, any order")
    p.add_argument("--stack", required=True, help="the stack the parts were predicted from (.ome.zarr)")
    p.add_argument("-o", "--out", required=True, help="output prediction (.ome.zarr; replaced atomically)")
    p.add_argument("--tiff", default=None, help="also export a (Z, Y, X) TIFF of --tiff-content to this file")
    p.add_argument("--tiff-content", choices=["segmentation", "instances", "cell-probability"],
                   default="segmentation",
                   help="what the TIFF holds: segmentation (uint8 class), instances (uint32) or "
                        "cell-probability (float32, 0..1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from unet_core.infer.merge import merge_parts

    merge_parts(args.parts, stack=args.stack, out=args.out, tiff=args.tiff, tiff_content=args.tiff_content)
