"""``unet <stage>``: one subcommand per pipeline stage.

Every module in this package other than ``common`` is a stage: it defines
``add_parser(subparsers)``, which registers its subcommand and sets ``func`` to a function
taking the parsed arguments. ``main`` parses, calls that one function, and maps errors to
exit codes: a user mistake prints one line naming the file/key and the problem and exits
with 2; ``--debug`` shows the traceback.

Each stage module imports its stage's implementation inside its ``run`` function, not at the
top: building the parser (``unet --help``, or any one subcommand) then loads no torch, zarr
or dask, and a stage's code hash (:func:`unet_core.common.provenance.code_hash`) covers the
modules its ``run`` imports.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import pkgutil
import sys
import traceback

from unet_core import __version__
from unet_core.common.background import settle_background_writes
from unet_core.common.errors import UserInputError

# Display order of the subcommands (the order data flows through the pipeline).
STAGE_ORDER = ("synth", "ingest", "weights", "augment", "train", "predict", "merge", "evaluate")

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
log = logging.getLogger("unet_core")


def _stage_modules() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules(__path__) if m.name != "common"}
    return [s for s in STAGE_ORDER if s in found] + sorted(found - set(STAGE_ORDER))


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``unet`` parser; with ``only`` (a known stage) only that subcommand's, so that a stage
    imports no other stage's modules (scipy.ndimage through merge's: 0.15-0.3 CPU-s of start-up)."""
    parser = argparse.ArgumentParser(
        prog="unet",
        description=(
            "U-Net segmentation pipeline (Ronneberger et al. 2015). Each subcommand is one "
            "stage of the Snakemake workflow and also runs on its own; see 'unet STAGE --help'."
        ),
    )
    parser.add_argument("--version", action="version", version=f"unet-pipeline {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name in _stage_modules():
        if only is None or name == only:
            importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    for stage in sub.choices.values():
        _show_defaults(stage)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append "(default X)" to every option's help that has a value default and does not say it."""
    for action in parser._actions:
        default = action.default
        if (action.help in (None, argparse.SUPPRESS) or default in (None, argparse.SUPPRESS)
                or isinstance(default, bool) or "default" in action.help.lower()):
            continue
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        action.help += f" (default {str(shown).replace('%', '%%')})"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``unet`` console script; returns the exit status."""
    words = sys.argv[1:] if argv is None else argv
    named = next((w for w in words if not w.startswith("-")), None)  # the global options take no value
    parser = build_parser(named if named in _stage_modules() else None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format=f"unet {args.stage}: %(message)s",
        stream=sys.stderr,
    )
    prefix = f"unet {args.stage}: error:"
    try:
        try:
            args.func(args)
        finally:  # in-place stores (a part store) too: no write of the stage outlives it
            settle_background_writes()
    except KeyboardInterrupt:
        print(f"{prefix} interrupted", file=sys.stderr)
        return 130
    except UserInputError as err:
        if args.debug:
            traceback.print_exc()
        print(f"{prefix} {_one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except MemoryError:
        if args.debug:
            traceback.print_exc()
        print(f"{prefix} out of memory; use smaller blocks/tiles or more memory", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:
        if args.debug:
            traceback.print_exc()
        where = f"{err.filename}: " if err.filename else ""
        reason = err.strerror or _one_line(err)
        if err.errno == errno.ENOSPC:
            reason = "no space left on device; free space or choose another output directory"
        print(f"{prefix} {where}{reason}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as err:  # a bug: keep the traceback, but say so in one line at the end
        traceback.print_exc()
        print(f"{prefix} internal error ({type(err).__name__}: {_one_line(err)}); please report it", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
