"""Error types of a prediction's cells against the stack's instance ground truth (issue 37, DIC-HeLa).

For each true cell, its best-overlapping predicted cell: matched (IoU > 0.5); merged (IoU <= 0.5 and
that predicted cell covers more than half of another true cell); split (two or more predicted cells
each cover over 20 % of it); under half (the rest); missed (no predicted cell pixel). Pixels: missed
cell pixels within 5 px of the true outline ("margins") or deeper, and predicted cell pixels outside
every true cell. Prints two lines; no files written.

    .venv/bin/python benchmarks/dic_hela_error_types.py results/dic_hela_cpu/hela_val/prediction.ome.zarr \
        results/dic_hela_cpu/hela_val/stack.ome.zarr
"""
import sys

import numpy as np
import zarr
from scipy import ndimage as ndi

pred = zarr.open_group(sys.argv[1], mode="r")["labels/instances/0"][:]
gt = zarr.open_group(sys.argv[2], mode="r")["labels/gt/0"][:]
counts = {"matched": 0, "merged": 0, "missed": 0, "under_half": 0, "split": 0}
ious, n = [], 0
fn_margin = fn_inner = fp_out = tp = 0
for z in range(gt.shape[0]):
    g, p = gt[z].astype(np.int64), pred[z].astype(np.int64)
    # pixels: missed cell pixels within 5 px of the true cell's outline ("margins") vs deeper
    fg = g > 0
    inner = ndi.binary_erosion(fg, iterations=5)
    miss = fg & (p == 0)
    fn_margin += int((miss & ~inner).sum()); fn_inner += int((miss & inner).sum())
    fp_out += int(((p > 0) & ~fg).sum()); tp += int((fg & (p > 0)).sum())
    gids = np.unique(g[g > 0])
    for gid in gids:
        n += 1
        m = g == gid
        area = m.sum()
        ids, c = np.unique(p[m], return_counts=True)
        keep = ids > 0
        ids, c = ids[keep], c[keep]
        if len(ids) == 0:
            counts["missed"] += 1; continue
        best = ids[np.argmax(c)]
        pm = p == best
        inter = c.max(); union = area + pm.sum() - inter
        iou = inter / union
        # does the best predicted cell cover half of another true cell too?
        others = np.unique(g[pm]); others = others[(others > 0) & (others != gid)]
        merged = any((pm & (g == o)).sum() > 0.5 * (g == o).sum() for o in others)
        if iou > 0.5:
            counts["matched"] += 1; ious.append(iou)
        elif merged:
            counts["merged"] += 1
        elif (c > 0.2 * area).sum() >= 2:
            counts["split"] += 1
        else:
            counts["under_half"] += 1
print("true cells", n, {k: f"{v} ({100*v/n:.0f} %)" for k, v in counts.items()},
      f"mean IoU matched {np.mean(ious):.3f}" if ious else "")
tot = fn_margin + fn_inner
print(f"cell pixels missed: {tot} = {100*tot/(tp+tot):.1f} % of true cell px; within 5 px of the outline {fn_margin} "
      f"({100*fn_margin/max(tot,1):.0f} % of missed), deeper {fn_inner}; predicted cell px outside true cells {fp_out} "
      f"({100*fp_out/(tp+tot):.1f} % of true cell px)")
