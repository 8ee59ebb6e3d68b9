"""Peak RSS of one 3-D ``unet predict`` job and of each ``unet merge`` step per piece (issue 36).

Run: ``.venv/bin/python benchmarks/bench_rss_3d.py [--workdir DIR] [--sizes 256x256x256,128x1024x1024]
[--blocks-per-job 2] [--sections predict,merge]``

The issue's target: "Peak RSS of predict and merge flat (+-20 %) from 256^3 to 1024 x 1024 x 128".
What a cluster user requests is the memory of one job, so that is what is measured: the volumes
are cut into the same blocks, every job (predict) or piece (merge) gets the same number of blocks
(``--blocks-per-job``), and the peak RSS of one job / piece, k = K // 2 of K, is compared between
the sizes, as a ratio against the first size, measured in the same run.

* Data: ``unet synth --dims 3 --slices Z --size Y --width X --seed 0`` (nuclei at 2.0 x 0.5 x 0.5 um,
  with their labels), ``unet ingest --voxel-size-um 2,0.5,0.5 --chunks 16,128,128``. Built once per
  work folder and reused (the build is not measured).
* predict: the issue's network (depth 3, base 32, ``--pool-z 1,1,2 --kernel-z 1,1,3,3``) with random
  He weights (``torch.manual_seed(0)``; memory does not depend on the weights), fp32 on the CPU,
  batch 1, blocks ``--block`` (default 32 x 256 x 256) and tiles ``--tile`` (default 32 x 128 x 128);
  ``unet predict --jobs K --job k`` with K = blocks / ``--blocks-per-job``, k = K // 2: one process,
  its peak RSS from ``/usr/bin/time -f %M`` (the process's ``ru_maxrss``).
* merge: ``--instances watershed --seeds distance --seed-h-um 0.25 --mask-threshold 0.2
  --min-object-px 50 --halo-px 32 --cells cells.csv --jobs K`` in its steps (start, seeds,
  number-seeds, cells, number-cells, write, finish). Its part stores are written by this script in
  ``unet predict``'s layout (the way tests/unit/test_merge_3d.py writes them: predicting the large
  volume in full is out of reach of a 2-core CPU), uint8 probabilities, from the synthetic labels:
  P(cell) = the labels' foreground without the voxels where two nuclei touch, smoothed (Gaussian,
  sigma 0.5 slices and 1 px in-plane): a realistic number of cells and seeds. Every step is its own
  ``unet merge --step`` process; of the parallel steps (seeds, cells, write) every piece is measured,
  each its own process, and the largest is reported (``--pieces middle``: piece K // 2 only, the
  others run unmeasured in one process). A piece's windows are its blocks grown by the halo and
  clipped to the stack, so a stack only one or two blocks wide gives smaller windows than the
  interior of a wide one: compare sizes whose blocks have neighbours on all sides for flatness.

Wall seconds are printed too; they depend on the machine's load (run it niced on a shared VM and
they are of little use). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
VOXEL_UM = "2,0.5,0.5"
MERGE_ARGS = ["--instances", "watershed", "--seeds", "distance", "--seed-h-um", "0.25", "--mask-threshold", "0.2",
              "--min-object-px", "50", "--halo-px", "32"]
STEPS = ("start", "seeds", "number-seeds", "cells", "number-cells", "write", "finish")
PARALLEL = ("seeds", "cells", "write")


def shape3(text: str) -> tuple[int, int, int]:
    z, y, x = (int(v) for v in text.lower().split("x"))
    return z, y, x


def label(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def unet() -> list[str]:
    exe = VENV_BIN / "unet"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "unet_core"]


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` in a fresh process; (peak RSS MiB, wall s). Its output goes to ``log``."""
    t0 = time.perf_counter()
    if Path("/usr/bin/time").exists():
        with open(log, "w") as fh:
            subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd], stdout=fh, stderr=subprocess.STDOUT,
                           check=True)
        wall = time.perf_counter() - t0
        kb = [line for line in log.read_text().splitlines() if line.startswith("MAXRSS_KB")][-1].split()[1]
        return int(kb) / 1024, wall
    with open(log, "w") as fh:  # no GNU time: the child's own ru_maxrss through wait4
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise subprocess.CalledProcessError(status, cmd)
    return usage.ru_maxrss / 1024, time.perf_counter() - t0


