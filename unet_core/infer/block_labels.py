"""Labels made block by block, joined across block faces into ids unique over the stack.

A pass of ``unet merge`` (seeds, components, flooding) labels each block on its own. Values
``1..n_fixed`` in a block are ids that are already global (the watershed's seeds, numbered
before flooding); values above ``n_fixed`` are the block's own: ``n_fixed + 1, n_fixed + 2, ...``.
With ``counts[b]`` such values in block ``b`` (flat index in C order of the block grid), the
*provisional* id of value ``v`` in block ``b`` is::

    v                   if v <= n_fixed
    v + offsets[b]      otherwise, offsets = exclusive cumulative sum of counts in block order

so provisional ids never depend on which piece labelled which block. Ids that touch across a
face between two blocks are the same object and are joined; two fixed ids are never joined.
The final ids number the joined sets ``1..N`` in order of their smallest provisional id.

A piece (a contiguous run of blocks in C order) records the pairs across every face between two
of its own blocks, and the strips (the outermost layer of labels) of its blocks on faces to
blocks of other pieces; :func:`number_labels` joins those strips with the neighbours' from the
other pieces. The serial work is O(provisional ids + the strips on faces between pieces), never
O(pixels). Faces are handled along any axes of the block grid (``face_axes``): (y, x) for the
2-D per-slice mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from unet_core.common.errors import UserInputError

#: Axes of the (Z, Y, X) block grid whose faces join labels: y and x (slices are independent).
FACE_AXES = (1, 2)
UINT32_IDS = 2**32 - 1


def flat_index(index: Sequence[int], grid: Sequence[int]) -> int:
    """Position of block ``index`` in the C order of a block grid of shape ``grid``."""
    return int(np.ravel_multi_index(tuple(int(i) for i in index), tuple(int(g) for g in grid)))


def face_pairs(earlier: np.ndarray, later: np.ndarray, n_fixed: int) -> np.ndarray:
    """(n, 2) unique value pairs that touch across a face: ``earlier`` is the last layer of one
    block, ``later`` the first layer of its neighbour (same shape); background (0) and pairs of
    two fixed ids are left out. Sorted, so the result does not depend on the scan order."""
    a, b = earlier.ravel().astype(np.int64), later.ravel().astype(np.int64)
    keep = (a > 0) & (b > 0) & ((a > n_fixed) | (b > n_fixed))
    if not keep.any():
        return np.zeros((0, 2), np.int64)
    return np.unique(np.stack([a[keep], b[keep]], axis=1), axis=0)


@dataclass
class PieceLabels:
    """What one piece records of a labelling pass (saved in its record, joined by :func:`number_labels`).

    Attributes:
        blocks: flat indices of the piece's blocks, in order.
        counts: block-own label values per block (values above ``n_fixed``).
        pairs: (n, 4) int64 rows ``(flat_a, value_a, flat_b, value_b)`` touching across faces
            between two blocks of the piece.
        strips: ``(flat, axis, side) -> labels`` of the piece's outermost layers facing a block of
            another piece (side 0: the first layer along ``axis``, 1: the last).
    """

    blocks: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    pairs: list[np.ndarray] = field(default_factory=list)
    strips: dict[tuple[int, int, int], np.ndarray] = field(default_factory=dict)

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """The record as named arrays (for ``np.savez``)."""
        keys = sorted(self.strips)
        return {
            f"{prefix}blocks": np.asarray(self.blocks, np.int64),
            f"{prefix}counts": np.asarray(self.counts, np.int64),
            f"{prefix}pairs": np.concatenate(self.pairs) if self.pairs else np.zeros((0, 4), np.int64),
            f"{prefix}strip_keys": np.asarray(keys, np.int64).reshape(-1, 3),
            f"{prefix}strip_sizes": np.asarray([self.strips[k].size for k in keys], np.int64),
            f"{prefix}strip_values": (
                np.concatenate([self.strips[k].ravel() for k in keys]) if keys else np.zeros(0, np.uint32)
            ).astype(np.uint32),
        }

    @classmethod
    def from_arrays(cls, data: dict[str, np.ndarray], prefix: str) -> PieceLabels:
        keys = [tuple(int(v) for v in row) for row in data[f"{prefix}strip_keys"]]
        values = (
            np.split(data[f"{prefix}strip_values"], np.cumsum(data[f"{prefix}strip_sizes"])[:-1])
            if keys
            else []
        )
        return cls(
            [int(b) for b in data[f"{prefix}blocks"]],
            [int(c) for c in data[f"{prefix}counts"]],
            [data[f"{prefix}pairs"]],
            dict(zip(keys, values)),
        )


class PieceLabeller:
    """Records a piece's labels block by block (:meth:`add`), in C order of the block grid.

    Args:
        grid: shape of the block grid (Z, GY, GX).
        piece_blocks: flat indices of the piece's blocks (a contiguous run of C order).
        n_fixed: values ``<= n_fixed`` are global ids (never joined with each other).
        face_axes: block-grid axes along which faces join labels.
    """

    def __init__(
        self,
        grid: Sequence[int],
        piece_blocks: Sequence[int],
        n_fixed: int,
        face_axes: Sequence[int] = FACE_AXES,
    ) -> None:
        self.grid, self.n_fixed, self.face_axes = tuple(grid), int(n_fixed), tuple(face_axes)
        self.mine = set(int(b) for b in piece_blocks)
        self.record = PieceLabels()
        self._last: dict[tuple[int, int], np.ndarray] = {}  # (flat, axis) -> last layer, for later blocks

    def add(self, index: Sequence[int], labels: np.ndarray, count: int) -> None:
        """Record one block: ``labels`` (the block's array, axes as the grid's) and its number of
        block-own values ``count`` (values ``n_fixed + 1 .. n_fixed + count``)."""
        flat = flat_index(index, self.grid)
        self.record.blocks.append(flat)
        self.record.counts.append(int(count))
        for axis in self.face_axes:
            first, last = np.take(labels, 0, axis=axis), np.take(labels, -1, axis=axis)
            if index[axis] > 0:
                before = list(index)
                before[axis] -= 1
                prev = flat_index(before, self.grid)
                if prev in self.mine:
                    pairs = face_pairs(self._last.pop((prev, axis)), first, self.n_fixed)
                    if len(pairs):
                        self.record.pairs.append(
                            np.column_stack(
                                [
                                    np.full(len(pairs), prev),
                                    pairs[:, 0],
                                    np.full(len(pairs), flat),
                                    pairs[:, 1],
                                ]
                            )
                        )
                else:
                    self.record.strips[(flat, axis, 0)] = first.copy()
            if index[axis] + 1 < self.grid[axis]:
                after = list(index)
                after[axis] += 1
                if flat_index(after, self.grid) in self.mine:
                    self._last[(flat, axis)] = last.copy()
                else:
                    self.record.strips[(flat, axis, 1)] = last.copy()


@dataclass(frozen=True)
class Numbering:
    """The result of :func:`number_labels`.

    Attributes:
        n_fixed: values ``<= n_fixed`` were global ids.
        offsets: (n_blocks,) int64 offset added to block-own values (see the module docstring).
        final: (n_provisional + 1,) uint32 lookup table provisional id -> final id (0 -> 0).
    """

    n_fixed: int
    offsets: np.ndarray
    final: np.ndarray

    @property
    def n_final(self) -> int:
        return int(self.final.max(initial=0))

    def provisional(self, flat: int | np.ndarray, values: np.ndarray) -> np.ndarray:
        """Provisional ids (int64) of label ``values`` of block(s) ``flat``."""
        values = np.asarray(values).astype(np.int64)
        return values + np.where(values > self.n_fixed, self.offsets[flat], 0)


def number_labels(
    pieces: Sequence[PieceLabels],
    grid: Sequence[int],
    n_fixed: int,
    *,
    what: str,
    face_axes: Sequence[int] = FACE_AXES,
) -> Numbering:
    """Join the pieces' labels across every face and number the sets (see the module docstring).

    Args:
        pieces: the records of all pieces (together, every block once).
        grid: the block grid.
        n_fixed: values ``<= n_fixed`` are global ids, never joined with each other.
        what: what is numbered, for the one-line error beyond uint32 ("cells", "seeds").

    Raises:
        UserInputError: more than 2**32 - 1 ids, counted per block (uint32 labels cannot hold them).
    """
    n_blocks = int(np.prod(grid))
    counts = np.zeros(n_blocks, np.int64)
    for piece in pieces:
        counts[np.asarray(piece.blocks, np.int64)] = piece.counts
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if n_blocks else counts
    total = n_fixed + int(counts.sum())
    if total > UINT32_IDS:  # before any table of that size is made, and before any final id is written
        raise UserInputError(
            f"{total} {what} (counted per block, before joining across block faces): more than "
            "2**32 - 1, the most that uint32 labels hold; split the stack into several samples "
            "(fewer slices each)"
        )
    numbering = Numbering(n_fixed, offsets, np.zeros(0, np.uint32))
    rows = [p for piece in pieces for p in piece.pairs if len(p)]
    rows += _cross_piece_pairs(pieces, grid, n_fixed, face_axes)
    pairs = np.concatenate(rows) if rows else np.zeros((0, 4), np.int64)
    a = numbering.provisional(pairs[:, 0], pairs[:, 1])
    b = numbering.provisional(pairs[:, 2], pairs[:, 3])
    root = _smallest_member(total, a, b)  # uint32 throughout: 4 bytes per provisional id and array
    is_root = root == np.arange(total + 1, dtype=np.uint32)
    is_root[0] = False
    final = np.cumsum(is_root, dtype=np.uint32)[root]
    final[0] = 0
    return Numbering(n_fixed, offsets, final)


def _cross_piece_pairs(
    pieces: Sequence[PieceLabels], grid: Sequence[int], n_fixed: int, face_axes: Sequence[int]
) -> list[np.ndarray]:
    """Pair rows across the faces between blocks of different pieces, from their strips."""
    last = {
        (flat, axis): strip for piece in pieces for (flat, axis, side), strip in piece.strips.items() if side
    }
    rows = []
    for piece in pieces:
        for (flat, axis, side), first in piece.strips.items():
            if side or axis not in face_axes:
                continue
            index = list(np.unravel_index(flat, tuple(grid)))
            index[axis] -= 1
            prev = flat_index(index, grid)
            earlier = last.get((prev, axis))
            if earlier is None:
                raise UserInputError(
                    f"the record of block {prev} lacks its face strip; rerun the merge from its start"
                )
            pairs = face_pairs(earlier, first, n_fixed)
            if len(pairs):
                rows.append(
                    np.column_stack(
                        [np.full(len(pairs), prev), pairs[:, 0], np.full(len(pairs), flat), pairs[:, 1]]
                    )
                )
    return rows


def _smallest_member(total: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(total + 1,) uint32 smallest id of each id's connected set, for the edges ``a[i] - b[i]``."""
    root = np.arange(total + 1, dtype=np.uint32)
    if not len(a):
        return root
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ids, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    n = len(ids)
    graph = coo_matrix((np.ones(len(a), np.int8), (inverse[: len(a)], inverse[len(a) :])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    smallest = np.full(component.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(smallest, component, ids)
    root[ids] = smallest[component].astype(np.uint32)
    return root


def drop_small(final: np.ndarray, areas: np.ndarray, *, min_px: int) -> np.ndarray:
    """The lookup table ``final`` with objects of fewer than ``min_px`` pixels sent to background
    and the rest renumbered 1..K' in their order (``min_px`` 0: unchanged).

    Args:
        final: lookup table provisional id -> final id.
        areas: pixels of each final id (index = final id).
    """
    if min_px <= 0:
        return final
    keep = areas >= min_px
    keep[0] = False
    renumber = np.cumsum(keep).astype(np.uint32) * keep
    return renumber[final]
