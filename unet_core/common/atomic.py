"""Atomic outputs: write to a temporary sibling, rename into place only when complete.

A stage killed at any point (SIGKILL, pre-emption, a full disk) therefore leaves either
the previous complete output or nothing under the final name, never a half-written file
or Zarr store that looks finished. Temporaries live in the same directory as the target
so the final ``os.replace`` is a rename on one file system.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unet_core.common.background import settle_background_writes
from unet_core.common.errors import UserInputError
from unet_core.common.outputs import Mark, PngMark, check_replaceable, png_metadata

TMP_MARK = ".tmp-"


def _host() -> str:
    return socket.gethostname().replace("-", "_").replace("/", "_") or "host"


def temporary_sibling(path: Path) -> Path:
    """A unique hidden path next to ``path`` (same directory, so rename is atomic).

    The name records host and PID (``.NAME.tmp-HOST-PID-RANDOM``) so that a later run can
    recognise temporaries left by a killed process of this host (see :func:`remove_stale`).
    """
    return path.with_name(f".{path.name}{TMP_MARK}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def host_name() -> str:
    """This host's name as temporaries and lock files record it."""
    return _host()


def process_start(pid: int) -> int | None:
    """When process ``pid`` of this host started (clock ticks after boot, from /proc), or None
    where that cannot be read. Together with the PID it names one process, even after the PID
    is reused."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def pid_alive(pid: int, started: int | None = None) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie, killed but not yet reaped,
    does not). With ``started`` (from :func:`process_start`), a process that reuses the PID of
    the one that started then does not count."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
        return False
    return started is None or process_start(pid) in (None, started)


def _left_by_dead_process(name: str, marker: str) -> bool:
    """Whether ``name`` is a temporary (``...MARKER<pid>-...``) of a process that no longer runs."""
    pid = name.split(marker, 1)[1].split("-", 1)[0] if marker in name else ""
    return pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid))


def remove_stale(path: Path) -> None:
    """Delete temporaries of ``path`` left by killed processes of this host.

    Only siblings named by :func:`temporary_sibling` for this host whose PID no longer runs are
    removed; those of live processes or of other hosts (a shared file system) are left alone.
    """
    prefix = f".{path.name}{TMP_MARK}{_host()}-"
    if not path.parent.is_dir():
        return
    for sibling in path.parent.iterdir():
        if sibling.name.startswith(prefix) and _left_by_dead_process(sibling.name, prefix):
            remove_path(sibling)


def remove_stale_tree(root: str | os.PathLike[str], *, max_depth: int = 4) -> list[Path]:
    """Delete the temporaries that killed processes of this host left anywhere under ``root``.

    A killed stage whose outputs are still complete from an earlier run (e.g. a killed
    ``--forcerun``) is not rerun, so :func:`remove_stale` never sees its temporaries; the
    workflow calls this at start-up instead. Looks ``max_depth`` directories deep and never
    inside Zarr stores (their files are written in place, inside one atomic temporary).

    Returns:
        The paths removed.
    """
    root = Path(root)
    marker = f"{TMP_MARK}{_host()}-"
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    todo = [(root, 0)]
    while todo:
        folder, depth = todo.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            name = entry.name
            if name.startswith(".") and marker in name:
                if _left_by_dead_process(name, marker):
                    remove_path(Path(entry.path))
                    removed.append(Path(entry.path))
            elif depth < max_depth and entry.is_dir(follow_symlinks=False) and not name.endswith(".zarr"):
                todo.append((Path(entry.path), depth + 1))
    return removed


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
def atomic_output(path: str | os.PathLike[str], *, own: Mark | None) -> Iterator[Path]:
    """Yield a temporary path; on success move it to ``path``, on any error delete it.

    Works for files and directories (Zarr stores). An existing ``path`` is replaced only
    after the new output is complete, and only if it is an output of kind ``own``
    (:mod:`unet_core.common.outputs`), checked again just before the rename.

    Args:
        path: final location of the output.
        own: the kind of output written; what stands at ``path`` must carry its mark to be
            replaced. None only for files inside an output folder the stage has already
            claimed with :func:`unet_core.common.outputs.claim_outputs` (e.g. a part store's
            block markers).

    Yields:
        The temporary path to write to (it does not exist yet).

    Raises:
        UserInputError: something other than an output of kind ``own`` stands at ``path``
            (named in the message; the temporary is removed).
    """
    final = Path(path)
    ensure_writable_parent(final)
    remove_stale(final)
    tmp = temporary_sibling(final)
    try:
        try:
            yield tmp
        except OSError as err:
            if err.filename is None:  # name the user's path (numpy and tifffile writes name none)
                raise _naming(err, final) from err
            raise
        if not tmp.exists():
            raise RuntimeError(f"{final}: the stage finished without writing its output")
        if own is not None:
            check_replaceable(final, own)
        try:
            if final.is_dir() and not final.is_symlink():
                # os.replace cannot overwrite a non-empty directory: move the old one aside first.
                old = temporary_sibling(final)
                os.replace(final, old)
                os.replace(tmp, final)
                remove_path(old)
            else:
                os.replace(tmp, final)
        except OSError as err:  # name the user's path, not the hidden temporary
            raise OSError(err.errno, f"cannot put the output in place ({err.strerror})", str(final)) from err
    except BaseException:
        settle_background_writes()
        remove_path(tmp)
        raise


@contextlib.contextmanager
def atomic_output_with_companions(
    path: str | os.PathLike[str], *, own: Mark | None
) -> Iterator[tuple[Path, list[Path]]]:
    """:func:`atomic_output`, for a stage that also writes companion files (a figure, a TIFF, a
    table) from the finished temporary, before it is put in place.

    Yields:
        (the temporary path, a list): append each companion to the list once it is written;
        if anything fails, then or while the output is put in place, they are removed again,
        so a failed run leaves none of its outputs (each companion is itself written atomically,
        over an earlier output of its own kind only).
    """
    written: list[Path] = []
    try:
        with atomic_output(path, own=own) as tmp:
            yield tmp, written
    except BaseException:
        for companion in written:
            remove_path(Path(companion))
        raise


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` as an error about the output ``path``. A short write that lost its errno (numpy's
    ``tofile``, under tifffile: "N requested and M written") on a file system with less than
    1 MiB left is a full disk (ENOSPC), which the CLI reports as such."""
    code = err.errno
    if code is None:
        with contextlib.suppress(OSError):
            st = os.statvfs(path.parent)
            code = errno.ENOSPC if st.f_bavail * st.f_frsize < 1 << 20 else None
    return OSError(code, err.strerror or str(err), str(path))


def save_png(fig: Any, path: str | os.PathLike[str], *, stage: str, dpi: int) -> None:
    """Write a matplotlib figure atomically as a PNG carrying ``stage``'s mark.

    The mark (:class:`unet_core.common.outputs.PngMark`) is what lets a later run of the same
    stage replace the figure; any other file at ``path`` is left alone (one-line error).
    """
    with atomic_output(path, own=PngMark(stage)) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, metadata=png_metadata(stage))
