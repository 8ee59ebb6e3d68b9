"""Choosing the torch device for a stage (``auto``, ``cpu``, ``cuda`` or ``cuda:N``), and the one
line a stage stops with when that GPU runs out of memory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from unet_core.common.errors import UserInputError


def resolve_device(device: torch.device | str = "auto", *, option: str = "--device") -> torch.device:
    """``"auto"`` -> the first CUDA GPU if present, else the CPU; checks an explicit choice.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (or a torch.device).
        option: the flag or config key named in error messages.

    Raises:
        UserInputError: not a CPU/CUDA torch device, CUDA asked for but not available, or
            ``cuda:N`` with N beyond the GPUs this process sees (``CUDA_VISIBLE_DEVICES`` counts).
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
    if dev.type == "cuda" and dev.index is not None and dev.index >= (count := torch.cuda.device_count()):
        raise UserInputError(
            f"{option} {device}: this process sees {count} CUDA GPU{'s' if count != 1 else ''} "
            f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}; CUDA_VISIBLE_DEVICES renumbers them): "
            "use one of those, cuda or auto")
    return dev


@contextlib.contextmanager
def out_of_gpu_memory(where: str, remedy: str, *, error: type[UserInputError] = UserInputError) -> Iterator[None]:
    """Turn a CUDA out-of-memory error raised inside the block into one line: ``out of GPU memory
    {where}; {remedy}`` (``error``, a user error: the CLI prints it and exits 2). Put it outside
    an atomic output's block, so that output is discarded first."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise error(f"out of GPU memory {where}; {remedy}") from None
