"""Export a trained model as a bioimage.io model package (format 0.5), for the model zoo's consumers.

``unet export-bioimageio MODEL.pt OUT.zip --sample STACK.ome.zarr[:z]`` writes one zip that
bioimage.io.core (Python), ilastik, deepImageJ (Fiji) and QuPath open. What it holds:

* ``rdf.yaml``: name, description, authors, citations (the U-Net paper; this project), license,
  tags, the input and output tensors with their axes and geometry, the preprocessing that stands
  for the model's normalisation, and the weights entries;
* the network three ways: a ``pytorch_state_dict`` with its architecture source
  (:mod:`unet_core.export.packaged_unet`, standalone), ``torchscript`` and ``onnx``. All three are
  :class:`~unet_core.export.packaged_unet.PackagedUNet`: the input mirrored by the network's
  context, the decision rule's logit offsets and the softmax inside, so the output is the class
  probabilities ``unet predict`` computes, one value per input pixel;
* test input and output tensors (``.npy``) from a crop of one slice of the sample stack, the output
  computed through the package's own preprocessing (statistics of the test input itself, as a
  consumer computes them) and the packaged network; the same crop as TIFF sample tensors; a cover
  image (the crop and its prediction); the documentation, from the model card.

Geometry (:func:`geometry`): inputs of ``2**depth * k`` px per axis; the output has the input's size
and a halo of the network's context rounded up to ``2**depth``. bioimage.io.core then cuts blocks
whose inner parts start on multiples of ``2**depth``, so every 2x2 max-pool sees the pixel pairs of
one whole-image pass and its block-wise prediction equals its whole-image prediction
(``tests/unit/test_bioimageio_export.py``; its whole-image path computes the preprocessing's statistics on
the image padded by the halo, its block-wise path on the image: they then differ by that alone, 3e-4
in probability on the test's image). A valid-convolution net described directly (input size
``{min: 188, step: 16}``, output offset -184) predicted whole images but failed block-wise in
bioimage.io.core 0.11.0 ("Block data shape does not match block meta information").

Preprocessing (:func:`preprocessing`): ``slice-percentile`` is ``scale_range`` over (y, x) at 1 / 99.8
percent; ``slice-zscore`` is ``zero_mean_unit_variance`` over (y, x); both differ from ours only by
the spec's ``eps`` (1e-6 added to the divisor), on constant or saturated slices, and where a consumer
gives a part of a slice (its statistics are then the part's; ours are always the whole slice's).
``stack-zscore`` (each predicted stack's own mean and std) has no spec operation: the package uses
``zero_mean_unit_variance`` over (y, x), each image's own statistics, inexact where slices differ in
brightness. (Over (batch, y, x) bioimage.io.core switches to running "dataset" statistics, which
made its block-wise prediction differ from its whole-image one.) The package's documentation
states, for every mode, how often the package's decision (argmax) on the test crop agrees with
``unet predict``'s on the same pixels with the sample stack's stored statistics (:func:`agreement`).
"""

from __future__ import annotations

import getpass
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet_core import __version__
from unet_core.common.atomic import atomic_output
from unet_core.common.errors import UserInputError
from unet_core.common.intensity import PERCENTILES, Normalisation, Scaling
from unet_core.common.outputs import ZipMark, claim_outputs
from unet_core.export import packaged_unet
from unet_core.export.documentation import documentation, validation_scores
from unet_core.infer.tiling import round_up, tile_margins
from unet_core.io.ngff import open_stack
from unet_core.model import onnx_network
from unet_core.model.checkpoint import STATE_MARK, load_model
from unet_core.model.package import PACKAGE_FORMAT
from unet_core.model.spec import Padding, UNetSpec
from unet_core.model.unet import UNet

log = logging.getLogger(__name__)

#: What the rdf of a package this module wrote holds (``config.unet_pipeline.format``): its mark.
FORMAT = PACKAGE_FORMAT
PACKAGE_MARK = ZipMark("rdf.yaml", "a bioimage.io package written by 'unet export-bioimageio'",
                       contains=FORMAT.encode())
