"""Elastic deformation with rotation, flips, shifts and grey-value changes (the paper's augmentation).

One random :class:`Deformation` per sample maps every pixel ``p = (y, x)`` of an output tile
of shape ``(H, W)`` to a source position (pixels of the source slice)::

    src(p) = origin + c + M (p - c) + d(p)        c = ((H - 1) / 2, (W - 1) / 2)

``M`` is a rotation by any angle times optional flips of y and x; ``origin`` is an integer
shift (so without rotation and deformation the source positions are whole pixels); ``d``
is the elastic displacement: vectors drawn from N(0, sigma_px^2) on a coarse ``grid x grid``
lattice spanning the tile (knots at the corners and evenly in between, in pixel centres),
upsampled to every pixel by bicubic convolution (Keys 1981, a = -1/2, with Keys' boundary
extrapolation ``c[-1] = 3 c[0] - 3 c[1] + c[2]``; for the paper's 3 x 3 grid this is exactly
the biquadratic through the 9 knots, so the field is smooth and never folds at sigma = 10 px
on a 572 px tile).

Resampling, all with the project's mirror convention (:mod:`unet_core.common.mirror`: reflect
about the centre of the border pixel, numpy ``"reflect"``) about the true image border:

* images: bicubic (``torch.nn.functional.grid_sample(mode="bicubic")``, cubic convolution
  with a = -0.75, reflection padding, ``align_corners=True``) or bilinear; bicubic keeps
  membranes sharper, bilinear never overshoots. Where every source position is a whole
  pixel (no rotation, no deformation: shifts and flips only) nearest neighbour is used, so
  the image is copied exactly.
* labels: nearest neighbour (``grid_sample(mode="nearest")`` carrying the integer values
  exactly in float32/float64), never blended: the deformed label set is a subset of the
  source label set, exactly.

Grey values (on z-scored images): ``x' = contrast * x + brightness``, and optionally a
gamma curve applied between the tile's min and max. Each change is off when its range is 0.

Randomness comes only from a :class:`numpy.random.Generator` built from an integer key
``(seed, *path)`` via :class:`numpy.random.SeedSequence` (see :func:`rng_for`), never from
a global RNG, so a sample is identical whatever order or process it is made in. The random
draws and the separable factors of the sampling grid are float64 (NumPy); the grid itself
is one batched float32 matrix product and the warp is ``grid_sample``, in torch on any
device (CUDA when asked for), batched over samples that share a source shape.
:func:`warp_reference` is a slow NumPy version that pins torch's reflection padding to
:func:`unet_core.common.mirror.mirror_index` in the tests.

Volumes (3-D, issue 36): a :class:`VolumeDeformation` maps every voxel ``p = (z, y, x)`` of a
``(Z, H, W)`` tile the same way, ``src(p) = origin + c + M (p - c) + d(p)``, with

* ``d``: vectors drawn in µm from N(0, sigma_um^2) per component on a coarse
  ``Gz x Gy x Gx`` lattice (:func:`coarse_grid_shape`: at most ``params.grid`` knots per axis,
  at least 2, never closer in µm than the paper's spacing in sigmas, 28.55 sigma, so a
  128 px tile gets 2 knots per axis where 3 would fold it), divided per axis by the voxel size
  ``spacing_um = (dz, dy, dx)`` (isotropic in µm, so anisotropic in voxels), and upsampled to every voxel by
  the same separable Keys cubic convolution as in 2-D (:func:`upsample_matrix` per axis):
  torch's 5-D ``grid_sample`` has no cubic mode, so the field's smoothness comes from its own
  interpolation, not from the resampling;
* ``M``: a rotation about the z axis only (voxels are anisotropic: a rotation tilting z would
  mix 2 µm and 0.5 µm steps and resample along z from few slices), by an angle in µm space
  (``S^-1 R S`` on (y, x) with ``S = diag(dy, dx)``, plain R when dy == dx), times flips of y
  and x; z is never flipped (light microscopy blurs and attenuates with depth, so up and down
  differ);
* images resampled trilinearly (``grid_sample(mode="bilinear")`` on 5-D, reflection padding,
  ``align_corners=True``: the same mirror convention), copied exactly (nearest) where every
  position is a whole voxel; labels by nearest neighbour, never blended.

:func:`draw_volume_transform` draws it; :func:`sampling_grid`, :func:`deform`,
:func:`warp_images`, :func:`warp_labels`, :func:`adjust_grey`, :func:`source_coordinates`,
:func:`displacement_field`, :func:`jacobian_determinant` and :func:`warp_reference` take 2-D
and 3-D alike (the 3-D grid is built in torch on the images' device; only the per-sample
knot values, a few dozen numbers, and the 1-D upsampling factors are NumPy). Volumes are
drawn with the same :class:`DeformParams` as slices (grid, rotate, flip, grey values,
mirror; ``sigma_um`` defaults to ``sigma_px`` times the in-plane voxel size); their
``interpolation`` is trilinear whatever ``params.interpolation`` says.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unet_core.common.errors import ConfigError, UserInputError
from unet_core.common.mirror import mirror_index

log = logging.getLogger(__name__)

KEYS_A = -0.5  # displacement upsampling kernel (Keys' third-order accurate choice)
TORCH_BICUBIC_A = -0.75  # the cubic convolution kernel inside torch.grid_sample(mode="bicubic")
KNOT_STEP_PER_SIGMA = (572 - 1) / (3 - 1) / 10.0  # the paper's knot spacing in sigmas (28.55); volumes keep it


class Interpolation(str, Enum):
    """Image resampling (labels are always nearest neighbour)."""

    BICUBIC = "bicubic"
    BILINEAR = "bilinear"


@dataclass(frozen=True)
class DeformParams:
    """What the random augmentation may do; defaults follow the paper.

    Attributes:
        sigma_px: std of the coarse-grid displacement vectors, pixels (paper: 10; 0 = off).
        grid: coarse grid points per axis, >= 2 (paper: 3).
        rotate: rotate by a uniform angle in [0, 360) degrees.
        flip: flip y and x, each with probability 1/2.
        brightness: added offset drawn from U(-brightness, brightness), in units of the
            normalised image (the std for z-scores, the 1-99.8 % range for percentiles); 0 = off.
        contrast: factor drawn log-uniformly from [1/(1+contrast), 1+contrast]; 0 = off.
        gamma: exponent drawn log-uniformly from [1/(1+gamma), 1+gamma], applied between
            the tile's min and max grey value; 0 = off.
        mirror: allow the tile to extend beyond the image (mirrored, as in prediction).
            False requires every sampled position to lie inside the image.
        interpolation: image resampling, ``bicubic`` or ``bilinear``.
    """

    sigma_px: float = 10.0
    grid: int = 3
    rotate: bool = True
    flip: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    gamma: float = 0.0
    mirror: bool = True
    interpolation: Interpolation = Interpolation.BICUBIC

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "interpolation", Interpolation(self.interpolation))
        except ValueError:
            raise ConfigError(
                f"augment.interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}"
            ) from None
        if not isinstance(self.grid, int) or isinstance(self.grid, bool) or self.grid < 2:
            raise ConfigError(f"augment.grid must be an integer >= 2 (coarse grid points per axis), got {self.grid!r}")
        for name in ("sigma_px", "brightness", "contrast", "gamma"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"augment.{name} must be a finite number >= 0, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["interpolation"] = self.interpolation.value
        return d

    def describe(self) -> str:
        """Short human-readable summary (figure titles, logs)."""
        parts = [f"sigma {self.sigma_px:g} px on {self.grid}x{self.grid}"]
        parts += [name for name in ("rotate", "flip") if getattr(self, name)]
        parts += [f"{name} {getattr(self, name):g}" for name in ("brightness", "contrast", "gamma") if getattr(self, name)]
        parts.append(self.interpolation.value)
        return ", ".join(parts)

    @classmethod
    def identity(cls) -> DeformParams:
        """No deformation, rotation, flip or grey-value change (only the shift remains)."""
        return cls(sigma_px=0.0, rotate=False, flip=False, brightness=0.0, contrast=0.0, gamma=0.0)


@dataclass(frozen=True)
class Deformation:
    """The random draws of one sample (see the module docstring for the mapping).

    Attributes:
        coarse: (2, G, G) float64 displacement (dy, dx) at the coarse knots, pixels.
        angle: rotation, radians (counter-clockwise in (y, x) = (row, column) axes).
        flip: (flip_y, flip_x).
        origin: (y, x) integer shift of the tile's top-left corner in the source, pixels.
        brightness: offset added to the z-scored image.
        contrast: factor applied to the z-scored image.
        gamma: exponent of the grey-value curve (1 = off).
    """

    coarse: np.ndarray
    angle: float
    flip: tuple[bool, bool]
    origin: tuple[int, int]
    brightness: float
    contrast: float
    gamma: float

    def matrix(self) -> np.ndarray:
        """(2, 2) float64 linear part ``M = R(angle) @ diag(flip signs)`` acting on (y, x)."""
        return _plane_matrix(self.angle, self.flip)


@dataclass(frozen=True)
class VolumeDeformation:
    """The random draws of one volume sample (3-D; mapping in the module docstring).

    Attributes:
        coarse: (3, Gz, Gy, Gx) float64 displacement (dz, dy, dx) at the coarse knots, voxels
            (drawn in µm and divided by each axis' voxel size).
        angle: rotation about the z axis, radians, counter-clockwise in (y, x), in µm space.
        flip: (flip_y, flip_x); z is never flipped.
        origin: (z, y, x) integer shift of the tile's first voxel in the source, voxels.
        spacing_um: (dz, dy, dx) voxel size, µm (makes the rotation physical when dy != dx).
        brightness: offset added to the z-scored image.
        contrast: factor applied to the z-scored image.
        gamma: exponent of the grey-value curve (1 = off).
    """

    coarse: np.ndarray
    angle: float
    flip: tuple[bool, bool]
    origin: tuple[int, int, int]
    spacing_um: tuple[float, float, float]
    brightness: float
    contrast: float
    gamma: float

    def matrix(self) -> np.ndarray:
        """(3, 3) float64 linear part on (z, y, x) voxel offsets: 1 along z, in-plane
        ``S^-1 R(angle) S diag(flip signs)`` with ``S = diag(dy, dx)`` (R itself when dy == dx)."""
        m = np.eye(3)
        m[1:, 1:] = _plane_matrix(self.angle, self.flip, aspect=self.spacing_um[2] / self.spacing_um[1])
        return m


def _plane_matrix(angle: float, flip: Sequence[bool], *, aspect: float = 1.0) -> np.ndarray:
    """(2, 2) float64 ``S^-1 R(angle) S diag(flip signs)`` on (y, x) offsets, pixels.

    ``aspect = dx / dy`` (pixel width over height) turns a rotation in µm into one in pixels;
    1 (square pixels, or 2-D) gives ``R`` exactly.
    """
    cos, sin = math.cos(angle), math.sin(angle)
    rot = np.array([[cos, -sin * aspect], [sin / aspect, cos]])
    signs = np.array([-1.0 if flip[0] else 1.0, -1.0 if flip[1] else 1.0])
    return rot * signs[None, :]


def rng_for(seed: int, *path: int) -> np.random.Generator:
    """The generator of one sample: ``SeedSequence(seed, spawn_key=path)``, PCG64.

    Args:
        seed: global seed (>= 0).
        path: non-negative integers naming the sample, e.g. (source slice z, sample index k)
            for the stored set or (epoch, step, i) on the fly.
    """
    if seed < 0 or any(p < 0 for p in path):
        raise UserInputError(f"seed and sample keys must be >= 0, got seed {seed}, key {path}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed), spawn_key=tuple(int(p) for p in path))))


# --------------------------------------------------------------------------------------
# displacement field
# --------------------------------------------------------------------------------------
def _keys_weights(t: np.ndarray, a: float) -> np.ndarray:
    """Cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 for fraction t in [0, 1]."""

    def near(s: np.ndarray) -> np.ndarray:  # |s| <= 1
        return ((a + 2) * s - (a + 3)) * s * s + 1

    def far(s: np.ndarray) -> np.ndarray:  # 1 < |s| < 2
        return ((a * s - 5 * a) * s + 8 * a) * s - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def upsample_matrix(n_out: int, n_coarse: int) -> np.ndarray:
    """Bicubic interpolation matrix from ``n_coarse`` knots to ``n_out`` pixels along one axis.

    Knot ``i`` sits at pixel ``i * (n_out - 1) / (n_coarse - 1)`` (the first and last knots
    on the first and last pixel centres). Interior pixels use Keys' cubic convolution
    (a = -1/2); the missing knots beyond the ends are Keys' extrapolation
    ``c[-1] = 3 c[0] - 3 c[1] + c[2]`` (linear ``2 c[0] - c[1]`` for 2 knots), so the
    interpolant reproduces quadratics and, for 3 knots, is the parabola through them.

    Args:
        n_out: pixels along the axis, >= 1.
        n_coarse: knots along the axis, >= 2.

    Returns:
        (n_out, n_coarse) float64; rows sum to 1; the row of a pixel on a knot is one-hot.
    """
    if n_coarse < 2:
        raise UserInputError(f"the coarse grid needs >= 2 points per axis, got {n_coarse}")
    # Express knots -1 .. n_coarse (with the two ghosts) as combinations of the real knots.
    ext = np.zeros((n_coarse + 2, n_coarse))
    ext[1:-1] = np.eye(n_coarse)
    if n_coarse >= 3:
        ext[0, :3] = (3.0, -3.0, 1.0)
        ext[-1, -3:] = (1.0, -3.0, 3.0)
    else:
        ext[0, :2] = (2.0, -1.0)
        ext[-1, -2:] = (-1.0, 2.0)
    u = np.arange(n_out) * ((n_coarse - 1) / max(n_out - 1, 1))
    j = np.minimum(np.floor(u).astype(np.int64), n_coarse - 2)
    t = u - j
    w = _keys_weights(t, KEYS_A)  # (n_out, 4) for knots j-1 .. j+2 = ext rows j .. j+3
    rows = ext[j[:, None] + np.arange(4)[None, :]]  # (n_out, 4, n_coarse)
    return np.einsum("nt,ntc->nc", w, rows)


def displacement_field(coarse: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Full-resolution displacement from coarse-grid vectors (:func:`upsample_matrix` along each axis).

    Args:
        coarse: (D, *G) or (N, D, *G) float displacement at the knots, pixels/voxels, with
            D = 2 ((dy, dx) on a (Gy, Gx) lattice) or 3 ((dz, dy, dx) on (Gz, Gy, Gx)).
        shape: (H, W) or (Z, H, W) of the tile, pixels/voxels.

    Returns:
        float64 array (…, D, *shape): displacement of every pixel/voxel, pixels/voxels.
    """
    coarse = np.asarray(coarse, dtype=np.float64)
    ndim = len(shape)
    if ndim not in (2, 3):
        raise UserInputError(f"a displacement field is 2-D or 3-D, got a tile of shape {tuple(shape)}")
    factors = [upsample_matrix(int(n), g) for n, g in zip(shape, coarse.shape[-ndim:])]
    out_axes, knot_axes = "dhw"[-ndim:], "kij"[-ndim:]
    # 2-D: "hi,...ij,wj->...hw" (operand order kept so 2-D output is unchanged bit for bit).
    terms = [out_axes[0] + knot_axes[0], "..." + knot_axes]
    terms += [o + k for o, k in zip(out_axes[1:], knot_axes[1:])]
    spec = ",".join(terms) + "->..." + out_axes
    return np.einsum(spec, factors[0], coarse, *factors[1:], optimize=ndim > 2)


# --------------------------------------------------------------------------------------
# random transforms
# --------------------------------------------------------------------------------------
def _log_uniform(u: float, spread: float) -> float:
    """Map u ~ U(0, 1) to a factor log-uniform in [1/(1+spread), 1+spread]."""
    return math.exp(math.log1p(spread) * (2.0 * u - 1.0))


def draw_transform(
    rng: np.random.Generator,
    *,
    params: DeformParams,
    source_shape: Sequence[int],
    tile_shape: Sequence[int],
    out_shape: Sequence[int] | None = None,
) -> Deformation:
    """Draw one sample's transform; always consumes the same number of random values.

    Draw order: 2 * grid**2 standard normals (coarse displacements), then 8 uniforms
    (angle, flip y, flip x, position y, position x, brightness, contrast, gamma), drawn
    whether or not each change is switched on, so switching one off leaves the others'
    values unchanged.
    The position is uniform over the integer shifts that keep the tile's central
    ``out_shape`` window (the network output; before rotation) inside the image, so every
    image pixel can land in the output; where the image is smaller
    than that window the tile is centred. With ``params.mirror`` False the shift is instead
    restricted so that every sampled position (including the interpolation support) lies
    inside the image.

    Args:
        rng: the sample's generator (:func:`rng_for`).
        params: the augmentation settings.
        source_shape: (Y, X) of the source slice, pixels.
        tile_shape: (H, W) of the deformed tile (the network input), pixels.
        out_shape: (h, w) central window that should land inside the image (the network
            output); default: ``tile_shape``.

    Raises:
        UserInputError: ``params.mirror`` is False and this sample does not fit in the image.
    """
    sy, sx = (int(v) for v in source_shape)
    th, tw = (int(v) for v in tile_shape)
    oh, ow = (int(v) for v in (out_shape or tile_shape))
    coarse = rng.standard_normal((2, params.grid, params.grid)) * float(params.sigma_px)
    u_angle, u_flip_y, u_flip_x, u_pos_y, u_pos_x, u_bright, u_contrast, u_gamma = rng.random(8)
    angle = 2.0 * math.pi * float(u_angle) if params.rotate else 0.0
    flips = (bool(u_flip_y < 0.5), bool(u_flip_x < 0.5)) if params.flip else (False, False)
    position = (float(u_pos_y), float(u_pos_x))
    brightness, contrast, gamma = _grey_draws(params, u_bright, u_contrast, u_gamma)
    partial = Deformation(coarse, angle, flips, (0, 0), brightness, contrast, gamma)

    if params.mirror:
        origin = [_mirrored_origin(u, n, t, o) for u, n, t, o in zip(position, (sy, sx), (th, tw), (oh, ow))]
    else:
        margin = 1 if params.interpolation is Interpolation.BICUBIC else 0
        origin = _inside_origin(partial, position, source_shape=(sy, sx), tile_shape=(th, tw), margin=margin)
    return Deformation(coarse, angle, partial.flip, (int(origin[0]), int(origin[1])), brightness, contrast, gamma)


def _grey_draws(
    params: DeformParams, u_bright: float, u_contrast: float, u_gamma: float
) -> tuple[float, float, float]:
    """(brightness, contrast, gamma) of one sample from three uniforms in [0, 1)."""
    brightness = params.brightness * (2.0 * float(u_bright) - 1.0)
    contrast = _log_uniform(float(u_contrast), params.contrast)
    return brightness, contrast, _log_uniform(float(u_gamma), params.gamma)


def _mirrored_origin(u: float, n: int, t: int, o: int) -> int:
    """Origin along one axis, uniform (``u`` in [0, 1)) over those keeping the tile's central
    ``o``-wide output window inside the ``n`` source pixels; centred where none does."""
    ctx_lo = (t - o) // 2  # output window starts here inside the tile
    lo, hi = -ctx_lo, n - o - ctx_lo  # origins keeping the window inside [0, n)
    return lo + min(int(u * (hi - lo + 1)), hi - lo) if hi >= lo else (n - t) // 2


def _inside_origin(
    partial: Deformation | VolumeDeformation,
    position: Sequence[float],
    *,
    source_shape: Sequence[int],
    tile_shape: Sequence[int],
    margin: int,
) -> list[int]:
    """Origin per axis, uniform over those keeping every sampled position (and ``margin``
    pixels of interpolation support) inside the source: mirroring off.

    Raises:
        UserInputError: no such origin along some axis.
    """
    offsets = relative_coordinates([partial], tile_shape)[0]  # (D, *tile) = src - origin
    origin = []
    for axis, (u, n) in enumerate(zip(position, source_shape)):
        lo = math.ceil(margin - offsets[axis].min())
        hi = math.floor(n - 1 - margin - offsets[axis].max())
        if hi < lo:
            unit, noun = ("px", "slice") if len(tile_shape) == 2 else ("voxel", "volume")
            raise UserInputError(
                f"a {'x'.join(map(str, tile_shape))} {unit} tile (deformed, rotated) does not fit inside the "
                f"{'x'.join(map(str, source_shape))} {unit} source {noun} and mirroring is off: allow mirroring, "
                f"use a smaller tile, or reduce sigma/rotation"
            )
        origin.append(lo + min(int(u * (hi - lo + 1)), hi - lo))
    return origin


def check_fits(source_shape: Sequence[int], tile_shape: Sequence[int], *, params: DeformParams) -> None:
    """Fail early when a tile cannot come from the source without mirroring.

    Raises:
        UserInputError: ``params.mirror`` is False and the tile (its diagonal, when rotating)
            is larger than the source slice.
    """
    if params.mirror:
        return
    th, tw = (int(v) for v in tile_shape)
    need_y, need_x = (th, tw)
    if params.rotate:
        need_y = need_x = math.ceil(math.hypot(th - 1, tw - 1)) + 1
    margin = 2 if params.interpolation is Interpolation.BICUBIC else 0
    sy, sx = (int(v) for v in source_shape)
    if need_y + margin > sy or need_x + margin > sx:
        raise UserInputError(
            f"tile {th}x{tw} px needs {need_y + margin}x{need_x + margin} px of source"
            f"{' (rotated)' if params.rotate else ''} but the slice is {sy}x{sx} px and mirroring "
            f"is off: allow mirroring (--mirror), choose a smaller --tile-out, or turn rotation off"
        )


# --------------------------------------------------------------------------------------
# random transforms of volumes (3-D)
# --------------------------------------------------------------------------------------
def coarse_grid_shape(
    tile_shape: Sequence[int], spacing_um: Sequence[float], *, grid: int, sigma_um: float
) -> tuple[int, int, int]:
    """Knots per axis (Gz, Gy, Gx) of a volume tile's coarse displacement grid.

    Each axis gets ``clip(1 + floor(extent_um / (KNOT_STEP_PER_SIGMA * sigma_um)), 2, grid)``
    knots, ``extent_um = (n - 1) * spacing``: knots never closer, in units of sigma, than the
    paper's (3 knots on a 572 px tile at sigma 10 px: 285.5 px = 28.55 sigma apart), and at
    most ``grid`` per axis. Why not always ``grid``: neighbouring knots' vectors differ by about
    sigma * sqrt(2), so the strain grows as sigma / knot spacing, and the 3-knot parabola is
    2.5x steeper still at the tile's ends; 3 knots on a 32 x 128 x 128 tile at (2, 0.5, 0.5) µm
    with sigma 5 µm (10 px in plane) fold the tile (Jacobian determinant <= 0) in 48 of 100
    samples; with the 2 knots this rule gives, the smallest determinant of 100 samples was 0.46.
    In µm, so z (coarse voxels) gets as many knots as an in-plane axis of the same physical
    length; a thin tile gets 2 (a field linear in z).

    Args:
        tile_shape: (Z, H, W) of the tile, voxels.
        spacing_um: (dz, dy, dx) voxel size, µm.
        grid: most knots per axis, >= 2 (``DeformParams.grid``).
        sigma_um: std of the displacement components, µm; 0 gives ``grid`` everywhere.

    Returns:
        (Gz, Gy, Gx), each in [2, grid].
    """
    if sigma_um <= 0:
        return (grid, grid, grid)
    step_um = KNOT_STEP_PER_SIGMA * sigma_um
    extents_um = [(int(n) - 1) * float(d) for n, d in zip(tile_shape, spacing_um)]
    counts = [1 + math.floor(extent / step_um + 1e-9) for extent in extents_um]
    gz, gy, gx = (min(max(c, 2), grid) for c in counts)
    return (gz, gy, gx)


def draw_volume_transform(
    rng: np.random.Generator,
    *,
    params: DeformParams,
    spacing_um: Sequence[float],
    source_shape: Sequence[int],
    tile_shape: Sequence[int],
    out_shape: Sequence[int] | None = None,
    sigma_um: float | None = None,
) -> VolumeDeformation:
    """Draw one volume sample's transform (3-D).

    Draw order: 9 uniforms (angle, flip y, flip x, position z, y, x, brightness, contrast,
    gamma), each drawn whether or not it is used, then 3 * Gz * Gy * Gx standard normals
    (coarse (dz, dy, dx), times ``sigma_um``, µm; knots from :func:`coarse_grid_shape`, which
    depend on sigma: so the uniforms come first, and switching the deformation off leaves the
    other draws unchanged). The µm vectors are divided by ``spacing_um`` per axis, so the
    field is isotropic in physical space. Rotation is about z only; ``params.interpolation``
    is not used (volumes are resampled trilinearly, :func:`deform`). The position is chosen
    as in :func:`draw_transform`, per axis, but the output window must fit inside the source.

    Args:
        rng: the sample's generator (:func:`rng_for`, e.g. keyed (volume, sample)).
        params: the augmentation settings (grid, rotate, flip, grey values, mirror).
        spacing_um: (dz, dy, dx) voxel size of the source volume, µm, each > 0.
        source_shape: (Z, Y, X) of the source volume, voxels.
        tile_shape: (Z, H, W) of the deformed tile (the network input), voxels.
        out_shape: central window (the network output) that must lie inside the source,
            voxels; default ``tile_shape``.
        sigma_um: std of the coarse displacement components, µm (0 = off); default
            ``params.sigma_px`` times the finer in-plane voxel size (the 2-D setting in µm).

    Raises:
        ConfigError: a voxel size or sigma_um that is not a finite number (> 0, >= 0).
        UserInputError: shapes that are not 3-D, an output window larger than the source,
            or (mirroring off) a tile that does not fit inside the source.
    """
    spacing = _checked_spacing(spacing_um)
    src, tile, out = _checked_volume_shapes(source_shape, tile_shape, out_shape)
    sigma = params.sigma_px * min(spacing[1:]) if sigma_um is None else float(sigma_um)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ConfigError(f"augment sigma_um must be a finite number >= 0 (µm), got {sigma_um!r}")
    u = [float(v) for v in rng.random(9)]
    knots = coarse_grid_shape(tile, spacing, grid=params.grid, sigma_um=sigma)
    coarse = rng.standard_normal((3, *knots)) * sigma / np.asarray(spacing)[:, None, None, None]
    angle = 2.0 * math.pi * u[0] if params.rotate else 0.0
    flips = (u[1] < 0.5, u[2] < 0.5) if params.flip else (False, False)
    partial = VolumeDeformation(coarse, angle, flips, (0, 0, 0), spacing, *_grey_draws(params, *u[6:]))
    if params.mirror:
        origin = [_mirrored_origin(p, n, t, o) for p, n, t, o in zip(u[3:6], src, tile, out)]
    else:
        origin = _inside_origin(partial, u[3:6], source_shape=src, tile_shape=tile, margin=0)
    return replace(partial, origin=(int(origin[0]), int(origin[1]), int(origin[2])))


def _checked_spacing(spacing_um: Sequence[float]) -> tuple[float, float, float]:
    """(dz, dy, dx) as floats, or a one-line :class:`ConfigError`."""
    values = tuple(spacing_um) if isinstance(spacing_um, (Sequence, np.ndarray)) else ()
    if len(values) != 3 or not all(
        isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(v) and v > 0 for v in values
    ):
        raise ConfigError(
            f"spacing_um must be three finite voxel sizes > 0 in µm (dz, dy, dx), got {spacing_um!r}: "
            f"give the volume's voxel size"
        )
    return (float(values[0]), float(values[1]), float(values[2]))


def _checked_volume_shapes(
    source_shape: Sequence[int], tile_shape: Sequence[int], out_shape: Sequence[int] | None
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(source, tile, out) as int tuples of 3 positive sizes, out fitting in the source, or a
    one-line :class:`UserInputError`."""
    shapes = [tuple(int(v) for v in shape) for shape in (source_shape, tile_shape, out_shape or tile_shape)]
    if any(len(shape) != 3 or min(shape) < 1 for shape in shapes):
        raise UserInputError(
            f"a 3-D deformation needs (Z, Y, X) sizes >= 1: got source {shapes[0]}, tile {shapes[1]}, "
            f"output window {shapes[2]}; use the 2-D draw_transform for single slices"
        )
    src, tile, out = shapes
    if any(o > n for o, n in zip(out, src)):
        raise UserInputError(
            f"the {'x'.join(map(str, out))} voxel output window (z, y, x) is larger than the "
            f"{'x'.join(map(str, src))} voxel source volume: choose a smaller tile or a larger volume"
        )
    return src, tile, out


# --------------------------------------------------------------------------------------
# sampling grid
# --------------------------------------------------------------------------------------
def relative_coordinates(
    transforms: Sequence[Deformation | VolumeDeformation], tile_shape: Sequence[int]
) -> np.ndarray:
    """Source positions minus the origin, ``c + M (p - c) + d(p)``, pixels/voxels.

    Args:
        transforms: N transforms, all 2-D (:class:`Deformation`) or all 3-D (:class:`VolumeDeformation`).
        tile_shape: (H, W) or (Z, H, W) of the tile.

    Returns:
        float64 (N, D, *tile_shape), components (y, x) or (z, y, x).
    """
    shape = tuple(int(v) for v in tile_shape)
    ndim = len(shape)
    centre = [(n - 1) / 2.0 for n in shape]
    offsets = [  # p - c along each axis, shaped to broadcast over the tile
        (np.arange(n, dtype=np.float64) - c).reshape([-1 if b == a else 1 for b in range(ndim)])
        for a, (n, c) in enumerate(zip(shape, centre))
    ]
    out = np.empty((len(transforms), ndim, *shape))
    for i, tr in enumerate(transforms):
        m = _checked_matrix(tr, ndim)
        disp = displacement_field(tr.coarse, shape) if np.any(tr.coarse) else 0.0
        for a in range(ndim):
            turned = m[a, 0] * offsets[0]
            for b in range(1, ndim):
                turned = turned + m[a, b] * offsets[b]
            out[i, a] = centre[a] + turned
        out[i] += disp
    return out


def _checked_matrix(transform: Deformation | VolumeDeformation, ndim: int) -> np.ndarray:
    """The transform's (D, D) matrix, or a one-line error when it is not for a ``ndim``-D tile."""
    m = transform.matrix()
    if m.shape != (ndim, ndim) or transform.coarse.ndim != ndim + 1:
        raise UserInputError(
            f"a {m.shape[0]}-D transform cannot sample a {ndim}-D tile: draw volume tiles with "
            f"draw_volume_transform and slice tiles with draw_transform"
        )
    return m


def source_coordinates(
    transforms: Sequence[Deformation | VolumeDeformation], tile_shape: Sequence[int]
) -> np.ndarray:
    """Source position of every tile pixel/voxel, float64 (N, D, *tile_shape), (y, x) or (z, y, x)."""
    rel = relative_coordinates(transforms, tile_shape)
    origin = np.array([tr.origin for tr in transforms], dtype=np.float64)
    return rel + origin.reshape(*origin.shape, *(1,) * len(tile_shape))


def jacobian_determinant(coords: np.ndarray) -> np.ndarray:
    """det of d src / d p by central differences, on the interior (each axis 2 shorter).

    (2, H, W) -> (H-2, W-2) or (3, Z, H, W) -> (Z-2, H-2, W-2), float64. Positive everywhere
    means the map does not fold (flips make it negative everywhere).
    """
    c = np.asarray(coords, dtype=np.float64)
    ndim = c.shape[0]

    def along(b: int) -> np.ndarray:  # d src / d p_b, every component, interior points
        hi = tuple(slice(2, None) if a == b else slice(1, -1) for a in range(ndim))
        lo = tuple(slice(None, -2) if a == b else slice(1, -1) for a in range(ndim))
        return (c[(slice(None), *hi)] - c[(slice(None), *lo)]) / 2.0

    grads = [along(b) for b in range(ndim)]  # grads[b][a] = d src_a / d p_b
    if ndim == 2:
        return grads[0][0] * grads[1][1] - grads[1][0] * grads[0][1]
    jac = np.stack(grads, axis=-1)  # (a, *interior, b)
    return np.linalg.det(np.moveaxis(jac, 0, -2))


# --------------------------------------------------------------------------------------
# warping (torch, batched)
# --------------------------------------------------------------------------------------
def is_whole_pixel(transforms: Sequence[Deformation | VolumeDeformation]) -> bool:
    """Whether every source position is a whole pixel/voxel (no rotation, no displacement)."""
    return all(t.angle == 0.0 and not np.any(t.coarse) for t in transforms)


def sampling_grid(
    transforms: Sequence[Deformation | VolumeDeformation],
    *,
    tile_shape: Sequence[int],
    source_shape: Sequence[int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The ``grid_sample`` grid of :func:`source_coordinates`, computed in torch on ``device``.

    Args:
        transforms: N transforms, all 2-D or all 3-D (:func:`draw_volume_transform`, one tile shape).
        tile_shape: (H, W) or (Z, H, W) of the output tiles, pixels/voxels.
        source_shape: (Y, X) or (Z, Y, X) of the source images, pixels/voxels.
        device: where to build the grid (the images' device).
        dtype: float dtype of the grid.

    Returns:
        (N, H, W, 2) grid of (x, y), or (N, Z, H, W, 3) of (x, y, z): source positions scaled
        to [-1, 1] for ``align_corners=True`` (-1 = first pixel centre, 1 = last), outside =
        beyond the border.
    """
    if len(source_shape) != len(tile_shape) or not transforms:
        raise UserInputError(
            f"{len(transforms)} transforms, tile {tuple(tile_shape)}, source {tuple(source_shape)}: "
            f"need at least one transform and tile and source of the same dimension"
        )
    for t in transforms:
        _checked_matrix(t, len(tile_shape))
    if len(tile_shape) == 3:
        return _volume_sampling_grid(
            transforms, tile_shape=tile_shape, source_shape=source_shape, device=device, dtype=dtype
        )
    th, tw = (int(v) for v in tile_shape)
    sy, sx = (int(v) for v in source_shape)
    n, g = len(transforms), transforms[0].coarse.shape[-1]
    # Every grid coordinate is a sum of separable terms, grid[n, h, w, k] =
    #   sum_j (A_y C_k)[h, j] A_x[w, j] + (m_k0 (h - cy) + shift_k) * 1 + 1 * m_k1 (w - cx),
    # so one (H, K) @ (K, 2W) product per sample with K = 2 (G + 2) writes the interleaved
    # (H, W, 2) grid directly (the other coordinate's terms are zero in each half).
    scale = np.array([2.0 / max(sy - 1, 1), 2.0 / max(sx - 1, 1)])
    cy, cx = (th - 1) / 2.0, (tw - 1) / 2.0
    a_y, a_x = upsample_matrix(th, g), upsample_matrix(tw, g)
    py, px = np.arange(th) - cy, np.arange(tw) - cx
    k_terms = g + 2
    left = np.zeros((n, th, 2 * k_terms))
    right = np.zeros((n, 2 * k_terms, tw, 2))
    for i, t in enumerate(transforms):
        m = t.matrix() * scale[:, None]
        shift = (np.array(t.origin) + (cy, cx)) * scale - 1.0
        for axis, slot in ((0, 1), (1, 0)):  # source y -> grid[..., 1]; source x -> grid[..., 0]
            cols = slice(axis * k_terms, (axis + 1) * k_terms)
            left[i, :, cols] = np.column_stack([a_y @ (t.coarse[axis] * scale[axis]), m[axis, 0] * py + shift[axis], np.ones(th)])
            right[i, cols, :, slot] = np.vstack([a_x.T, np.ones(tw), m[axis, 1] * px])
    left_t = torch.from_numpy(left).to(device, dtype)
    right_t = torch.from_numpy(right.reshape(n, 2 * k_terms, 2 * tw)).to(device, dtype)
    return torch.bmm(left_t, right_t).view(n, th, tw, 2)


def _volume_sampling_grid(
    transforms: Sequence[VolumeDeformation],
    *,
    tile_shape: Sequence[int],
    source_shape: Sequence[int],
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`sampling_grid` of 3-D transforms, (N, Z, H, W, 3), built in torch on ``device``.

    Per sample and axis a (z, y, x), in ``grid_sample`` units (``scale_a = 2 / (S_a - 1)``)::

        grid_a(p) = scale_a (origin_a + c_a + sum_b M_ab (p_b - c_b) + d_a(p)) - 1

    The affine part is linear in p, and the separable Keys upsampling reproduces every function
    linear in each axis, so it is added to the knots (float64, NumPy: (N, Gz, Gy, Gx, 3), tiny)
    and the grid is one upsampling of the knots: three passes along z, y, x, in torch on
    ``device`` (a CUDA batch never leaves the GPU), writing (x, y, z) last as ``grid_sample``
    reads it. Every pass is elementwise (no matrix product, whose blocking may depend on the
    batch size), so a sample's grid is bit-identical alone or in any batch.
    """
    tile = tuple(int(v) for v in tile_shape)
    knots = transforms[0].coarse.shape[1:]
    if any(t.coarse.shape[1:] != knots for t in transforms):
        shapes = [t.coarse.shape for t in transforms]
        raise UserInputError(f"a batch of volume transforms must share the coarse grid, got {shapes}")
    scale = np.array([2.0 / max(int(n) - 1, 1) for n in source_shape])
    centre = (np.array(tile, dtype=np.float64) - 1) / 2.0
    # knot positions minus the centre, per axis, broadcast over the (Gz, Gy, Gx) lattice
    at = [(np.arange(g) * ((n - 1) / (g - 1)) - c).reshape([-1 if b == a else 1 for b in range(3)])
          for a, (n, g, c) in enumerate(zip(tile, knots, centre))]
    values = np.empty((len(transforms), *knots, 3))
    for i, t in enumerate(transforms):
        m = t.matrix()
        for a in range(3):
            affine = t.origin[a] + centre[a] + m[a, 0] * at[0] + m[a, 1] * at[1] + m[a, 2] * at[2]
            values[i, ..., 2 - a] = (affine + t.coarse[a]) * scale[a] - 1.0  # slot 2 - a: (x, y, z)

    def on_device(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(device, dtype)

    grid = on_device(values)
    for dim, (n, g) in enumerate(zip(tile, knots), start=1):
        grid = _upsample_along(grid, on_device(upsample_matrix(n, g)), dim=dim)
    return grid


def _upsample_along(values: torch.Tensor, factor: torch.Tensor, *, dim: int) -> torch.Tensor:
    """``sum_k factor[:, k] * values[..., k, ...]`` along ``dim``: (…, G, …) -> (…, n, …).

    A sum of G broadcast products in a fixed order (G = 2 or 3 knots): elementwise, so each
    output value is computed the same way whatever the batch size or device.
    """
    shape = [1] * values.ndim
    shape[dim] = -1
    out = factor[:, 0].view(shape) * values.narrow(dim, 0, 1)
    for k in range(1, values.shape[dim]):
        out.addcmul_(factor[:, k].view(shape), values.narrow(dim, k, 1))
    return out


def warp_images(
    images: torch.Tensor, grid: torch.Tensor, *, interpolation: Interpolation | str = Interpolation.BICUBIC
) -> torch.Tensor:
    """Resample images on a sampling grid, mirroring about the image border.

    Args:
        images: (N, C, Y, X) or (N, C, Z, Y, X) float source images.
        grid: (N, H, W, 2) or (N, Z, H, W, 3) from :func:`sampling_grid` (same device).
        interpolation: ``bicubic`` (cubic convolution, a = -0.75; 2-D only: torch has no
            tricubic mode), ``bilinear`` (trilinear on volumes) or ``nearest`` (exact copies;
            used where every position is a whole pixel).

    Returns:
        (N, C, H, W) or (N, C, Z, H, W) tensor of the images' dtype.

    Raises:
        UserInputError: ``bicubic`` asked for volumes.
    """
    mode = interpolation.value if isinstance(interpolation, Interpolation) else str(interpolation)
    if images.ndim == 5 and mode == Interpolation.BICUBIC.value:
        raise UserInputError("volumes (3-D) cannot be resampled bicubically (torch grid_sample has no tricubic "
                             "mode): use interpolation 'bilinear' (trilinear)")
    return F.grid_sample(images, grid.to(images.dtype), mode=mode, padding_mode="reflection", align_corners=True)


def warp_labels(labels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour resampling of integer labels, mirroring about the border; never blends.

    Values are carried as float32 (exact below 2**24) or float64 (exact below 2**53), so
    every output value is one of the source values.

    Args:
        labels: (N, Y, X) or (N, Z, Y, X) integer labels (int32 or narrower, uint16 included;
            int64 below 2**53).
        grid: (N, H, W, 2) or (N, Z, H, W, 3) from :func:`sampling_grid`.

    Returns:
        (N, H, W) or (N, Z, H, W) labels of the same dtype.
    """
    if labels.dtype in (torch.uint8, torch.int8, torch.int16, torch.uint16, torch.bool) or not labels.numel():
        top = 0
    else:
        low, high = torch.aminmax(labels)
        top = max(-int(low), int(high))
    if top >= 2**53:
        raise UserInputError("label values >= 2**53 cannot be warped exactly; relabel them consecutively")
    carrier = torch.float64 if top >= 2**24 else torch.float32
    out = F.grid_sample(
        labels[:, None].to(carrier), grid.to(carrier), mode="nearest", padding_mode="reflection", align_corners=True
    )
    return out[:, 0].to(labels.dtype)


def adjust_grey(images: torch.Tensor, transforms: Sequence[Deformation | VolumeDeformation]) -> torch.Tensor:
    """Apply each sample's contrast, brightness and gamma to (N, C, H, W) or (N, C, Z, H, W) z-scored
    images."""
    out = images
    dtype, device = images.dtype, images.device
    per_sample = (-1,) + (1,) * (images.ndim - 1)
    whole = tuple(range(1, images.ndim))  # gamma spans the sample's min..max over channels and space
    if any(t.contrast != 1.0 or t.brightness != 0.0 for t in transforms):
        contrast = torch.tensor([t.contrast for t in transforms], dtype=dtype, device=device).view(per_sample)
        brightness = torch.tensor([t.brightness for t in transforms], dtype=dtype, device=device).view(per_sample)
        out = out * contrast + brightness
    if any(t.gamma != 1.0 for t in transforms):
        gamma = torch.tensor([t.gamma for t in transforms], dtype=dtype, device=device).view(per_sample)
        lo = out.amin(dim=whole, keepdim=True)
        span = (out.amax(dim=whole, keepdim=True) - lo).clamp_min(torch.finfo(dtype).tiny)
        out = lo + span * ((out - lo) / span).clamp(0, 1) ** gamma
    return out


def deform(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    transforms: Sequence[Deformation | VolumeDeformation],
    *,
    tile_shape: Sequence[int],
    interpolation: Interpolation | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Deform a batch: one sampling grid per sample, shared by image and labels.

    Args:
        images: (N, C, Y, X) or, for volumes, (N, C, Z, Y, X) float z-scored sources (one
            per transform; the same source may be repeated), on any device (CUDA when available).
        labels: (N, Y, X) or (N, Z, Y, X) integer labels aligned with ``images``, or None.
        transforms: N transforms (:func:`draw_transform`, or :func:`draw_volume_transform`
            for volumes).
        tile_shape: (H, W) or (Z, H, W) of the output tiles, pixels/voxels.
        interpolation: image resampling, ``bicubic`` or ``bilinear`` (trilinear for volumes);
            default bicubic for slices, trilinear for volumes.

    Returns:
        images (N, C, *tile_shape) with grey-value changes applied, and labels (N, *tile_shape) or None.

    Raises:
        UserInputError: arrays whose dimensions do not match the tile and transforms (e.g. a
            slice given with volume transforms).
    """
    ndim = len(tile_shape)
    if images.ndim != ndim + 2 or (labels is not None and labels.ndim != ndim + 1):
        raise UserInputError(
            f"a {ndim}-D tile {tuple(tile_shape)} needs images (N, C, {'Z, ' * (ndim == 3)}Y, X) and labels "
            f"(N, {'Z, ' * (ndim == 3)}Y, X), got {tuple(images.shape)} and "
            f"{None if labels is None else tuple(labels.shape)}"
        )
    if len(transforms) != images.shape[0]:
        raise ValueError(f"{len(transforms)} transforms for a batch of {images.shape[0]} images")
    grid = sampling_grid(transforms, tile_shape=tile_shape, source_shape=images.shape[2:], device=images.device)
    if interpolation is None:
        interpolation = Interpolation.BICUBIC if ndim == 2 else Interpolation.BILINEAR
    mode = "nearest" if is_whole_pixel(transforms) else interpolation
    warped = adjust_grey(warp_images(images, grid, interpolation=mode), transforms)
    return warped, (warp_labels(labels, grid) if labels is not None else None)


# --------------------------------------------------------------------------------------
# numpy reference (tests and documentation)
# --------------------------------------------------------------------------------------
def warp_reference(image: np.ndarray, coords: np.ndarray, *, interpolation: Interpolation | str) -> np.ndarray:
    """Slow, explicit NumPy version of :func:`warp_images` for one 2-D image or 3-D volume.

    Cubic convolution with a = -0.75 (bicubic) or linear weights over the 4 / 2 neighbours
    per axis (bilinear, trilinear for volumes), each neighbour index mirrored with
    :func:`unet_core.common.mirror.mirror_index`.

    Args:
        image: (Y, X) or (Z, Y, X) float image.
        coords: (D, *out) source positions ((y, x) or (z, y, x)), pixels/voxels.

    Returns:
        (*out) float64.
    """
    img = np.asarray(image, dtype=np.float64)
    floors = [np.floor(c) for c in coords]
    fractions = [c - f for c, f in zip(coords, floors)]
    if Interpolation(interpolation) is Interpolation.BICUBIC:
        offsets = np.arange(-1, 3)
        weights = [_keys_weights(t, TORCH_BICUBIC_A) for t in fractions]
    else:
        offsets = np.arange(0, 2)
        weights = [np.stack([1 - t, t], -1) for t in fractions]
    out = np.zeros(coords.shape[1:])
    for taps in itertools.product(range(len(offsets)), repeat=img.ndim):  # last axis fastest, as 2-D always did
        index = tuple(
            mirror_index(f.astype(np.int64) + offsets[k], n) for f, k, n in zip(floors, taps, img.shape)
        )
        w = weights[0][..., taps[0]]
        for axis in range(1, img.ndim):
            w = w * weights[axis][..., taps[axis]]
        out += w * img[index]
    return out
