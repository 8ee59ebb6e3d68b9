"""Warping error of one 2-D slice (Jain et al. 2010): topological errors of a binary prediction.

* warping error: the ground-truth foreground is deformed by flipping simple points
  (pixels whose flip changes no topology) towards the prediction until no mismatching
  simple point is left; the pixels still mismatching are topological errors (splits,
  merges, holes, missing or extra objects). See :func:`warping_error_count`;
  :func:`warping_sweep` scores every threshold of a probability map.

Conventions (thresholds, foreground / background connectivity):
:mod:`unet_core.evaluate.score_inputs`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from unet_core.common.labels import connectivity_structure
from unet_core.evaluate.score_inputs import (
    ISBI_THRESHOLDS,
    above_threshold,
    as_probability,
    check_2d,
    check_same_shape,
)

log = logging.getLogger(__name__)

# Neighbour offsets (dy, dx) in the order of the bits of a 3x3 neighbourhood code.
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def _components_in_ring(bits: Sequence[bool], connectivity: int, *, adjacent_to_centre: bool) -> int:
    """Connected components of the set pixels of the 8-neighbourhood (centre excluded)."""
    cells = {_NEIGHBOURS[k] for k in range(8) if bits[k]}
    seen: set[tuple[int, int]] = set()
    count = 0
    for start in cells:
        if start in seen:
            continue
        stack, comp = [start], {start}
        seen.add(start)
        while stack:
            y, x = stack.pop()
            for q in cells - seen:
                dy, dx = abs(q[0] - y), abs(q[1] - x)
                if (dy + dx == 1) or (connectivity == 8 and max(dy, dx) == 1):
                    seen.add(q)
                    comp.add(q)
                    stack.append(q)
        if not adjacent_to_centre or any(abs(y) + abs(x) == 1 for y, x in comp):
            count += 1
    return count


@lru_cache(maxsize=2)
def topological_numbers(connectivity: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Look-up tables of the topological numbers of a pixel's 3x3 neighbourhood.

    For foreground connectivity 4 (background 8): T_fg = number of 4-components of the
    foreground of the 8-neighbourhood that are 4-adjacent to the pixel, T_bg = number of
    8-components of its background (Bertrand 1994); for foreground connectivity 8 the
    roles swap.

    Args:
        connectivity: foreground connectivity, 4 or 8.

    Returns:
        ``(t_fg, t_bg)``: two (256,) uint8 arrays indexed by the neighbourhood code (bit k
        set when neighbour ``_NEIGHBOURS[k]`` is foreground).
    """
    connectivity_structure(connectivity)
    background = 12 - connectivity  # 4 <-> 8
    t_fg = np.zeros(256, dtype=np.uint8)
    t_bg = np.zeros(256, dtype=np.uint8)
    for code in range(256):
        fg = [bool(code >> k & 1) for k in range(8)]
        t_fg[code] = _components_in_ring(fg, connectivity, adjacent_to_centre=connectivity == 4)
        t_bg[code] = _components_in_ring([not b for b in fg], background, adjacent_to_centre=background == 4)
    return t_fg, t_bg


@lru_cache(maxsize=2)
def simple_point_table(connectivity: int = 4) -> np.ndarray:
    """Look-up table: is a pixel with this 3x3 neighbourhood a simple point?

    A pixel is simple when flipping it changes no topology: T_fg = 1 and T_bg = 1
    (:func:`topological_numbers`). The test does not depend on the pixel's own value, so
    it serves both directions of the flip.

    Args:
        connectivity: foreground connectivity, 4 or 8.

    Returns:
        (256,) bool, indexed by the neighbourhood code.
    """
    t_fg, t_bg = topological_numbers(connectivity)
    return (t_fg == 1) & (t_bg == 1)


