"""Slice selections such as ``0-19`` or ``0,3,5-7``: the ``--slices`` options of the stages and the
``slices`` column of the samples table, parsed one way."""

from __future__ import annotations

from unet_core.common.errors import UserInputError


def parse_slices(text: str | None, n_slices: int, *, what: str) -> list[int]:
    """Parse a slice selection such as ``"0-19"``, ``"0,2,5-7"`` or ``"all"``.

    Args:
        text: the selection; ``None``/``"all"``/``""`` selects every slice.
        n_slices: slices in the stack (Z), to check the bounds.
        what: name of the option or file, for the error message.

    Raises:
        UserInputError: malformed selection, a range whose end comes before its start, an
            index out of range, or a selection of no slice at all (never silently nothing).
    """
    if text is None or str(text).strip() in ("", "all"):
        if n_slices < 1:
            raise UserInputError(f"{what}: the stack has no slices to select")
        return list(range(n_slices))
    chosen: list[int] = []
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
        chosen.extend(range(lo, hi + 1))
    if not chosen:
        raise UserInputError(f"{what}: slice selection {text!r} selects no slice")
    bad = [z for z in chosen if not 0 <= z < n_slices]
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (f" ... ({len(bad)} in all)" if len(bad) > 5 else "")
        raise UserInputError(
            f"{what}: slice(s) {shown} out of range for a stack of {n_slices} slices (0-{n_slices - 1})")
    if len(set(chosen)) != len(chosen):
        raise UserInputError(f"{what}: slice selection {text!r} lists a slice twice")
    return chosen
