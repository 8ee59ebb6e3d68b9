"""bioimage.io model packages as the model of ``unet predict``, without running the package's code.

A package (a ``.zip``, or a folder holding ``rdf.yaml``; format 0.5) is read here and becomes a network
the overlap-tile engine tiles like our own (:func:`load_predict_model`), with its metadata in the form
``model.pt``'s takes (normalisation, decision offsets, median object area):

* **A state dict of our architecture** (a ``pytorch_state_dict`` whose architecture is called
  ``PackagedUNet``, as ``unet export-bioimageio`` writes): its tensors go into
  :class:`unet_core.model.unet.UNet` (the package's source file is never imported; the tensors load with
  ``torch.load(weights_only=True)``). A package of ours (``config.unet_pipeline``) then predicts exactly
  as its ``model.pt``: same architecture, weights, normalisation, logit offsets and median object area.
* **ONNX weights** of any other network run through ONNX Runtime (no package code runs).
* **TorchScript weights** are code: only with ``trust_torchscript`` (``--trust-torchscript``,
  ``predict.trust_torchscript``), else refused.

Anything else is refused with one line naming the file and what is unsupported (:class:`CheckpointError`):
a format other than 0.5, no rdf, several inputs or outputs, axes other than batch, one input channel,
output channels, y and x (time, z, index axes), a fixed input size, sizes whose step is not a power of
two, output sizes that are not the input's, preprocessing other than the two below, postprocessing other
than sigmoid or softmax over the channels, missing weights, a sha256 that does not match, a file
reference outside the package or on the network, a zip member with ``..`` or an absolute path, a zip
that expands past :data:`MAX_UNPACKED_BYTES`.

Preprocessing computable from the statistics ``unet ingest`` stores (per slice, over whole slices):
``scale_range`` over (y, x) at percentiles 1 / 99.8 is ``slice-percentile``; ``zero_mean_unit_variance``
over (y, x) is ``slice-zscore``; ``ensure_dtype`` float32 is a no-op. Both differ from the spec's by its
``eps`` (added to the divisor; ours adds none) and in that the statistics are the whole slice's, not
those of the image a consumer hands the package.

Geometry (:func:`package_spec`): the input's size step (a power of two, at least 2) is the tile
alignment ``2**depth``; the output's declared halo, rounded up to it (and grown so that the smallest
tile reaches the package's smallest input), is read around each tile
(:class:`unet_core.model.spec.PackageSpec`). The result then equals one whole-image pass as far as the
declared halo holds: exactly if the network's receptive field and alignment are within it, else
approximately. A sigmoid or softmax output's cell channel (``cell_channel``: a channel name; the only
channel of a one-channel output by default) becomes the engine's two classes, background = 1 - cell.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from unet_core.common.errors import CheckpointError
from unet_core.common.intensity import PERCENTILES, Normalisation
from unet_core.model.checkpoint import (
    ModelExpectation,
    check_architecture,
    checked_metadata,
    load_model,
    load_plain_data,
    model_from_state,
)
from unet_core.model.onnx_network import OnnxNetwork, onnx_session
from unet_core.model.spec import PackageSpec, Padding, UNetSpec

#: ``config.unet_pipeline.format`` of the packages ``unet export-bioimageio`` writes.
PACKAGE_FORMAT = "unet-pipeline/bioimageio-export/1"
RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
#: Largest total size of a zip package's members once unpacked, bytes (3 copies of the paper net's
#: 124 MB of weights are 347 MB): larger is refused as a possible zip bomb.
MAX_UNPACKED_BYTES = 4 * 2**30
MAX_RDF_BYTES = 2**20
#: Probabilities are clipped to [EPS, 1 - EPS] before they become logits (float64; exact elsewhere).
EPS = 1e-12
#: The engine's axis order of a network's input and output.
CANONICAL_AXES = ("batch", "channel", "y", "x")


def is_package(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is given as a bioimage.io package: a ``.zip`` file, a folder holding an rdf, or an
    rdf file. Decided by name, without opening the file (a model.pt is read once, for its hash and its
    loading together; it is a zip archive too, named ``.pt``)."""
    path = Path(path)
    if path.is_dir():
        return any((path / name).is_file() for name in RDF_NAMES)
    return path.suffix.lower() == ".zip" or path.name.endswith(RDF_NAMES)


