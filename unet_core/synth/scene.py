"""Realistic synthetic microscopy: dense, touching cells with instance ground truth.

The project's embedded sample data (``unet synth``). Each slice is an independent 2-D image
of a dense cell culture, rendered the way a fluorescence (membrane stain) or phase-like
microscope would see it, together with its instance labels:

1. **Geometry.** Cell centres ("seeds") sit on a jittered square grid (spacing = the mean
   cell diameter, jitter <= 0.3 spacing) in a *warped* coordinate frame ``q = p + u(p)``.
   Every pixel belongs to its nearest seed in that frame (a Voronoi tessellation, exact with
   a 3 x 3 grid-neighbour search at that jitter) if it is closer than the cell's radius;
   otherwise it is background. The warp ``u`` is a smooth random field whose gradient is
   kept below 1, so it is a diffeomorphism: cells stay single connected regions while their
   sides curve and their sizes vary. About one seed in eight merges with a neighbour into a
   larger, non-convex (often two-nucleus) cell. Touching cells share a Voronoi edge; the
   density option decides how often cells touch and how much background shows between
   them. Where pixel sampling cuts a sliver off a cell (a one-pixel tip, a cell entering
   the image twice) the sliver is relabelled, so every id is one 4-connected region.
2. **Appearance.** Per-cell brightness, a nucleus of random size and contrast, granular
   cytoplasm with sparse bright puncta, and a membrane band (a Gaussian profile across every
   cell edge, including the edge between two touching cells) that is brighter or darker
   than the interiors.
3. **Optics and camera.** Uneven illumination (smooth field and off-centre vignetting),
   Gaussian PSF blur, then Poisson photon noise plus Gaussian read noise, camera offset,
   rounding and clipping to ``uint8`` or 12-bit ``uint16``.

Slice ``k`` of seed ``s`` draws all of its randomness from
``numpy.random.SeedSequence(s, spawn_key=(k,))``, never from a global generator, so a slice
is identical whether it is generated alone, inside a stack, in another process, or in
strips of another height.

Pure functions (:func:`synth_slice`, :func:`iter_synth_slices`) produce arrays; the I/O
adapter :func:`unet_core.synth.tiffs.write_synth_tiffs` streams them, page by page, into raw
multi-page TIFF files (image and labels separately), exactly as a microscope user would bring them.
"""

from __future__ import annotations

import enum
import functools
import math
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from unet_core.common.errors import UserInputError
from unet_core.common.mirror import SCIPY_MODE

#: Largest grey value of each supported output dtype (uint16 mimics a 12-bit camera).
FULL_SCALE = {"uint8": 255, "uint16": 4095}
#: Camera offset (dark level), grey values.
CAMERA_OFFSET = {"uint8": 6, "uint16": 100}
#: Seed jitter as a fraction of the grid spacing; <= 0.3 keeps the 3 x 3 search exact.
JITTER = 0.3
#: Largest norm of the coarse / fine warp gradients at irregularity 1 (sum < 1: a diffeomorphism).
MAX_WARP_GRADIENT = (0.5, 0.35)
#: Knot spacing of the coarse (cell sizes) and fine (curved sides) warp, in cell diameters.
WARP_KNOTS = (1.5, 0.4)
#: Probability that a seed merges with a neighbour into one larger, non-convex cell.
MERGE_PROBABILITY = 0.12
#: Pixels per strip of rows (keeps temporaries in cache; any value gives the same result).
STRIP_PIXELS = 65536
#: Knot spacings beyond which a field's Gaussian bumps are cut to zero (exp(-4**2 / 2) ~ 3e-4).
BUMP_REACH = 4.0
#: Photon counts below which the exact Poisson sampler is used (above: its normal limit).
EXACT_POISSON_BELOW = 30.0
#: Background (non-cell) intensity relative to the mean cell interior.
BACKGROUND = np.float32(0.12)


#: Default number of slices and seed of a synthetic stack (``unet synth --slices/--seed``, the
#: workflow's ``synth.slices``/``synth.seed``); the rest of the defaults are :class:`SynthParams`'.
SLICES = 8
SEED = 0


class CameraSettings(Protocol):
    """What :func:`_camera` reads of a slice's or a volume's parameters."""

    dtype: str
    photons: float
    read_noise: float


