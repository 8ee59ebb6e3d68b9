"""Slice selections such as ``0-19`` or ``0,3,5-7``: the ``--slices`` options of the stages and the
``slices`` column of the samples table, parsed one way.

A selection is kept as its inclusive ranges until its bounds are checked: ``0-3000000000`` is one
range, not three billion integers (expanded first, it filled the memory before the bounds check)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import chain, islice

from unet_core.common.errors import UserInputError

#: Inclusive (first, last) slice ranges, in the order written.
Ranges = list[tuple[int, int]]


def slice_ranges(text: str | None, *, what: str) -> Ranges | None:
    """The ranges of a selection such as ``"0-19"`` or ``"0,2,5-7"``; None for every slice
    (``None``, ``""`` or ``"all"``).

    Raises:
        UserInputError: a malformed selection, a range whose end comes before its start, or a
            slice listed twice.
    """
    if text is None or str(text).strip() in ("", "all"):
        return None
    ranges: Ranges = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            lo, hi = (int(v) for v in part.split("-", 1)) if "-" in part else (int(part), int(part))
        except ValueError:
            raise UserInputError(
                f"{what}: cannot parse slice selection {text!r} (use e.g. 0-19 or 0,3,5-7)") from None
        if hi < lo:
            raise UserInputError(
                f"{what}: range {part!r} in {text!r} selects no slice (its end comes before its start); "
                f"write it as {hi}-{lo}")
        ranges.append((lo, hi))
    if count(merged(ranges)) != count(ranges):
        raise UserInputError(f"{what}: slice selection {text!r} lists a slice twice")
    return ranges


def merged(ranges: Sequence[tuple[int, int]]) -> Ranges:
    """``ranges`` sorted, with overlapping or adjacent ones joined."""
    out: Ranges = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def count(ranges: Sequence[tuple[int, int]]) -> int:
    """How many slices ``ranges`` (disjoint, e.g. :func:`merged`) hold."""
    return sum(hi - lo + 1 for lo, hi in ranges)


def first(ranges: Sequence[tuple[int, int]], n: int) -> list[int]:
    """The first ``n`` slices of ``ranges``, without expanding the rest."""
    values: Iterator[int] = chain.from_iterable(range(lo, hi + 1) for lo, hi in ranges)
    return list(islice(values, n))


def parse_slices(text: str | None, n_slices: int, *, what: str) -> list[int]:
    """Parse a slice selection such as ``"0-19"``, ``"0,2,5-7"`` or ``"all"``.

    Args:
        text: the selection; ``None``/``"all"``/``""`` selects every slice.
        n_slices: slices in the stack (Z), to check the bounds.
        what: name of the option or file, for the error message.

    Raises:
        UserInputError: malformed selection, a range whose end comes before its start (never
            silently nothing), a slice listed twice, or an index out of range.
    """
    ranges = slice_ranges(text, what=what)
    if ranges is None:
        if n_slices < 1:
            raise UserInputError(f"{what}: the stack has no slices to select")
        return list(range(n_slices))
    outside = merged([(max(lo, n_slices), hi) for lo, hi in ranges if hi >= n_slices])
    if outside:
        bad = count(outside)
        shown = ", ".join(map(str, first(outside, 5))) + (f" ... ({bad} in all)" if bad > 5 else "")
        raise UserInputError(
            f"{what}: slice(s) {shown} out of range for a stack of {n_slices} slices (0-{n_slices - 1})")
    return [z for lo, hi in ranges for z in range(lo, hi + 1)]
