"""``unet synth``: generate the embedded sample data (synthetic dense-cell TIFF stacks, or with
``--dims 3`` one synthetic 3-D volume of touching nuclei)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from unet_core.cli.common import nonnegative_float, positive_int
from unet_core.common.errors import UserInputError


def _fraction(text: str) -> float:
    value = nonnegative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def _dims(text: str) -> int:
    if text.strip() not in ("2", "3"):
        raise argparse.ArgumentTypeError(f"expected 2 or 3, got {text}")
    return int(text)


def _positive_floats(count: int) -> Callable[[str], tuple[float, ...]]:
    """Parser of ``count`` comma-separated finite positive numbers (``2,0.5,0.5``)."""

    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(t) for t in text.split(","))
        except ValueError:
            values = ()
        if len(values) != count or not all(0 < v < float("inf") for v in values):  # NaN fails both
            raise argparse.ArgumentTypeError(
                f"expected {count} positive numbers separated by commas, got {text!r}")
        return values

    return parse


class _Given(argparse.Action):
    """Store the value and remember that the option was given (``args.given``): with ``--dims 3``
    an option left out takes the 3-D default, and a 2-D-only option given is refused."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = frozenset(getattr(namespace, "given", frozenset()) | {self.dest})


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
# Defaults of unet_core.synth.volume.VolumeParams (--dims 3), repeated for the same reason
# (tests/unit/test_synth_volume.py checks they agree).
VOLUME_DEFAULTS = {
    "depth": 32, "height": 128, "width": 128, "spacing_um": [2.0, 0.5, 0.5], "nucleus_diameter_um": 10.0,
    "nuclei_per_1000um3": 0.6, "psf_sigma_um": [1.0, 0.3], "psf_growth": 1.5, "attenuation_length_um": 80.0,
    "photons": 20.0, "read_noise": 4.0, "dtype": "uint16",
}
#: Options of 2-D slices only, and of 3-D volumes only (dests).
ONLY_2D = ("cell_size_px", "density", "irregularity", "texture", "border", "border_contrast",
           "border_width_px",
           "gap_px", "illumination", "blur_px", "workers")
ONLY_3D = ("index", "voxel_size_um", "nucleus_diameter_um", "nuclei_per_1000um3", "psf_sigma_um",
           "psf_growth",
           "attenuation_length_um")


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
            "each file's ImageDescription. With --dims 3 it writes one 3-D volume instead: a "
            "confocal-like stack of dense, often touching nuclei (deformed ellipsoids, round in "
            "micrometres, so flattened in voxels along z at the default 2.0 x 0.5 x 0.5 um voxels), "
            "a PSF wider along z that widens with depth, attenuation with depth, Poisson-Gaussian "
            "noise, and 3-D instance labels (one id per nucleus across its slices, each one "
            "6-connected region); the voxel size is recorded in the TIFF (ImageJ description and "
            "resolution tags), where 'unet ingest' reads it. The volume depends only on (--seed, "
            "--index). Density, touching fraction and signal-to-noise ratio of the defaults: the "
            "docstring of unet_core.synth.volume."
        ),
        epilog="examples: unet synth --image data/synth/image.tif --labels data/synth/labels.tif "
               "--slices 3 --size 512 --seed 0;  unet synth --dims 3 --image vol/image.tif "
               "--labels vol/labels.tif --seed 1 (32 x 128 x 128 voxels)",
    )
    # every plain option records that it was given (args.given): see _Given
    p.register("action", None, _Given)
    p.register("action", "store", _Given)
    v = VOLUME_DEFAULTS
    p.add_argument("--dims", type=_dims, default=2,
                   help="2: a stack of independent 2-D slices (default); 3: one 3-D volume of nuclei")
    p.add_argument("--image", required=True,
                   help="output image TIFF, axes (Z, Y, X), dtype --dtype (replaced if it exists)")
    p.add_argument("--labels",
                   help="output label TIFF, axes (Z, Y, X), uint16 instance ids (uint32 for more than "
                        "65534 cells per slice), 0 = background; omit to write the image only")
    p.add_argument("--slices", type=positive_int, default=SLICES,
                   help=f"number of slices Z (default {SLICES}; --dims 3: the volume's depth, "
                        f"default {v['depth']})")
    p.add_argument("--size", type=positive_int, default=d["height"],
                   help=f"slice height Y in px, and width X unless --width is given (default {d['height']}; "
                        f"--dims 3: default {v['height']})")
    p.add_argument("--width", type=positive_int, help="slice width X in px (default: --size)")
    p.add_argument("--seed", type=int, default=SEED, help=f"random seed, an integer >= 0 (default {SEED})")
    p.add_argument("--dtype", choices=["uint8", "uint16"], default=d["dtype"],
                   help=f"image dtype; uint16 uses a 12-bit range 0..4095 (default {d['dtype']}; "
                        f"--dims 3: {v['dtype']})")
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
                        f"(default {d['photons']:g}; --dims 3: at depth 0, default {v['photons']:g})")
    g.add_argument("--read-noise", type=nonnegative_float, default=d["read_noise"],
                   help=f"camera read noise standard deviation in grey values (default {d['read_noise']:g}; "
                        f"--dims 3: {v['read_noise']:g})")
    _add_volume_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--bigtiff", action=argparse.BooleanOptionalAction, default=None,
                   help="force BigTIFF (--bigtiff) or classic TIFF (--no-bigtiff); default: BigTIFF "
                        "for a file larger than 2 GiB")
    g.add_argument("--workers", type=positive_int, default=1,
                   help="processes rendering slices in parallel; the output does not depend on it "
                        "(default 1)")
    p.set_defaults(func=run, given=frozenset())