def tiled(source: tuple[Path, Path], shape: tuple[int, int, int], tif: Path, labels: Path) -> None:
    """``shape``'s volume and labels cut from the source volume repeated along every axis (the labels
    of each copy numbered on, uint32, so every nucleus keeps an id of its own)."""
    import tifffile

    image, ids = tifffile.imread(source[0]), tifffile.imread(source[1]).astype(np.uint32)
    reps = [-(-n // s) for n, s in zip(shape, image.shape)]
    step = int(ids.max()) + 1
    copies = np.arange(math.prod(reps), dtype=np.uint32).reshape(reps)
    big_ids = np.tile(ids, reps) + np.where(np.tile(ids, reps) > 0, np.kron(copies, np.ones(ids.shape, np.uint32)) * step, 0)
    cut = tuple(slice(0, n) for n in shape)
    tifffile.imwrite(tif, np.tile(image, reps)[cut], bigtiff=True)  # ingest is given the voxel size
    tifffile.imwrite(labels, big_ids[cut], bigtiff=True)


def build(work: Path, shape: tuple[int, int, int], chunks: str,
          source: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
    """The synthetic volume and its labels as TIFF, the image ingested; reused when present. With
    ``source`` (``--build tile``), cut from that volume repeated instead of rendered anew."""
    name = label(shape)
    tif, labels, stack = work / f"{name}.tif", work / f"{name}_labels.tif", work / f"{name}.ome.zarr"
    if source is not None and not (tif.exists() and labels.exists()):
        print(f"  building {name}: the first size's volume repeated (not measured)", flush=True)
        tiled(source, shape, tif, labels)
    if not (tif.exists() and labels.exists()):
        print(f"  building {name}: unet synth (not measured)", flush=True)
        subprocess.run([*unet(), "synth", "--dims", "3", "--slices", str(shape[0]), "--size", str(shape[1]),
                        "--width", str(shape[2]), "--seed", "0", "--image", str(tif), "--labels", str(labels)],
                       check=True, stdout=subprocess.DEVNULL)
    if not (stack / "zarr.json").exists():
        subprocess.run([*unet(), "ingest", str(tif), str(stack), "--voxel-size-um", VOXEL_UM, "--chunks", chunks],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return stack, labels


def network_spec(base: int):
    from unet_core.model.spec import UNetSpec

    return UNetSpec(depth=3, base_channels=base, dropout=0.0, dims=3, pool_z=(1, 1, 2), kernel_z=(1, 1, 3, 3))


def write_model(path: Path, base: int) -> None:
    import torch

    from unet_core.model.checkpoint import save_model
    from unet_core.model.unet import UNet

    if path.exists():
        return
    torch.manual_seed(0)
    save_model(path, UNet(network_spec(base)), metadata={"voxel_size_um": [2.0, 0.5, 0.5]})


def tiling_of(shape: tuple[int, int, int], args: argparse.Namespace):
    from unet_core.infer.tiling import Tiling

    bz, by, _ = args.block
    tz, ty, _ = args.tile
    return Tiling(shape, network_spec(args.base), block_px=by, tile_out=ty, block_z=bz, tile_z=tz)


def predict_args(args: argparse.Namespace) -> list[str]:
    bz, by, _ = args.block
    tz, ty, _ = args.tile
    return ["--block-px", str(by), "--tile-out", str(ty), "--block-z", str(bz), "--tile-z", str(tz),
            "--device", "cpu", "--batch", "1"]


def jobs_of(n_blocks: int, per_job: int) -> tuple[int, int]:
    jobs = max(1, n_blocks // per_job)
    return jobs, jobs // 2


def predict_section(args: argparse.Namespace, stacks: dict, work: Path) -> dict:
    model = work / f"model_base{args.base}.pt"
    write_model(model, args.base)
    rows = {}
    for shape, (stack, _) in stacks.items():
        tiling = tiling_of(shape, args)
        jobs, job = jobs_of(tiling.n_blocks, args.blocks_per_job)
        blocks = len(tiling.job_blocks(job, jobs))
        part = work / f"predict_{label(shape)}_job{job}"
        shutil.rmtree(part, ignore_errors=True)
        cmd = [*unet(), "predict", str(stack), str(model), str(part), "--jobs", str(jobs), "--job", str(job),
               *predict_args(args)]
        print(f"  $ {' '.join(cmd)}", flush=True)
        rss, wall = timed(cmd, work / f"predict_{label(shape)}.log")
        rows[shape] = (rss, wall, blocks, jobs, job, tiling.n_blocks)
        shutil.rmtree(part, ignore_errors=True)
        print(f"  predict {label(shape)}: job {job}/{jobs} ({blocks} of {tiling.n_blocks} blocks): "
              f"peak RSS {rss:.0f} MiB, {wall:.0f} s", flush=True)
    return rows


def write_parts(root: Path, stack: Path, labels_tif: Path, tiling, jobs: int) -> list[Path]:
    """Part stores of ``jobs`` predict jobs in ``unet predict``'s layout (uint8 probabilities),
    P(cell) from the synthetic labels (see the module docstring); written block by block."""
    import tifffile
    import torch
    import zarr
    from scipy import ndimage

    from unet_core.infer.encoding import ProbabilityEncoding
    from unet_core.infer.part_store import MANIFEST, PART_FORMAT, PROBABILITIES, SEGMENTATION, PartStore
    from unet_core.io.ngff import create_array, fast_compressor, open_stack

    labels = tifffile.imread(labels_tif)
    inner = labels > 0
    for axis in range(3):  # drop both sides of every face where two different nuclei touch
        a, b = [slice(None)] * 3, [slice(None)] * 3
        a[axis], b[axis] = slice(0, -1), slice(1, None)
        la, lb = labels[tuple(a)], labels[tuple(b)]
        touch = (la != lb) & (la > 0) & (lb > 0)
        inner[tuple(a)] &= ~touch
        inner[tuple(b)] &= ~touch
    del labels
    p_cell = ndimage.gaussian_filter(inner.astype(np.float32), sigma=(0.5, 1.0, 1.0))
    del inner
    st = open_stack(stack)
    c, b, bz = 2, tiling.block_px, tiling.block_z
    paths = []
    for job in range(jobs):
        path = root / f"part{job}"
        group = zarr.open_group(path, mode="w")
        p_arr = create_array(group, PROBABILITIES, shape=(c, *tiling.shape), dtype=np.uint8, chunks=(c, bz, b, b),
                             dimension_names=list("czyx"), compressors=fast_compressor())
        s_arr = create_array(group, SEGMENTATION, shape=tiling.shape, dtype=np.uint8, chunks=(bz, b, b),
                             dimension_names=list("zyx"), compressors=fast_compressor())
        config = {"write_empty_chunks": True}
        p_arr, s_arr = p_arr.with_config(config), s_arr.with_config(config)
        (path / "done").mkdir()
        settings = {
            "format": PART_FORMAT, "stack": str(stack), "shape": list(tiling.shape), "model_sha256": "0" * 64,
            "tiling": tiling.to_dict(), "job": job, "jobs": jobs, "tta": "none", "precision": "fp32",
            "device": "cpu", "intensity": st.intensity.to_dict(), "intensity_normalisation": "stack-zscore",
            "logit_offsets": None, "probabilities": "uint8", "batch": 1, "backend": "torch",
            "cell_channel": 1, "median_object_area_px": None,
        }
        (path / MANIFEST).write_text(json.dumps(settings))
        store = PartStore(path)
        for block in tiling.job_blocks(job, jobs):
            sl = block.write.to_slices()
            p1 = torch.from_numpy(np.ascontiguousarray(p_cell[sl]))
            probs = torch.stack([1 - p1, p1])
            s_arr[sl] = (probs[1] > probs[0]).numpy().astype(np.uint8)
            p_arr[(slice(None), *sl)] = ProbabilityEncoding.UINT8.encode(probs, inplace=True).numpy()
            store.mark_done(block)
        store.mark_complete({"job": job})
        paths.append(path)
    return paths


def merge_section(args: argparse.Namespace, stacks: dict, work: Path) -> dict:
    rows = {}
    for shape, (stack, labels_tif) in stacks.items():
        tiling = tiling_of(shape, args)
        jobs, piece = jobs_of(tiling.n_blocks, args.blocks_per_job)
        root = work / f"merge_{label(shape)}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        t0 = time.perf_counter()
        parts = write_parts(root, stack, labels_tif, tiling, jobs)
        print(f"  merge {label(shape)}: {jobs} part stores written from the labels in {time.perf_counter() - t0:.0f} s "
              "(not measured)", flush=True)
        out, cells = root / "pred.ome.zarr", root / "cells.csv"
        base = [*unet(), "merge", *map(str, parts), "--stack", str(stack), "-o", str(out), "--cells", str(cells),
                *MERGE_ARGS, "--jobs", str(jobs)]
        steps = {}
        for step in STEPS:
            if step not in PARALLEL:
                steps[step] = [timed([*base, "--step", step], root / f"{step}.log")]
                print(f"  merge {label(shape)} --step {step}: peak RSS {steps[step][0][0]:.0f} MiB, "
                      f"{steps[step][0][1]:.0f} s", flush=True)
                continue
            measured = range(jobs) if args.pieces == "all" else [piece]
            if args.pieces != "all" and jobs > 1:  # the others unmeasured, one after another in one process
                others = [k for k in range(jobs) if k != piece]
                subprocess.run([sys.executable, "-c", other_pieces_code(step, others, jobs), str(stack), str(out),
                                str(cells), *map(str, parts)], check=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
            steps[step] = [timed([*base, "--step", step, "--job", str(k)], root / f"{step}-{k}.log") for k in measured]
            rss = [r for r, _ in steps[step]]
            print(f"  merge {label(shape)} --step {step}, {len(rss)} piece(s) measured: peak RSS max {max(rss):.0f} MiB "
                  f"(piece {list(measured)[rss.index(max(rss))]}), median {np.median(rss):.0f} MiB, min {min(rss):.0f} MiB; "
                  f"{sum(w for _, w in steps[step]):.0f} s in all", flush=True)
        n_cells = sum(1 for _ in open(cells)) - 1 if cells.exists() else -1
        rows[shape] = (steps, jobs, piece, tiling.n_blocks, n_cells)
        print(f"  merge {label(shape)}: {n_cells} cells; command of a step: {' '.join(base[:3])} ... "
              f"{' '.join(base[-len(MERGE_ARGS) - 2:])} --step STEP [--job k]", flush=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return rows


def other_pieces_code(step: str, pieces: list[int], jobs: int) -> str:
    """The unmeasured pieces of a parallel step, one after another in one process, through the
    same settings parser as the command line (``unet_core.cli``'s merge)."""
    return (
        "import sys\n"
        "from unet_core.cli import main\n"
        f"argv = ['merge', *sys.argv[4:], '--stack', sys.argv[1], '-o', sys.argv[2], '--cells', sys.argv[3], "
        f"*{MERGE_ARGS!r}, '--jobs', '{jobs}', '--step', '{step}']\n"
        f"for k in {pieces!r}:\n"
        "    rc = main([*argv, '--job', str(k)])\n"
        "    if rc: sys.exit(rc)\n"
    )


def report(args: argparse.Namespace, predict: dict, merge: dict) -> None:
    sizes = list(args.sizes)
    ref = sizes[0]
    print("\n| volume | voxels | what | blocks (of the volume's) | peak RSS | vs first size | wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for shape in sizes:
        if shape in predict:
            rss, wall, blocks, jobs, job, n = predict[shape]
            ratio = rss / predict[ref][0] if ref in predict else float("nan")
            print(f"| {label(shape)} | {math.prod(shape) / 1e6:.1f} M | predict --jobs {jobs} --job {job} | "
                  f"{blocks} (of {n}) | {rss:.0f} MiB | {ratio:.2f}x | {wall:.0f} |")
    for shape in sizes:
        if shape in merge:
            steps, jobs, piece, n, _ = merge[shape]
            for step, runs in steps.items():
                rss = max(r for r, _ in runs)
                ratio = rss / max(r for r, _ in merge[ref][0][step]) if ref in merge else float("nan")
                if step in PARALLEL:
                    what = f"merge --step {step}, max over {len(runs)} piece(s) of {jobs}"
                    lo, hi = n // jobs, -(-n // jobs)
                    blocks = f"{lo if lo == hi else f'{lo}-{hi}'} (of {n})"
                else:
                    what, blocks = f"merge --step {step}", f"all {n}"
                wall = max(w for _, w in runs)
                print(f"| {label(shape)} | {math.prod(shape) / 1e6:.1f} M | {what} | {blocks} | {rss:.0f} MiB | "
                      f"{ratio:.2f}x | {wall:.0f} |")
    print("\nTarget: every row within +-20 % of the first size's (ratio 0.80-1.20).")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/unet-bench-rss3d"),
                    help="where the volumes (reused), models and stores go")
    ap.add_argument("--sizes", default="256x256x256,128x1024x1024", help="Z x Y x X volumes, the first the reference")
    ap.add_argument("--block", type=shape3, default=(32, 256, 256), help="block Z x Y x X (Y = X)")
    ap.add_argument("--tile", type=shape3, default=(32, 128, 128), help="output tile Z x Y x X (Y = X)")
    ap.add_argument("--chunks", default="16,128,128", help="ingest --chunks")
    ap.add_argument("--base", type=int, default=32, help="the network's base channels")
    ap.add_argument("--blocks-per-job", type=int, default=2)
    ap.add_argument("--sections", default="predict,merge")
    ap.add_argument("--build", choices=("synth", "tile"), default="synth",
                    help="volumes after the first: rendered by unet synth (slow at 1024 x 1024 x 128 on 2 cores), "
                         "or the first size's volume repeated along each axis (tile)")
    ap.add_argument("--pieces", choices=("all", "middle"), default="all",
                    help="merge's parallel steps: measure every piece, each its own process (the largest is what "
                         "a cluster job must request), or piece K // 2 only (the others run unmeasured)")
    ap.add_argument("--keep", action="store_true", help="keep the merge stores")
    args = ap.parse_args(argv)
    args.sizes = [shape3(s) for s in args.sizes.split(",") if s]
    sections = set(args.sections.split(","))
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in model.splitlines() if line.startswith("Model name")), "?")
    print(f"bench_rss_3d: {model}, {os.cpu_count()} CPUs, load {os.getloadavg()}; blocks {label(args.block)}, "
          f"tiles {label(args.tile)}, {args.blocks_per_job} blocks per job / piece, base {args.base}", flush=True)
    stacks = {}
    for shape in args.sizes:
        first = args.sizes[0]
        source = None
        if args.build == "tile" and shape != first:
            source = (args.workdir / f"{label(first)}.tif", args.workdir / f"{label(first)}_labels.tif")
        stacks[shape] = build(args.workdir, shape, args.chunks, source)
    predict = predict_section(args, stacks, args.workdir) if "predict" in sections else {}
    merge = merge_section(args, stacks, args.workdir) if "merge" in sections else {}
    report(args, predict, merge)


if __name__ == "__main__":
    main()
