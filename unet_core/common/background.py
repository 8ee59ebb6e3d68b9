"""Work that may still be writing after a stage has failed, and how to wait for it.

A failed stage removes its temporary output (:func:`unet_core.common.atomic.atomic_output`).
Two kinds of work can outlive the error and write into that temporary after its removal,
re-creating part of it: Dask's threaded scheduler raises a task's error at once while the
other tasks keep running on the pool, and zarr writes a store's chunks and metadata as
concurrent tasks on its own event-loop thread, whose siblings keep running when one fails.
:func:`settle_background_writes` waits for both before anything is removed or reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait

#: How long to wait for work still running after a failure, s.
SETTLE_TIMEOUT_S = 60.0

_settlers: list[Callable[[float], None]] = []


class SettlingThreadPool(ThreadPoolExecutor):
    """A thread pool that can cancel its queued work and wait for its running work without
    shutting down (:meth:`settle`), e.g. Dask's pool while a failed output is removed."""

    def __init__(self, max_workers: int, **kwargs) -> None:
        super().__init__(max_workers, **kwargs)
        self._outstanding: set[Future] = set()
        self._outstanding_lock = threading.Lock()

    def submit(self, fn, /, *args, **kwargs) -> Future:  # noqa: ANN001 (Executor's signature)
        future = super().submit(fn, *args, **kwargs)
        with self._outstanding_lock:
            self._outstanding.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: Future) -> None:
        with self._outstanding_lock:
            self._outstanding.discard(future)

    def settle(self, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
        """Cancel the work not yet started and wait (at most ``timeout_s``) for the running work."""
        with self._outstanding_lock:
            outstanding = list(self._outstanding)
        for future in outstanding:
            future.cancel()
        wait(outstanding, timeout=timeout_s)


@contextlib.contextmanager
def background_work(settle: Callable[[float], None]) -> Iterator[None]:
    """For the duration, :func:`settle_background_writes` also calls ``settle(timeout_s)``: a
    function that returns once work started in the background has ended."""
    _settlers.append(settle)
    try:
        yield
    finally:
        _settlers.remove(settle)


def settle_background_writes(timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    """Wait until registered background work (:func:`background_work`) and the writes zarr has
    in flight have ended, and take zarr's errors (asyncio would print them at exit, after the
    stage's one-line error). Call before removing a failed output and before reporting an error."""
    for settle in reversed(list(_settlers)):
        with contextlib.suppress(Exception):
            settle(timeout_s)
    _settle_zarr(timeout_s)


def _settle_zarr(timeout_s: float) -> None:
    """Wait for the tasks on zarr's event-loop thread; nothing to do where zarr was never loaded."""
    zarr_sync = sys.modules.get("zarr.core.sync")
    loop = getattr(zarr_sync, "loop", [None])[0]
    if loop is None or not loop.is_running() or zarr_sync.iothread[0] is threading.current_thread():
        return

    async def settle() -> None:
        pending = asyncio.all_tasks() - {asyncio.current_task()}
        if not pending:
            return
        done, _ = await asyncio.wait(pending, timeout=timeout_s)
        for task in done:  # retrieved: asyncio no longer reports them at exit
            if not task.cancelled():
                task.exception()

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(settle(), loop).result(timeout_s + 5)