UNET_PAPER_DOI = "10.1007/978-3-319-24574-4_28"
#: Edge of the test tensor's crop (px, rounded down to 2**depth): small files, quick package tests.
TEST_CROP_PX = 256
#: The spec's eps of scale_range and zero_mean_unit_variance (its default; bioimage.io.core uses it).
SPEC_EPS = 1e-6
INPUT_ID, OUTPUT_ID = "raw", "probabilities"
#: Largest error of the spec's normalisation against ours on a constant slice is unbounded: named in docs.
ONNX_OPSET = onnx_network.ONNX_OPSET


@dataclass(frozen=True)
class Geometry:
    """How the packaged network's tensors are described (see the module docstring).

    Attributes:
        step: input sizes are positive multiples of this (2**depth).
        pad_before, pad_after: mirrored pixels the packaged network adds before / after each axis.
        halo: output pixels per side a block-wise consumer discards (a multiple of ``step``).
        exact: whether block-wise prediction equals one whole-image pass (valid padding).
    """

    step: int
    pad_before: int
    pad_after: int
    halo: int
    exact: bool

    @property
    def min_size(self) -> int:
        """The smallest input the package declares: the spec wants more than two halos per axis."""
        return 2 * self.halo + self.step

    def crop_edge(self, extent: int) -> int:
        """The test crop's edge along an axis of ``extent`` px: the largest declared size up to
        :data:`TEST_CROP_PX` (at least the smallest), within ``extent`` (0: none fits)."""
        want = min(extent, max(TEST_CROP_PX, self.min_size))
        return 0 if want < self.min_size else self.min_size + (want - self.min_size) // self.step * self.step


def geometry(spec: UNetSpec) -> Geometry:
    """The package's geometry for ``spec``, from the overlap-tile margins of the inference engine
    (:func:`unet_core.infer.tiling.tile_margins`): the same context and surplus output pixels."""
    step = spec.stride
    if spec.padding is Padding.SAME:
        return Geometry(step, 0, 0, round_up(spec.receptive_field_radius, step), exact=False)
    before, after = tile_margins(spec, step)
    if any(tile_margins(spec, step * k) != (before, after) for k in (2, 3, 7)):  # constant for every k
        raise AssertionError(f"tile margins of {spec} depend on the tile size")
    return Geometry(step, before, after, round_up(max(before, after), step), exact=True)


@dataclass(frozen=True)
class Sample:
    """The stack slice the test tensors come from: ``raw`` a (Y, X) crop of slice ``z``, and the
    normalisation ``unet predict`` gives that slice (from the statistics ingest stored)."""

    path: Path
    z: int
    raw: np.ndarray
    scaling: Scaling


def parse_sample(text: str) -> tuple[Path, int | None]:
    """``STACK.ome.zarr`` or ``STACK.ome.zarr:z`` -> (path, z or None)."""
    head, sep, tail = text.rpartition(":")
    if sep and tail.strip().lstrip("-").isdigit() and head:
        return Path(head), int(tail)
    return Path(text), None