def load_predict_model(path: str | os.PathLike[str], *, expect: ModelExpectation = None, digest: Any = None,
                       trust_torchscript: bool = False,
                       cell_channel: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network and metadata of a ``model.pt`` (:func:`load_model`) or of a bioimage.io package.

    Args:
        path: a ``model.pt``, or a package (zip, folder or its ``rdf.yaml``).
        expect: architecture keys the caller's config gives (checked against a network of ours; a
            foreign network has none to check, so any is refused).
        digest: a ``hashlib`` object fed the bytes the model comes from (a zip: the whole file; a folder:
            its rdf, then the weights file used).
        trust_torchscript: run a package's TorchScript weights (code) where it has no other usable ones.
        cell_channel: the output channel that is the cell class (a name of a foreign package's output).

    Returns:
        A network with a ``spec`` (a :class:`UNet`, or a :class:`PackageNetwork`), in eval mode on the CPU,
        and the metadata prediction uses.

    Raises:
        CheckpointError: one line naming the file and what cannot be run (see the module docstring).
    """
    if not is_package(path):
        return load_model(path, expect=expect, digest=digest)
    package = PackageFiles.open(Path(path), digest)
    rdf = package.rdf()
    tensors = _tensors(package, rdf)
    weights = rdf.get("weights")
    if not isinstance(weights, Mapping) or not weights:
        raise package.refuse("it names no weights")
    state = weights.get("pytorch_state_dict")
    architecture = state.get("architecture") if isinstance(state, Mapping) else None
    if isinstance(architecture, Mapping) and architecture.get("callable") == "PackagedUNet":
        return _our_architecture(package, rdf, state, tensors.mode, expect)
    if expect:
        raise package.refuse(f"the config's model keys {sorted(expect)} cannot be checked against a network "
                             "of another architecture; delete them from the config's model section")
    runner = _foreign_runner(package, weights, tensors.spec, trust_torchscript)
    cell = tensors.cell_index(cell_channel, package)
    net = PackageNetwork(runner, tensors.spec, tensors.input_axes, tensors.output_axes, cell, tensors.activation)
    _probe(net, len(tensors.channels), package)
    return net.eval(), {"intensity_normalisation": tensors.mode.value,
                        "package": {"weights": runner.kind, "cell_channel": tensors.channels[cell],
                                    "halo_px": tensors.spec.halo_px, "step_px": tensors.spec.stride}}


# -- the package's files ---------------------------------------------------------------------------


@dataclass
class PackageFiles:
    """The files of a package: a zip's members (read from its bytes in memory) or a folder's files."""

    path: Path
    folder: Path | None
    archive: zipfile.ZipFile | None
    rdf_name: str
    digest: Any

    @classmethod
    def open(cls, path: Path, digest: Any) -> PackageFiles:
        if path.is_file() and path.name.endswith(RDF_NAMES):
            return cls(path, path.parent, None, path.name, digest)
        if path.is_dir():
            return cls(path, path, None, next(n for n in RDF_NAMES if (path / n).is_file()), digest)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such model file or package")
        try:
            content = path.read_bytes()
        except OSError as err:
            raise CheckpointError(f"{path}: not readable ({err.strerror or err})") from None
        if digest is not None:
            digest.update(content)
        try:
            archive = zipfile.ZipFile(io.BytesIO(content))
        except zipfile.BadZipFile:
            raise CheckpointError(f"{path}: not a zip file; a bioimage.io package is a .zip (or a folder) "
                                  "holding rdf.yaml") from None
        name = next((n for n in RDF_NAMES if n in archive.namelist()), None)
        if name is None:
            raise CheckpointError(f"{path}: a zip without rdf.yaml at its top level, not a bioimage.io package")
        files = cls(path, None, archive, name, None)
        files.check_archive()
        return files

    def refuse(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: bioimage.io package: {problem}")

    def check_archive(self) -> None:
        """Refuse members outside the package's root (``..``, absolute) and more than the bound unpacked."""
        total = 0
        for info in self.archive.infolist():
            name = PurePosixPath(info.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts or ":" in info.filename:
                raise self.refuse(f"member {info.filename!r} points outside the package (path traversal)")
            total += info.file_size
        if total > MAX_UNPACKED_BYTES:
            raise self.refuse(f"its members unpack to {total / 2**30:.1f} GiB, more than the "
                              f"{MAX_UNPACKED_BYTES / 2**30:.0f} GiB allowed")

    def read(self, source: Any, *, sha256: str | None = None, limit: int = MAX_UNPACKED_BYTES) -> bytes:
        """The bytes of the package file ``source`` (a relative name), checked against ``sha256``."""
        if not isinstance(source, str) or not source.strip():
            raise self.refuse(f"file reference {source!r} is not a file name")
        name = PurePosixPath(source.strip())
        if "://" in source or name.is_absolute() or ".." in name.parts:
            raise self.refuse(f"file {source!r} is outside the package (only files inside it are read; "
                              "nothing is downloaded)")
        data = self._member(str(name).removeprefix("./"), source, limit)
        if sha256 is not None and hashlib.sha256(data).hexdigest() != str(sha256).lower():
            raise self.refuse(f"{source} does not match its sha256 in the rdf (damaged or altered)")
        return data

    def _member(self, name: str, source: str, limit: int) -> bytes:
        try:
            if self.archive is not None:
                info = self.archive.getinfo(name)
                with self.archive.open(info) as fh:
                    data = fh.read(min(limit, info.file_size) + 1)
                if len(data) != info.file_size or len(data) > limit:
                    raise self.refuse(f"{source} unpacks to more than its stated or allowed size")
                return data
            target = self.folder / name
            if target.stat().st_size > limit:
                raise self.refuse(f"{source} is larger than {limit} bytes")
            data = target.read_bytes()
        except KeyError:
            raise self.refuse(f"file {source!r} it names is missing") from None
        except FileNotFoundError:
            raise self.refuse(f"file {source!r} it names is missing") from None
        except (OSError, zipfile.BadZipFile, EOFError) as err:
            raise self.refuse(f"{source} is not readable ({str(err)[:80]})") from None
        if self.digest is not None:
            self.digest.update(data)
        return data

    def rdf(self) -> dict[str, Any]:
        """The rdf (YAML), checked to be a format-0.5 model description."""
        import yaml  # here: unet predict of a model.pt does not pay for it

        try:
            rdf = yaml.safe_load(self.read(self.rdf_name, limit=MAX_RDF_BYTES))
        except yaml.YAMLError as err:
            raise self.refuse(f"{self.rdf_name} is not valid YAML ({str(err).splitlines()[0][:80]})") from None
        if not isinstance(rdf, dict):
            raise self.refuse(f"{self.rdf_name} is not a mapping")
        if rdf.get("type") != "model":
            raise self.refuse(f"type {rdf.get('type')!r}, not a model")
        version = str(rdf.get("format_version", ""))
        if not version.startswith("0.5."):
            raise self.refuse(f"format_version {version or 'missing'!r} is not supported (0.5.x only; "
                              "bioimageio.spec's update_format converts 0.4 packages)")
        return rdf


# -- tensors: axes, geometry, pre- and postprocessing -----------------------------------------------


@dataclass(frozen=True)
class Tensors:
    """What the package says of its input and output tensor, as the engine needs it."""

    input_axes: tuple[str, ...]
    output_axes: tuple[str, ...]
    channels: tuple[str, ...]
    spec: PackageSpec
    mode: Normalisation
    activation: str | None

    def cell_index(self, cell_channel: str | None, package: PackageFiles) -> int:
        """The output channel of the cell class (``cell_channel``; the only one by default)."""
        if cell_channel is None:
            if len(self.channels) == 1:
                return 0
            raise package.refuse(f"its output has channels {list(self.channels)}: set predict.cell_channel "
                                 "(--cell-channel) to the one that is the cell class")
        if cell_channel not in self.channels:
            raise package.refuse(f"predict.cell_channel {cell_channel!r} is not one of its output channels "
                                 f"{list(self.channels)}")
        return self.channels.index(cell_channel)


def _tensors(package: PackageFiles, rdf: Mapping[str, Any]) -> Tensors:
    inputs, outputs = rdf.get("inputs"), rdf.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != 1 or len(outputs) != 1:
        raise package.refuse("one input and one output tensor are supported, it has "
                             f"{len(inputs) if isinstance(inputs, list) else 0} and "
                             f"{len(outputs) if isinstance(outputs, list) else 0}")
    source, target = inputs[0], outputs[0]
    input_axes, sizes = _input_axes(package, source)
    output_axes, channels, halo = _output_axes(package, target, str(source.get("id", "")))
    return Tensors(input_axes, output_axes, channels, package_spec(package, sizes, halo),
                   _preprocessing(package, source), _postprocessing(package, target))


def _axis_name(package: PackageFiles, axis: Any, where: str) -> str:
    kind = axis.get("type") if isinstance(axis, Mapping) else None
    if kind in ("batch", "channel"):
        return kind
    if kind == "space" and axis.get("id", "x") in ("y", "x"):
        return axis.get("id", "x")
    name = axis.get("id", kind) if isinstance(axis, Mapping) else axis
    raise package.refuse(f"{where} axis {name!r} ({kind}) is not supported (2-D images: batch, channel, y, x)")


def _input_axes(package: PackageFiles, tensor: Mapping[str, Any]) -> tuple[tuple[str, ...], dict[str, tuple[int, int]]]:
    """The input's axis order and, for y and x, (min, step) of its sizes."""
    axes, sizes = [], {}
    for axis in tensor.get("axes") or []:
        name = _axis_name(package, axis, "input")
        axes.append(name)
        if name == "channel" and len(axis.get("channel_names") or [None]) != 1:
            raise package.refuse(f"input has {len(axis['channel_names'])} channels; stacks have one")
        size = axis.get("size")
        if name in ("y", "x"):
            if not (isinstance(size, Mapping) and isinstance(size.get("min"), int) and isinstance(size.get("step"), int)
                    and size["min"] > 0 and size["step"] > 0):
                raise package.refuse(f"input axis {name} has size {size!r}; a size min + step*k is needed to tile")
            sizes[name] = (size["min"], size["step"])
    if sorted(sizes) != ["x", "y"] or len(set(axes)) != len(axes):
        raise package.refuse(f"input axes {axes}: one y and one x axis are needed")
    data = tensor.get("data") or {}
    if isinstance(data, Mapping) and data.get("type", "float32") != "float32":
        raise package.refuse(f"input data type {data.get('type')!r} is not supported (float32)")
    return tuple(axes), sizes


def _output_axes(package: PackageFiles, tensor: Mapping[str, Any],
                 input_id: str) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """The output's axis order, channel names and declared halo (px, the larger of y and x)."""
    axes, channels, halo = [], ("output",), 0
    for axis in tensor.get("axes") or []:
        name = _axis_name(package, axis, "output")
        axes.append(name)
        if name == "channel":
            channels = tuple(str(c) for c in axis.get("channel_names") or [])
        if name in ("y", "x"):
            size = axis.get("size")
            if not (isinstance(size, Mapping) and size.get("tensor_id") == input_id and size.get("axis_id") == name
                    and size.get("offset", 0) == 0 and axis.get("scale", 1.0) == 1.0):
                raise package.refuse(f"output axis {name} has size {size!r}; only outputs of the input's size "
                                     "are supported")
            halo = max(halo, int(axis.get("halo", 0) or 0))
    if sorted(a for a in axes if a in ("y", "x")) != ["x", "y"] or len(set(axes)) != len(axes) or not channels:
        raise package.refuse(f"output axes {axes}: one y and one x axis and named channels are needed")
    return tuple(axes), channels, halo


def package_spec(package: PackageFiles, sizes: Mapping[str, tuple[int, int]], halo: int) -> PackageSpec:
    """The tiling geometry from the package's sizes (min, step per axis) and declared output halo.

    The alignment is the larger step (at least 2, a power of two of which the other step is a divisor);
    the halo is the declared one rounded up to it, grown until the smallest tile (alignment + 2 halos)
    reaches each axis' minimum. Each minimum must be a multiple of its step, so every tile input
    (a multiple of the alignment) is a size the package declares.

    Raises:
        CheckpointError: a step that is not a power of two, or a minimum that is not a multiple of it.
    """
    steps = [step for _, step in sizes.values()]
    align = max(2, *steps)
    if align & (align - 1) or any(align % s for s in steps):
        raise package.refuse(f"input size steps {steps} px: a power of two is needed to align tiles")
    for name, (low, step) in sizes.items():
        if low % step:
            raise package.refuse(f"input axis {name}: smallest size {low} is not a multiple of its step {step}")
    need = max(low for low, _ in sizes.values())
    halo_px = max(_round_up(halo, align), _round_up(math.ceil(max(0, need - align) / 2), align))
    return PackageSpec(depth=align.bit_length() - 1, base_channels=1, in_channels=1, n_classes=2,
                       padding=Padding.SAME, dropout=0.0, halo_px=halo_px)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _steps(package: PackageFiles, tensor: Mapping[str, Any], key: str) -> list[tuple[str, dict[str, Any]]]:
    steps = tensor.get(key) or []
    if not isinstance(steps, list) or not all(isinstance(s, Mapping) for s in steps):
        raise package.refuse(f"{key} is not a list of operations")
    out = []
    for step in steps:
        kwargs = dict(step.get("kwargs") or {})
        if step.get("id") == "ensure_dtype" and kwargs.get("dtype") == "float32":
            continue  # the engine's input and our outputs are float32
        out.append((str(step.get("id")), kwargs))
    return out


def _preprocessing(package: PackageFiles, tensor: Mapping[str, Any]) -> Normalisation:
    """The normalisation the input's preprocessing stands for (see the module docstring)."""
    steps = _steps(package, tensor, "preprocessing")
    if len(steps) == 1:
        op, kwargs = steps[0]
        axes = set(kwargs.get("axes") or ())
        plane = axes in ({"y", "x"}, {"channel", "y", "x"})
        percentiles = (float(kwargs.get("min_percentile", 0.0)), float(kwargs.get("max_percentile", 100.0)))
        if op == "scale_range" and plane and percentiles == PERCENTILES and not kwargs.get("reference_tensor"):
            return Normalisation.SLICE_PERCENTILE
        if op == "zero_mean_unit_variance" and plane:
            return Normalisation.SLICE_ZSCORE
    named = ", ".join(f"{op} {kwargs}" for op, kwargs in steps) or "none"
    raise package.refuse(f"preprocessing {named} is not supported (supported: scale_range over y, x at "
                         f"percentiles {PERCENTILES[0]:g} / {PERCENTILES[1]:g}; zero_mean_unit_variance over y, x)")


def _postprocessing(package: PackageFiles, tensor: Mapping[str, Any]) -> str | None:
    """``sigmoid``, ``softmax`` (over the channels) or None: what turns the network's output into
    probabilities inside the package (None: the network outputs them)."""
    steps = _steps(package, tensor, "postprocessing")
    if not steps:
        return None
    if len(steps) == 1 and steps[0][0] == "sigmoid":
        return "sigmoid"
    if len(steps) == 1 and steps[0][0] == "softmax" and steps[0][1].get("axis", "channel") == "channel":
        return "softmax"
    named = ", ".join(f"{op} {kwargs}" for op, kwargs in steps)
    raise package.refuse(f"postprocessing {named} is not supported (sigmoid, or softmax over the channels)")


# -- weights ---------------------------------------------------------------------------------------


def _our_architecture(package: PackageFiles, rdf: Mapping[str, Any], entry: Mapping[str, Any],
                      mode: Normalisation, expect: ModelExpectation) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A ``PackagedUNet`` state dict as our :class:`UNet` (its source is not imported), with the metadata
    a ``model.pt`` carries: from ``config.unet_pipeline`` for a package of ours, else from the rdf."""
    kwargs = entry["architecture"].get("kwargs")
    kwargs = dict(kwargs) if isinstance(kwargs, Mapping) else {}
    ours = (rdf.get("config") or {}).get("unet_pipeline") if isinstance(rdf.get("config"), Mapping) else None
    ours = ours if isinstance(ours, Mapping) and ours.get("format") == PACKAGE_FORMAT else None
    given = {k: kwargs[k] for k in ("depth", "base_channels", "in_channels", "n_classes", "padding", "norm")
             if k in kwargs}
    try:  # a foreign package's dropout is unknown and does not act in prediction
        spec = UNetSpec.from_dict(dict(ours["spec"]) if ours else {**given, "dropout": 0.0})
    except (ValueError, TypeError) as err:
        raise package.refuse(f"architecture PackagedUNet {kwargs}: {err}") from None
    if any(spec.to_dict()[k] != v for k, v in given.items()):
        raise package.refuse(f"architecture kwargs {given} differ from config.unet_pipeline.spec {spec.to_dict()}")
    check_architecture(spec, expect, path=package.path)
    data = load_plain_data(io.BytesIO(package.read(entry.get("source"), sha256=entry.get("sha256"))),
                           where=f"{package.path}: {entry.get('source')}")
    state = {k.removeprefix("net."): v for k, v in data.items()}
    model = model_from_state(spec, state, path=package.path)
    offsets = kwargs.get("logit_offsets")
    metadata = {"intensity_normalisation": ours["normalisation"] if ours else mode.value,
                **({"decision": {"logit_offsets": offsets}} if offsets is not None else {}),
                **({"median_object_area_px": ours["median_object_area_px"]}
                   if ours and ours.get("median_object_area_px") is not None else {})}
    return model, checked_metadata(metadata, spec, path=package.path)


@dataclass
class _Runner:
    """A package network's forward pass, (…) float32 tensor in the package's layout -> its output."""

    run: Callable[[torch.Tensor], torch.Tensor]
    kind: str


def _foreign_runner(package: PackageFiles, weights: Mapping[str, Any], spec: PackageSpec,
                    trust_torchscript: bool) -> _Runner:
    """The package's ONNX weights through ONNX Runtime, or (trusted only) its TorchScript."""
    onnx, script = weights.get("onnx"), weights.get("torchscript")
    if isinstance(onnx, Mapping):
        data = package.read(onnx.get("source"), sha256=onnx.get("sha256"))
        try:
            return _Runner(OnnxNetwork(onnx_session(data), spec), "onnx")
        except ValueError as err:
            raise package.refuse(f"ONNX Runtime cannot load {onnx.get('source')} ({err})") from None
    if isinstance(script, Mapping) and trust_torchscript:
        data = package.read(script.get("source"), sha256=script.get("sha256"))
        try:
            module = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
        except RuntimeError as err:
            raise package.refuse(f"TorchScript {script.get('source')} does not load "
                                 f"({str(err).splitlines()[0][:100]})") from None
        return _Runner(module, "torchscript")
    if isinstance(script, Mapping):
        raise package.refuse("its only usable weights are TorchScript, which is code; run it only if you trust "
                             "the package: --trust-torchscript (config predict.trust_torchscript: true)")
    raise package.refuse(f"no weights that run without the package's code (it has {sorted(weights)}; usable: "
                         "onnx, a pytorch_state_dict of PackagedUNet, or torchscript when trusted)")


class PackageNetwork(torch.nn.Module):
    """A foreign package's network as the engine drives ours: (N, 1, Y, X) normalised float32 in,
    (N, 2, Y, X) logits ``(0, margin)`` out, where ``sigmoid(margin)`` is the cell channel's probability.

    Args:
        runner: the package's forward pass (:class:`_Runner`), in its own axis order.
        spec: the tiling geometry (:func:`package_spec`).
        input_axes, output_axes: the package's axis orders (names from :data:`CANONICAL_AXES`).
        cell: index of the cell channel among the output channels.
        activation: ``sigmoid``/``softmax`` (the package's postprocessing: the network outputs logits), or
            None (it outputs probabilities).
    """

    def __init__(self, runner: _Runner, spec: PackageSpec, input_axes: tuple[str, ...],
                 output_axes: tuple[str, ...], cell: int, activation: str | None) -> None:
        super().__init__()
        self.runner, self.spec, self.kind = runner.run, spec, runner.kind
        self.input_axes, self.output_axes, self.cell, self.activation = input_axes, output_axes, cell, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if "batch" in self.input_axes:
            out = self._canonical(self.runner(_to_axes(x, self.input_axes)))
        else:
            out = torch.cat([self._canonical(self.runner(_to_axes(x[i:i + 1], self.input_axes)))
                             for i in range(x.shape[0])])
        return torch.stack([torch.zeros_like(out[:, 0]), self._margin(out)], dim=1)

    def _canonical(self, out: torch.Tensor) -> torch.Tensor:
        if out.dim() != len(self.output_axes):
            raise ValueError(f"an output of {out.dim()} axes, its rdf names {len(self.output_axes)}: "
                             f"{list(self.output_axes)}")
        names = list(self.output_axes)
        for name in ("channel", "batch"):
            if name not in names:
                out, names = out.unsqueeze(0), [name, *names]
        return out.permute([names.index(a) for a in CANONICAL_AXES]).float()

    def _margin(self, out: torch.Tensor) -> torch.Tensor:
        """(N, Y, X) logit margin of the cell channel: its logit where a sigmoid follows, else
        log(p / (1 - p)) of its probability (float64; p clipped to [EPS, 1 - EPS])."""
        if self.activation == "sigmoid":
            return out[:, self.cell]
        p = torch.softmax(out, dim=1)[:, self.cell] if self.activation == "softmax" else out[:, self.cell]
        p = p.double().clamp(EPS, 1 - EPS)
        return (torch.log(p) - torch.log1p(-p)).float()


def _probe(net: PackageNetwork, channels: int, package: PackageFiles) -> None:
    """Run the network once on its smallest tile (zeros): a network that fails there, or whose output
    is not (channels, Y, X) of the input's size, is refused now, before a job writes anything."""
    size = net.spec.stride + 2 * net.spec.halo_px
    x = torch.zeros((1, 1, size, size), dtype=torch.float32)
    try:
        with torch.inference_mode():
            out = net._canonical(net.runner(_to_axes(x, net.input_axes)))
    except (ValueError, RuntimeError, IndexError) as err:
        raise package.refuse(f"its network fails on a {size} x {size} input ({str(err).splitlines()[0][:160]})") from None
    if tuple(out.shape) != (1, channels, size, size):
        raise package.refuse(f"its network gives {tuple(out.shape)} for a {size} x {size} input, not the "
                             f"(1, {channels}, {size}, {size}) its output axes describe")


def _to_axes(x: torch.Tensor, axes: tuple[str, ...]) -> torch.Tensor:
    """(N, 1, Y, X) in the package's axis order ``axes`` (a missing batch axis: N is 1)."""
    names = list(CANONICAL_AXES)
    for name, dim in (("channel", 1), ("batch", 0)):
        if name not in axes:
            x = x.squeeze(dim)
            names.remove(name)
    return x.permute([names.index(a) for a in axes]).contiguous()
