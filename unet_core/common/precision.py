"""Arithmetic precision of the network: ``auto``, ``bf16``/``fp16`` autocast or plain ``fp32``.

``auto`` is bf16 autocast on a GPU (fp16 where bf16 is unsupported) and float32 on the CPU
(the path the exactness and bit-exact-resume tests cover). An explicit ``bf16`` is honoured on
a CPU that multiplies bf16 in hardware (AVX512-BF16 or AMX: Intel Sapphire Rapids and later,
AMD Zen 4 and later), where oneDNN's bf16 convolutions run about twice as fast as float32;
elsewhere it would be emulated, so the CPU computes in float32 with a warning.
Free of torch at import time, so command-line parsers can list the choices cheaply.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import TYPE_CHECKING

from unet_core.common.errors import UserInputError, parse_choice

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
    supported), fp32 on the CPU; on the CPU an explicit bf16 is kept where
    :func:`cpu_has_native_bf16`, and it and fp16 are otherwise ignored with a warning.

    Raises:
        UserInputError: not one of auto, bf16, fp16, fp32; or bf16 asked for on a GPU without
            native bf16 (before Ampere: torch would emulate it, many times slower).
    """
    chosen = parse_choice(Precision, precision, option=option)
    if device.type != "cuda":
        if chosen is Precision.BF16 and cpu_has_native_bf16():
            return Precision.BF16
        if chosen not in (Precision.AUTO, Precision.FP32):
            why = "no native bf16 on this CPU" if chosen is Precision.BF16 else "the CPU computes bf16 or fp32"
            log.warning("%s %s ignored (%s): computing in float32", option, chosen.value, why)
        return Precision.FP32
    if chosen is Precision.AUTO:
        return Precision.BF16 if cuda_has_native_bf16(device) else Precision.FP16
    if chosen is Precision.BF16 and not cuda_has_native_bf16(device):
        import torch

        raise UserInputError(
            f"{option} bf16: {device} ({torch.cuda.get_device_name(device)}) has no native bf16 (compute "
            "capability 8.0 or later); use auto (fp16 there) or fp32")
    return chosen


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Whether the CUDA GPU ``device`` multiplies bf16 in hardware (compute capability >= 8.0,
    or ROCm); True where CUDA is not available (nothing to check: the device choice fails first).

    Not ``torch.cuda.is_bf16_supported()``: it asks the current GPU, not ``device``, and by
    default counts emulated bf16 (pre-Ampere GPUs) as supported.
    """
    import torch

    if torch.version.hip or not torch.cuda.is_available():
        return True
    return torch.cuda.get_device_properties(device).major >= 8


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16 instructions).

    Both probes are torch's own (``torch.cpu``); a torch without them counts as no.
    """
    import torch

    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