def read_sample(path: Path, z: int | None, spec: UNetSpec, mode: Normalisation) -> Sample:
    """A centred crop of slice ``z`` (None: the middle slice) of an ingested stack, of the size
    :meth:`Geometry.crop_edge` chooses.

    Raises:
        UserInputError: not a stack written by 'unet ingest', no slice ``z``, or a slice smaller
            than the package's smallest input.
    """
    stack = open_stack(path)
    depth = stack.shape[0]
    z = depth // 2 if z is None else z
    if not 0 <= z < depth:
        raise UserInputError(f"{path}: --sample asks for slice {z}, but the stack has slices 0-{depth - 1}")
    geo = geometry(spec)
    edges = [geo.crop_edge(n) for n in stack.shape[1:]]
    if min(edges) < 1:
        raise UserInputError(f"{path}: slices of {stack.shape[1]} x {stack.shape[2]} px are smaller than the "
                             f"{geo.min_size} px the package's smallest input needs (two halos of {geo.halo} px and "
                             f"2**depth); give a larger sample stack")
    start = [(n - e) // 2 for n, e in zip(stack.shape[1:], edges)]
    raw = np.asarray(stack.image[z, start[0]:start[0] + edges[0], start[1]:start[1] + edges[1]])
    return Sample(path, z, raw, stack.scaler(mode)(z))


def checked_model(path: Path) -> tuple[UNet, dict[str, Any]]:
    """The model and metadata of a ``model.pt``; a training state (``state.pt``) is refused.

    Raises:
        CheckpointError / UserInputError: missing, damaged or not a model file of ours.
    """
    if path.is_file() and STATE_MARK.recognises(path):
        raise UserInputError(f"{path}: a training state (state.pt), not a model; give the model.pt that "
                             "'unet train' writes beside it when the run finishes")
    model, metadata = load_model(path)
    if model.spec.dims != 2:
        raise UserInputError(f"{path}: a 3-D model (model.dims 3); bioimage.io packages (and their ONNX weights) "
                             "are made of 2-D models only in this version")
    return model, metadata


def spec_scaling(raw: np.ndarray, mode: Normalisation) -> Scaling:
    """The affine map the package's preprocessing applies to ``raw`` (one test image), as
    bioimage.io.core computes it: statistics of the image itself, ``eps`` added to the divisor."""
    x = np.asarray(raw, np.float64)
    if mode is Normalisation.SLICE_PERCENTILE:
        low, high = np.percentile(x, PERCENTILES)
        return Scaling(float(low), float(high - low) + SPEC_EPS)
    return Scaling(float(x.mean()), float(x.std()) + SPEC_EPS)


def preprocessing(mode: Normalisation) -> list[Any]:
    """The spec's preprocessing that stands for ``mode`` (see the module docstring)."""
    from bioimageio.spec.model import v0_5

    yx = [v0_5.AxisId("y"), v0_5.AxisId("x")]
    if mode is Normalisation.SLICE_PERCENTILE:
        return [v0_5.ScaleRangeDescr(kwargs=v0_5.ScaleRangeKwargs(
            axes=yx, min_percentile=PERCENTILES[0], max_percentile=PERCENTILES[1], eps=SPEC_EPS))]
    return [v0_5.ZeroMeanUnitVarianceDescr(kwargs=v0_5.ZeroMeanUnitVarianceKwargs(axes=yx, eps=SPEC_EPS))]


def packaged_network(model: UNet, metadata: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The :class:`PackagedUNet` holding ``model``'s weights, and its constructor's keyword arguments."""
    spec, geo = model.spec, geometry(model.spec)
    offsets = (metadata.get("decision") or {}).get("logit_offsets")
    kwargs = {"depth": spec.depth, "base_channels": spec.base_channels, "in_channels": spec.in_channels,
              "n_classes": spec.n_classes, "padding": spec.padding.value, "norm": spec.norm.value,
              "pad_before": geo.pad_before, "pad_after": geo.pad_after,
              "logit_offsets": None if offsets is None else [float(v) for v in offsets]}
    net = packaged_unet.PackagedUNet(**kwargs)
    net.net.load_state_dict(model.state_dict())
    return net.eval(), kwargs


def channel_names(spec: UNetSpec) -> list[str]:
    return ["background", "cell"] if spec.n_classes == 2 else [f"class{c}" for c in range(spec.n_classes)]


@dataclass(frozen=True)
class ExportOptions:
    """What the user says about the package (the CLI's options)."""

    name: str | None = None
    authors: Sequence[str] = ()
    license: str = "MIT"
    project_url: str | None = None
    description: str | None = None


def export_bioimageio(model_path: str | Path, out_path: str | Path, sample: str | Path, *,
                      z: int | None = None, options: ExportOptions = ExportOptions()) -> Path:
    """Write the bioimage.io package of ``model_path`` to ``out_path`` (a ``.zip``), atomically.

    Raises:
        UserInputError / CheckpointError: the bioimage.io extra is not installed, a bad model file,
            sample or output path (one line naming it); nothing is written.
    """
    model_path, out_path, sample = Path(model_path), Path(out_path), Path(sample)
    spec_module = require_extra()
    if out_path.suffix.lower() != ".zip":
        raise UserInputError(f"{out_path}: a bioimage.io package is a zip file; give an output path ending in .zip")
    claim_outputs([(out_path, PACKAGE_MARK)], [model_path, sample])
    model, metadata = checked_model(model_path)
    crop = read_sample(sample, z, model.spec, Normalisation.of_metadata(metadata.get("intensity_normalisation")))
    card = read_card(model_path)
    with tempfile.TemporaryDirectory(prefix="unet-bioimageio-") as folder:
        descr = described(Path(folder), model, metadata, crop, card=card, options=options, model_path=model_path)
        with atomic_output(out_path, own=PACKAGE_MARK) as tmp:
            spec_module.save_bioimageio_package(descr, output_path=tmp)
    log.info("wrote %s (%s, sample %s slice %d)", out_path, model_path, sample, crop.z)
    return out_path


def described(folder: Path, model: UNet, metadata: dict[str, Any], crop: Sample, *, card: dict[str, Any] | None,
              options: ExportOptions, model_path: Path) -> Any:
    """:func:`describe`, with a description the spec refuses (a value the user gave: --author, --license,
    --project-url, --name) as one line naming the field and the value."""
    from pydantic import ValidationError

    try:
        return describe(folder, model, metadata, crop, card=card, options=options, model_path=model_path)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())[:1]) or "description"
        raise UserInputError(f"{model_path}: bioimage.io refuses the package's {where} = "
                             f"{str(first.get('input'))[:80]!r}: {str(first.get('msg'))[:120]}; check --author (no '/'), "
                             "--license (an SPDX identifier such as MIT or CC-BY-4.0), --project-url (http(s) URL) "
                             "and --name") from None


def require_extra() -> Any:
    """``bioimageio.spec``, or one line saying how to install the optional dependencies."""
    try:
        import bioimageio.spec as spec_module
        from loguru import logger
    except ImportError as err:
        raise UserInputError(f"bioimage.io export needs the optional dependencies ({err.name} is missing): "
                             "pip install 'unet-pipeline[bioimageio]'") from None
    logger.disable("bioimageio")  # its progress lines; our errors stay one line
    return spec_module


def read_card(model_path: Path) -> dict[str, Any] | None:
    """The model card 'unet train' wrote beside ``model_path`` (None: none, or not readable)."""
    from unet_core.train.outputs import CARD_FILE, CARD_FORMAT

    try:
        card = json.loads((model_path.parent / CARD_FILE).read_text())
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) and card.get("format") == CARD_FORMAT else None


