"""Overlap-tile geometry: where blocks and tiles start, what each one reads and writes.

The paper's overlap-tile strategy feeds the network an input tile that is the output tile
grown by the receptive-field context (``spec.context``, 92 px per side for the paper's
net), mirroring the image beyond its border. With valid convolutions the tiled prediction
is *exactly* the prediction of one monolithic pass over the mirror-padded image, provided
every tile's output origin is a multiple of ``spec.stride`` (2**depth) relative to the
image origin, so every 2x2 max-pool sees the same pixel pairs. This module is the only
place that decides where tiles start.

Two levels, both 2-D per slice (the network is 2-D; z is never mixed)::

    image (Y, X), origin (0, 0)
    +---------------+---------------+-------+
    | block (0, 0)  | block (0, 1)  | (0,2) |   blocks: block_px x block_px, aligned to the
    | +----+----+   |               |       |   output Zarr chunks; edge blocks are clipped
    | |tile|tile|   |               |       |   to the image. Each job owns whole blocks.
    | +----+----+   |               |       |
    | |tile|tile|   |               |       |   tiles: n x n per block, write size S a
    | +----+----+   |               |       |   multiple of stride; the last tile may run
    +---------------+---------------+-------+   past the block/image end (cropped on write)

Edge policy: a tile's write box may extend past the block (and the image); the network
still sees a full input tile, read with :func:`unet_core.common.mirror.read_mirrored`, and only
the part inside the block is kept. An image smaller than one tile, or 1 px wide, is one
block with one tile of at least ``stride`` px per axis.

Per tile and axis, in the network's frame the input is the write box grown by ``before``
on the low side and ``after`` on the high side (:func:`tile_margins`); ``after`` also
covers the few extra output pixels (4 at depth 4) a valid net produces because its
output sizes are ``4 mod 16``, not multiples of 16. Test-time augmentation flips the
tile, so on a flipped axis the original-frame read box is grown by ``after`` below and
``before`` above; in the flipped frame the alignment is relative to the image end rounded
up to ``stride``, so the result is independent of blocks, tiles and jobs as well.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from itertools import product

from unet_core.common.errors import UserInputError
from unet_core.common.geometry import Box
from unet_core.model.spec import AxisGeometry, PackageSpec, Padding, UNetSpec

#: Default block edge (also the output chunk edge) and largest output tile per network pass, px
#: (:class:`unet_core.infer.predict_settings.PredictSettings` and :class:`Tiling` take them).
BLOCK_PX = 2048
TILE_OUT = 1024


class TTA(str, Enum):
    """Test-time augmentation: which dihedral transforms are averaged."""

    NONE = "none"  # identity only
    FLIPS = "flips"  # identity, flip y, flip x, flip both (= rot180)
    D4 = "d4"  # all 8: the 4 rotations and their mirror images


@dataclass(frozen=True)
class Dihedral:
    """A dihedral transform of a (Y, X) tile: flip the flagged axes, then maybe transpose."""

    flip_y: bool = False
    flip_x: bool = False
    transpose: bool = False

    @property
    def flips(self) -> tuple[bool, bool]:
        return (self.flip_y, self.flip_x)


def transforms(tta: TTA | str) -> tuple[Dihedral, ...]:
    """The transforms averaged for ``tta``, identity first (a fixed order: deterministic sums)."""
    tta = TTA(tta)
    if tta is TTA.NONE:
        return (Dihedral(),)
    flips = [Dihedral(fy, fx) for fy, fx in product((False, True), repeat=2)]
    if tta is TTA.FLIPS:
        return tuple(flips)
    return tuple(flips) + tuple(Dihedral(t.flip_y, t.flip_x, True) for t in flips)


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple


def default_block_z(z_chunk: int, spec: UNetSpec) -> int:
    """Slices per block of a 3-D network when none is asked for: the stack's stored z chunk (at most
    its depth) rounded up to the network's z stride, on which z tiles must start for the tiled result
    to equal one pass over the whole volume. ``unet predict`` and the workflow's job count use it."""
    return round_up(int(z_chunk), spec.z_axis.stride)


