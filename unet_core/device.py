"""Choosing the torch device for a stage: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""

from __future__ import annotations

import torch

from unet_core.errors import UserInputError


def resolve_device(device: torch.device | str = "auto") -> torch.device:
    """``"auto"`` -> the first CUDA GPU if present, else the CPU; checks an explicit choice.

    Raises:
        UserInputError: not a torch device, or a CUDA device asked for but not available.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise UserInputError(f"--device {device!r}: not a torch device (use auto, cpu, cuda or cuda:N)") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"--device {device}: CUDA is not available on this machine (use --device cpu or auto)")
    return dev
