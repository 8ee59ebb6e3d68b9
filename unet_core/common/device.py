"""Choosing the torch device for a stage: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""

from __future__ import annotations

import torch

from unet_core.common.errors import UserInputError


def resolve_device(device: torch.device | str = "auto", *, option: str = "--device") -> torch.device:
    """``"auto"`` -> the first CUDA GPU if present, else the CPU; checks an explicit choice.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (or a torch.device).
        option: the flag or config key named in error messages.

    Raises:
        UserInputError: not a CPU/CUDA torch device, or CUDA asked for but not available.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise UserInputError(f"{option} {device!r}: not a torch device (use auto, cpu, cuda or cuda:N)") from err
    if dev.type not in ("cpu", "cuda"):
        raise UserInputError(f"{option} {device!r}: not supported (use auto, cpu, cuda or cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"{option} {device}: CUDA is not available on this machine (use cpu or auto)")
    return dev