class BorderStyle(enum.Enum):
    """How cell borders (membranes) look relative to the cell interiors."""

    BRIGHT = "bright"  # fluorescent membrane stain
    DARK = "dark"  # phase-contrast / EM-like dark boundaries


@dataclass(frozen=True)
class SynthParams:
    """Everything that defines a synthetic slice besides the seed and the slice index.

    Attributes:
        height: slice height Y, pixels.
        width: slice width X, pixels.
        cell_size_px: mean cell diameter, pixels (the seed grid spacing).
        density: 0 < density <= 1; 1 = confluent (nearly every cell touches its neighbours,
            almost no background), lower values = smaller cells with background gaps.
        irregularity: 0..1, strength of the smooth warp that curves cell sides and varies
            cell sizes (0 = straight-sided Voronoi polygons).
        border: membrane brighter (``bright``) or darker (``dark``) than the interiors.
        border_contrast: membrane amplitude relative to the mean interior intensity, > 0.
        border_width_px: standard deviation of the membrane's Gaussian profile, pixels.
        gap_px: width of the ground-truth background band along every cell edge (the visible
            membrane between touching cells, and the membrane on a cell's outer edge), pixels;
            0 = the labels fill the cells up to the edge (touching cells share an edge).
        texture: 0..1, strength of the granular cytoplasm texture and puncta.
        illumination: 0..0.9, relative fall-off of the uneven illumination.
        blur_px: standard deviation of the Gaussian PSF, pixels (0 = no blur).
        photons: expected photon count at the mean cell interior intensity (Poisson noise:
            fewer photons = noisier), > 0.
        read_noise: standard deviation of the Gaussian camera read noise, grey values.
        dtype: ``uint8`` or ``uint16`` (12-bit range 0..4095) for the image.
    """

    height: int = 512
    width: int = 512
    cell_size_px: float = 32.0
    density: float = 0.7
    irregularity: float = 0.6
    border: BorderStyle = BorderStyle.BRIGHT
    border_contrast: float = 0.9
    border_width_px: float = 1.0
    gap_px: float = 0.0
    texture: float = 0.5
    illumination: float = 0.3
    blur_px: float = 1.0
    photons: float = 40.0
    read_noise: float = 1.5
    dtype: str = "uint8"

    def __post_init__(self) -> None:
        if not isinstance(self.border, BorderStyle):
            try:
                object.__setattr__(self, "border", BorderStyle(str(self.border)))
            except ValueError:
                raise UserInputError(
                    f"border: {self.border!r} is not a border style; use 'bright' or 'dark'"
                ) from None
        if self.dtype not in FULL_SCALE:
            raise UserInputError(f"dtype: {self.dtype!r} is not supported; use 'uint8' or 'uint16'")
        _require(self.height >= 16 and self.width >= 16, "height/width",
                 f"{self.height} x {self.width} px is too small; use at least 16 x 16 px")
        _require(4.0 <= self.cell_size_px <= min(self.height, self.width) * 4, "cell_size_px",
                 f"{self.cell_size_px} px is out of range; use 4 px up to 4 x the slice size")
        _require(0.0 < self.density <= 1.0, "density", f"{self.density} must be in (0, 1]")
        _require(0.0 <= self.irregularity <= 1.0, "irregularity", f"{self.irregularity} must be in [0, 1]")
        _require(0.0 < self.border_contrast <= 5.0, "border_contrast",
                 f"{self.border_contrast} must be in (0, 5] (with border 'dark', values above 1 "
                 "saturate at black)")
        _require(0.3 <= self.border_width_px <= self.cell_size_px / 4, "border_width_px",
                 f"{self.border_width_px} px must be between 0.3 px and a quarter of the cell size")
        _require(0.0 <= self.gap_px <= self.cell_size_px / 4, "gap_px",
                 f"{self.gap_px} px must be between 0 and a quarter of the cell size")
        _require(0.0 <= self.texture <= 1.0, "texture", f"{self.texture} must be in [0, 1]")
        _require(0.0 <= self.illumination <= 0.9, "illumination", f"{self.illumination} must be in [0, 0.9]")
        _require(0.0 <= self.blur_px <= 20.0, "blur_px", f"{self.blur_px} px must be in [0, 20]")
        _require(0.5 <= self.photons <= 1e6, "photons", f"{self.photons} must be in [0.5, 1e6]")
        _require(0.0 <= self.read_noise <= 1000.0, "read_noise", f"{self.read_noise} must be in [0, 1000]")

    @property
    def label_dtype(self) -> np.dtype:
        """uint16 when a slice cannot hold 65535 cells, else uint32."""
        return np.dtype(np.uint16 if self.max_cells < 2**16 - 1 else np.uint32)

    @property
    def max_cells(self) -> int:
        """Upper bound on the cells of one slice (seed grid points covering the slice)."""
        margin = _warp_margin_px(self)
        s = self.cell_size_px
        return math.ceil((self.height + 2 * margin) / s + 3) * math.ceil((self.width + 2 * margin) / s + 3)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (the border style as its string value)."""
        out = asdict(self)
        out["border"] = self.border.value
        return out


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        options = " / ".join("--" + k.replace("_", "-") for k in key.split("/"))
        raise UserInputError(f"{key} ({options}): {problem}")


def slice_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of slice ``index`` of the stack with ``seed``.

    Independent of every other slice and of generation order:
    ``default_rng(SeedSequence(seed, spawn_key=(index,)))``.
    """
    if seed < 0 or index < 0:
        raise UserInputError(f"seed {seed} / slice {index}: must be non-negative integers")
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(index),)))


