"""``unet synth``: generate the embedded sample data (synthetic dense-cell TIFF stacks)."""

from __future__ import annotations

import argparse

from unet_core.cli.common import nonnegative_float, positive_int
from unet_core.common.errors import UserInputError


def _fraction(text: str) -> float:
    value = nonnegative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


# Defaults of unet_core.synth.scene.SynthParams, repeated here so that building the parser does not
# import numpy (keeps `unet --help` fast); tests/unit/test_synth.py checks they agree.
DEFAULTS = {
    "height": 512, "width": 512, "cell_size_px": 32.0, "density": 0.7, "irregularity": 0.6,
    "border": "bright", "border_contrast": 0.9, "border_width_px": 1.0, "gap_px": 0.0, "texture": 0.5,
    "illumination": 0.3, "blur_px": 1.0, "photons": 40.0, "read_noise": 1.5, "dtype": "uint8",
}
BORDER_STYLES = ("bright", "dark")
#: unet_core.synth.scene.SLICES and SEED, repeated for the same reason (test_settings_agreement checks).
SLICES, SEED = 8, 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = DEFAULTS
    p = sub.add_parser(
        "synth",
        help="generate a synthetic microscopy stack of dense, touching cells with instance labels",
        description=(
            "Render a stack of 2-D microscopy-like images of a dense cell culture (irregular, often "
            "touching cells with textured interiors and bright or dark membranes, uneven "
            "illumination, PSF blur, Poisson-Gaussian camera noise) and its instance ground truth, "
            "and write them as raw multi-page TIFF files (image and labels separately; BigTIFF "
            "above 2 GiB), page by page and atomically. Slice k depends only on (seed, k), so "
            "the same seed always gives the same bytes. The generation parameters are stored in "
            "each file's ImageDescription."
        ),
        epilog="example: unet synth --image data/synth/image.tif --labels data/synth/labels.tif "
               "--slices 3 --size 512 --seed 0",
    )
    p.add_argument("--image", required=True,
                   help="output image TIFF, axes (Z, Y, X), dtype --dtype (replaced if it exists)")
    p.add_argument("--labels",
                   help="output label TIFF, axes (Z, Y, X), uint16 instance ids (uint32 for more than "
                        "65534 cells per slice), 0 = background; omit to write the image only")
    p.add_argument("--slices", type=positive_int, default=SLICES, help=f"number of slices Z (default {SLICES})")
    p.add_argument("--size", type=positive_int, default=d["height"],
                   help=f"slice height Y in px, and width X unless --width is given (default {d['height']})")
    p.add_argument("--width", type=positive_int, help="slice width X in px (default: --size)")
    p.add_argument("--seed", type=int, default=SEED, help=f"random seed, an integer >= 0 (default {SEED})")
    p.add_argument("--dtype", choices=["uint8", "uint16"], default=d["dtype"],
                   help=f"image dtype; uint16 uses a 12-bit range 0..4095 (default {d['dtype']})")
    g = p.add_argument_group("cells")
    g.add_argument("--cell-size-px", type=nonnegative_float, default=d["cell_size_px"],
                   help=f"mean cell diameter in px (default {d['cell_size_px']:g})")
    g.add_argument("--density", type=_fraction, default=d["density"],
                   help="cell packing in (0, 1]: 1 = confluent, every cell touches its neighbours; "
                        f"lower = smaller cells with background gaps (default {d['density']:g})")
    g.add_argument("--irregularity", type=_fraction, default=d["irregularity"],
                   help="0..1, how much cell sides curve and cell sizes vary "
                        f"(0 = straight-sided polygons; default {d['irregularity']:g})")
    g.add_argument("--texture", type=_fraction, default=d["texture"],
                   help=f"0..1, granular cytoplasm texture and bright puncta (default {d['texture']:g})")
    g = p.add_argument_group("cell borders (membranes)")
    g.add_argument("--border", choices=BORDER_STYLES, default=d["border"],
                   help="membranes brighter (fluorescent membrane stain) or darker (phase contrast / "
                        f"EM-like) than the cell interiors (default {d['border']})")
    g.add_argument("--border-contrast", type=nonnegative_float, default=d["border_contrast"],
                   help="membrane amplitude relative to the mean interior intensity, in (0, 5] "
                        f"(default {d['border_contrast']:g})")
    g.add_argument("--border-width-px", type=nonnegative_float, default=d["border_width_px"],
                   help="standard deviation of the membrane profile in px "
                        f"(default {d['border_width_px']:g})")
    g.add_argument("--gap-px", type=nonnegative_float, default=d["gap_px"],
                   help="width of the ground-truth background band along every cell edge (the "
                        "visible membrane; 0 = labels fill the cells up to the edge, touching cells "
                        f"share an edge) in px (default {d['gap_px']:g})")
    g = p.add_argument_group("optics and camera")
    g.add_argument("--illumination", type=nonnegative_float, default=d["illumination"],
                   help="relative fall-off of the uneven illumination, 0..0.9 "
                        f"(default {d['illumination']:g})")
    g.add_argument("--blur-px", type=nonnegative_float, default=d["blur_px"],
                   help="standard deviation of the Gaussian PSF in px, 0 = no blur "
                        f"(default {d['blur_px']:g})")
    g.add_argument("--photons", type=nonnegative_float, default=d["photons"],
                   help="photons at the mean cell interior intensity; fewer = more Poisson noise "
                        f"(default {d['photons']:g})")
    g.add_argument("--read-noise", type=nonnegative_float, default=d["read_noise"],
                   help=f"camera read noise standard deviation in grey values (default {d['read_noise']:g})")
    g = p.add_argument_group("output")
    g.add_argument("--bigtiff", action=argparse.BooleanOptionalAction, default=None,
                   help="force BigTIFF (--bigtiff) or classic TIFF (--no-bigtiff); default: BigTIFF "
                        "for a file larger than 2 GiB")
    g.add_argument("--workers", type=positive_int, default=1,
                   help="processes rendering slices in parallel; the output does not depend on it "
                        "(default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from unet_core.synth.scene import SynthParams
    from unet_core.synth.tiffs import write_synth_tiffs

    if args.seed < 0:
        raise UserInputError(f"--seed: {args.seed} must be an integer >= 0")
    params = SynthParams(
        height=args.size, width=args.width or args.size, cell_size_px=args.cell_size_px,
        density=args.density, irregularity=args.irregularity, border=args.border,
        border_contrast=args.border_contrast, border_width_px=args.border_width_px,
        gap_px=args.gap_px,
        texture=args.texture, illumination=args.illumination, blur_px=args.blur_px,
        photons=args.photons, read_noise=args.read_noise, dtype=args.dtype,
    )
    write_synth_tiffs(
        args.image, args.labels, params, seed=args.seed, slices=args.slices,
        bigtiff=args.bigtiff, workers=args.workers,
    )