def check_multiple_of_stride(value: int, spec: UNetSpec, *, what: str, z: bool = False) -> int:
    """Validate a block/tile size: a positive multiple of ``spec.stride`` (with ``z``: of the
    3-D network's z stride, the product of its ``pool_z``).

    Raises:
        UserInputError: not a positive multiple; names the nearest valid sizes.
    """
    stride = spec.z_axis.stride if z else spec.stride
    if not isinstance(value, int) or isinstance(value, bool) or value < stride or value % stride:
        lo = max(stride, (int(value) // stride) * stride)
        hi = max(stride, round_up(int(value), stride))
        near = f"{lo}" if lo == hi else f"{lo} or {hi}"
        unit, product = ("slices", "the z pooling product") if z else ("px", "2**depth")
        raise UserInputError(
            f"{what} {value} {unit} is not a multiple of {product} = {stride} (tile origins must be aligned "
            f"to it for seamless tiling); nearest valid: {near}"
        )
    return value


def tile_margins(spec: UNetSpec, write_px: int) -> tuple[int, int]:
    """Input pixels the network needs beyond an output extent, per side, in its own frame.

    Args:
        spec: the network.
        write_px: output pixels kept along the axis, a positive multiple of ``spec.stride``.

    Returns:
        ``(before, after)``: input = ``write_px + before + after`` is a valid input size.
        Valid padding: ``before = context`` (92 at depth 4) and ``after = context + extra``
        with ``extra`` the surplus output pixels (4 at depth 4). Same padding: a halo of
        the receptive-field radius rounded up to ``stride`` on both sides (not exact).
    """
    return axis_margins(spec.plane, write_px, radius=spec.receptive_field_radius)


def axis_margins(axis: AxisGeometry, write_px: int, *, radius: int | None = None) -> tuple[int, int]:
    """:func:`tile_margins` along one axis of the network (``radius``: a same-padded net's halo,
    by default the axis's receptive-field radius; a package declares its own)."""
    if axis.padding is Padding.SAME:
        halo = round_up(axis.receptive_field_radius if radius is None else radius, axis.stride)
        return halo, halo
    out = axis.valid_output_size_at_least(write_px)
    return axis.context, axis.context + out - write_px


def margins(spec: UNetSpec, write: tuple[int, ...]) -> list[tuple[int, int]]:
    """:func:`tile_margins` per axis of a tile's write shape: (Y, X), or (Z, Y, X) for a 3-D net."""
    if len(write) == 2:
        return [tile_margins(spec, n) for n in write]
    return [axis_margins(spec.z_axis, write[0])] + [tile_margins(spec, n) for n in write[1:]]


def output_offset(spec: UNetSpec, write_px: int) -> int:
    """Index in the network output (its own frame) of the first kept pixel along an in-plane axis."""
    before, _ = tile_margins(spec, write_px)
    return before - spec.context


def output_offsets(spec: UNetSpec, write: tuple[int, ...]) -> tuple[int, ...]:
    """:func:`output_offset` per axis of a tile's write shape ((Y, X) or (Z, Y, X))."""
    contexts = [a.context for a in spec.axes]
    return tuple(before - c for (before, _), c in zip(margins(spec, write), contexts, strict=True))


def tile_read_box(write: Box, spec: UNetSpec, transform: Dihedral = Dihedral()) -> Box:
    """The (Y, X) (3-D net: (Z, Y, X)) input box (original image frame) a tile needs under ``transform``.

    Args:
        write: (Y, X) or (Z, Y, X) output box of the tile; origin and shape multiples of the
            network's stride along each axis.
        spec: the network.
        transform: the dihedral transform applied to the read pixels before the network (in the
            plane: z is never flipped).

    Returns:
        The read box; it may extend past the image (read it mirrored).
    """
    offset, shape = [], []
    flips = transform.flips if write.ndim == 2 else (False, *transform.flips)
    for o, s, flipped, (before, after) in zip(write.offset, write.shape, flips, margins(spec, write.shape), strict=True):
        if flipped:
            before, after = after, before
        offset.append(o - before)
        shape.append(s + before + after)
    return Box(tuple(offset), tuple(shape))


@dataclass(frozen=True)
class Block:
    """One unit of work and of output: a chunk-aligned (1, Y, X) box of the stack (a 3-D
    network's: (<=Bz, Y, X), several slices).

    Attributes:
        index: ``(bz, by, bx)`` position in the block grid (``bz`` the slice for a 2-D network).
        write: (Z, Y, X) box of output voxels, clipped to the stack, shape ``(1, <=B, <=B)``
            (3-D: ``(<=Bz, <=B, <=B)``).
    """

    index: tuple[int, int, int]
    write: Box

    @property
    def plane(self) -> Box:
        """The (Y, X) part of :attr:`write`."""
        return Box(self.write.offset[1:], self.write.shape[1:])

    @property
    def name(self) -> str:
        """Stable name used for completion markers, e.g. ``"3.0.1"``."""
        return ".".join(str(i) for i in self.index)


@dataclass(frozen=True)
class Tiling:
    """Block and tile layout of a (Z, Y, X) stack for one network.

    Attributes:
        shape: (Z, Y, X) stack shape in voxels.
        spec: the network (its stride and context decide the geometry).
        block_px: block edge in px, a multiple of ``spec.stride``; also the output chunk edge.
        tile_out: largest tile write edge in px, a multiple of ``spec.stride`` (the network's
            output per pass; larger = less overlap overhead, more memory).
        block_z: slices per block: 1 for a 2-D network (it sees one slice at a time); for a 3-D
            network a multiple of its z stride (the product of ``pool_z``), also the output z chunk.
        tile_z: largest tile write extent along z, slices (3-D only; default ``block_z``), a
            multiple of the z stride.
    """

    shape: tuple[int, int, int]
    spec: UNetSpec
    block_px: int = BLOCK_PX
    tile_out: int = TILE_OUT
    block_z: int = 1
    tile_z: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if len(self.shape) != 3 or any(s < 1 for s in self.shape):
            raise UserInputError(f"stack shape {self.shape} is not a non-empty (Z, Y, X) volume")
        check_multiple_of_stride(self.block_px, self.spec, what="block size")
        check_multiple_of_stride(self.tile_out, self.spec, what="tile size")
        if self.spec.dims == 2:
            if self.block_z != 1 or self.tile_z not in (None, 1):
                raise UserInputError(f"a 2-D network predicts one slice at a time: block z {self.block_z}, "
                                     f"tile z {self.tile_z} must be 1")
            return
        check_multiple_of_stride(self.block_z, self.spec, what="block z size", z=True)
        if self.tile_z is None:
            object.__setattr__(self, "tile_z", self.block_z)
        check_multiple_of_stride(self.tile_z, self.spec, what="tile z size", z=True)

    @property
    def volumes(self) -> bool:
        """Whether blocks and tiles are (Z, Y, X) volumes (a 3-D network), not (Y, X) planes."""
        return self.spec.dims == 3

    @property
    def grid(self) -> tuple[int, int, int]:
        """Number of blocks along (Z, Y, X)."""
        z, y, x = self.shape
        return math.ceil(z / self.block_z), math.ceil(y / self.block_px), math.ceil(x / self.block_px)

    @property
    def n_blocks(self) -> int:
        return math.prod(self.grid)

    def block(self, index: tuple[int, int, int]) -> Block:
        """The block at grid position ``(z, by, bx)``."""
        bz, by, bx = index
        b = self.block_px
        write = Box((bz * self.block_z, by * b, bx * b), (self.block_z, b, b)).intersect(Box.from_shape(self.shape))
        return Block((bz, by, bx), write)

    def blocks(self) -> Iterator[Block]:
        """All blocks in C order of ``(z, by, bx)``."""
        for index in product(*(range(n) for n in self.grid)):
            yield self.block(index)

    def job_blocks(self, job: int, jobs: int) -> list[Block]:
        """The blocks of job ``job`` of ``jobs``: a contiguous run of the C-ordered blocks.

        The runs of jobs 0..jobs-1 partition all blocks (sizes differ by at most one); a job
        beyond the number of blocks gets none.

        Raises:
            UserInputError: ``jobs < 1`` or ``job`` outside ``[0, jobs)``.
        """
        if not isinstance(jobs, int) or jobs < 1:
            raise UserInputError(f"--jobs must be a positive integer, got {jobs!r}")
        if not isinstance(job, int) or not 0 <= job < jobs:
            raise UserInputError(f"--job must be in [0, {jobs}) for --jobs {jobs}, got {job!r}")
        n = self.n_blocks
        lo, hi = job * n // jobs, (job + 1) * n // jobs
        grid = self.grid
        return [self.block(_unravel(i, grid)) for i in range(lo, hi)]

    def check_jobs(self, jobs: int, *, option: str, of: str = "the stack") -> None:
        """Refuse sharing the blocks among more jobs than there are blocks (or fewer than one).

        :meth:`job_blocks` would give the jobs beyond :attr:`n_blocks` nothing to do, and a
        workflow would still plan, start and track every one of them (``predict.jobs: 100000``
        on 3 blocks: a 148 s, 2.1 GB dry run). The one check for ``unet predict --jobs``, the
        workflow's ``predict.jobs`` and ``predict.merge_jobs`` (at start-up) and the merge pieces.

        Args:
            jobs: the number of jobs asked for.
            option: the option or config key, as the message starts (``"--jobs"``,
                ``"config predict.jobs ="``).
            of: what the blocks are of, for the message (e.g. ``"sample 'a' (a.tif)"``).

        Raises:
            UserInputError: one line naming ``option``, the block count and how it comes about.
        """
        if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
            raise UserInputError(f"{option} {jobs!r}: must be a positive integer")
        n = self.n_blocks
        if jobs > n:
            z, gy, gx = self.grid
            layers = f"{z} slice(s)" if not self.volumes else f"{z} z block(s) of {self.block_z} slices for {self.shape[0]}"
            raise UserInputError(
                f"{option} {jobs} is more than the {n} block(s) of {of}: {layers} x {gy} x {gx} blocks of "
                f"{self.block_px} px for {self.shape[1]} x {self.shape[2]} px; each job needs a block of its own, "
                f"use at most {n}")

    def tile_px(self, extent: int, *, z: bool = False) -> tuple[int, int]:
        """``(n, S)``: tiles per axis and their write size for a block extent of ``extent`` px
        (``z``: slices along a 3-D network's z axis).

        ``n = ceil(extent / tile_out)`` and ``S`` the smallest multiple of ``stride`` with
        ``n * S >= extent``, so the tiles of a clipped edge block waste little.
        """
        tile, stride = (min(self.tile_z, self.block_z), self.spec.z_axis.stride) if z else (
            min(self.tile_out, self.block_px), self.spec.stride)
        n = math.ceil(extent / tile)
        return n, round_up(math.ceil(extent / n), stride)

    def region(self, block: Block) -> Box:
        """The box the network's tiles cover: (Y, X) of a block (2-D), all of it (3-D)."""
        return block.write if self.volumes else block.plane

    def tile_grid(self, block: Block) -> list[tuple[int, int]]:
        """``(n, S)`` per axis of :meth:`region`: tiles and their write size (:meth:`tile_px`)."""
        region = self.region(block)
        first = len(region.shape) - 2
        return [self.tile_px(e, z=a < first) for a, e in enumerate(region.shape)]

    def tiles(self, block: Block) -> list[Box]:
        """(Y, X) (3-D: (Z, Y, X)) write boxes of the tiles of ``block``, C order; all one shape.

        Origins are ``block origin + k * S``, multiples of the stride because block origins
        are multiples of the block size. Their union covers the block (it may run past it).
        """
        grid = self.tile_grid(block)
        origin = self.region(block).offset
        size = tuple(s for _, s in grid)
        return [Box(tuple(o + k * s for o, k, s in zip(origin, ks, size)), size)
                for ks in product(*(range(n) for n, _ in grid))]

    def block_read(self, block: Block, tta: TTA | str = TTA.NONE) -> Box:
        """Box covering the reads of all tiles of ``block`` under all ``tta`` transforms ((Y, X) or
        for a 3-D network (Z, Y, X))."""
        reads = [tile_read_box(t, self.spec, tr) for t in self.tiles(block) for tr in transforms(tta)]
        axes = range(reads[0].ndim)
        lo = tuple(min(r.offset[a] for r in reads) for a in axes)
        hi = tuple(max(r.end[a] for r in reads) for a in axes)
        return Box(lo, tuple(h - l for l, h in zip(lo, hi)))

    def flops_overhead(self) -> float:
        """FLOPs per kept output pixel (voxel) of a full ``tile_out`` (x ``tile_z``) tile over the
        ideal (infinite image)."""
        tile = min(self.tile_out, self.block_px)
        write = (tile, tile) if not self.volumes else (min(self.tile_z, self.block_z), tile, tile)
        read = tuple(n + before + after for n, (before, after) in zip(write, margins(self.spec, write)))
        per_px = self.spec.tile_flops(read) / math.prod(write)
        return per_px / self.spec.ideal_flops_per_output_pixel()

    def to_dict(self) -> dict:
        """Plain-data description (stored in part stores and provenance)."""
        d = {
            "shape": list(self.shape), "spec": self.spec.to_dict(), "block_px": self.block_px,
            "tile_out": self.tile_out, "stride": self.spec.stride, "context": self.spec.context,
        }
        if self.volumes:  # 2-D layouts keep their description (part stores written before 3-D)
            d.update(block_z=self.block_z, tile_z=self.tile_z, z_stride=self.spec.z_axis.stride,
                     z_context=self.spec.z_axis.context)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> Tiling:
        spec = (PackageSpec if "halo_px" in data["spec"] else UNetSpec).from_dict(data["spec"])
        return cls(tuple(data["shape"]), spec, int(data["block_px"]), int(data["tile_out"]),
                   int(data.get("block_z", 1)), data.get("tile_z"))


def _unravel(i: int, grid: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for n in reversed(grid):
        i, r = divmod(i, n)
        out.append(r)
    return tuple(reversed(out))
