"""Host memory behaviour of long block-by-block loops.

glibc's malloc serves large requests (the float tensors of a block: tens of MB) with fresh
``mmap`` pages and returns them to the system on ``free``; the next block's tensors then pay
for first-touch page faults on every page again. Measured on the CPU inference engine (2 x
4096² uint16 stack, a zero-cost network, one thread) that doubled the host time per output
pixel (90 -> 43 CPU-ms per Mpx). :func:`reuse_freed_memory` raises glibc's mmap and trim
thresholds to 1 GiB so freed blocks are reused; peak memory is unchanged, the process just
keeps it until it ends.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_THRESHOLD = 1 << 30
_done = False


def reuse_freed_memory() -> bool:
    """Keep freed allocations below 1 GiB in the process for reuse (glibc only; once per process).

    Returns:
        Whether the setting is in effect (False on a C library without ``mallopt``).
    """
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        ok = bool(libc and libc.mallopt(M_MMAP_THRESHOLD, _THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, _THRESHOLD))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        ok = False
    _done = ok
    log.debug("malloc keeps freed blocks for reuse: %s", ok)
    return ok