def describe(folder: Path, model: UNet, metadata: dict[str, Any], crop: Sample, *, card: dict[str, Any] | None,
             options: ExportOptions, model_path: Path) -> Any:
    """Write the package's files to ``folder`` and return the validated model description."""
    from bioimageio.spec.model import v0_5

    mode = Normalisation.of_metadata(metadata.get("intensity_normalisation"))
    net, kwargs = packaged_network(model, metadata)
    files, probabilities = write_files(folder, net, crop, mode)
    geo = geometry(model.spec)
    agree = agreement(model, metadata, crop, probabilities)
    name = options.name or f"U-Net {model_path.parent.name or model_path.stem}"
    docs = folder / "README.md"
    docs.write_text(documentation(name, model.spec, metadata, card, mode, geo, crop, agree))
    return v0_5.ModelDescr(
        name=name,
        description=options.description or (
            f"U-Net (Ronneberger et al. 2015, depth {model.spec.depth}, {model.spec.base_channels} base channels) "
            f"for 2-D cell segmentation, trained with unet-pipeline {__version__}; outputs class probabilities"),
        authors=[v0_5.Author(name=a) for a in (options.authors or [getpass.getuser()])],
        cite=citations(options.project_url),
        license=options.license,
        git_repo=options.project_url,
        documentation=v0_5.FileDescr(source=docs),
        tags=["unet", "segmentation", "cells", "2d", "pytorch", "unet-pipeline", *tags_of(metadata)],
        covers=[v0_5.FileDescr(source=files["cover"])],
        inputs=[input_tensor(model.spec, mode, files)],
        outputs=[output_tensor(model.spec, geo, files)],
        weights=weights(files, kwargs),
        config=v0_5.Config(unet_pipeline={"format": FORMAT, "version": __version__, "normalisation": mode.value,
                                          "spec": model.spec.to_dict(), "exact_blockwise": geo.exact,
                                          # unet predict of the package reads it as model.pt's ('auto' merges)
                                          "median_object_area_px": metadata.get("median_object_area_px"),
                                          "validation": validation_scores(metadata, card),
                                          "argmax_agreement_with_unet_predict": agree,
                                          "sample": {"stack": str(crop.path), "z": crop.z}}),
    )


