"""Boxes in voxel space: pure integer geometry, no numpy or torch.

A :class:`Box` is the half-open region ``[offset, offset + shape)``; axes are ordered as
the data is (``(Z, Y, X)`` on disk, ``(Y, X)`` for a slice). Halo maths reads like the
paper: ``read = write.grow(context)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import product


@dataclass(frozen=True)
class Box:
    """Half-open box ``[offset, offset + shape)`` in voxels."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "offset", tuple(int(v) for v in self.offset))
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))
        if len(self.offset) != len(self.shape):
            raise ValueError(f"offset {self.offset} and shape {self.shape} differ in length")
        if any(s < 0 for s in self.shape):
            raise ValueError(f"negative box shape {self.shape}")

    @classmethod
    def from_shape(cls, shape: Sequence[int]) -> Box:
        """The box ``[0, shape)``."""
        return cls((0,) * len(shape), tuple(shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def end(self) -> tuple[int, ...]:
        """One past the last voxel per axis."""
        return tuple(o + s for o, s in zip(self.offset, self.shape))

    @property
    def size(self) -> int:
        """Number of voxels."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def empty(self) -> bool:
        return any(s == 0 for s in self.shape)

    def grow(self, by: int | Sequence[int]) -> Box:
        """Grow by ``by`` voxels on every side (negative shrinks)."""
        by = (by,) * self.ndim if isinstance(by, int) else tuple(by)
        return Box(
            tuple(o - b for o, b in zip(self.offset, by)),
            tuple(s + 2 * b for s, b in zip(self.shape, by)),
        )

    def shift(self, by: Sequence[int]) -> Box:
        """Translate by ``by`` voxels."""
        return Box(tuple(o + b for o, b in zip(self.offset, by)), self.shape)

    def intersect(self, other: Box) -> Box:
        """The overlap of two boxes (empty shape where they do not overlap)."""
        lo = tuple(max(a, b) for a, b in zip(self.offset, other.offset))
        hi = tuple(min(a, b) for a, b in zip(self.end, other.end))
        return Box(lo, tuple(max(0, h - l) for l, h in zip(lo, hi)))

    def contains(self, other: Box) -> bool:
        """Whether ``other`` lies entirely inside this box."""
        return all(a <= b for a, b in zip(self.offset, other.offset)) and all(
            a >= b for a, b in zip(self.end, other.end)
        )

    def relative_to(self, origin: Box) -> Box:
        """This box in the coordinates of ``origin`` (its offset becomes 0)."""
        return self.shift(tuple(-o for o in origin.offset))

    def to_slices(self) -> tuple[slice, ...]:
        """Slices that cut this box out of an array whose origin is 0."""
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.shape))


def chunk_grid(shape: Sequence[int], chunks: Sequence[int]) -> Iterator[Box]:
    """The boxes of a regular chunk grid over ``[0, shape)``, C order; edge boxes are clipped."""
    ranges = [range(0, n, c) for n, c in zip(shape, chunks, strict=True)]
    whole = Box.from_shape(shape)
    for start in product(*ranges):
        yield Box(start, tuple(chunks)).intersect(whole)
