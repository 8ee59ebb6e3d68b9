"""Compare two result trees of the workflow, e.g. before and after a code change.

    python scripts/compare_results.py OLD/results NEW/results

Reports Zarr chunk files (byte for byte), TIFFs (bytes, else pixels), model files (state_dict
tensors), and lists every other file that differs (metadata with code hashes, timings, logs
are expected to). Exit status 1 when a chunk, TIFF or tensor differs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import tifffile
import torch


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*")
            if p.is_file() and "logs/" not in str(p.relative_to(root)) and ".snakemake" not in p.parts}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    return data.get("state_dict") or data.get("model") or {}


def compare(old: Path, new: Path) -> bool:
    a, b = _files(old), _files(new)
    ok = not (set(a) ^ set(b))
    for side, names in (("only in old", set(a) - set(b)), ("only in new", set(b) - set(a))):
        if names:
            print(f"{side}: {sorted(names)[:20]}")
    same_chunks, changed, other = 0, [], []
    for name in sorted(set(a) & set(b)):
        same = a[name].read_bytes() == b[name].read_bytes()
        if name.endswith(".pt"):
            ta, tb = _tensors(a[name]), _tensors(b[name])
            equal = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
            print(f"{name}: state_dict {'identical' if equal else 'DIFFERS'}")
            ok &= equal
        elif name.endswith((".tif", ".tiff")):
            equal = same or np.array_equal(tifffile.imread(a[name]), tifffile.imread(b[name]))
            print(f"{name}: {'identical bytes' if same else 'same pixels' if equal else 'DIFFERS'}")
            ok &= equal
        elif ".zarr/" in name and Path(name).name not in ("zarr.json", "part.json", "COMPLETE"):
            same_chunks += same
            if not same:
                changed.append(name)
        elif not same:
            other.append(name)
    print(f"zarr chunks: {same_chunks} identical, {len(changed)} differ {changed[:10]}")
    print(f"other files that differ: {other}")
    return ok and not changed


if __name__ == "__main__":
    sys.exit(0 if compare(Path(sys.argv[1]), Path(sys.argv[2])) else 1)
