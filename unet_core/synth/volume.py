"""Synthetic 3-D volumes: touching nuclei in an anisotropic light-microscope stack, with 3-D ids.

The 3-D counterpart of :mod:`unet_core.synth.scene` (``unet synth --dims 3``): one volume is a
confocal / light-sheet-like stack of a nuclear stain in dense tissue, and its instance labels,
where every nucleus spans several slices under one id. The geometry is built in micrometres and
then sampled on the voxel grid, so objects look right in µm and flattened in voxels along z.

1. **Geometry (µm).** Nucleus centres are placed by random sequential addition at a fixed
   number density (``nuclei_per_1000um3``), no two closer than MIN_DISTANCE x the diameter, in the
   volume grown by the largest nucleus reach (objects entering through the faces are cut, not
   missing; distances wrap around that box, so the density is even up to its walls). Each nucleus is a deformed ellipsoid: semi-axes ``r * exp(0.15 N)`` at a random
   orientation, times an egg / pear factor of the direction, so it is star-shaped around its
   centre. A voxel belongs to the nucleus of its nearest centre (a Voronoi cell, convex) if it
   lies inside that nucleus' shape; the intersection of a convex cell and a star-shaped body
   around the same centre is connected, so touching nuclei share a flat face and every nucleus is
   one piece. Pieces that voxel sampling cuts off (a diagonal-only contact) are repaired by
   :func:`unet_core.synth.scene._repair_fragments`, so every id is one 6-connected region.
2. **Appearance.** Per-nucleus brightness, a smooth chromatin texture (a 3-D smooth random field
   built from the 2-D module's Gaussian bumps), a rim dimmer than the centre and a dim seam
   along the face between two touching nuclei; a uniform out-of-focus haze (scene.BACKGROUND).
3. **Optics and camera.** A Gaussian PSF wider along z than in-plane, both widths growing
   linearly with depth (``psf_growth`` per 100 µm), applied slice by slice in-plane and as one
   depth-varying kernel along z; attenuation ``exp(-depth / attenuation_length_um)``; then the 2-D
   module's camera (:func:`unet_core.synth.scene._camera`: Poisson photon noise, Gaussian read
   noise, offset, 12-bit ``uint16``).

**Statistics of the defaults** (32 x 128 x 128 voxels of 2.0 x 0.5 x 0.5 µm, a 64 µm cube;
``tests/unit/test_synth_volume.py`` measures them on generated volumes and holds the mean of
three to these values within the stated tolerance; over 12 volumes, mean ± standard deviation):

- density: 0.6 nuclei per 1000 µm³ (``nuclei_per_1000um3``, the same count in every placement
  box, so fixed, not Poisson), about 157 centres per 64 µm cube; the Miles-Lantuéjoul estimate
  from the labels (nuclei not touching a face, each weighted by the inverse of the volume its
  bounding box can take) is 0.60 ± 0.04 (tolerance ±15 %). The labels hold about 230 ids (nuclei
  cut by a face included); foreground (nucleus) volume fraction 0.33 ± 0.02 (±0.05).
- touching fraction: 0.71 ± 0.04 of the labelled nuclei share a face (6-neighbours, no
  background between) with another nucleus (±0.08).
- signal-to-noise ratio: 7.1 ± 0.2, as (mean nucleus grey value - mean background grey value) /
  standard deviation of the background grey values, background = voxels at least 3 µm from every
  nucleus, over the whole volume (attenuation and PSF included) (±15 %).
- anisotropy: nuclei are round in µm (mean ratio of the z to the in-plane standard deviation of
  a nucleus' voxel positions 1.00 ± 0.02 in µm) and so flattened 4-fold in voxels (0.25).

Volume ``k`` of seed ``s`` draws all of its randomness from
``numpy.random.SeedSequence(s, spawn_key=(k,))`` (:func:`unet_core.synth.scene.slice_rng`),
never from a global generator, so a volume is the same whether generated alone or among others.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from unet_core.common.errors import UserInputError
from unet_core.common.mirror import SCIPY_MODE
from unet_core.synth.scene import (
    BACKGROUND,
    FULL_SCALE,
    _bump_matrix,
    _camera,
    _consecutive_labels,
    _repair_fragments,
    _require,
    slice_rng,
)

#: Smallest centre-to-centre distance of two nuclei, in nucleus diameters.
MIN_DISTANCE = 0.9
#: Standard deviation of the log nucleus size and of the log semi-axis ratios.
SIZE_SPREAD, AXIS_SPREAD = 0.10, 0.15
#: Largest egg (odd) and pear (even) deformation amplitudes of a nucleus outline.
EGG, PEAR = 0.12, 0.15
#: Brightness loss at a nucleus rim relative to its centre, and the seam's depth and width (µm).
RIM_DIMMING, SEAM_DIMMING, SEAM_WIDTH_UM = 0.3, 0.5, 0.35
#: Chromatin texture: knot spacing of the smooth field (µm) and its relative amplitude.
TEXTURE_KNOT_UM, TEXTURE = 2.0, 0.25
#: Voxels sampled per batch (bounds the float64 temporaries; any value gives the same volume).
SAMPLE_VOXELS = 2**18
#: What the module docstring states about volumes of the default parameters (tests check both).
STATED_DENSITY_PER_1000UM3, STATED_FOREGROUND_FRACTION = 0.6, 0.33
STATED_TOUCHING_FRACTION, STATED_SNR = 0.71, 7.1


@dataclass(frozen=True)
class VolumeParams:
    """Everything that defines a synthetic volume besides the seed and the volume index.

    Attributes:
        depth: volume depth Z, slices.
        height: volume height Y, voxels.
        width: volume width X, voxels.
        spacing_um: voxel size (z, y, x), µm; the default z spacing is 4x the in-plane one.
        nucleus_diameter_um: mean nucleus diameter, µm.
        nuclei_per_1000um3: number density of nucleus centres, per 1000 µm³.
        psf_sigma_um: standard deviation of the Gaussian PSF (z, in-plane) at depth 0, µm.
        psf_growth: relative widening of the PSF per 100 µm of depth (0 = the same everywhere).
        attenuation_length_um: depth over which the signal falls to 1/e, µm.
        photons: expected photon count at the mean nucleus interior at depth 0 (fewer = noisier).
        read_noise: standard deviation of the Gaussian camera read noise, grey values.
        dtype: ``uint16`` (12-bit range 0..4095) or ``uint8`` for the image.
    """

    depth: int = 32
    height: int = 128
    width: int = 128
    spacing_um: tuple[float, float, float] = (2.0, 0.5, 0.5)
    nucleus_diameter_um: float = 10.0
    nuclei_per_1000um3: float = 0.6
    psf_sigma_um: tuple[float, float] = (1.0, 0.3)
    psf_growth: float = 1.5
    attenuation_length_um: float = 80.0
    photons: float = 20.0
    read_noise: float = 4.0
    dtype: str = "uint16"

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing_um", tuple(float(s) for s in self.spacing_um))
        object.__setattr__(self, "psf_sigma_um", tuple(float(s) for s in self.psf_sigma_um))
        if self.dtype not in FULL_SCALE:
            raise UserInputError(f"dtype: {self.dtype!r} is not supported; use 'uint16' or 'uint8'")
        _require(self.depth >= 2 and self.height >= 16 and self.width >= 16, "slices/size",
                 f"{self.depth} x {self.height} x {self.width} voxels is too small; use at least 2 x 16 x 16")
        _require(len(self.spacing_um) == 3 and all(0.01 <= s <= 100 for s in self.spacing_um),
                 "voxel_size_um",
                 f"{list(self.spacing_um)} must be three sizes (z, y, x) in [0.01, 100] µm")
        _require(2 * max(self.spacing_um) <= self.nucleus_diameter_um <= 1000, "nucleus_diameter_um",
                 f"{self.nucleus_diameter_um} µm must span at least two voxels on every axis "
                 "(and at most 1000 µm)")
        exclusion_um3 = math.pi / 6 * (MIN_DISTANCE * self.nucleus_diameter_um) ** 3
        packing = self.nuclei_per_1000um3 / 1000 * exclusion_um3  # RSA jams near 0.38
        _require(0 < packing <= 0.3, "nuclei_per_1000um3",
                 f"{self.nuclei_per_1000um3} must be > 0 and pack the nuclei loosely enough to place them "
                 f"(at most {0.3 / packing * self.nuclei_per_1000um3:.3g} for this diameter)")
        _require(len(self.psf_sigma_um) == 2 and all(0 <= s <= 20 for s in self.psf_sigma_um), "psf_sigma_um",
                 f"{list(self.psf_sigma_um)} must be two widths (z, in-plane) in [0, 20] µm")
        _require(0 <= self.psf_growth <= 10, "psf_growth", f"{self.psf_growth} must be in [0, 10]")
        _require(1 <= self.attenuation_length_um <= 1e6, "attenuation_length_um",
                 f"{self.attenuation_length_um} µm must be in [1, 1e6]")
        _require(0.5 <= self.photons <= 1e6, "photons", f"{self.photons} must be in [0.5, 1e6]")
        _require(0.0 <= self.read_noise <= 1000.0, "read_noise", f"{self.read_noise} must be in [0, 1000]")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, Y, X) in voxels."""
        return self.depth, self.height, self.width

    @property
    def label_dtype(self) -> np.dtype:
        """uint16 when a volume cannot hold 65535 nuclei, else uint32."""
        return np.dtype(np.uint16 if self.max_nuclei < 2**16 - 1 else np.uint32)

    @property
    def max_nuclei(self) -> int:
        """Upper bound on the labels of one volume: the centres placed around it, twice (a
        nucleus cut by a face can enter the volume in more than one piece)."""
        return 2 * _centre_count(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (tuples as lists)."""
        out = asdict(self)
        out["spacing_um"], out["psf_sigma_um"] = list(self.spacing_um), list(self.psf_sigma_um)
        return out


# --------------------------------------------------------------------------- nuclei (µm)
@dataclass(frozen=True)
class _Nuclei:
    """Centres and shapes of the nuclei around one volume (µm, axes z, y, x)."""

    centres: np.ndarray  # (n, 3) float64
    inverse: np.ndarray  # (n, 3, 3) float64: |inverse @ (p - c)| = 1 on the undeformed ellipsoid
    egg_axis: np.ndarray  # (n, 3) unit vectors
    egg: np.ndarray  # (n,)
    pear_axis: np.ndarray  # (n, 3) unit vectors
    pear: np.ndarray  # (n,)
    brightness: np.ndarray  # (n,) float32, mean 1
    reach: np.ndarray  # (n,) float64 bound on the distance of the nucleus surface from its centre, µm

    @property
    def reach_um(self) -> float:
        """Largest distance of any nucleus surface from its centre, µm."""
        return float(self.reach.max())


def _reach_bound_um(params: VolumeParams) -> float:
    """Upper bound on a nucleus' reach: semi-axes clipped at 3 standard deviations, largest deformation."""
    radius = 0.5 * params.nucleus_diameter_um * math.exp(3 * SIZE_SPREAD + 3 * AXIS_SPREAD)
    return radius * (1 + EGG + PEAR * 2 / 3)


def _placement_box_um(params: VolumeParams) -> tuple[np.ndarray, np.ndarray]:
    """Low and high corner of the box the centres are drawn in: the volume (voxel centres at
    ``i * spacing``, each voxel half a spacing either side) grown by the largest reach."""
    spacing = np.asarray(params.spacing_um)
    low = -0.5 * spacing - _reach_bound_um(params)
    high = (np.asarray(params.shape) - 0.5) * spacing + _reach_bound_um(params)
    return low, high


def _centre_count(params: VolumeParams) -> int:
    low, high = _placement_box_um(params)
    return max(1, round(params.nuclei_per_1000um3 / 1000 * float(np.prod(high - low))))


def _place_centres(rng: np.random.Generator, params: VolumeParams) -> np.ndarray:
    """Random sequential addition: uniform candidates, kept when no kept centre is closer than
    MIN_DISTANCE diameters, until the box holds its fixed count. Distances wrap around the box
    (periodic), so the density is the same everywhere: a hard wall would crowd centres along it
    and thin them in the volume. Returns (n, 3) µm."""
    low, high = _placement_box_um(params)
    size = high - low
    count = _centre_count(params)
    min_d2 = (MIN_DISTANCE * params.nucleus_diameter_um) ** 2
    kept = np.empty((count, 3))
    n = tries = 0
    while n < count:
        if tries > 200 * count:  # unreachable below the packing limit __post_init__ enforces
            raise UserInputError(f"nuclei_per_1000um3: placed only {n} of {count} nuclei; lower the density")
        batch = rng.uniform(low, high, size=(256, 3))
        tries += len(batch)
        # the same as testing one candidate after the other: first against the centres kept
        # before this batch (all at once), then against those kept from it
        far = np.ones(len(batch), dtype=bool)
        if n:
            far = (_periodic_d2(batch[:, None, :] - kept[None, :n], size) >= min_d2).all(axis=1)
        first = n
        for candidate in batch[far]:
            if n > first and np.min(_periodic_d2(kept[first:n] - candidate, size)) < min_d2:
                continue
            kept[n] = candidate
            n += 1
            if n == count:
                break
    return kept


def _periodic_d2(diff: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Squared length of difference vectors (..., 3) in a periodic box of ``size`` (minimum image)."""
    diff = diff - size * np.round(diff / size)
    return np.square(diff).sum(axis=-1)


def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _make_nuclei(rng: np.random.Generator, params: VolumeParams) -> _Nuclei:
    """Centres, random deformed-ellipsoid shapes and brightness of every nucleus."""
    centres = _place_centres(rng, params)
    n = len(centres)
    size = np.clip(SIZE_SPREAD * rng.standard_normal(n), -3 * SIZE_SPREAD, 3 * SIZE_SPREAD)
    radius = 0.5 * params.nucleus_diameter_um * np.exp(size)
    ratios = np.clip(AXIS_SPREAD * rng.standard_normal((n, 3)), -3 * AXIS_SPREAD, 3 * AXIS_SPREAD)
    semi_axes = radius[:, None] * np.exp(ratios)
    q, r = np.linalg.qr(rng.standard_normal((n, 3, 3)))
    rotation = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]  # uniform random rotations
    inverse = np.transpose(rotation, (0, 2, 1)) / semi_axes[:, :, None]  # diag(1/a) @ R.T
    egg = rng.uniform(-EGG, EGG, n)
    pear = rng.uniform(-PEAR, PEAR, n)
    reach = semi_axes.max(axis=1) * (1 + np.abs(egg) + np.abs(pear) * 2 / 3)
    return _Nuclei(
        centres=centres, inverse=inverse, egg_axis=_unit_vectors(rng, n), egg=egg,
        pear_axis=_unit_vectors(rng, n), pear=pear,
        brightness=np.exp(0.2 * rng.standard_normal(n)).astype(np.float32), reach=reach,
    )


# --------------------------------------------------------------------------- voxel sampling
@dataclass(frozen=True)
class _Sampled:
    """Per-voxel geometry of a volume, (Z, Y, X) each."""

    owner: np.ndarray  # int32 nucleus index, -1 = background
    rho: np.ndarray  # float32 relative radius inside the owner (0 centre .. 1 surface)
    seam_um: np.ndarray  # float32 distance to the face shared with the next-nearest nucleus, µm


def _nearest_two(nuclei: _Nuclei, params: VolumeParams) -> tuple[np.ndarray, ...]:
    """Squared distance (µm²) to the nearest and second-nearest centre of every voxel centre
    (``index * spacing`` µm) and their indices, among the centres within ``reach_um`` (inf and
    -1 beyond): each centre visits the voxels of its box of that radius. Every centre nearer
    than a nucleus reaches is within the same radius, so a voxel inside a nucleus always gets
    its true nearest centre (the Voronoi cell it lies in).

    Returns:
        ``(d1, i1, d2, i2)``: (Z, Y, X) float32, int32, float32, int32.
    """
    spacing = np.asarray(params.spacing_um)
    axes = [np.arange(n, dtype=np.float32) * np.float32(s) for n, s in zip(params.shape, spacing)]
    d1 = np.full(params.shape, np.inf, dtype=np.float32)
    d2 = d1.copy()
    i1 = np.full(params.shape, -1, dtype=np.int32)
    i2 = i1.copy()
    reach = nuclei.reach_um
    for k, centre in enumerate(nuclei.centres):
        lo = np.maximum(np.ceil((centre - reach) / spacing), 0).astype(int)
        hi = np.minimum(np.floor((centre + reach) / spacing) + 1, params.shape).astype(int)
        if np.any(hi <= lo):
            continue
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        dz, dy, dx = (np.square(ax[a:b] - np.float32(c)) for ax, a, b, c in zip(axes, lo, hi, centre))
        dist = dz[:, None, None] + (dy[:, None] + dx[None, :])[None]
        b1, b2, j1, j2 = d1[box], d2[box], i1[box], i2[box]
        closer = dist < b1
        second = ~closer & (dist < b2)
        b2[...] = np.where(closer, b1, np.where(second, dist, b2))
        j2[...] = np.where(closer, j1, np.where(second, k, j2))
        b1[closer] = dist[closer]
        j1[closer] = k
    return d1, i1, d2, i2


def _sample(nuclei: _Nuclei, params: VolumeParams) -> _Sampled:
    """Sample the nuclei at the voxel centres: owner (the nearest centre, where the voxel lies
    inside that nucleus' deformed-ellipsoid shape), relative radius, seam distance.

    Works through the voxels SAMPLE_VOXELS at a time (each voxel on its own: any batch gives the
    same result), so the float64 temporaries stay small for large volumes.
    """
    d1, i1, d2, i2 = (a.ravel() for a in _nearest_two(nuclei, params))
    owner = np.full(params.shape, -1, dtype=np.int32)
    rho = np.ones(params.shape, dtype=np.float32)
    seam = np.full(params.shape, np.inf, dtype=np.float32)
    for start in range(0, i1.size, SAMPLE_VOXELS):
        near = start + np.flatnonzero(i1[start:start + SAMPLE_VOXELS] >= 0)
        near = near[d1[near] <= np.square(nuclei.reach[i1[near]])]  # the others lie outside
        r = _relative_radius(nuclei, i1[near], np.unravel_index(near, params.shape), params.spacing_um)
        inside = near[r < 1]
        owner.ravel()[inside] = i1[inside]
        rho.ravel()[near] = np.minimum(r, 1)
        pair = inside[i2[inside] >= 0]
        gap = np.linalg.norm(nuclei.centres[i2[pair]] - nuclei.centres[i1[pair]], axis=1)
        seam.ravel()[pair] = (d2[pair] - d1[pair]) / (2 * gap)  # distance to the bisector, µm
    return _Sampled(owner=owner, rho=rho, seam_um=seam)


def _relative_radius(nuclei: _Nuclei, owner: np.ndarray, index: tuple[np.ndarray, ...],
                     spacing_um: tuple[float, float, float]) -> np.ndarray:
    """Relative radius (< 1 inside) in nucleus ``owner`` (m,) of the voxels at ``index`` (3 x (m,)).

    The ellipsoid's radius ``|inverse @ v|`` divided by the outline factor of the direction of
    ``v``: it grows linearly along every ray from the centre, so the body is star-shaped.
    """
    v = np.column_stack(index) * np.asarray(spacing_um) - nuclei.centres[owner]
    u = v / np.maximum(np.linalg.norm(v, axis=1), 1e-9)[:, None]
    ellipsoid = np.linalg.norm(np.einsum("nij,nj->ni", nuclei.inverse[owner], v), axis=1)
    outline = (1 + nuclei.egg[owner] * np.einsum("ni,ni->n", u, nuclei.egg_axis[owner])
               + nuclei.pear[owner] * (np.einsum("ni,ni->n", u, nuclei.pear_axis[owner]) ** 2 - 1 / 3))
    return ellipsoid / outline


# --------------------------------------------------------------------------- appearance, optics
def smooth_field_3d(
    rng: np.random.Generator, shape: tuple[int, int, int], knot_vox: tuple[float, float, float]
) -> np.ndarray:
    """Smooth random field on a (Z, Y, X) grid: standard normal weights on knots ``knot_vox``
    voxels apart per axis, each a Gaussian bump (the 2-D module's ``_bump_matrix``), summed.

    Returns:
        (Z, Y, X) float32, scaled to unit standard deviation over the grid.
    """
    kz, ky, kx = (_bump_matrix(n, k)[0] for n, k in zip(shape, knot_vox))
    weights = rng.standard_normal((kz.shape[1], ky.shape[1], kx.shape[1])).astype(np.float32)
    field = np.tensordot(weights, kx, axes=([2], [1]))  # (kz, ky, X)
    field = np.tensordot(field, ky, axes=([1], [1]))  # (kz, X, Y)
    field = np.tensordot(kz, field, axes=([1], [0])).transpose(0, 2, 1)  # (Z, Y, X)
    return (field / max(float(field.std()), 1e-12)).astype(np.float32)


def _render(rng: np.random.Generator, nuclei: _Nuclei, sampled: _Sampled, params: VolumeParams) -> np.ndarray:
    """Emitted signal before optics: float32 (Z, Y, X), 1 = a mean nucleus interior."""
    inside = sampled.owner >= 0
    o = np.where(inside, sampled.owner, 0)
    knots = tuple(TEXTURE_KNOT_UM / s for s in params.spacing_um)
    texture = 1 + np.float32(TEXTURE) * smooth_field_3d(rng, params.shape, knots)
    seam_profile = np.exp(-0.5 * np.square(sampled.seam_um / np.float32(SEAM_WIDTH_UM)))
    seam = 1 - np.float32(SEAM_DIMMING) * seam_profile
    interior = nuclei.brightness.take(o) * (1 - np.float32(RIM_DIMMING) * np.square(sampled.rho))
    signal = np.where(inside, interior * np.maximum(texture, 0) * seam, np.float32(0))
    return signal + BACKGROUND


def psf_sigma_um(params: VolumeParams, depth_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PSF standard deviations (along z, in-plane) at ``depth_um``: each grows linearly,
    ``sigma * (1 + psf_growth * depth / 100 µm)``; µm."""
    growth = 1 + params.psf_growth * np.asarray(depth_um, dtype=np.float64) / 100.0
    return params.psf_sigma_um[0] * growth, params.psf_sigma_um[1] * growth


def _depth_blur(signal: np.ndarray, params: VolumeParams) -> np.ndarray:
    """Depth-dependent Gaussian PSF: slice z blurred in-plane with its own width, then every
    output slice a Gaussian-weighted sum of the slices around it, with that slice's z width.

    Both kernels mirror at the volume faces (common.mirror's convention) and stop at 3 sigma.
    """
    from scipy import ndimage

    z_n = signal.shape[0]
    dz, dy, _ = params.spacing_um
    sigma_z_um, sigma_yx_um = psf_sigma_um(params, np.arange(z_n) * dz)
    out = np.empty_like(signal)
    for z in range(z_n):
        sigma_px = float(sigma_yx_um[z]) / dy
        if sigma_px > 0:
            out[z] = ndimage.gaussian_filter(signal[z], sigma_px, mode=SCIPY_MODE, truncate=3.0)
        else:
            out[z] = signal[z]
    mixing = _z_kernel_matrix(sigma_z_um / dz)
    return np.tensordot(mixing, out, axes=([1], [0])).astype(np.float32)


def _z_kernel_matrix(sigma_vox: np.ndarray) -> np.ndarray:
    """(Z, Z) float32: row z the Gaussian of width ``sigma_vox[z]`` slices centred on slice z,
    truncated at 3 sigma, mirrored at both ends (scipy 'mirror': d c b | a b c d | c b a),
    summing to 1; the identity where the width is 0."""
    z_n = len(sigma_vox)
    matrix = np.zeros((z_n, z_n))
    for z, sigma in enumerate(sigma_vox):
        if sigma <= 0 or z_n == 1:
            matrix[z, z] = 1.0
            continue
        reach = min(int(math.ceil(3.0 * sigma)), z_n - 1)
        offsets = np.arange(-reach, reach + 1)
        source = np.abs(z + offsets)  # mirror below 0
        source = np.where(source > z_n - 1, 2 * (z_n - 1) - source, source)  # mirror above Z - 1
        np.add.at(matrix[z], source, np.exp(-0.5 * (offsets / sigma) ** 2))
        matrix[z] /= matrix[z].sum()
    return matrix.astype(np.float32)


# --------------------------------------------------------------------------- one volume
def synth_volume(params: VolumeParams, *, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Render volume ``index`` of the synthetic set with ``seed``.

    The default 32 x 128 x 128 voxels take about 0.45 s of CPU time (0.6-1.0 s wall on the
    project's 2-core VM while it trained, 2026-12); time and memory grow with the voxel count.

    Args:
        params: size, voxel size, nuclei and optics parameters.
        seed: seed of the set of volumes, >= 0.
        index: volume index, >= 0; the volume's randomness comes only from (seed, index).

    Returns:
        ``(image, labels)``: image (Z, Y, X) ``params.dtype`` raw grey values (camera offset
        included; uint16 in 0..4095); labels (Z, Y, X) ``params.label_dtype`` 3-D instance
        ids, 0 = background, 1..n consecutive, one id per nucleus across all its slices, each
        one 6-connected region; touching nuclei share a face with no background between them.
    """
    # The 2-D module's four streams: scene, texture, read/shot-noise normals, exact Poisson.
    rng_scene, rng_texture, rng_normal, rng_poisson = (
        np.random.default_rng(child) for child in slice_rng(seed, index).bit_generator.seed_seq.spawn(4)
    )
    nuclei = _make_nuclei(rng_scene, params)
    sampled = _sample(nuclei, params)
    signal = _depth_blur(_render(rng_texture, nuclei, sampled, params), params)
    depth_um = np.arange(params.depth, dtype=np.float32) * np.float32(params.spacing_um[0])
    signal *= np.exp(-depth_um / np.float32(params.attenuation_length_um))[:, None, None]
    image = _camera(rng_normal, rng_poisson, signal, params)
    labels = _consecutive_labels(sampled.owner, len(nuclei.centres), params.label_dtype)
    nucleus_voxels = math.pi / 6 * params.nucleus_diameter_um**3 / float(np.prod(params.spacing_um))
    min_piece = max(8, int(0.05 * nucleus_voxels))  # a smaller cut-off piece joins a neighbour
    return image, _repair_fragments(labels, min_piece_px=min_piece)
