"""``unet export-bioimageio``: write a trained model as a bioimage.io model package."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-bioimageio",
        help="write a trained model as a bioimage.io package (Fiji/deepImageJ, ilastik, QuPath, bioimageio.core)",
        description=(
            "Write MODEL (a model.pt of 'unet train') as a bioimage.io model package (format 0.5, one zip): the "
            "network as PyTorch state dict (with its architecture source), TorchScript and ONNX, each with the "
            "input mirrored by the network's context, the decision rule and the softmax inside (output: class "
            "probabilities of the input's size); the preprocessing that stands for the model's normalisation; "
            "test tensors and a cover image from a crop of one slice of the sample stack; documentation from the "
            "model card (with its validation scores). Needs the optional dependencies: pip install "
            "'unet-pipeline[bioimageio]'. Check the package with 'bioimageio test OUT.zip'."
        ),
    )
    p.add_argument("model", help="model.pt written by 'unet train'")
    p.add_argument("out", help="the package to write (.zip); replaced only if it is an earlier package of this command")
    p.add_argument("--sample", required=True, metavar="STACK.ome.zarr[:z]",
                   help="an ingested stack (unet ingest) and optionally the slice z whose centre crop gives the "
                        "test tensors and the cover (default: the middle slice)")
    p.add_argument("--name", default=None, help="the package's name (default: 'U-Net <model folder>')")
    p.add_argument("--description", default=None, help="one-sentence description (default: generated)")
    p.add_argument("--author", action="append", default=None, dest="authors", metavar="NAME",
                   help="an author (repeat for several; default: the login name)")
    p.add_argument("--license", default="MIT", help="SPDX license identifier of the weights (default MIT)")
    p.add_argument("--project-url", default=None, metavar="URL",
                   help="where this project's code is published: cited beside the U-Net paper and given as the "
                        "package's git_repo (a citation needs a URL or DOI; without it only the paper is cited)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from unet_core.export.bioimageio import ExportOptions, export_bioimageio, parse_sample

    stack, z = parse_sample(args.sample)
    options = ExportOptions(name=args.name, authors=tuple(args.authors or ()), license=args.license,
                            project_url=args.project_url, description=args.description)
    export_bioimageio(args.model, args.out, stack, z=z, options=options)
