"""Where the SEG of 3-D cells is lost (issue 36, config/synth3d.yaml): error types and boundary sensitivity.

For each true 3-D object (an id of the stack's ground truth), its predicted object with more than half of
its voxels: matched (IoU > 0.5, the SEG match), or not matched - merged (its best-overlapping predicted
object also covers over 30 % of another true object), low IoU, or missed (no predicted voxel). Each is
counted apart for objects that touch a face of the volume (nuclei cut by the imaged block) and interior
ones, with their median size in voxels and the matched objects' mean IoU. Then the SEG the ground truth
itself would score after a one-voxel boundary error of every object, along z only and in the plane only
(each object grown into the background, or shrunk): how much of SEG a sub-voxel outline decides at this
voxel size. Prints a few lines; no files written.

    .venv/bin/python benchmarks/synth3d_error_types.py results/synth3d/vol_test0/prediction.ome.zarr \
        results/synth3d/vol_test0/stack.ome.zarr
"""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import zarr
from scipy import ndimage as ndi


def seg(truth: np.ndarray, pred: np.ndarray) -> float:
    """Mean over true objects of the IoU with the predicted object holding over half of it (else 0)."""
    ious = []
    for i, box in enumerate(ndi.find_objects(truth), 1):
        if box is None:
            continue
        t = truth[box] == i
        ids, counts = np.unique(pred[box][t], return_counts=True)
        best = 0.0
        for j, c in zip(ids, counts):
            if j and c > 0.5 * t.sum():
                p = pred == j
                best = float((truth == i)[p].sum() / ((truth == i) | p).sum())
        ious.append(best)
    return float(np.mean(ious))


def error_types(truth: np.ndarray, pred: np.ndarray) -> tuple[Counter, dict[str, list[float]]]:
    """(counts of (kind, 'face' | 'interior'), {'face'/'interior' matched IoUs, 'missed sizes'})."""
    kinds: Counter = Counter()
    found: dict[str, list[float]] = {"face": [], "interior": [], "unmatched sizes": [], "matched sizes": []}
    for i, box in enumerate(ndi.find_objects(truth), 1):
        if box is None:
            continue
        where = "face" if any(s.start == 0 or s.stop == n for s, n in zip(box, truth.shape)) else "interior"
        t = truth == i
        size = int(t.sum())
        ids, counts = np.unique(pred[t], return_counts=True)
        inside = {int(j): int(c) for j, c in zip(ids, counts) if j}
        owner = next((j for j, c in inside.items() if c > 0.5 * size), None)
        if owner is not None:
            p = pred == owner
            iou = float((t & p).sum() / (t | p).sum())
            if iou > 0.5:
                kinds["matched", where] += 1
                found[where].append(iou)
                found["matched sizes"].append(size)
                continue
        found["unmatched sizes"].append(size)
        if not inside:
            kinds["missed", where] += 1
            continue
        top = max(inside, key=inside.get)
        others = [g for g, c in zip(*np.unique(truth[pred == top], return_counts=True)) if g and g != i
                  and c > 0.3 * (truth == g).sum()]
        kinds["merged" if others else "low IoU", where] += 1
    return kinds, found


def grown(labels: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Every object grown by the footprint into the background (never into another object)."""
    return np.where(labels > 0, labels, ndi.grey_dilation(labels, footprint=footprint))


def shrunk(labels: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Every object's voxels whose footprint neighbourhood is all that object."""
    same = (ndi.grey_erosion(labels, footprint=footprint) == labels) & (ndi.grey_dilation(labels, footprint=footprint) == labels)
    return np.where(same, labels, 0)


def main(prediction: str, stack: str) -> None:
    pred = np.asarray(zarr.open_group(prediction, mode="r")["labels/instances/0"][:]).astype(np.int64)
    truth = np.asarray(zarr.open_group(stack, mode="r")["labels/gt/0"][:]).astype(np.int64)
    kinds, found = error_types(truth, pred)
    n = sum(kinds.values())
    print(f"true objects {n}, touching a face {sum(v for (k, w), v in kinds.items() if w == 'face')}; "
          + ", ".join(f"{k} ({w}) {v}" for (k, w), v in sorted(kinds.items())))
    print(f"matched IoU mean: face {np.mean(found['face'] or [0]):.3f}, interior {np.mean(found['interior'] or [0]):.3f}; "
          f"median size voxels: matched {np.median(found['matched sizes'] or [0]):.0f}, "
          f"unmatched {np.median(found['unmatched sizes'] or [0]):.0f}; SEG {seg(truth, pred):.4f}")
    z = np.zeros((3, 1, 1), bool)
    z[:, 0, 0] = True
    plane = ndi.generate_binary_structure(2, 1)[None]
    print("ground truth's own SEG after a one-voxel outline error of every object: "
          f"z grown {seg(truth, grown(truth, z)):.3f}, z shrunk {seg(truth, shrunk(truth, z)):.3f}, "
          f"plane grown {seg(truth, grown(truth, plane)):.3f}, plane shrunk {seg(truth, shrunk(truth, plane)):.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
