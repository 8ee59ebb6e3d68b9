"""Architecture and size arithmetic of the U-Net (2-D, or 3-D with per-axis geometry), without torch.

The network owns its geometry: everything that tiles, crops or checks sizes asks a
:class:`UNetSpec` instead of retyping 572 / 388 / 92. Each spatial axis has an
:class:`AxisGeometry` (its kernels and pools per level): y and x always the paper's; z, for a
3-D network (``dims: 3``), its own ``kernel_z`` and ``pool_z``, so an anisotropic volume's z axis
can skip pooling and 3-px kernels where its spacing is coarse (nnU-Net's rule).

For valid (unpadded) 3x3 convolutions each level's two convolutions remove 2 px per side
at that level's scale, so for depth ``d`` the output loses ``context = 6 * 2**d - 4`` px per
side (92 for ``d = 4``), every max-pool needs an even size, and valid input sizes are
``min_input_size + 2**d * k``, which for ``d = 4`` is ``188 + 16 k`` (572 -> 388).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

from unet_core.common.errors import ConfigError, check_known_keys


class Padding(str, Enum):
    """Convolution padding: the paper's ``valid`` (exact tiling) or ``same``."""

    VALID = "valid"
    SAME = "same"


class Norm(str, Enum):
    """Optional normalisation after each convolution (the paper uses none)."""

    NONE = "none"
    BATCH = "batch"
    GROUP = "group"


@dataclass(frozen=True)
class AxisGeometry:
    """Size arithmetic of a U-Net along one spatial axis, from its kernels and pools there.

    Valid convolutions of size ``k`` lose ``k - 1`` px per convolution (two per level on each
    path), a pool of ``p`` needs a size divisible by ``p`` and an up-convolution multiplies by it.
    The paper's axis (kernels 3, pools 2) gives ``context = 6 * 2**depth - 4`` (92 at depth 4)
    and valid inputs ``188 + 16 k``; an axis without pooling and with 1-px kernels (the z axis
    of a strongly anisotropic volume, as nnU-Net builds it) has context 0 and stride 1.

    Attributes:
        kernels: convolution size along the axis per level, ``depth + 1`` values of 1 or 3.
        pools: pooling (and up-convolution) factor along the axis per level, ``depth`` values of
            1 or 2.
        padding: ``valid`` or ``same`` (every output pixel has an input pixel; no context).
    """

    kernels: tuple[int, ...]
    pools: tuple[int, ...]
    padding: Padding = Padding.VALID

    @property
    def depth(self) -> int:
        return len(self.pools)

    @property
    def stride(self) -> int:
        """Product of the pools: tile origins along the axis are multiples of it."""
        return math.prod(self.pools)

    @property
    def receptive_field_radius(self) -> int:
        """Input px per side one output pixel depends on (the valid net's context), px."""
        radius, scale = 0, 1
        for level, k in enumerate(self.kernels):
            convs = 2 if level == self.depth else 4  # down and up path; the bottom has two
            radius += convs * (k - 1) // 2 * scale
            if level < self.depth:
                scale *= self.pools[level]
        return radius

    @property
    def context(self) -> int:
        """Px the output loses per side relative to the input (0 for same padding)."""
        return 0 if self.padding is Padding.SAME else self.receptive_field_radius

    def _valid_forward(self, in_size: int) -> int | None:
        """Output length of a valid-padded net, or None where some layer would break."""
        size = in_size
        for k, p in zip(self.kernels, self.pools):
            size -= 2 * (k - 1)
            if size < p or size % p:
                return None
            size //= p
        size -= 2 * (self.kernels[-1] - 1)
        if size < 1:
            return None
        for k, p in zip(reversed(self.kernels[:-1]), reversed(self.pools)):
            size = p * size - 2 * (k - 1)
            if size < 1:
                return None
        return size

    @property
    def min_input_size(self) -> int:
        """Smallest valid input length (188 for the paper's axis; the stride for same padding)."""
        if self.padding is Padding.SAME:
            return self.stride
        size = 1
        while self._valid_forward(size) is None:
            size += 1
        return size

    def is_valid_input(self, in_size: int) -> bool:
        return in_size >= self.min_input_size and (in_size - self.min_input_size) % self.stride == 0

    def nearest_valid_inputs(self, in_size: int) -> tuple[int, ...]:
        """The valid input lengths just below and above ``in_size`` (or it, if valid)."""
        base, step = self.min_input_size, self.stride
        if in_size <= base:
            return (base,)
        k = (in_size - base) // step
        lo, hi = base + k * step, base + (k + 1) * step
        return (lo,) if lo == in_size else (lo, hi)

    def output_size(self, in_size: int, *, what: str = "a U-Net") -> int:
        """Output length for an input of ``in_size`` px.

        Raises:
            ValueError: ``in_size`` is not valid along this axis (names the nearest ones).
        """
        if self.padding is Padding.SAME:
            if in_size < 1 or in_size % self.stride:
                raise ValueError(
                    f"input size {in_size} is not valid for a same-padded {what}: it must be a positive "
                    f"multiple of {self.stride} (nearest: {self.nearest_valid_inputs(in_size)})")
            return in_size
        out = self._valid_forward(in_size)
        if out is None:
            raise ValueError(
                f"input size {in_size} is not valid for a valid-padded {what}: it must be "
                f"{self.min_input_size} + {self.stride}*k (nearest: {self.nearest_valid_inputs(in_size)})")
        return out

    def input_size(self, out_size: int, *, what: str = "U-Net") -> int:
        """Input length that yields an output of exactly ``out_size`` px.

        Raises:
            ValueError: no input gives that output; names the nearest valid output sizes.
        """
        in_size = out_size + 2 * self.context
        if not self.is_valid_input(in_size):
            near = tuple(n - 2 * self.context for n in self.nearest_valid_inputs(in_size))
            raise ValueError(f"output size {out_size} is not reachable by a {self.padding.value}-padded "
                             f"{what} (nearest valid output sizes: {near})")
        return in_size

    def valid_output_size_at_least(self, out_size: int) -> int:
        """Smallest reachable output length >= ``out_size`` (and >= the minimum)."""
        need = max(out_size + 2 * self.context, self.min_input_size)
        return self.nearest_valid_inputs(need)[-1] - 2 * self.context


