"""What ``unet predict`` is asked to do: one :class:`PredictSettings`, passed whole.

Block and tile sizes (in the plane, and along z for a 3-D model), batch, device, precision, test-time augmentation, decision rule, storage of
the probabilities, compilation and the normalisation the caller expects. Every default is written
here once (the CLI's options and the workflow's schema agree with it:
tests/unit/test_settings_agreement.py), and every closed set is parsed into its enum once, here,
where it enters. Free of torch, so the workflow and command-line parsers can import it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from unet_core.common.errors import UserInputError, parse_choice
from unet_core.common.intensity import Normalisation
from unet_core.common.precision import Precision
from unet_core.infer.encoding import ProbabilityEncoding
from unet_core.infer.tiling import BLOCK_PX, TILE_OUT, TTA
from unet_core.model.decision import Decision

#: Tiles per network pass when :attr:`PredictSettings.batch` is None, per device type.
DEFAULT_BATCH = {"cpu": 1, "cuda": 8}

#: The command-line option of each setting (named in the one-line errors).
OPTIONS = {
    "block_px": "--block-px", "tile_out": "--tile-out", "batch": "--batch", "device": "--device",
    "precision": "--precision", "tta": "--tta", "decision": "--decision", "probabilities": "--probabilities",
    "compile": "--compile", "normalisation": "--normalisation", "backend": "--backend",
    "cell_channel": "--cell-channel", "trust_torchscript": "--trust-torchscript",
    "block_z": "--block-z", "tile_z": "--tile-z",
}


class Backend(str, Enum):
    """What runs our network's convolutions on the CPU (a foreign package's ONNX weights always run on
    ONNX Runtime; :mod:`unet_core.model.package`)."""

    TORCH = "torch"  # PyTorch (oneDNN), channels-last; every device
    ONNXRUNTIME = "onnxruntime"  # the network exported to ONNX, run by ONNX Runtime; CPU, float32 only


@dataclass(frozen=True)
class PredictSettings:
    """Settings of one prediction job (see :func:`unet_core.infer.predict.predict_job`).

    Attributes:
        block_px: block (and output chunk) edge, px, a multiple of 2**depth.
        tile_out: largest output tile per network pass, px, a multiple of 2**depth (1024 costs
            1.13x the ideal FLOPs for the paper's net; larger tiles waste less context).
        batch: tiles per network pass; None: per device (:data:`DEFAULT_BATCH`, 1 on the CPU,
            8 on a GPU).
        device: ``auto`` (GPU ``job mod GPUs`` where there are several), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto`` (bf16 on a GPU, fp32 on the CPU), ``fp32``, ``bf16`` or ``fp16``.
        tta: test-time augmentation, ``none``, ``flips`` or ``d4``.
        decision: ``corrected``: the probabilities carry the model's weight-prior correction
            (:mod:`unet_core.model.decision`); ``raw``: the plain softmax of the network.
        probabilities: storage of the probabilities (uint8 codes, float16 or float32).
        compile: run the network through ``torch.compile`` (one graph per tile shape).
        normalisation: the grey-value normalisation the caller expects; None: the model's, which
            is always the one used (another value is an error naming both).
        backend: ``torch`` or ``onnxruntime`` (:class:`Backend`; same tiles and outputs up to float
            rounding, tests/unit/test_onnx_backend.py).
        cell_channel: the output channel of a foreign bioimage.io package that is the cell class (a
            channel name); None: the only channel of a one-channel output. Unused for our own models.
        trust_torchscript: run a bioimage.io package's TorchScript weights (code) where it has no ONNX
            weights and no state dict of our architecture; off: such a package is refused.
        block_z: slices per block of a 3-D model (model.dims 3), a multiple of its z stride (the
            product of ``pool_z``); also the part store's z chunk. None: the stack's z chunk rounded
            up to a multiple of the z stride (a block then reads whole chunks of a stack ingested
            for 3-D, whose z chunk is such a multiple). Must stay None for a 2-D model.
        tile_z: largest tile extent along z of a 3-D model, slices, a multiple of its z stride (the
            network's output per pass along z; larger = less z context recomputed, more memory).
            None: ``block_z``. Must stay None for a 2-D model.
    """

    block_px: int = BLOCK_PX
    tile_out: int = TILE_OUT
    batch: int | None = None
    device: str = "auto"
    precision: Precision = Precision.AUTO
    tta: TTA = TTA.NONE
    decision: Decision = Decision.CORRECTED
    probabilities: ProbabilityEncoding = ProbabilityEncoding.UINT8
    compile: bool = False
    normalisation: Normalisation | None = None
    backend: Backend = Backend.TORCH
    cell_channel: str | None = None
    trust_torchscript: bool = False
    block_z: int | None = None
    tile_z: int | None = None

    def __post_init__(self) -> None:
        for name, kind in (("precision", Precision), ("tta", TTA), ("decision", Decision),
                           ("probabilities", ProbabilityEncoding), ("backend", Backend)):
            object.__setattr__(self, name, parse_choice(kind, getattr(self, name), option=OPTIONS[name]))
        if self.normalisation is not None:
            object.__setattr__(self, "normalisation", parse_choice(Normalisation, self.normalisation,
                                                                   option="--normalisation"))
        for name in ("block_px", "tile_out", "batch", "block_z", "tile_z"):
            value = getattr(self, name)
            if value is None and name in ("batch", "block_z", "tile_z"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserInputError(f"{OPTIONS[name]} {value!r}: must be a positive integer")

    def batch_for(self, device_type: str) -> int:
        """Tiles per network pass on a device of ``device_type`` (``cpu`` or ``cuda``)."""
        return self.batch or DEFAULT_BATCH[device_type]

    @classmethod
    def from_options(cls, values: Any) -> PredictSettings:
        """The settings from an object with one attribute per field (an argparse namespace)."""
        return cls(**{f.name: getattr(values, f.name) for f in fields(cls)})
