"""The project's one mirror convention for extrapolating images beyond their borders.

Convention (pinned by ``tests/unit/test_mirror.py``): reflect about the *centre* of the
border pixel, without repeating it::

    row      a b c d e
    mirrored c b | a b c d e | d c

This is numpy ``np.pad(mode="reflect")``, scipy.ndimage ``mode="mirror"``, torch
``F.pad(mode="reflect")`` and ``F.grid_sample(padding_mode="reflection",
align_corners=True)``. (numpy ``"symmetric"`` / scipy ``"reflect"`` repeat the border pixel
and are *not* used.) Beyond one reflection the pattern repeats with period ``2 * (n - 1)``;
an axis of length 1 extends as a constant.

Tiling (overlap-tile inference) and augmentation (elastic deformation) both use it, so the
context a network sees at an image border is the same in training and in prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SCIPY_MODE = "mirror"


def mirror_index(index: np.ndarray, size: int) -> np.ndarray:
    """Map integer coordinates (any range) to in-bounds coordinates by mirroring.

    Args:
        index: integer array of coordinates along one axis, may be negative or >= size.
        size: length of the axis, >= 1.

    Returns:
        Array of the same shape with values in ``[0, size)``.
    """
    index = np.asarray(index, dtype=np.int64)
    if size < 1:
        raise ValueError(f"cannot mirror into an empty axis (size {size})")
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    folded = np.mod(index, period)
    return np.where(folded < size, folded, period - folded)


def mirror_pad(array: np.ndarray, pad: Sequence[tuple[int, int]] | int) -> np.ndarray:
    """Pad ``array`` by mirroring (the project convention), any pad width, any size.

    Args:
        array: N-D array.
        pad: ``(before, after)`` per axis, or one int for all axes and sides.

    Returns:
        The padded array (a copy).
    """
    if isinstance(pad, int):
        pad = [(pad, pad)] * array.ndim
    index = tuple(
        mirror_index(np.arange(-before, n + after), n)
        for n, (before, after) in zip(array.shape, pad, strict=True)
    )
    return array[np.ix_(*index)]


def read_mirrored(source, start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
    """Read the box ``[start, stop)`` from an array-like, mirroring outside its bounds.

    Reads only the in-bounds part from ``source`` (a NumPy, Zarr or Dask array, or anything with
    ``shape``, ``dtype`` and basic slicing), so a block plus halo is read without loading the
    whole array. Where one reflection suffices (every mirrored coordinate lies inside the box:
    a block and its halo, except on images thinner than the halo) the in-bounds part is read
    straight into place (through ``source.read_into(slices, out)`` where the source has it) and
    the borders are copied from it; otherwise the in-bounds bounding range is read and gathered.

    Args:
        source: array-like, axes as in ``start``/``stop``.
        start: first coordinate per axis (may be negative).
        stop: one past the last coordinate per axis (may exceed the shape).

    Returns:
        NumPy array of shape ``stop - start``.
    """
    index = [mirror_index(np.arange(a, b), n) for a, b, n in zip(start, stop, source.shape, strict=True)]
    if all(((i >= a) & (i < b)).all() for i, a, b in zip(index, start, stop, strict=True)):
        return _read_reflected(source, start, stop, index)
    lo = [int(i.min()) for i in index]
    hi = [int(i.max()) + 1 for i in index]
    block = np.asarray(source[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))])
    return block[np.ix_(*[i - a for i, a in zip(index, lo, strict=True)])]


def _read_reflected(source, start: Sequence[int], stop: Sequence[int], index: Sequence[np.ndarray]) -> np.ndarray:
    """:func:`read_mirrored` where every mirrored coordinate ``index`` lies inside the box."""
    out = np.empty([b - a for a, b in zip(start, stop, strict=True)], np.dtype(source.dtype))
    inner = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(start, stop, source.shape, strict=True))
    region = out[tuple(slice(s.start - a, s.stop - a) for s, a in zip(inner, start, strict=True))]
    if hasattr(source, "read_into"):
        source.read_into(inner, region)
    else:
        region[...] = np.asarray(source[inner])
    for axis, (i, a) in enumerate(zip(index, start, strict=True)):  # axis by axis: corners come last
        border = np.flatnonzero(i != np.arange(a, a + len(i)))
        if border.size:
            where = (slice(None),) * axis
            out[(*where, border)] = out[(*where, i[border] - a)]
    return out