def tags_of(metadata: dict[str, Any]) -> list[str]:
    mode = Normalisation.of_metadata(metadata.get("intensity_normalisation"))
    return [mode.value]


def citations(project_url: str | None) -> list[Any]:
    from bioimageio.spec.model import v0_5

    cite = [v0_5.CiteEntry(text="Ronneberger, Fischer, Brox (2015). U-Net: Convolutional Networks for Biomedical "
                                "Image Segmentation. MICCAI 2015, LNCS 9351, 234-241", doi=v0_5.Doi(UNET_PAPER_DOI))]
    if project_url:
        cite.append(v0_5.CiteEntry(text=f"unet-pipeline {__version__}: a reproducible U-Net batch pipeline",
                                   url=project_url))
    return cite


def input_tensor(spec: UNetSpec, mode: Normalisation, files: dict[str, Path]) -> Any:
    from bioimageio.spec.model import v0_5

    geo = geometry(spec)
    size = v0_5.ParameterizedSize(min=geo.min_size, step=geo.step)
    return v0_5.InputTensorDescr(
        id=v0_5.TensorId(INPUT_ID),
        description=f"raw grey values of one 2-D image; sizes {geo.min_size} + {geo.step}*k px",
        axes=[v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=["raw"] if spec.in_channels == 1 else
                                                 [f"raw{c}" for c in range(spec.in_channels)]),
              v0_5.SpaceInputAxis(id=v0_5.AxisId("y"), size=size),
              v0_5.SpaceInputAxis(id=v0_5.AxisId("x"), size=size)],
        # numpy's reflect, the project's mirror convention; mode named: a default-valued field is left out of
        # the rdf, and "pad: {}" loads as constant (zero) padding in bioimageio.spec 0.5.12.0
        pad=v0_5.ReflectPadding(mode="reflect"),
        test_tensor=v0_5.FileDescr(source=files["test_input"]),
        sample_tensor=v0_5.FileDescr(source=files["sample_input"]),
        data=v0_5.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=preprocessing(mode),
    )


def output_tensor(spec: UNetSpec, geo: Geometry, files: dict[str, Path]) -> Any:
    from bioimageio.spec.model import v0_5

    def axis(name: str) -> Any:
        return v0_5.SpaceOutputAxisWithHalo(
            id=v0_5.AxisId(name), halo=geo.halo,
            size=v0_5.SizeReference(tensor_id=v0_5.TensorId(INPUT_ID), axis_id=v0_5.AxisId(name)))

    return v0_5.OutputTensorDescr(
        id=v0_5.TensorId(OUTPUT_ID),
        description="class probabilities (softmax of the logits plus the decision rule's offsets)",
        axes=[v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=channel_names(spec)), axis("y"), axis("x")],
        test_tensor=v0_5.FileDescr(source=files["test_output"]),
        sample_tensor=v0_5.FileDescr(source=files["sample_output"]),
        data=v0_5.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
    )


