"""Helpers shared by the ``unet <stage>`` subcommands (argument types, threads)."""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, fields
from enum import Enum
from pathlib import Path
from typing import Any

from unet_core.common.config_values import MAX_INT, MAX_THREADS
from unet_core.model.spec import Norm, Padding, UNetSpec


def field_default(owner: type, name: str) -> Any:
    """The default of the dataclass ``owner``'s field ``name`` (an enum as its value): what an option
    offers as its default, written once, in the settings object that owns it."""
    value = next(f for f in fields(owner) if f.name == name).default
    if value is MISSING:
        raise TypeError(f"{owner.__name__}.{name} has no default")
    return value.value if isinstance(value, Enum) else value


def choice_values(kind: type[Enum]) -> list[Any]:
    """An option's ``choices``: the values of the enum that owns the closed set."""
    return [member.value for member in kind]


def existing_path(text: str) -> Path:
    """argparse type: a path that must exist (file or directory)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or directory")
    return path


def _number(text: str, kind: type, *, minimum: float, what: str, maximum: float | None = None) -> int | float:
    """Parse ``text`` as a finite ``kind`` in [``minimum``, ``maximum``] (integers: at most
    :data:`MAX_INT` where no ``maximum`` is given) or raise argparse's error naming ``what``."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if maximum is None and kind is int:
        maximum = MAX_INT
    if not (value >= minimum and abs(value) != float("inf")):  # also rejects NaN (every comparison is False)
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    if maximum is not None and value > maximum:
        raise argparse.ArgumentTypeError(f"expected {what} up to {maximum}, got {text}")
    return value


def finite_float(text: str) -> float:
    """argparse type: any finite number (NaN and ±Inf are refused)."""
    return _number(text, float, minimum=-float("inf"), what="a finite number")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(text, int, minimum=1, what="a positive integer")


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _number(text, int, minimum=0, what="an integer >= 0")


def thread_count(text: str) -> int:
    """argparse type: a number of CPU threads, 1 to :data:`MAX_THREADS`."""
    return _number(text, int, minimum=1, maximum=MAX_THREADS, what="a positive integer")


def worker_count(text: str) -> int:
    """argparse type: a number of worker processes, 0 to :data:`MAX_THREADS`."""
    return _number(text, int, minimum=0, maximum=MAX_THREADS, what="an integer >= 0")


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _number(text, float, minimum=0.0, what="a finite number >= 0")


def nonnegative_int_or_auto(text: str) -> int | str:
    """argparse type: an integer >= 0 or ``auto`` (derived from the model)."""
    return "auto" if text == "auto" else _number(text, int, minimum=0, what="an integer >= 0 or 'auto'")


def positive_float_or_auto(text: str) -> float | str:
    """argparse type: a finite number > 0 or ``auto`` (derived from the model)."""
    if text == "auto":
        return text
    value = _number(text, float, minimum=0.0, what="a finite number > 0 or 'auto'")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 or 'auto', got {text!r}")
    return value


def unit_interval(text: str) -> float:
    """argparse type: a probability threshold, a number in [0, 1)."""
    value = _number(text, float, minimum=0.0, what="a number in [0, 1)")
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    """A comma-separated list of integers, e.g. ``1,2,2`` (per-level z pools of a 3-D net)."""
    try:
        values = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,2, got {text!r}") from None
    return values


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=thread_count,
        default=None,
        help="CPU threads to use (default: all cores; Snakemake passes the rule's threads)",
    )


def configure_threads(threads: int | None) -> int:
    """Limit torch/BLAS threads to ``threads`` (all cores if None); returns the count used."""
    n = threads or os.cpu_count() or 1
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return n


#: Architecture options: (flag, key, type, paper default, help); the defaults are :class:`UNetSpec`'s.
MODEL_OPTIONS = tuple((flag, key, kind, field_default(UNetSpec, key), text) for flag, key, kind, text in (
    ("--depth", "depth", positive_int, "number of 2x2 max-pools (paper: 4)"),
    ("--base-channels", "base_channels", positive_int, "feature maps at level 0 (paper: 64)"),
    ("--n-classes", "n_classes", positive_int, "output classes (2: background, cell)"),
    ("--padding", "padding", str, "convolution padding: 'valid' as in the paper (exact tiling) or 'same'"),
    ("--norm", "norm", str, "normalisation after each convolution: none (paper), batch or group"),
    ("--dropout", "dropout", nonnegative_float, "dropout probability at the end of the contracting path"),
    ("--dims", "dims", positive_int, "2: the paper's network, slice by slice; 3: the 3-D U-Net (Z, Y, X volumes)"),
    ("--pool-z", "pool_z", int_list, "3-D only: z pooling per level, 1 or 2 each, e.g. 1,2,2 (default all 2)"),
    ("--kernel-z", "kernel_z", int_list, "3-D only: z kernel per level (depth + 1 values), 1 or 3 each (default all 3)"),
))
_CHOICES = {"padding": choice_values(Padding), "norm": choice_values(Norm)}


def add_model_args(parser: argparse.ArgumentParser, *, check_only: bool = False) -> None:
    """Options describing the U-Net architecture.

    Args:
        check_only: the stage reads the architecture from a model file; the options default
            to nothing and, when given, are only checked against the file.
    """
    title = ("model architecture (read from the model file; options given here are checked against it)"
             if check_only else "model architecture (defaults: the paper's network)")
    g = parser.add_argument_group(title)
    for flag, key, kind, default, text in MODEL_OPTIONS:
        g.add_argument(flag, dest=key, type=kind, choices=_CHOICES.get(key), default=None if check_only else default,
                       help=text if check_only or default is None else f"{text} (default {default})")


def spec_from_args(args: argparse.Namespace) -> UNetSpec:
    """The :class:`UNetSpec` described by :func:`add_model_args` options."""
    return UNetSpec(**{key: getattr(args, key) for _, key, _, _, _ in MODEL_OPTIONS})


def expected_model(args: argparse.Namespace) -> dict[str, Any]:
    """The architecture keys given on the command line (``add_model_args(check_only=True)``)."""
    return {key: getattr(args, key) for _, key, _, _, _ in MODEL_OPTIONS if getattr(args, key) is not None}
