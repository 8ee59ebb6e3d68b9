"""How much does uint8 probability storage change the cells? float32 vs uint8, side by side.

    python benchmarks/bench_encoding.py STACK.ome.zarr MODEL.pt [--tta none] [--decision corrected]

Predicts the stack twice with the same model (probabilities stored as float32 and as uint8),
merges each with seeded-watershed and with connected-component instances, and prints the share
of pixels whose instance differs (pixels outside the best one-to-one overlap of the two
labelings, background included) and the instance counts. Components come from the stored
full-precision argmax, so they are identical by construction; the watershed floods the stored
probabilities and sees ties where 256 codes replace float values.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import zarr

from unet_core.infer.merge import merge_parts
from unet_core.infer.merge_settings import MergeSettings
from unet_core.infer.predict import predict_job


def changed_share(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels not in the best one-to-one overlap of two label images (greedy by size)."""
    pairs, counts = np.unique(np.stack([a.ravel(), b.ravel()]).astype(np.int64), axis=1, return_counts=True)
    used_a, used_b, kept = set(), set(), 0
    for k in np.argsort(-counts):
        x, y = int(pairs[0, k]), int(pairs[1, k])
        if x not in used_a and y not in used_b:
            used_a.add(x)
            used_b.add(y)
            kept += int(counts[k])
    return 1.0 - kept / a.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stack", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("--tta", default="none")
    parser.add_argument("--decision", default="corrected")
    parser.add_argument("--block-px", type=int, default=512)
    parser.add_argument("--tile-out", type=int, default=512)
    args = parser.parse_args()
    labels = {}
    with tempfile.TemporaryDirectory() as tmp:
        for encoding in ("float32", "uint8"):
            part = Path(tmp) / f"part-{encoding}"
            predict_job(args.stack, args.model, part, device="cpu", probabilities=encoding, tta=args.tta,
                        decision=args.decision, block_px=args.block_px, tile_out=args.tile_out)
            for method in ("watershed", "components"):
                out = Path(tmp) / f"{encoding}-{method}.ome.zarr"
                merge_parts([part], stack=args.stack, out=out, settings=MergeSettings(instances=method))
                labels[encoding, method] = zarr.open_group(out, mode="r")["labels/instances/0"][:]
    for method in ("watershed", "components"):
        a, b = labels["float32", method], labels["uint8", method]
        print(f"{method}: {100 * changed_share(a, b):.4f} % of pixels change instance between float32 and uint8 "
              f"storage ({a.max()} vs {b.max()} instances)")


if __name__ == "__main__":
    main()
