"""Atomic outputs: write to a temporary sibling, rename into place only when complete.

A stage killed at any point (SIGKILL, pre-emption, a full disk) therefore leaves either
the previous complete output or nothing under the final name, never a half-written file
or Zarr store that looks finished. Temporaries live in the same directory as the target
so the final ``os.replace`` is a rename on one file system.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from unet_core.errors import UserInputError

TMP_MARK = ".tmp-"


def temporary_sibling(path: Path) -> Path:
    """A unique hidden path next to ``path`` (same directory, so rename is atomic)."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_path(path: Path) -> None:
    """Remove a file, link or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def ensure_writable_parent(path: Path) -> None:
    """Create ``path``'s parent directory and check it is writable.

    Raises:
        UserInputError: the directory cannot be created or written to.
    """
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserInputError(f"{parent}: cannot create output directory ({err.strerror})") from err
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserInputError(f"{path}: output directory {parent} is not writable")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path; on success move it to ``path``, on any error delete it.

    Works for files and directories (Zarr stores). An existing ``path`` is replaced only
    after the new output is complete.

    Args:
        path: final location of the output.

    Yields:
        The temporary path to write to (it does not exist yet).
    """
    final = Path(path)
    ensure_writable_parent(final)
    tmp = temporary_sibling(final)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"{final}: the stage finished without writing its output")
        if final.is_dir() and not final.is_symlink():
            # os.replace cannot overwrite a non-empty directory: move the old one aside first.
            old = temporary_sibling(final)
            os.replace(final, old)
            os.replace(tmp, final)
            remove_path(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        remove_path(tmp)
        raise