@dataclass(frozen=True)
class UNetSpec:
    """Architecture of a 2-D U-Net; defaults are the paper's network.

    Attributes:
        depth: number of 2x2 max-pools (4 in the paper).
        base_channels: feature maps at the first level (64), doubled per level.
        in_channels: image channels (1 for grey microscopy).
        n_classes: output classes of the final 1x1 convolution (2: background, cell).
        padding: ``valid`` (paper; exact overlap-tile) or ``same``.
        norm: ``none`` (paper), ``batch`` or ``group`` normalisation.
        dropout: drop probability at the end of the contracting path (paper: dropout layers
            there; 0.5 is the Caffe default).
        dims: 2 (the paper: (Y, X) slices) or 3 (the 3-D U-Net of Cicek et al. 2016: (Z, Y, X)
            volumes, every operation in 3-D).
        pool_z: 3-D only: the pooling factor along z per level, ``depth`` values of 1 or 2
            (default all 2, isotropic). 1 where the z spacing is still coarser than the in-plane
            spacing at that level (nnU-Net's rule), so z is not pooled below its resolution.
        kernel_z: 3-D only: the convolution size along z per level, ``depth + 1`` values of 1 or 3
            (default all 3); 1 gives 1x3x3 kernels where z is much coarser.
    """

    depth: int = 4
    base_channels: int = 64
    in_channels: int = 1
    n_classes: int = 2
    padding: Padding = Padding.VALID
    norm: Norm = Norm.NONE
    dropout: float = 0.5
    dims: int = 2
    pool_z: tuple[int, ...] | None = None
    kernel_z: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "padding", Padding(self.padding))
        object.__setattr__(self, "norm", Norm(self.norm))
        for name in ("depth", "base_channels", "in_channels", "n_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_classes < 2:
            raise ConfigError(f"model.n_classes must be >= 2 (softmax), got {self.n_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        self._check_dims()

    def _check_dims(self) -> None:
        """Validate ``dims``, ``pool_z`` and ``kernel_z``; fill the 3-D defaults."""
        if self.dims not in (2, 3) or isinstance(self.dims, bool):
            raise ConfigError(f"model.dims must be 2 or 3, got {self.dims!r}")
        if self.dims == 2:
            for key in ("pool_z", "kernel_z"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"model.{key} applies to model.dims 3 only; this model has dims 2")
            return
        for key, n, allowed, default in (("pool_z", self.depth, (1, 2), 2), ("kernel_z", self.depth + 1, (1, 3), 3)):
            value = getattr(self, key)
            value = (default,) * n if value is None else value
            if (not isinstance(value, (list, tuple)) or len(value) != n
                    or any(isinstance(v, bool) or v not in allowed for v in value)):
                raise ConfigError(f"model.{key} must be a list of {n} values, each {' or '.join(map(str, allowed))} "
                                  f"(one per level at depth {self.depth}), got {value!r}")
            object.__setattr__(self, key, tuple(int(v) for v in value))

    # -- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["padding"] = self.padding.value
        d["norm"] = self.norm.value
        if self.dims == 2:  # 2-D models (all models before the 3-D mode) keep their exact description
            for key in ("dims", "pool_z", "kernel_z"):
                del d[key]
        else:
            d["pool_z"], d["kernel_z"] = list(self.pool_z), list(self.kernel_z)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetSpec:
        """Build from a config mapping; unknown keys are an error naming them."""
        check_known_keys(data, (f.name for f in fields(cls)), section="model")
        try:
            return cls(**data)
        except ValueError as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"model: {err}") from err

    def fingerprint(self) -> str:
        """Canonical JSON of the architecture (to compare checkpoints with configs)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    # -- geometry ---------------------------------------------------------------------
    @property
    def plane(self) -> AxisGeometry:
        """The geometry along y and x: the paper's 3x3 convolutions and 2x2 pools."""
        return AxisGeometry((3,) * (self.depth + 1), (2,) * self.depth, self.padding)

    @property
    def z_axis(self) -> AxisGeometry:
        """The geometry along z (3-D only): ``kernel_z`` and ``pool_z``."""
        if self.dims != 3:
            raise ValueError("a 2-D U-Net has no z axis: it sees one slice at a time")
        return AxisGeometry(self.kernel_z, self.pool_z, self.padding)

    @property
    def axes(self) -> tuple[AxisGeometry, ...]:
        """Geometry per spatial axis in data order: (y, x) for 2-D, (z, y, x) for 3-D."""
        return (self.plane,) * 2 if self.dims == 2 else (self.z_axis, self.plane, self.plane)

    @property
    def stride(self) -> int:
        """2**depth: in-plane tile origins must be multiples of this for seamless tiling."""
        return self.plane.stride

    @property
    def context(self) -> int:
        """In-plane pixels the output loses per side relative to the input (92 at depth 4, valid)."""
        return self.plane.context

    @property
    def receptive_field_radius(self) -> int:
        """Half-width of the receptive field of one output pixel in the plane, in input pixels.

        Equals :attr:`context` for valid padding; for same padding it is the halo a tile
        needs so that border effects stay outside the written region (not exact).
        """
        return self.plane.receptive_field_radius

    @property
    def _what(self) -> str:
        return f"U-Net of depth {self.depth}"

    def output_size(self, in_size: int) -> int:
        """In-plane output length along one axis for an input of ``in_size`` pixels.

        Raises:
            ValueError: ``in_size`` is not valid for this network (names the nearest ones).
        """
        return self.plane.output_size(in_size, what=self._what)

    @property
    def min_input_size(self) -> int:
        """Smallest valid in-plane input length (188 at depth 4, valid; 2**depth for same)."""
        return self.plane.min_input_size

    def is_valid_input(self, in_size: int) -> bool:
        return self.plane.is_valid_input(in_size)

    def nearest_valid_inputs(self, in_size: int) -> tuple[int, ...]:
        """The valid in-plane input lengths just below and above ``in_size`` (or it, if valid)."""
        return self.plane.nearest_valid_inputs(in_size)

    def input_size(self, out_size: int) -> int:
        """In-plane input length that yields an output of exactly ``out_size`` pixels.

        Raises:
            ValueError: no input gives that output; names the nearest valid output sizes.
        """
        return self.plane.input_size(out_size, what=self._what)

    def valid_output_size_at_least(self, out_size: int) -> int:
        """Smallest reachable in-plane output length >= ``out_size`` (and >= the minimum)."""
        return self.plane.valid_output_size_at_least(out_size)

    def flops_per_output_pixel(self, in_size: int) -> float:
        """Multiply-add FLOPs (2 per MAC) per output pixel of one square tile (2-D)."""
        return self.tile_flops(in_size) / self.output_size(in_size) ** 2

    def _level_taps(self, level: int) -> tuple[int, int]:
        """(kernel taps of a convolution, taps of the pool / up-convolution) at ``level``."""
        kernels = [a.kernels[level] for a in self.axes]
        pools = [a.pools[level] for a in self.axes] if level < self.depth else [1]
        return math.prod(kernels), math.prod(pools)

    def tile_flops(self, in_size: int | tuple[int, ...]) -> float:
        """FLOPs (2 per multiply-add) of one forward pass on an input tile: ``in_size`` px per axis
        (a square 2-D tile), or its shape per axis ((Y, X), or (Z, Y, X) for a 3-D network)."""
        sizes = [in_size] * self.dims if isinstance(in_size, int) else list(in_size)
        for axis, n in zip(self.axes, sizes, strict=True):
            axis.output_size(n, what=self._what)  # validates
        same = self.padding is Padding.SAME
        c_in, c, total = self.in_channels, self.base_channels, 0.0

        def convs(c_in: int, c: int, level: int) -> None:
            nonlocal sizes, total
            for _ in range(2):
                sizes = [n if same else n - a.kernels[level] + 1 for a, n in zip(self.axes, sizes)]
                total += 2 * self._level_taps(level)[0] * c_in * c * math.prod(sizes)
                c_in = c

        for level in range(self.depth + 1):
            convs(c_in, c, level)
            c_in = c
            if level < self.depth:
                sizes = [n // a.pools[level] for a, n in zip(self.axes, sizes)]
                c *= 2
        for level in reversed(range(self.depth)):
            c //= 2
            total += 2 * self._level_taps(level)[1] * (2 * c) * c * math.prod(sizes)  # up-convolution
            sizes = [n * a.pools[level] for a, n in zip(self.axes, sizes)]
            convs(2 * c, c, level)
        return total + 2 * c * self.n_classes * math.prod(sizes)

    def ideal_flops_per_output_pixel(self) -> float:
        """FLOPs per output pixel (voxel) on an infinitely large image (no tile overhead)."""
        c, total, scale = self.base_channels, 0.0, 1.0
        c_in = self.in_channels
        for level in range(self.depth + 1):
            taps, pool = self._level_taps(level)
            total += 2 * taps * (c_in * c + c * c) * scale
            c_in = c
            if level < self.depth:
                scale /= pool
                c *= 2
        for level in reversed(range(self.depth)):
            taps, pool = self._level_taps(level)
            c //= 2
            total += 2 * pool * (2 * c) * c * scale  # up-conv evaluated at the coarse scale
            scale *= pool
            total += 2 * taps * (2 * c * c + c * c) * scale
        total += 2 * c * self.n_classes
        return total


#: z is "coarse" at a level while its spacing is at least this many times the in-plane spacing there:
#: no pooling and 1-px kernels along z (nnU-Net's anisotropy threshold)
ANISOTROPY_RATIO = 2.0
#: relative difference of voxel sizes up to which a model runs on data it was not trained on
VOXEL_SIZE_TOLERANCE = 0.1


def z_geometry_for(depth: int, spacing_um: tuple[float, float, float]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(pool_z, kernel_z)`` for a 3-D network of ``depth`` on voxels of ``spacing_um`` (z, y, x) µm.

    At each level the z and in-plane spacings are the voxel size times the pooling so far; while z
    is :data:`ANISOTROPY_RATIO` times coarser or more, that level neither pools z nor convolves
    across it (1-px z kernels), as nnU-Net plans anisotropic data. 2.0 x 0.5 x 0.5 µm at depth 3
    gives pool_z (1, 1, 2) and kernel_z (1, 1, 3, 3); isotropic voxels give all 2 and all 3.
    """
    dz, dy, dx = spacing_um
    plane, z = min(dy, dx), dz
    pools, kernels = [], []
    for level in range(depth + 1):
        coarse = z >= ANISOTROPY_RATIO * plane
        kernels.append(1 if coarse else 3)
        if level < depth:
            pools.append(1 if coarse else 2)
            z, plane = z * pools[-1], plane * 2
    return tuple(pools), tuple(kernels)


def check_z_geometry(spec: UNetSpec, spacing_um: tuple[float, float, float], *, where: str) -> None:
    """Refuse a 3-D network that pools z at a level where z is already coarse (see
    :func:`z_geometry_for`): each such pool halves a z resolution that is already the poorest, and
    the network's z context then spans several cells. 1-px or 3-px kernels are left to the user.

    Raises:
        ConfigError: one line naming ``where`` (the sample or stack), its voxel size and the
            ``pool_z`` the rule gives.
    """
    if spec.dims != 3:
        return
    pools, kernels = z_geometry_for(spec.depth, spacing_um)
    z, plane = spacing_um[0], min(spacing_um[1:])
    for level, pool in enumerate(spec.pool_z):
        if pool == 2 and z >= ANISOTROPY_RATIO * plane:
            raise ConfigError(
                f"{where}: model.pool_z {list(spec.pool_z)} pools z at level {level}, where the z spacing "
                f"({z:g} µm) is already >= {ANISOTROPY_RATIO:g}x the in-plane one ({plane:g} µm); for voxels of "
                f"{list(spacing_um)} µm use pool_z {list(pools)} (and kernel_z {list(kernels)})")
        z, plane = z * pool, plane * 2


def check_voxel_size(trained_um: tuple[float, ...] | None, given_um: tuple[float, ...], *, where: str) -> None:
    """Refuse data whose voxel size differs from the model's training data by more than
    :data:`VOXEL_SIZE_TOLERANCE` (relative, on any axis): a network learns cells at a size in
    voxels. ``trained_um`` None (a model that did not record it) is not checked.

    Raises:
        ConfigError: one line naming ``where`` and both voxel sizes.
    """
    if trained_um is None:
        return
    if len(trained_um) != len(given_um) or any(
            abs(g - t) > VOXEL_SIZE_TOLERANCE * t for t, g in zip(trained_um, given_um)):
        raise ConfigError(
            f"{where}: voxel size {list(given_um)} µm differs from the model's training data "
            f"({list(trained_um)} µm) by more than {VOXEL_SIZE_TOLERANCE:.0%} on an axis; resample the data "
            "or train on this voxel size")


@dataclass(frozen=True)
class PackageSpec(UNetSpec):
    """The geometry of a foreign network (a bioimage.io package's), as the tiling needs it.

    The network returns one value per input pixel (``padding`` same), takes inputs of ``2**depth * k``
    px per axis, and its output is trusted only ``halo_px`` px and more inside each edge of its input
    (the package's declared halo, rounded up to ``2**depth`` and grown to its smallest input). The
    overlap-tile engine then reads each tile grown by ``halo_px`` per side
    (:func:`unet_core.infer.tiling.tile_margins`: the receptive-field radius of a same-padded net),
    so its result equals one whole-image pass only as far as the declared halo guarantees.

    Attributes:
        halo_px: input pixels per side beyond a tile's output, a multiple of ``2**depth``.
    """

    halo_px: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.padding is not Padding.SAME:
            raise ConfigError(f"a package's network has padding same, got {self.padding.value}")
        if not isinstance(self.halo_px, int) or self.halo_px < 0 or self.halo_px % self.stride:
            raise ConfigError(f"halo_px must be a multiple of {self.stride} >= 0, got {self.halo_px!r}")

    @property
    def receptive_field_radius(self) -> int:
        """The declared halo (see the class docstring), px."""
        return self.halo_px