@dataclass(frozen=True)
class WarpResult:
    """Outcome of warping the ground truth towards a prediction.

    Attributes:
        errors: pixels still mismatching after the warp (topological errors).
        splits: of those, pixels whose flip would split an object of the warped truth.
        merges: of those, pixels whose flip would join two objects of the warped truth.
        pixels: pixels in the slice.
        passes: sweeps over the mismatching pixels that were needed.
        warped: (Y, X) bool, the warped ground-truth foreground.

    The other errors (``errors - splits - merges``) are missing or extra objects and
    added or removed holes.
    """

    errors: int
    splits: int
    merges: int
    pixels: int
    passes: int
    warped: np.ndarray

    @property
    def error(self) -> float:
        """All topological-error pixels / pixels."""
        return self.errors / self.pixels if self.pixels else 0.0

    @property
    def split_merge_error(self) -> float:
        """Split and merge pixels / pixels (the ISBI 2012 "splits and mergers" warping error)."""
        return (self.splits + self.merges) / self.pixels if self.pixels else 0.0


def warping_error_count(
    true_fg: np.ndarray, pred_fg: np.ndarray, *, connectivity: int = 4, max_passes: int = 100_000
) -> WarpResult:
    """Warping error of a binary prediction (Jain et al. 2010, as used by ISBI 2012).

    The ground-truth foreground L is deformed into L* by flipping, one at a time, pixels
    where L* differs from the prediction T and that are simple points of L*; L* therefore
    keeps the topology of L. What still differs from T when no mismatching simple point is
    left is counted: each split, merge, hole, missing or extra object leaves at least one
    such pixel, while boundary shifts leave none. Outside the image is background.

    Flips are done in parallel on the four (y mod 2, x mod 2) subfields: two pixels of a
    subfield are never in each other's 3x3 neighbourhood, so flipping them together equals
    flipping them in sequence. After the first sweep only mismatching pixels next to a
    flipped pixel are tested again (nothing else can have become simple), and every pass
    but the last flips a pixel, so passes <= mismatches + 1 and the work is about
    O(mismatches x 8) plus a cheap filter per pass. The order of flips can change which pixel of a topological
    defect remains, not how many defects remain (one pixel per defect in the usual
    cases); the Fiji implementation orders flips by the prediction's confidence instead.

    Args:
        true_fg: (Y, X) bool ground-truth foreground (cell interior).
        pred_fg: (Y, X) bool predicted foreground.
        connectivity: foreground connectivity, 4 (background 8) or 8 (background 4).
        max_passes: safety cap on sweeps (never reached in practice; logged if it is).

    Returns:
        The :class:`WarpResult`.
    """
    true_fg = check_2d("true_fg", true_fg).astype(bool, copy=False)
    pred_fg = check_2d("pred_fg", pred_fg).astype(bool, copy=False)
    check_same_shape(true_fg=true_fg, pred_fg=pred_fg)
    table = simple_point_table(connectivity)
    h, w = true_fg.shape
    width = w + 2
    padded = np.zeros((h + 2, width), dtype=np.uint8)
    padded[1:-1, 1:-1] = true_fg
    target = np.zeros_like(padded)
    target[1:-1, 1:-1] = pred_fg
    flat, goal = padded.ravel(), target.ravel()
    offsets = np.array([dy * width + dx for dy, dx in _NEIGHBOURS], dtype=np.intp)
    weights = (1 << np.arange(8)).astype(np.intp)
    todo = np.flatnonzero(flat != goal)
    ys, xs = np.divmod(todo, width)
    subfield = (ys % 2) * 2 + xs % 2
    todo_by_field = [todo[subfield == s] for s in range(4)]
    # A pixel's simplicity can only change when its 3x3 neighbourhood changes: after the
    # first sweep only the mismatching neighbours of flipped pixels are looked at again.
    dirty = np.ones(flat.size, dtype=bool)
    passes = 0
    while passes < max_passes:
        passes += 1
        flipped_any = False
        for s in range(4):
            remaining = todo_by_field[s]
            cand = remaining[dirty[remaining]]
            if cand.size == 0:
                continue
            dirty[cand] = False
            codes = (flat[cand[:, None] + offsets] * weights).sum(axis=1)
            simple = table[codes]
            if simple.any():
                flips = cand[simple]
                flat[flips] ^= 1
                dirty[(flips[:, None] + offsets).ravel()] = True
                keep = np.ones(remaining.size, dtype=bool)
                keep[np.searchsorted(remaining, flips)] = False
                todo_by_field[s] = remaining[keep]
                flipped_any = True
        if not flipped_any:
            break
    else:
        log.warning("warping stopped after max_passes=%d sweeps; the error is an upper bound", max_passes)
    residual = np.concatenate(todo_by_field)
    splits, merges = _classify_residual(padded, residual, connectivity=connectivity)
    return WarpResult(
        errors=int(residual.size), splits=splits, merges=merges, pixels=h * w, passes=passes,
        warped=padded[1:-1, 1:-1].astype(bool),
    )


