"""Run many ``unet`` command lines in one Python process: the data-safety corpus's speed-up.

Each command line goes through :func:`unet_core.cli.main`, exactly what the ``unet`` console
script runs, with its own captured stderr; only the interpreter start and the imports (torch
takes seconds) are shared. Reads a JSON list of argument lists on stdin, writes a JSON list of
``{"rc": int, "stderr": str}`` on stdout.

    python cli_batch.py < argvs.json > results.json
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys


class _CurrentStderr:
    """A stream that writes to whatever ``sys.stderr`` is now (each case's capture buffer)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def run_all(argvs: list[list[str]]) -> list[dict]:
    from unet_core.cli import main

    # main() configures logging only when nothing is configured: configure it once here, at the
    # level '-q' asks for, writing to the current case's buffer
    logging.basicConfig(level=logging.WARNING, stream=_CurrentStderr(), format="unet: %(message)s")
    results = []
    for argv in argvs:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(argv)
            except SystemExit as exc:  # argparse errors
                rc = exc.code if isinstance(exc.code, int) else 1
        results.append({"rc": rc, "stderr": err.getvalue()})
    return results


if __name__ == "__main__":
    out = sys.stdout
    json.dump(run_all(json.load(sys.stdin)), out)
