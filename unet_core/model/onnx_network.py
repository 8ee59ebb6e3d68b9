"""Networks run by ONNX Runtime on the CPU: our U-Net exported to ONNX, or a package's ONNX weights.

:class:`OnnxNetwork` is a ``torch.nn.Module`` whose forward pass hands a (N, C, Y, X) float32 tensor
to an ``onnxruntime.InferenceSession`` and returns its output as a tensor, so the overlap-tile engine
(:mod:`unet_core.infer.engine`) drives it exactly as it drives the torch network: same tiles, same
normalisation, same decision offsets, softmax and encoding; only the convolutions run elsewhere.
ONNX Runtime computes in float32 on the CPU; its sums are ordered differently from oneDNN's, so the
probabilities differ from torch's by float rounding (``tests/unit/test_onnx_backend.py`` bounds it).

Needs the optional dependencies (``pip install 'unet-pipeline[bioimageio]'``: onnx, onnxruntime).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet_core.common.errors import UserInputError
from unet_core.model.spec import UNetSpec

#: ONNX operator set of the exports (the bioimage.io package's and the backend's).
ONNX_OPSET = 17


def require_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or one line saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise UserInputError("ONNX Runtime is not installed (the onnxruntime backend and ONNX packages need it): "
                             "pip install 'unet-pipeline[bioimageio]'") from None
    return onnxruntime


def export_onnx(net: torch.nn.Module, example: torch.Tensor, path: str | Path | io.BytesIO, *,
                input_name: str = "input", output_name: str = "output") -> None:
    """Write ``net`` as ONNX (opset :data:`ONNX_OPSET`) with free batch and spatial sizes.

    The TorchScript-based exporter (``dynamo=False``) took 1 s for a depth-4 net on a 2-core VM, the
    ``torch.export`` one 19-33 s; the latter is the fallback where the former is gone.

    Args:
        net: the network, (N, C, Y, X) float32 in and out.
        example: an input of that layout (its sizes are not fixed in the export).
        path: a file path or a binary buffer.
    """
    axes = {0: "batch", 2: "y", 3: "x"}
    target = path if isinstance(path, io.BytesIO) else str(path)
    with warnings.catch_warnings():  # the TorchScript-based exporter is deprecated
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(net, (example,), target, dynamo=False, opset_version=ONNX_OPSET,
                              input_names=[input_name], output_names=[output_name],
                              dynamic_axes={input_name: axes, output_name: axes})
        except (TypeError, RuntimeError, ImportError):
            dim = {i: torch.export.Dim(name) for i, name in axes.items()}
            torch.onnx.export(net, (example,), target, dynamo=True, opset_version=ONNX_OPSET, external_data=False,
                              input_names=[input_name], output_names=[output_name], dynamic_shapes={"x": dim})


def onnx_session(model: bytes, *, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session of the serialised ONNX ``model``.

    Raises:
        ValueError: ONNX Runtime cannot load it (one line).

    Args:
        threads: intra-op threads; None: torch's thread count (``unet predict --threads`` sets it),
            so both backends use the cores they are given.
    """
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are not ours
    # idle threads sleep instead of spinning: the engine's own work between tiles (and other jobs on a
    # shared machine) needs the cores; paper net, 572-px tile, 2 threads, load 10 on 2 cores, median of 5:
    # 5.65 s without spinning, 6.09 s with (torch channels-last 8.10 s)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    except onnxruntime_errors() as err:
        raise ValueError(f"{type(err).__name__}: {str(err).splitlines()[0][:120]}") from None


def onnxruntime_errors() -> tuple[type[Exception], ...]:
    """ONNX Runtime's own exception classes (derived from Exception only, not from one base of theirs)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(getattr(state, name) for name in ("Fail", "InvalidArgument", "InvalidProtobuf", "InvalidGraph",
                                                    "NoSuchFile", "NotImplemented", "RuntimeException")
                 if hasattr(state, name))


class OnnxNetwork(torch.nn.Module):
    """(N, C, Y, X) float32 -> the ONNX model's (first) output, as a CPU tensor.

    Args:
        session: an ``onnxruntime.InferenceSession`` (:func:`onnx_session`).
        spec: the geometry the engine tiles with (the exported U-Net's, or a package's
            :class:`~unet_core.model.spec.PackageSpec`).
    """

    def __init__(self, session: Any, spec: UNetSpec) -> None:
        super().__init__()
        self.session, self.spec = session, spec
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        try:
            out = self.session.run([self.output_name], {self.input_name: array})[0]
        except onnxruntime_errors() as err:  # e.g. an input of a rank or size the model does not take
            raise ValueError(f"ONNX Runtime: {type(err).__name__}: {str(err).splitlines()[0][:160]}") from None
        return torch.from_numpy(np.asarray(out, np.float32))


def onnx_unet(model: torch.nn.Module, *, threads: int | None = None) -> OnnxNetwork:
    """``model`` (a U-Net with a ``spec``: logits out) exported to ONNX in memory and run by ONNX Runtime."""
    spec: UNetSpec = model.spec
    size = spec.min_input_size + spec.stride
    example = torch.zeros((1, spec.in_channels, size, size), dtype=torch.float32)
    buffer = io.BytesIO()
    export_onnx(model.eval().to("cpu", memory_format=torch.contiguous_format), example, buffer)
    return OnnxNetwork(onnx_session(buffer.getvalue(), threads=threads), spec)
