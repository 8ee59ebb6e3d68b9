"""``unet ingest``: raw TIFF stacks -> chunked OME-Zarr."""

from __future__ import annotations

import argparse

from unet_core.common.labels import AUTO_KIND, LabelKind
from unet_core.common.slices import parse_slices


def _triple(text: str, *, what: str, kind: type) -> tuple:
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        values = tuple(kind(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: expected three numbers like 1,512,512, got {text!r}") from None
    if len(values) != 3 or not all(0 < v < float("inf") for v in values):  # NaN fails every comparison
        raise argparse.ArgumentTypeError(f"{what}: expected three finite positive numbers (z,y,x), got {text!r}")
    return values


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="convert a TIFF stack (+ labels) to chunked OME-Zarr",
        description=(
            "Convert a raw TIFF stack (multi-page TIFF, BigTIFF, OME-TIFF, ImageJ hyperstack, or a "
            "folder of single-page TIFFs) and optionally its label stack into one OME-Zarr (NGFF 0.5, "
            "Zarr v3) store: image at level 0 plus a 2x pyramid, labels under labels/gt, provenance "
            "and intensity statistics in the attributes. Reads one slice at a time; the output "
            "appears only when complete."
        ),
    )
    p.add_argument("image", help="image stack: a TIFF file or a folder of single-page TIFFs, axes (Z, Y, X)")
    p.add_argument("out", help="output store, e.g. results/NAME/stack.ome.zarr (replaced if it exists)")
    p.add_argument("--labels", help="label stack of the same shape: instance ids (0 = background) or a binary mask")
    p.add_argument("--label-kind", choices=[AUTO_KIND, *(k.value for k in LabelKind)], default=AUTO_KIND,
                   help="how to read the labels: auto = two distinct values -> binary mask "
                        "(larger value = cell interior, e.g. ISBI 2012's 255/0), otherwise instance ids")
    p.add_argument("--slices", default="all",
                   help="slices to keep, e.g. 0-19 or 0,3,5-7 (0-based, default: all)")
    p.add_argument("--chunks", default="1,512,512", type=lambda t: _triple(t, what="--chunks", kind=int),
                   help="Zarr chunk shape z,y,x in voxels (default 1,512,512)")
    p.add_argument("--voxel-size-um", type=lambda t: _triple(t, what="--voxel-size-um", kind=float),
                   help="voxel size z,y,x in micrometres (default: from the file; where it gives none, 1 µm "
                        "stands in, with a warning, and the stack records the size as not given, which "
                        "the 3-D stages (--dims 3) refuse)")
    p.add_argument("--name", help="dataset name for the metadata (default: the image file name)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from unet_core.io.ingest import ingest
    from unet_core.io.tiff import open_tiff_stack

    slices = None
    if args.slices not in (None, "", "all"):
        with open_tiff_stack(args.image) as stack:
            slices = parse_slices(args.slices, stack.shape[0], what=f"--slices for {args.image}")
    ingest(
        args.image, args.out, labels=args.labels, slices=slices, chunks=args.chunks,
        label_kind=args.label_kind, spacing_um=args.voxel_size_um, name=args.name,
    )
