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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
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
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        rot = np.array([[cos, -sin], [sin, cos]])
        signs = np.array([-1.0 if self.flip[0] else 1.0, -1.0 if self.flip[1] else 1.0])
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
    """Full-resolution displacement from coarse-grid vectors (bicubic, see :func:`upsample_matrix`).

    Args:
        coarse: (2, Gy, Gx) or (N, 2, Gy, Gx) float displacement (dy, dx) at the knots, pixels.
        shape: (H, W) of the tile, pixels.

    Returns:
        float64 array (…, 2, H, W): displacement (dy, dx) of every pixel, pixels.
    """
    coarse = np.asarray(coarse, dtype=np.float64)
    a_y = upsample_matrix(int(shape[0]), coarse.shape[-2])
    a_x = upsample_matrix(int(shape[1]), coarse.shape[-1])
    return np.einsum("hi,...ij,wj->...hw", a_y, coarse, a_x)


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
    brightness = params.brightness * (2.0 * float(u_bright) - 1.0)
    contrast = _log_uniform(float(u_contrast), params.contrast)
    gamma = _log_uniform(float(u_gamma), params.gamma)
    partial = Deformation(coarse, angle, flips, (0, 0), brightness, contrast, gamma)

    origin = []
    if params.mirror:
        for u, n, t, o in zip(position, (sy, sx), (th, tw), (oh, ow)):
            ctx_lo = (t - o) // 2  # output window starts here inside the tile
            lo, hi = -ctx_lo, n - o - ctx_lo  # origins keeping the window inside [0, n)
            origin.append(lo + min(int(u * (hi - lo + 1)), hi - lo) if hi >= lo else (n - t) // 2)
    else:
        offsets = relative_coordinates([partial], (th, tw))[0]  # (2, H, W) = src - origin
        margin = 1 if params.interpolation is Interpolation.BICUBIC else 0
        for axis, (u, n) in enumerate(zip(position, (sy, sx))):
            lo = math.ceil(margin - offsets[axis].min())
            hi = math.floor(n - 1 - margin - offsets[axis].max())
            if hi < lo:
                raise UserInputError(
                    f"a {th}x{tw} px tile (deformed, rotated) does not fit inside the {sy}x{sx} px "
                    f"source slice and mirroring is off: allow mirroring, use a smaller tile, "
                    f"or reduce sigma/rotation"
                )
            origin.append(lo + min(int(u * (hi - lo + 1)), hi - lo))
    return Deformation(coarse, angle, partial.flip, (int(origin[0]), int(origin[1])), brightness, contrast, gamma)


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
# sampling grid
# --------------------------------------------------------------------------------------
def relative_coordinates(transforms: Sequence[Deformation], tile_shape: Sequence[int]) -> np.ndarray:
    """Source positions minus the origin, ``c + M (p - c) + d(p)``, float64 (N, 2, H, W) (y, x)."""
    th, tw = (int(v) for v in tile_shape)
    cy, cx = (th - 1) / 2.0, (tw - 1) / 2.0
    py = (np.arange(th, dtype=np.float64) - cy)[:, None]
    px = (np.arange(tw, dtype=np.float64) - cx)[None, :]
    out = np.empty((len(transforms), 2, th, tw))
    for i, tr in enumerate(transforms):
        m = tr.matrix()
        disp = displacement_field(tr.coarse, (th, tw)) if np.any(tr.coarse) else 0.0
        out[i, 0] = cy + (m[0, 0] * py + m[0, 1] * px)
        out[i, 1] = cx + (m[1, 0] * py + m[1, 1] * px)
        out[i] += disp
    return out


def source_coordinates(transforms: Sequence[Deformation], tile_shape: Sequence[int]) -> np.ndarray:
    """Source position (y, x) of every tile pixel, float64 (N, 2, H, W), pixels."""
    rel = relative_coordinates(transforms, tile_shape)
    origin = np.array([tr.origin for tr in transforms], dtype=np.float64)
    return rel + origin[:, :, None, None]


def jacobian_determinant(coords: np.ndarray) -> np.ndarray:
    """det of d src / d p by central differences; (2, H, W) float -> (H-2, W-2) float64.

    Positive everywhere means the map does not fold (flips make it negative everywhere).
    """
    c = np.asarray(coords, dtype=np.float64)
    dy = (c[:, 2:, 1:-1] - c[:, :-2, 1:-1]) / 2.0
    dx = (c[:, 1:-1, 2:] - c[:, 1:-1, :-2]) / 2.0
    return dy[0] * dx[1] - dx[0] * dy[1]


# --------------------------------------------------------------------------------------
# warping (torch, batched)
# --------------------------------------------------------------------------------------
def is_whole_pixel(transforms: Sequence[Deformation]) -> bool:
    """Whether every source position is a whole pixel (no rotation, no displacement)."""
    return all(t.angle == 0.0 and not np.any(t.coarse) for t in transforms)


def sampling_grid(
    transforms: Sequence[Deformation],
    *,
    tile_shape: Sequence[int],
    source_shape: Sequence[int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The ``grid_sample`` grid of :func:`source_coordinates`, computed in torch on ``device``.

    Args:
        transforms: N transforms.
        tile_shape: (H, W) of the output tiles, pixels.
        source_shape: (Y, X) of the source images, pixels.
        device: where to build the grid (the images' device).
        dtype: float dtype of the grid.

    Returns:
        (N, H, W, 2) grid: (x, y) source positions scaled to [-1, 1] for
        ``align_corners=True`` (-1 = first pixel centre, 1 = last), outside = beyond the border.
    """
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


def warp_images(
    images: torch.Tensor, grid: torch.Tensor, *, interpolation: Interpolation | str = Interpolation.BICUBIC
) -> torch.Tensor:
    """Resample images on a sampling grid, mirroring about the image border.

    Args:
        images: (N, C, Y, X) float source images.
        grid: (N, H, W, 2) from :func:`sampling_grid` (same device).
        interpolation: ``bicubic`` (cubic convolution, a = -0.75), ``bilinear`` or
            ``nearest`` (exact copies; used where every position is a whole pixel).

    Returns:
        (N, C, H, W) tensor of the images' dtype.
    """
    mode = interpolation.value if isinstance(interpolation, Interpolation) else str(interpolation)
    return F.grid_sample(images, grid.to(images.dtype), mode=mode, padding_mode="reflection", align_corners=True)


def warp_labels(labels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour resampling of integer labels, mirroring about the border; never blends.

    Values are carried as float32 (exact below 2**24) or float64 (exact below 2**53), so
    every output value is one of the source values.

    Args:
        labels: (N, Y, X) integer labels (int32 or narrower; int64 below 2**53).
        grid: (N, H, W, 2) from :func:`sampling_grid`.

    Returns:
        (N, H, W) labels of the same dtype.
    """
    if labels.dtype in (torch.uint8, torch.int8, torch.int16, torch.bool) or not labels.numel():
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


def adjust_grey(images: torch.Tensor, transforms: Sequence[Deformation]) -> torch.Tensor:
    """Apply each sample's contrast, brightness and gamma to (N, C, H, W) z-scored images."""
    out = images
    dtype, device = images.dtype, images.device
    if any(t.contrast != 1.0 or t.brightness != 0.0 for t in transforms):
        contrast = torch.tensor([t.contrast for t in transforms], dtype=dtype, device=device).view(-1, 1, 1, 1)
        brightness = torch.tensor([t.brightness for t in transforms], dtype=dtype, device=device).view(-1, 1, 1, 1)
        out = out * contrast + brightness
    if any(t.gamma != 1.0 for t in transforms):
        gamma = torch.tensor([t.gamma for t in transforms], dtype=dtype, device=device).view(-1, 1, 1, 1)
        lo = out.amin(dim=(1, 2, 3), keepdim=True)
        span = (out.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(torch.finfo(dtype).tiny)
        out = lo + span * ((out - lo) / span).clamp(0, 1) ** gamma
    return out


def deform(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    transforms: Sequence[Deformation],
    *,
    tile_shape: Sequence[int],
    interpolation: Interpolation | str = Interpolation.BICUBIC,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Deform a batch: one sampling grid per sample, shared by image and labels.

    Args:
        images: (N, C, Y, X) float z-scored source images (one per transform; the same slice
            may be repeated), on any device (CUDA when available).
        labels: (N, Y, X) integer labels aligned with ``images``, or None.
        transforms: N transforms (:func:`draw_transform`).
        tile_shape: (H, W) of the output tiles, pixels.
        interpolation: image resampling (``bicubic`` or ``bilinear``).

    Returns:
        images (N, C, H, W) with grey-value changes applied, and labels (N, H, W) or None.
    """
    if len(transforms) != images.shape[0]:
        raise ValueError(f"{len(transforms)} transforms for a batch of {images.shape[0]} images")
    grid = sampling_grid(transforms, tile_shape=tile_shape, source_shape=images.shape[-2:], device=images.device)
    mode = "nearest" if is_whole_pixel(transforms) else interpolation
    warped = adjust_grey(warp_images(images, grid, interpolation=mode), transforms)
    return warped, (warp_labels(labels, grid) if labels is not None else None)


# --------------------------------------------------------------------------------------
# numpy reference (tests and documentation)
# --------------------------------------------------------------------------------------
def warp_reference(image: np.ndarray, coords: np.ndarray, *, interpolation: Interpolation) -> np.ndarray:
    """Slow, explicit NumPy version of :func:`warp_images` for one 2-D image.

    Cubic convolution with a = -0.75 (bicubic) or linear weights over the 4x4 / 2x2
    neighbours, each neighbour index mirrored with :func:`unet_core.common.mirror.mirror_index`.

    Args:
        image: (Y, X) float image.
        coords: (2, H, W) source positions (y, x), pixels.

    Returns:
        (H, W) float64.
    """
    img = np.asarray(image, dtype=np.float64)
    fy, fx = np.floor(coords[0]), np.floor(coords[1])
    ty, tx = coords[0] - fy, coords[1] - fx
    if Interpolation(interpolation) is Interpolation.BICUBIC:
        offsets = np.arange(-1, 3)
        wy, wx = _keys_weights(ty, TORCH_BICUBIC_A), _keys_weights(tx, TORCH_BICUBIC_A)
    else:
        offsets = np.arange(0, 2)
        wy, wx = np.stack([1 - ty, ty], -1), np.stack([1 - tx, tx], -1)
    out = np.zeros(coords.shape[1:])
    for i, oy in enumerate(offsets):
        rows = mirror_index(fy.astype(np.int64) + oy, img.shape[0])
        for j, ox in enumerate(offsets):
            cols = mirror_index(fx.astype(np.int64) + ox, img.shape[1])
            out += wy[..., i] * wx[..., j] * img[rows, cols]
    return out