def weights(files: dict[str, Path], kwargs: dict[str, Any]) -> Any:
    from bioimageio.spec.model import v0_5

    torch_version = v0_5.Version(torch.__version__.split("+")[0])
    state = v0_5.PytorchStateDictWeightsDescr(
        source=files["state_dict"], pytorch_version=torch_version,
        architecture=v0_5.ArchitectureFromFileDescr(source=files["architecture"], callable="PackagedUNet",
                                                    kwargs=kwargs))
    return v0_5.WeightsDescr(
        pytorch_state_dict=state,
        torchscript=v0_5.TorchscriptWeightsDescr(source=files["torchscript"], pytorch_version=torch_version,
                                                 parent="pytorch_state_dict"),
        onnx=v0_5.OnnxWeightsDescr(source=files["onnx"], opset_version=ONNX_OPSET, parent="pytorch_state_dict"),
    )


def write_files(folder: Path, net: torch.nn.Module, crop: Sample, mode: Normalisation) -> dict[str, Path]:
    """The package's files (weights, architecture, test and sample tensors, cover) in ``folder``."""
    import tifffile

    from unet_core.export.cover import save_cover

    files = {name: folder / file for name, file in (
        ("architecture", "packaged_unet.py"), ("state_dict", "weights.pt"), ("torchscript", "weights.torchscript"),
        ("onnx", "weights.onnx"), ("test_input", "test_input.npy"), ("test_output", "test_output.npy"),
        ("sample_input", "sample_input.tif"), ("sample_output", "sample_output.tif"), ("cover", "cover.png"))}
    shutil.copyfile(packaged_unet.__file__, files["architecture"])
    torch.save(net.state_dict(), files["state_dict"])
    raw = crop.raw.astype(np.float32)[None, None]
    scaling = spec_scaling(crop.raw, mode)
    x = torch.from_numpy((raw - np.float32(scaling.offset)) / np.float32(scaling.scale))
    with torch.no_grad():
        probabilities = net(x).numpy()
    np.save(files["test_input"], raw)
    np.save(files["test_output"], probabilities)
    tifffile.imwrite(files["sample_input"], raw[0, 0])
    tifffile.imwrite(files["sample_output"], probabilities[0])
    save_cover(files["cover"], crop, probabilities[0])
    with warnings.catch_warnings():  # TorchScript and the TorchScript-based ONNX exporter are deprecated
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(net), files["torchscript"])
        export_onnx(net, x, files["onnx"])
    return files, probabilities[0]


def agreement(model: UNet, metadata: dict[str, Any], crop: Sample, probabilities: np.ndarray) -> float:
    """The fraction of the test crop's pixels where the package's decision (argmax of its test output
    ``probabilities``, (C, Y, X)) equals ``unet predict``'s with the stack's stored statistics."""
    from unet_core.infer.predict import predict_plane

    offsets = (metadata.get("decision") or {}).get("logit_offsets")
    edge = round_up(max(crop.raw.shape), model.spec.stride)
    ours = predict_plane(model, crop.raw, stats=crop.scaling, block_px=edge, tile_out=edge,
                         offsets=None if offsets is None else np.asarray(offsets, np.float32))[:, 0]
    return float(np.mean(ours.argmax(0) == probabilities.argmax(0)))


def export_onnx(net: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """The package's ONNX weights (:func:`unet_core.model.onnx_network.export_onnx`), named by its tensor ids."""
    onnx_network.export_onnx(net, example, path, input_name=INPUT_ID, output_name=OUTPUT_ID)
