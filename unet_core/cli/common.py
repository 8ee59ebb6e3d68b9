"""Helpers shared by the ``unet <stage>`` subcommands (argument types, threads)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from unet_core.common.errors import UserInputError


def existing_path(text: str) -> Path:
    """argparse type: a path that must exist (file or directory)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or directory")
    return path


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=positive_int,
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


def parse_slices(text: str | None, n_slices: int, *, what: str) -> list[int]:
    """Parse a slice selection such as ``"0-19"``, ``"0,2,5-7"`` or ``"all"``.

    Args:
        text: the selection; ``None``/``"all"``/``""`` selects every slice.
        n_slices: slices in the stack (Z), to check the bounds.
        what: name of the option or file, for the error message.

    Raises:
        UserInputError: malformed selection or an index out of range.
    """
    if text is None or str(text).strip() in ("", "all"):
        return list(range(n_slices))
    chosen: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                chosen.extend(range(lo, hi + 1))
            else:
                chosen.append(int(part))
        except ValueError:
            raise UserInputError(f"{what}: cannot parse slice selection {text!r} (use e.g. 0-19 or 0,3,5-7)") from None
    bad = [z for z in chosen if not 0 <= z < n_slices]
    if bad:
        raise UserInputError(f"{what}: slice(s) {bad[:5]} out of range for a stack of {n_slices} slices")
    if len(set(chosen)) != len(chosen):
        raise UserInputError(f"{what}: slice selection {text!r} lists a slice twice")
    return chosen


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Options describing the U-Net architecture (defaults: the paper's network)."""
    g = parser.add_argument_group("model architecture (must match the trained model)")
    g.add_argument("--depth", type=positive_int, default=4, help="number of 2x2 max-pools (paper: 4)")
    g.add_argument("--base-channels", type=positive_int, default=64, help="feature maps at level 0 (paper: 64)")
    g.add_argument("--n-classes", type=positive_int, default=2, help="output classes (2: background, cell)")
    g.add_argument("--padding", choices=["valid", "same"], default="valid",
                   help="convolution padding: 'valid' as in the paper (exact tiling) or 'same'")
    g.add_argument("--norm", choices=["none", "batch", "group"], default="none",
                   help="normalisation after each convolution (paper: none)")
    g.add_argument("--dropout", type=nonnegative_float, default=0.5,
                   help="dropout probability at the end of the contracting path")


def spec_from_args(args: argparse.Namespace):
    """The :class:`UNetSpec` described by :func:`add_model_args` options."""
    from unet_core.model.spec import UNetSpec

    return UNetSpec(
        depth=args.depth, base_channels=args.base_channels, n_classes=args.n_classes,
        padding=args.padding, norm=args.norm, dropout=args.dropout,
    )
