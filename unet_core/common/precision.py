"""Arithmetic precision of the network: ``auto``, ``bf16``/``fp16`` autocast or plain ``fp32``.

``auto`` is bf16 autocast on a GPU (fp16 where bf16 is unsupported) and float32 on the CPU;
the CPU always computes in float32 (the path the exactness and bit-exact-resume tests cover).
Free of torch at import time, so command-line parsers can list the choices cheaply.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import TYPE_CHECKING

from unet_core.common.errors import parse_choice

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class Precision(str, Enum):
    """Arithmetic of the network: ``auto``, ``bf16``/``fp16`` autocast or plain ``fp32``."""

    AUTO = "auto"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for float32 (no autocast)."""
        import torch  # here, not at the top: the CLI's argument parsers import this module

        return {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(self)


def resolve_precision(precision: Precision | str, device: torch.device, *, option: str = "--precision") -> Precision:
    """The precision to use on ``device``: ``auto`` -> bf16 on a GPU (fp16 where bf16 is not
    supported), fp32 on the CPU; an explicit bf16/fp16 on the CPU is ignored with a warning.

    Raises:
        UserInputError: not one of auto, bf16, fp16, fp32.
    """
    chosen = parse_choice(Precision, precision, option=option)
    if device.type != "cuda":
        if chosen not in (Precision.AUTO, Precision.FP32):
            log.warning("%s %s ignored on the CPU: computing in float32", option, chosen.value)
        return Precision.FP32
    if chosen is Precision.AUTO:
        import torch

        bf16 = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else True
        return Precision.BF16 if bf16 else Precision.FP16
    return chosen
