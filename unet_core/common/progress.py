"""Progress bars for long work: a live bar on a terminal, sparse lines in log files, none when
info messages are off (``unet -q``)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Wrap ``iterable`` in a progress bar on stderr.

    On a terminal the bar updates live; when stderr is a file (a Snakemake ``log:``) it is
    written at most every 30 s, so logs stay readable.
    """
    yield from progress_bar(iterable, desc=desc, total=total, unit=unit)


def progress_bar(
    iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it", initial: int = 0
) -> tqdm:
    """The bar :func:`progress` uses, returned so callers can ``set_postfix`` (e.g. the loss).

    ``initial``: work already done before ``iterable`` starts (a resumed run). It must be given
    here, not added with ``update``: in a log file the bar prints at most every 30 s, and tqdm
    would count an unprinted ``update`` a second time at its next print.
    """
    tty = sys.stderr.isatty()
    return tqdm(
        iterable,
        disable=not logging.getLogger("unet_core").isEnabledFor(logging.INFO),
        desc=desc,
        total=total,
        initial=initial,
        unit=unit,
        file=sys.stderr,
        mininterval=0.2 if tty else 30.0,
        ascii=not tty,
        dynamic_ncols=tty,
        leave=True,
    )
