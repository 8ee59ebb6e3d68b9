"""The merge's seeded flood against scikit-image's watershed, side by side on merge-sized windows.

Baseline: ``skimage.segmentation.watershed(-height, markers, mask=mask)`` (scikit-image 0.26),
which ``unet merge`` called before it had compiled kernels. Measured: ``flood_from_markers``
(unet_core/infer/morphology.py) on the same inputs, in the same process, alternating, CPU seconds
(``time.process_time``, best of ``--repeats``; numba's compilation excluded).

Windows (``--side`` px, default 2176 = a 2048-px block with its 64-px halo each side):

* ``confluent``: one mask component of most of the window (smoothed noise above its 20th
  percentile: 80 % of the pixels), like the bench_scale stack's untrained model (81 %) or
  confluent cells;
* ``cells``: discs of radius 6-24 px covering a third of the window, as nuclei give.

For each, two height/marker rules of the merge: ``distance`` (the Gaussian-smoothed distance
transform, seeds its h-maxima at 1 px: float64 heights, nearly all distinct) and ``threshold``
(P(cell) coded k/255, seeds P > 0.9 eroded twice: 256 heights, ties everywhere). Prints a row per
case: both times, the ratio, and whether the labels are identical; where they are not, how many
pixels differ and whether tied seeds (equal heights, different labels, one component) explain it:
the flood takes those in raster order, skimage in its heap's order (README, *Merging into cells*).

    python benchmarks/bench_flood.py [--side 2176] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from unet_core.infer import instances
from unet_core.infer.morphology import flood_from_markers


def confluent_mask(side: int, rng: np.random.Generator) -> np.ndarray:
    """(side, side) bool: smoothed noise above its 20th percentile; one giant component."""
    noise = ndi.gaussian_filter(rng.random((side, side)), 1.0)
    return noise > np.percentile(noise, 20)


def cells_mask(side: int, rng: np.random.Generator) -> np.ndarray:
    """(side, side) bool: discs of radius 6-24 px until a third of the window is covered."""
    mask = np.zeros((side, side), bool)
    yy, xx = np.ogrid[:side, :side]
    while mask.mean() < 1 / 3:
        cy, cx, r = rng.integers(0, side), rng.integers(0, side), rng.integers(6, 25)
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, side), max(cx - r, 0), min(cx + r + 1, side)
        mask[y0:y1, x0:x1] |= (yy[y0:y1] - cy) ** 2 + (xx[:, x0:x1] - cx) ** 2 <= r * r
    return mask


def flood_inputs(mask: np.ndarray, rule: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(height, markers, flood mask) of one seed rule on ``mask``, as the merge forms them."""
    if rule == "distance":
        height = instances.mask_distance(mask)
        markers, _ = ndi.label(instances.distance_seed_mask(height, mask, h_px=1.0))
        return height, markers, mask
    p = (np.round(ndi.gaussian_filter(mask.astype(np.float32), 2.0) * 255) / 255).astype(np.float32)
    markers, _ = ndi.label(instances.seed_mask(p))
    return p, markers, p > instances.MASK_THRESHOLD


def tied_seeds(height: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> int:
    """Seed pixels whose height another seed of a different label in their component shares."""
    comp, _ = ndi.label(mask)
    on = mask & (markers != 0)
    keys = np.stack([comp[on], np.unique(height[on], return_inverse=True)[1].ravel()], axis=1)
    labels = markers[on]
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    return int((labels != labels[first][inverse.ravel()]).sum())


def skimage_flood(height: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The baseline: what the merge called before its compiled flood."""
    return watershed(-height, markers, mask=mask).astype(np.int32)


def cpu_s(fn, *args) -> tuple[float, np.ndarray]:
    """(CPU seconds, result) of ``fn(*args)``."""
    t = time.process_time()
    out = fn(*args)
    return time.process_time() - t, out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=2176, help="window edge, px (default 2176)")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs (default 3)")
    p.add_argument("--quick", action="store_true", help="256-px windows, 1 repeat: seconds")
    args = p.parse_args(argv)
    side, repeats = (256, 1) if args.quick else (args.side, args.repeats)
    rng = np.random.default_rng(0)
    tiny = np.zeros((32, 32), bool)
    tiny[8:24, 8:24] = True
    flood_from_markers(*flood_inputs(tiny, "distance"))  # compile / load the kernels
    flood_from_markers(*flood_inputs(tiny, "threshold"))
    print(f"# bench_flood  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  window {side}²  "
          f"best of {repeats}  load average {os.getloadavg()[0]:.1f}")
    print(f"{'window':10s} {'seeds':10s} {'mask px':>9s} {'largest':>9s} {'skimage s':>10s} {'flood s':>8s} "
          f"{'ratio':>6s}  labels")
    rows = []
    for window, make in (("confluent", confluent_mask), ("cells", cells_mask)):
        mask = make(side, rng)
        for rule in ("distance", "threshold"):
            height, markers, fmask = flood_inputs(mask, rule)
            sizes = np.bincount(ndi.label(fmask)[0].ravel())[1:]
            t_old = t_new = np.inf
            for _ in range(repeats):  # alternate, so both see the same load
                t, old = cpu_s(skimage_flood, height, markers, fmask)
                t_old = min(t_old, t)
                t, new = cpu_s(flood_from_markers, height, markers, fmask)
                t_new = min(t_new, t)
            differ = int((old != new).sum())
            note = "identical" if differ == 0 else (
                f"{differ} px differ ({tied_seeds(height, markers, fmask)} tied seed px)")
            row = {"window": window, "seeds": rule, "mask_px": int(fmask.sum()),
                   "largest": int(sizes.max(initial=0)), "skimage_s": t_old, "flood_s": t_new,
                   "ratio": t_old / t_new, "differ_px": differ}
            rows.append(row)
            print(f"{window:10s} {rule:10s} {row['mask_px']:9d} {row['largest']:9d} {t_old:10.3f} {t_new:8.3f} "
                  f"{row['ratio']:5.1f}x  {note}")
    return rows


if __name__ == "__main__":
    main()