# --------------------------------------------------------------------------- smooth fields
@functools.lru_cache(maxsize=8)
def _bump_matrix(n: int, knot_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian bumps on knots ``knot_px`` apart covering ``[0, n)`` with two knots to spare.

    Cached (the same for every slice of a stack); the arrays are read-only.

    Returns:
        ``(K, dK)``: (n, k) float32 bump values and their derivatives along the axis.
    """
    first = -2.0 * knot_px
    k = int(math.ceil((n - 1 - first) / knot_px)) + 3
    knots = first + knot_px * np.arange(k)
    t = (np.arange(n, dtype=np.float64)[:, None] - knots[None, :]) / knot_px
    bump = np.exp(-0.5 * t * t)
    bump[np.abs(t) > BUMP_REACH] = 0.0  # compact support: strips need only nearby knots
    values, slopes = bump.astype(np.float32), (-t / knot_px * bump).astype(np.float32)
    values.flags.writeable = slopes.flags.writeable = False
    return values, slopes


class _SmoothField:
    """Low-rank smooth random field ``Ky @ N @ Kx.T`` (N: standard normal knot weights).

    Evaluated strip by strip (``rows``) and at any sampling step, always with the same values.
    """

    def __init__(self, rng: np.random.Generator, height: int, width: int, knot_px: float) -> None:
        self.ky, self.dky = _bump_matrix(height, knot_px)
        self.knot_px = knot_px
        kx, dkx = _bump_matrix(width, knot_px)
        weights = rng.standard_normal((self.ky.shape[1], kx.shape[1])).astype(np.float32)
        self._right = weights @ kx.T  # (ky, X)
        self._right_dx = weights @ dkx.T

    def rows(self, start: int, stop: int, *, step: int = 1) -> np.ndarray:
        """Field values of rows ``start:stop:step`` (all columns), float32 (rows, X).

        Only knots within BUMP_REACH knot spacings of the rows contribute (the bumps are
        zero beyond), so a strip costs O(rows) whatever the slice height. The sum runs over
        the knots in increasing order with plain numpy (extra knots add exact zeros), so a
        row has the same value in strips of any height; it also avoids BLAS threads, which
        spin badly on small products when the cores are shared.
        """
        first = -2.0 * self.knot_px  # knot 0 position, as in _bump_matrix
        k0 = max(0, int(math.floor((start - first) / self.knot_px - BUMP_REACH)))
        k1 = min(self.ky.shape[1], int(math.ceil((stop - 1 - first) / self.knot_px + BUMP_REACH)) + 1)
        weights = self.ky[start:stop:step, k0:k1]
        out = np.zeros((weights.shape[0], self._right.shape[1]), dtype=np.float32)
        for k in range(k1 - k0):
            out += weights[:, k : k + 1] * self._right[k0 + k]
        return out

    def gradient_sampled(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """d/dy and d/dx sampled every ``step`` pixels on both axes."""
        return self.dky[::step] @ self._right[:, ::step], self.ky[::step] @ self._right_dx[:, ::step]


def _warp_knots_px(params: SynthParams) -> tuple[float, ...]:
    return tuple(max(4.0, k * params.cell_size_px) for k in WARP_KNOTS)


def _warp_margin_px(params: SynthParams) -> float:
    """Upper bound on |u|: each field's gradient bound times its knot spacing, 4-fold."""
    return sum(g * params.irregularity * k * 4.0 for g, k in zip(MAX_WARP_GRADIENT, _warp_knots_px(params)))


# --------------------------------------------------------------------------- one slice
@dataclass(frozen=True)
class _Seeds:
    """Seed grid (flat arrays indexed by ``gy * nx + gx``) in warped coordinates."""

    y: np.ndarray
    x: np.ndarray
    radius: np.ndarray
    yx: np.ndarray  # complex64 y + i x (one gather fetches both coordinates)
    owner: np.ndarray  # int32 cell id of each seed (its own index unless merged)
    origin: float
    spacing: float
    ny: int
    nx: int


def _make_seeds(rng: np.random.Generator, params: SynthParams) -> _Seeds:
    s = float(params.cell_size_px)
    margin = _warp_margin_px(params)
    origin = -(math.ceil(margin / s) + 1) * s
    ny = math.ceil((params.height - 2 * origin) / s) + 1
    nx = math.ceil((params.width - 2 * origin) / s) + 1
    gy, gx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    jitter = rng.uniform(-JITTER, JITTER, size=(2, ny, nx))
    y = origin + (gy + 0.5 + jitter[0]) * s
    x = origin + (gx + 0.5 + jitter[1]) * s
    # Radius: density 1 reaches past every Voronoi corner (max 0.85 s at jitter 0.3).
    radius = s * (0.38 + 0.55 * params.density) * np.exp(0.1 * rng.standard_normal((ny, nx)))
    y, x, radius = (a.ravel().astype(np.float32) for a in (y, x, radius))
    owner = _merge_owners(rng, y, x, radius, ny=ny, nx=nx)
    yx = (y + 1j * x).astype(np.complex64)
    return _Seeds(y=y, x=x, radius=radius, yx=yx, owner=owner, origin=origin, spacing=s, ny=ny, nx=nx)


def _merge_owners(
    rng: np.random.Generator, y: np.ndarray, x: np.ndarray, radius: np.ndarray, *, ny: int, nx: int
) -> np.ndarray:
    """Cell id (an owning seed index) of every seed: some neighbours merge into one larger cell.

    Seed ``i`` joins its right or lower grid neighbour ``j`` (probability MERGE_PROBABILITY)
    only when the two regions provably share an edge inside both cells: the midpoint of the
    two seeds is closer to them than to any other seed of the 3 x 3 neighbourhoods and lies
    within both radii. The union of two such regions is connected, so every cell stays one
    connected region. A seed merges at most once (no chains).
    """
    owner = np.arange(y.size, dtype=np.int32)
    want = rng.random(y.size) < MERGE_PROBABILITY
    direction = rng.random(y.size) < 0.5  # True: right neighbour, False: lower neighbour
    taken = np.zeros(y.size, dtype=bool)
    for i in np.flatnonzero(want):
        gy, gx = divmod(int(i), nx)
        j = i + 1 if direction[i] else i + nx
        if gx + 1 >= nx or gy + 1 >= ny or taken[i] or taken[j]:
            continue
        my, mx = 0.5 * (y[i] + y[j]), 0.5 * (x[i] + x[j])
        half2 = (y[i] - my) ** 2 + (x[i] - mx) ** 2
        if half2 >= min(radius[i], radius[j]) ** 2:
            continue
        near = [gy2 * nx + gx2 for gy2 in range(max(gy - 1, 0), min(gy + 3, ny))
                for gx2 in range(max(gx - 1, 0), min(gx + 3, nx))]
        near = np.array([k for k in near if k != i and k != j])
        if np.any((y[near] - my) ** 2 + (x[near] - mx) ** 2 <= half2):
            continue
        owner[j] = i
        taken[i] = taken[j] = True
    return owner


class _Scene:
    """Everything random about one slice that is not per pixel: seeds, warp, cells, light."""

    def __init__(self, rng: np.random.Generator, params: SynthParams) -> None:
        h, w = params.height, params.width
        self.params = params
        self.seeds = _make_seeds(rng, params)
        self.offsets = np.array(
            [oy * self.seeds.nx + ox for oy in (-1, 0, 1) for ox in (-1, 0, 1)], dtype=np.int32
        )
        # Warp u = sum of (coarse, fine) fields, each scaled so its sampled gradient norm is
        # MAX_WARP_GRADIENT * irregularity (the fields vary on the knot scale, so sampling
        # every knot/4 px finds the maximum closely); the bounds sum to < 1, so p -> p + u(p)
        # is a diffeomorphism and every cell stays one connected region.
        self.warps = []
        for knot, limit in zip(_warp_knots_px(params), MAX_WARP_GRADIENT):
            fy, fx = _SmoothField(rng, h, w, knot), _SmoothField(rng, h, w, knot)
            step = max(1, int(knot // 4))
            gyy, gyx = fy.gradient_sampled(step)
            gxy, gxx = fx.gradient_sampled(step)
            gnorm = float(np.sqrt(gyy**2 + gyx**2 + gxy**2 + gxx**2).max())
            self.warps.append((fy, fx, np.float32(limit * params.irregularity / gnorm if gnorm > 0 else 0.0)))
        n = self.seeds.y.size
        self.brightness = np.exp(0.25 * rng.standard_normal(n)).astype(np.float32)
        self.nucleus_r = rng.uniform(0.3, 0.5, n).astype(np.float32)
        self.nucleus_gain = (rng.choice([-1.0, 1.0], n) * rng.uniform(0.3, 0.6, n)).astype(np.float32)
        # Illumination: a very smooth field plus off-centre vignetting, both in [0, 1].
        self.light = _SmoothField(rng, h, w, max(h, w) / 2.5)
        lo, hi = _field_range(self.light, h)
        self.light_lo, self.light_span = np.float32(lo), np.float32(max(hi - lo, 1e-6))
        self.optical_centre = rng.uniform(0.2, 0.8, size=2) * (h, w)

    def geometry(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``r0:r1``: cell (owner seed index, -1 = background), distance to the seed
        relative to the cell radius, and distance to the nearest cell edge (px, warped frame)."""
        seeds, w = self.seeds, self.params.width
        qy = np.repeat(np.arange(r0, r1, dtype=np.float32)[:, None], w, axis=1)
        qx = np.repeat(np.arange(w, dtype=np.float32)[None, :], r1 - r0, axis=0)
        for fy, fx, scale in self.warps:
            qy += scale * fy.rows(r0, r1)
            qx += scale * fx.rows(r0, r1)
        inv_s, origin = np.float32(1.0 / seeds.spacing), np.float32(seeds.origin)
        # Grid cell of each warped pixel. The grid's margin exceeds the largest warp several
        # times over; the clip only guarantees in-range candidates whatever happens.
        gy = np.clip(np.floor((qy - origin) * inv_s).astype(np.int32), 1, seeds.ny - 2)
        gx = np.clip(np.floor((qx - origin) * inv_s).astype(np.int32), 1, seeds.nx - 2)
        base = gy * np.int32(seeds.nx) + gx
        # Nearest and second-nearest of the 3 x 3 candidate seeds. A squared distance
        # (float32 >= 0, whose bit pattern orders like an int32) carries the candidate
        # number in its 4 lowest mantissa bits, so plain integer min/max track both the
        # distances (to 2e-6 relative) and which candidate they belong to.
        best1 = np.full(qy.shape, np.iinfo(np.int32).max, dtype=np.int32)
        best2 = best1.copy()
        for k, off in enumerate(self.offsets):
            site = seeds.yx.take(base + np.int32(off))
            d2 = np.square(qy - site.real)
            d2 += np.square(qx - site.imag)
            key = d2.view(np.int32)
            key &= np.int32(~15)
            key |= np.int32(k)
            np.minimum(best2, np.maximum(best1, key), out=best2)
            np.minimum(best1, key, out=best1)
        idx1 = base + self.offsets.take(best1 & 15)
        idx2 = base + self.offsets.take(best2 & 15)
        best1 &= np.int32(~15)
        best2 &= np.int32(~15)
        best1, best2 = best1.view(np.float32), best2.view(np.float32)
        d1 = np.sqrt(best1)
        radius = seeds.radius.take(idx1)
        inside = d1 < radius
        # Distance to the bisector of the two nearest seeds (the shared edge of touching
        # cells); none between two seeds of one merged cell.
        sep = np.abs(seeds.yx.take(idx1) - seeds.yx.take(idx2))
        bisector = (best2 - best1) / (2.0 * sep)
        bisector[seeds.owner.take(idx1) == seeds.owner.take(idx2)] = np.inf
        edge = radius - d1
        cell = np.where(inside, seeds.owner.take(idx1), -1)
        return cell, d1 / radius, np.where(inside, np.minimum(bisector, edge), -edge)

    def illumination(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1`` of the multiplicative illumination, float32 in [1 - illumination, 1]."""
        h, w = self.params.height, self.params.width
        field = (self.light.rows(r0, r1) - self.light_lo) / self.light_span
        cy, cx = self.optical_centre
        yy = ((np.arange(r0, r1, dtype=np.float32) - cy) / max(h, w))[:, None]
        xx = ((np.arange(w, dtype=np.float32) - cx) / max(h, w))[None, :]
        vignette = np.exp(-2.0 * yy * yy) * np.exp(-2.0 * xx * xx)  # 1 at the optical centre
        shade = 0.5 * np.clip(field, 0.0, 1.0) + 0.5 * vignette
        return 1.0 - np.float32(self.params.illumination) * (1.0 - shade)

    def render(self, rng: np.random.Generator, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``r0:r1`` before blur and noise: (signal float32 in photons / photons at mean
        interior, cell index int32 with -1 = background)."""
        p = self.params
        cell, rel, mdist = self.geometry(r0, r1)
        inside = cell >= 0
        c = np.where(inside, cell, 0)
        # Nucleus: a smooth disc (warped frame) of relative radius nucleus_r, brighter or dimmer.
        nucleus = 1.0 / (1.0 + np.exp((rel - self.nucleus_r.take(c)) * np.float32(25.0)))
        interior = self.brightness.take(c) * (1.0 + self.nucleus_gain.take(c) * nucleus)
        interior *= 1.0 - 0.25 * np.square(np.minimum(rel, 1.0))  # thinner towards the edge
        # Granular cytoplasm and sparse puncta from one white-noise draw (the PSF adds grain).
        white = rng.standard_normal(cell.shape, dtype=np.float32)
        grain = 1.0 + np.float32(0.6 * p.texture) * white
        grain += np.float32(4.0 * p.texture) * (white > 3.0)
        np.maximum(grain, 0.0, out=grain)
        signal = np.where(inside, interior * grain, np.float32(0.0))
        signal += BACKGROUND
        membrane = np.exp(-0.5 * np.square(mdist / np.float32(p.border_width_px)))
        if p.border is BorderStyle.BRIGHT:
            signal += np.float32(p.border_contrast) * membrane
        else:
            signal *= 1.0 - np.minimum(np.float32(p.border_contrast) * membrane, 1.0)
        signal *= self.illumination(r0, r1)
        if p.gap_px > 0:
            cell = np.where(mdist >= np.float32(0.5 * p.gap_px), cell, -1)
        return signal, cell


def _field_range(field: _SmoothField, height: int) -> tuple[float, float]:
    """Min and max of a smooth field, from rows sampled every 8 px (cheap, deterministic)."""
    sample = field.rows(0, height, step=8)
    return float(sample.min()), float(sample.max())


def synth_slice(params: SynthParams, *, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Render slice ``index`` of the synthetic stack with ``seed``.

    Works in strips of about STRIP_PIXELS pixels (temporaries stay in cache); only the
    signal, the labels and the image are held for the whole slice.

    Args:
        params: image size, cell and optics parameters.
        seed: stack seed, >= 0.
        index: slice index (Z), >= 0; the slice's randomness comes only from (seed, index).

    Returns:
        ``(image, labels)``: image (Y, X) ``params.dtype`` raw grey values (camera offset
        included, uint16 in 0..4095); labels (Y, X) ``params.label_dtype`` instance ids,
        0 = background, 1..n = cells, each one 4-connected region, numbered in seed-grid
        raster order (then split-off border pieces); touching cells share an edge with no
        background between them.
    """
    # Separate streams for the scene, the texture, the read/shot-noise normals and the exact
    # Poisson draws: each is consumed in raster order, so strips of any height give the
    # same slice.
    rng_scene, rng_texture, rng_normal, rng_poisson = (
        np.random.default_rng(child) for child in slice_rng(seed, index).bit_generator.seed_seq.spawn(4)
    )
    scene = _Scene(rng_scene, params)
    h, w = params.height, params.width
    rows = max(1, STRIP_PIXELS // w)
    signal = np.empty((h, w), dtype=np.float32)
    cells = np.empty((h, w), dtype=np.int32)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        signal[r0:r1], cells[r0:r1] = scene.render(rng_texture, r0, r1)
    if params.blur_px > 0:
        from scipy import ndimage

        signal = ndimage.gaussian_filter(signal, params.blur_px, mode=SCIPY_MODE, truncate=3.0)
    image = np.empty((h, w), dtype=params.dtype)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        image[r0:r1] = _camera(rng_normal, rng_poisson, signal[r0:r1], params)
    del signal
    labels = _consecutive_labels(cells, scene.seeds.y.size, params.label_dtype)
    return image, _repair_fragments(labels, min_piece_px=max(4, int(0.05 * params.cell_size_px**2)),
                                    check_all=params.gap_px > 0)


def _camera(
    rng_normal: np.random.Generator,
    rng_poisson: np.random.Generator,
    signal: np.ndarray,
    params: CameraSettings,
) -> np.ndarray:
    """Poisson photon noise + Gaussian read noise, camera offset, rounding, clipping.

    Args:
        signal: float32 of any shape ((rows, X) of a slice, (Z, Y, X) of a volume), 1 = photons
            expected at the mean cell interior.
        params: :class:`SynthParams` or ``synth.volume.VolumeParams`` (dtype, photons, read_noise).
    """
    full = FULL_SCALE[params.dtype]
    offset = CAMERA_OFFSET[params.dtype]
    gain = np.float32(0.4 * (full - offset) / params.photons)  # mean interior -> 40 % of range
    lam = signal * np.float32(params.photons)
    np.maximum(lam, 0.0, out=lam)
    z = rng_normal.standard_normal(lam.shape, dtype=np.float32)
    # Above EXACT_POISSON_BELOW the Poisson law is replaced by its normal limit N(lam, lam)
    # (the same draw z also carries the read noise: independent Gaussians add in variance).
    read_var = np.float32((params.read_noise / gain) ** 2)
    counts = lam + np.sqrt(lam + read_var) * z
    low = lam < EXACT_POISSON_BELOW
    if low.any():
        counts[low] = rng_poisson.poisson(lam[low]).astype(np.float32) + np.sqrt(read_var) * z[low]
    grey = offset + gain * counts
    return np.clip(np.rint(grey), 0, full).astype(params.dtype)


def _consecutive_labels(cells: np.ndarray, n_seeds: int, dtype: np.dtype) -> np.ndarray:
    """Renumber owner seed indices (-1 = background) to 1..n in seed order; background 0."""
    present = np.bincount(cells.ravel() + 1, minlength=n_seeds + 1)[1:] > 0
    lut = np.zeros(n_seeds + 1, dtype=dtype)
    lut[1:][present] = np.arange(1, int(present.sum()) + 1, dtype=dtype)
    return lut.take(cells + 1)


def _repair_fragments(labels: np.ndarray, *, min_piece_px: int, check_all: bool = False) -> np.ndarray:
    """Make every id one face-connected region (4-connected in 2-D, 6 in 3-D; in place; returns
    ``labels``).

    The continuous cells are connected, but pixel sampling can cut a one-pixel-thin tip
    off a cell (only a diagonal contact remains), and a cell can enter the image in two
    places. In 2-D only such suspects are checked: cells touching the image border and cells
    with a checkerboard 2 x 2 pattern; in 3-D (``unet_core.synth.volume``) every id is. The
    largest piece keeps the id; a piece of at least ``min_piece_px`` pixels (voxels) becomes a
    new cell (next free id), a smaller one joins the cell it touches most (face neighbours), or
    background if it touches none.

    Args:
        labels: (Y, X) or (Z, Y, X) unsigned instance ids, 0 = background, 1..n consecutive.
        min_piece_px: smallest piece kept as a cell of its own, pixels (voxels).
        check_all: check every id in 2-D too.
    """
    from scipy import ndimage

    if check_all or labels.ndim != 2:  # a gap can cut a thin neck anywhere; 3-D: every id
        suspects = np.unique(labels)
    else:
        a, b, c, d = labels[:-1, :-1], labels[:-1, 1:], labels[1:, :-1], labels[1:, 1:]
        diag = np.concatenate([a[(a == d) & (b != a) & (c != a)], b[(b == c) & (a != b) & (d != b)]])
        border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        suspects = np.unique(np.concatenate([diag, border]))
    suspects = suspects[suspects > 0]
    if suspects.size == 0:
        return labels
    boxes = ndimage.find_objects(labels, max_label=int(suspects.max()))
    next_id = int(labels.max()) + 1
    four = ndimage.generate_binary_structure(labels.ndim, 1)
    for cell_id in suspects.tolist():
        box = boxes[cell_id - 1]
        if box is None:
            continue
        grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        view = labels[grown]
        pieces, n = ndimage.label(view == cell_id, structure=four)
        if n < 2:
            continue
        sizes = np.bincount(pieces.ravel())[1:]
        for piece in np.argsort(-sizes, kind="stable")[1:] + 1:
            mask = pieces == piece
            if sizes[piece - 1] >= min_piece_px:
                if next_id > np.iinfo(labels.dtype).max:
                    raise RuntimeError("synthetic image has more cells than its label dtype holds")
                view[mask] = next_id
                next_id += 1
                continue
            ring = ndimage.binary_dilation(mask, structure=four) & ~mask
            around = view[ring]
            around = around[(around > 0) & (around != cell_id)]
            view[mask] = np.bincount(around).argmax() if around.size else 0
    return labels


def voronoi_cells(shape: tuple[int, int], n: int, seed: int, *, gap: float = 0.0) -> np.ndarray:
    """Plain touching cells for tests and benchmarks: nearest-seed (Voronoi) labels 1..n, int32.

    ``n`` seeds uniform in the image (seeded by ``seed``); ``gap > 0`` blanks (label 0) the
    pixels farther from their seed than ``gap`` times the radius of a disk of mean cell area,
    giving cells with background between them. No texture, no warps: see :func:`synth_slice`
    for realistic images.
    """
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    points = rng.uniform(0, 1, (n, 2)) * np.array(shape)
    grid = np.stack(np.mgrid[: shape[0], : shape[1]], -1).reshape(-1, 2)
    dist, index = cKDTree(points).query(grid)
    labels = (index + 1).reshape(shape).astype(np.int32)
    if gap:
        labels[dist.reshape(shape) > gap * math.sqrt(shape[0] * shape[1] / n / math.pi)] = 0
    return labels


def iter_synth_slices(
    params: SynthParams, *, seed: int, slices: int, start: int = 0, workers: int = 1
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(image, labels)`` of :func:`synth_slice` for slices ``start .. start + slices - 1``.

    With ``workers > 1`` slices are rendered ahead in that many processes (at most
    ``2 * workers`` slices in flight; never more processes than slices or CPU cores, which would
    only cost memory: a fork start forks them all at once); the output is identical for any
    worker count.
    """
    if slices < 1:
        raise UserInputError(f"slices: {slices} must be at least 1")
    workers = min(workers, slices, os.cpu_count() or 1)
    if workers <= 1:
        for z in range(start, start + slices):
            yield synth_slice(params, seed=seed, index=z)
        return
    # fork: workers need no re-import of __main__ (works from scripts, notebooks, stdin).
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: deque = deque()
        next_z = start
        while pending or next_z < start + slices:
            while next_z < start + slices and len(pending) < 2 * workers:
                pending.append(pool.submit(synth_slice, params, seed=seed, index=next_z))
                next_z += 1
            yield pending.popleft().result()
