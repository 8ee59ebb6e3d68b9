"""Lock files: one process at a time writes an output that several commands could write.

A holder creates the lock file with ``O_EXCL`` and records its host, PID and the PID's start
time; it refreshes the file's modification time every :data:`LOCK_HEARTBEAT_S` seconds while
it holds it. A second process is refused with one line naming the holder. A lock whose process
is gone is taken over, so a killed command never blocks its rerun: on the same host when its PID
(with its start time) no longer runs; from another host (a shared file system, a requeued
cluster job) when it has not been refreshed for :data:`LOCK_STALE_S` seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unet_core.common.atomic import ensure_writable_parent, host_name, pid_alive, process_start
from unet_core.common.errors import UserInputError

log = logging.getLogger(__name__)

#: A holder refreshes its lock this often; a lock of another host not refreshed for LOCK_STALE_S
#: is taken over (its process can only be checked on its own host).
LOCK_HEARTBEAT_S, LOCK_STALE_S = 30.0, 600.0


@contextlib.contextmanager
def holding(lock: Path, *, owner: Path, who: str, what: str) -> Iterator[None]:
    """Hold ``lock`` for this process while the block is entered.

    Args:
        lock: the lock file.
        owner: the output the lock protects (named in messages).
        who: the command that holds such locks, e.g. "'unet predict'".
        what: what it does to ``owner``, e.g. "writing this part store".

    Raises:
        UserInputError: another live process holds it (named, with its host and PID).
    """
    ensure_writable_parent(lock)
    me = {"host": host_name(), "pid": os.getpid(), "started": process_start(os.getpid())}
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _break_stale(lock, owner=owner, who=who, what=what)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    else:
        raise UserInputError(f"{owner}: cannot take the lock {lock}; another {who} keeps taking it")
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(LOCK_HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(lock)

    beat = threading.Thread(target=heartbeat, name="lock-heartbeat", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        if read_lock(lock) == me:
            lock.unlink()


def held_by_other(lock: Path) -> dict[str, Any] | None:
    """The holder of ``lock`` where a live process other than this one holds it, else None."""
    holder = read_lock(lock)
    if holder is None or holder.get("pid") == os.getpid() and holder.get("host") == host_name():
        return None
    return None if _gone(lock, holder) else holder


def _gone(lock: Path, holder: dict[str, Any]) -> bool:
    host, pid = holder.get("host"), holder.get("pid")
    if host == host_name():
        return isinstance(pid, int) and not pid_alive(pid, holder.get("started"))
    return _lock_age(lock) > LOCK_STALE_S


def _break_stale(lock: Path, *, owner: Path, who: str, what: str) -> None:
    """Remove ``lock`` if its process is gone (see the module docstring); else refuse."""
    holder = read_lock(lock)
    if holder is None:  # being written this instant, or removed: look again
        if lock.exists() and _lock_age(lock) > 10.0:
            raise UserInputError(f"{owner}: unreadable lock file {lock}; delete it if no {who} is {what}")
        time.sleep(0.2)
        return
    host, pid = holder.get("host"), holder.get("pid")
    if not _gone(lock, holder):
        raise UserInputError(
            f"{owner}: another {who} (pid {pid} on host {host}) is {what}; wait for it to finish (a lock not "
            f"refreshed for {LOCK_STALE_S:.0f} s is taken over), or, if that process is gone, delete {lock}"
        )
    log.warning("%s: taking over the lock of process %s on %s, which no longer runs", owner, pid, host)
    stolen = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    try:
        os.replace(lock, stolen)
    except FileNotFoundError:
        return  # another process took it over first
    if read_lock(stolen) != holder:  # it changed in between: put the live lock back
        with contextlib.suppress(FileExistsError):
            os.link(stolen, lock)
    stolen.unlink()


def read_lock(path: Path) -> dict[str, Any] | None:
    """The holder a lock file records, or None (no file, or not readable yet)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _lock_age(path: Path) -> float:
    """Seconds since ``path`` was last modified (refreshed); 0 where it cannot be read."""
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except OSError:
        return 0.0