def _add_volume_args(p: argparse.ArgumentParser) -> None:
    """The options of ``--dims 3`` only (their defaults: VOLUME_DEFAULTS)."""
    v = VOLUME_DEFAULTS
    g = p.add_argument_group("3-D volume (--dims 3 only)")
    g.add_argument("--index", type=int, default=0,
                   help="volume index, an integer >= 0: the volume depends only on (--seed, --index) "
                        "(default 0)")
    g.add_argument("--voxel-size-um", type=_positive_floats(3), default=tuple(v["spacing_um"]),
                   help="voxel size z,y,x in micrometres, written into the TIFFs "
                        f"(default {','.join(f'{x:g}' for x in v['spacing_um'])}: z 4x the in-plane size)")
    g.add_argument("--nucleus-diameter-um", type=nonnegative_float, default=v["nucleus_diameter_um"],
                   help=f"mean nucleus diameter in micrometres (default {v['nucleus_diameter_um']:g})")
    g.add_argument("--nuclei-per-1000um3", type=nonnegative_float, default=v["nuclei_per_1000um3"],
                   help="number density of nucleus centres per 1000 cubic micrometres; higher = more "
                        f"nuclei touch (default {v['nuclei_per_1000um3']:g})")
    g.add_argument("--psf-sigma-um", type=_positive_floats(2), default=tuple(v["psf_sigma_um"]),
                   help="standard deviation of the Gaussian PSF along z and in-plane at depth 0, "
                        f"micrometres (default {','.join(f'{x:g}' for x in v['psf_sigma_um'])})")
    g.add_argument("--psf-growth", type=nonnegative_float, default=v["psf_growth"],
                   help=f"relative widening of the PSF per 100 um of depth (default {v['psf_growth']:g})")
    g.add_argument("--attenuation-length-um", type=nonnegative_float, default=v["attenuation_length_um"],
                   help="depth over which the signal falls to 1/e, micrometres "
                        f"(default {v['attenuation_length_um']:g})")


def run(args: argparse.Namespace) -> None:
    if args.seed < 0:
        raise UserInputError(f"--seed: {args.seed} must be an integer >= 0")
    wrong = ONLY_3D if args.dims == 2 else ONLY_2D
    given = sorted(dest for dest in args.given if dest in wrong)
    if given:
        option = "--" + given[0].replace("_", "-")
        raise UserInputError(f"{option}: applies to --dims {5 - args.dims} only, not --dims {args.dims}; "
                             "leave it out or change --dims")
    if args.dims == 3:
        _run_volume(args)
        return
    from unet_core.synth.scene import SynthParams
    from unet_core.synth.tiffs import write_synth_tiffs

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


def _run_volume(args: argparse.Namespace) -> None:
    """``--dims 3``: one volume; options left out take VolumeParams' defaults."""
    from unet_core.synth.tiffs import write_synth_volume_tiffs
    from unet_core.synth.volume import VolumeParams

    given = {dest: getattr(args, dest) for dest in args.given}
    names = {"slices": "depth", "size": "height", "voxel_size_um": "spacing_um"}
    fields = {names.get(dest, dest): value for dest, value in given.items()
              if names.get(dest, dest) in VOLUME_DEFAULTS and dest != "width"}
    if "size" in given or "width" in given:
        fields["width"] = args.width or args.size
    if args.index < 0:
        raise UserInputError(f"--index: {args.index} must be an integer >= 0")
    params = VolumeParams(**fields)
    write_synth_volume_tiffs(args.image, args.labels, params, seed=args.seed, index=args.index,
                             bigtiff=args.bigtiff)