def _distinct_nonzero(labels: np.ndarray) -> np.ndarray:
    """Number of distinct non-zero values in each row of a (M, k) integer array."""
    if labels.shape[0] == 0:
        return np.zeros(0, dtype=np.intp)
    srt = np.sort(labels, axis=1)
    new = np.concatenate([srt[:, :1] != 0, (np.diff(srt, axis=1) != 0) & (srt[:, 1:] != 0)], axis=1)
    return new.sum(axis=1)


def _classify_residual(padded: np.ndarray, residual: np.ndarray, *, connectivity: int) -> tuple[int, int]:
    """Split and merge pixels among the non-simple mismatches left by the warp.

    A background pixel of L* whose flip would join foreground pieces (T_fg >= 2) that
    belong to different objects of L* is a merge; a foreground pixel whose flip would
    join background pieces (T_bg >= 2) of which two are the same background region is a
    split (the background loop cuts the object). Other flips would close a loop into a
    hole, open a hole, or create or delete an object.
    """
    if residual.size == 0:
        return 0, 0
    width = padded.shape[1]
    flat = padded.ravel()
    background = 12 - connectivity
    t_fg, t_bg = topological_numbers(connectivity)
    all8 = np.array([dy * width + dx for dy, dx in _NEIGHBOURS], dtype=np.intp)
    four = np.array([dy * width + dx for dy, dx in _NEIGHBOURS if abs(dy) + abs(dx) == 1], dtype=np.intp)
    codes = (flat[residual[:, None] + all8] * (1 << np.arange(8))).sum(axis=1)
    is_fg = flat[residual] == 1
    fg_labels = ndimage.label(padded, structure=connectivity_structure(connectivity))[0].ravel()
    bg_labels = ndimage.label(padded == 0, structure=connectivity_structure(background))[0].ravel()
    fg_adjacent = four if connectivity == 4 else all8
    bg_adjacent = four if background == 4 else all8
    objects = _distinct_nonzero(fg_labels[residual[:, None] + fg_adjacent])
    regions = _distinct_nonzero(bg_labels[residual[:, None] + bg_adjacent])
    merges = ~is_fg & (t_fg[codes] >= 2) & (objects >= 2)
    splits = is_fg & (t_bg[codes] >= 2) & (regions < t_bg[codes])
    return int(splits.sum()), int(merges.sum())


def warping_sweep(
    cell_probability: np.ndarray,
    true_fg: np.ndarray,
    *,
    thresholds: Sequence[float] = ISBI_THRESHOLDS,
    connectivity: int = 4,
) -> list[tuple[int, int]]:
    """Warping-error pixel counts of ``cell_probability > t`` for every threshold t.

    Args:
        cell_probability: (Y, X) float, P(cell interior).
        true_fg: (Y, X) bool ground-truth foreground.
        thresholds: the thresholds t.
        connectivity: foreground connectivity, 4 or 8.

    Returns:
        ``(all topological-error pixels, split + merge pixels)`` per threshold (divide by
        the pixel count).
    """
    prob = as_probability("cell_probability", cell_probability)
    out = []
    for t in thresholds:
        r = warping_error_count(true_fg, above_threshold(prob, t), connectivity=connectivity)
        out.append((r.errors, r.splits + r.merges))
    return out
