"""Large-stack benchmark: the whole CPU chain ingest -> predict (K jobs) -> merge on 1 GiB and 16 GiB.

Run: ``.venv/bin/python benchmarks/bench_scale.py [--sizes 8,128 | --slices N] [--jobs 2]
[--workdir DIR] [--merge-k-compare] [--markdown FILE] [--keep]``; ``--quick`` runs a tiny stack
(2 x 1024², K = 2, 512-px blocks) in seconds, as the test suite does.

For each size it builds a uint16 BigTIFF of Z x 8192² px (Z = 8: 1 GiB; Z = 128: 16 GiB) by tiling
ten 512² synthetic slices (``unet synth --slices 10 --size 512 --seed 0 --density 0.2 --gap-px 3
--dtype uint16``) 16 x 16 into each slice (slice z, tile i uses synthetic slice (z*256 + i) % 10),
written page by page (the stack is never held in memory; the build is not timed). Before anything
it checks the free space of the work folder against what the run needs (``DISK_RATIO`` x the
TIFF in all, the TIFF included, with a ``DISK_MARGIN`` on the stores' share; see below) and
refuses with one line and exit 2 if short. Then it runs the CLI as subprocesses, as a cluster would:

* ``unet ingest TIFF S.ome.zarr --voxel-size-um 1,0.5,0.5``
* ``unet predict S.ome.zarr tiny.pt part-k --job k --jobs K --device cpu --threads 1 --decision raw``
  for k = 0..K-1, all K at once (tiny.pt: ``UNetSpec(depth=1, base_channels=1, dropout=0)``,
  ``torch.manual_seed(0)``: the network costs little, so the host side and I/O are measured);
* ``unet merge part-0 .. part-{K-1} --stack S -o P --instances watershed --seeds distance
  --seed-h-px 1 --min-object-px 20 --mask-threshold 0.5 --halo-px 64 --cells cells.csv``: in its
  stepwise block-parallel form (``--jobs K --work W --step STEP [--job k]``, steps start, seeds,
  number-seeds, cells, number-cells, write, finish; the parallel ones as K concurrent processes)
  when ``unet merge --help`` mentions ``--step``, else as one command; the table says which ran.

For every stage or merge step it prints: wall seconds; CPU-s (user + sys of its processes and
their children, from ``os.wait4``); CPU-s per output Mpx (the whole stack's Mpx, whatever the
number of pieces); peak RSS (the largest of the stage's processes: each runs under a small
wrapper that forks it, so the figure is the process's own and not this script's, which a
``vfork``-ed child would inherit); GiB written (``ru_oublock``: file data the processes dirtied,
temporary files included); the change of the work folder's size on disk; and the work folder's
size on disk after the stage (TIFF included). The peak of those sizes is the run's peak disk use;
the filesystem's used space is also sampled every 0.5 s during the stages (statvfs), which sees
transient files but also any other writer on the same disk. Totals: end-to-end wall and CPU-s of
ingest + predict + merge. ``--merge-k-compare`` reruns the merge with K = 1 on the same parts
(one command, ``--jobs 1``) and prints the K / K=1 wall ratio.

Targets of the issue are printed beside the figures: 16 GiB end to end <= 45 min; every stage's
peak RSS <= 2 GiB (per process); per-piece stages (predict and the parallel merge steps) within
+-20 % peak RSS between the smallest and the largest size run; merge wall with K = 2 <= 0.6 x K = 1.
Nothing is asserted. The stores are deleted when a size is done (``--keep`` keeps them); the TIFF
too. ``--markdown FILE`` writes the table in the layout of benchmarks/RESULTS.md.

The stages run whatever ``unet_core`` the ``unet`` command imports. Each merge step checks the
code hash recorded by ``start``, so editing ``unet_core`` during a run makes the later steps
refuse ("differs in code"): in a tree others are editing, run from a snapshot of a commit, e.g.
``git archive HEAD unet_core | tar -x -C $SNAP`` and ``PYTHONPATH=$SNAP`` (started outside the
repository, so that the working directory does not come first on the path). Wall seconds depend
on what else the machine runs (the load average is printed); CPU-s much less.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SIDE = 8192
SYNTH_SIZE = 512
SYNTH_SLICES = 10
MIB = 2**20
GIB = 2**30
RSS_TARGET_MIB = 2048
# Peak disk use of a run over the TIFF's size, the TIFF included (TIFF, ingested stack with its
# pyramid, part stores, the merge's work folder, prediction with segmentation, instances and their
# pyramids, cells.csv), measured 2026-12-07: one-command merge, quick run (2 x 1024²) 2.98x, 1 GiB
# run (8 x 8192²) 2.85x; stepwise merge (K = 2), quick 4.15x (metadata-bound), 1 GiB 4.01x (after
# 'merge write': the work folder's scratch labels and the store it builds, beside the parts). The
# check asks for the TIFF plus the stores' share times DISK_MARGIN: 16 GiB x (1 + 3.0 x 1.1) =
# 69 GiB for the 16 GiB run.
DISK_RATIO = 4.0
DISK_MARGIN = 1.1
MERGE_OPTIONS = ["--instances", "watershed", "--seeds", "distance", "--seed-h-px", "1", "--min-object-px", "20",
                 "--mask-threshold", "0.5", "--halo-px", "64"]
MERGE_STEPS = [("start", False), ("seeds", True), ("number-seeds", False), ("cells", True),
               ("number-cells", False), ("write", True), ("finish", False)]

PER_PIECE = ("predict", "merge seeds", "merge cells", "merge write", "merge (one command)")

# Runs one command and reports its own rusage: a forked child starts from this small process's
# memory, not from the benchmark's (a vfork-ed child's peak RSS would include its parent's).
WRAPPER = r"""
import json, os, subprocess, sys
p = subprocess.Popen(sys.argv[2:])
_, status, ru = os.wait4(p.pid, 0)
with open(sys.argv[1], "w") as fh:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "cpu_s": ru.ru_utime + ru.ru_stime,
               "maxrss_mib": ru.ru_maxrss / 1024, "written": ru.ru_oublock * 512}, fh)
"""


@dataclass
class Stage:
    """One stage or merge step: its figures (``procs`` processes, concurrent)."""

    size: str
    name: str
    procs: int
    wall_s: float
    cpu_s: float
    mpx: float
    peak_rss_mib: float
    written: int
    delta: int
    disk_after: int
    rss_each: list[float] = field(default_factory=list)

    @property
    def cpu_per_mpx(self) -> float:
        return self.cpu_s / self.mpx


@dataclass
class Result:
    """What ``main`` measured: every stage row, the merge form that ran, the notes printed."""

    rows: list[Stage] = field(default_factory=list)
    merge_form: str = ""
    notes: list[str] = field(default_factory=list)
    work: Path | None = None


def du(path: Path) -> int:
    """Bytes on disk under ``path`` (allocated blocks, as ``du``)."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_blocks * 512
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files + dirs:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


class DiskSampler:
    """The filesystem's used bytes, sampled every ``interval`` s while running; ``peak`` above the start."""

    def __init__(self, path: Path, interval: float = 0.5) -> None:
        self.path, self.interval = path, interval
        self.start = self._used()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _used(self) -> int:
        u = shutil.disk_usage(self.path)
        return u.total - u.free

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used() - self.start)
            self._stop.wait(self.interval)

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._used() - self.start)


def unet_command() -> list[str]:
    exe = Path(sys.executable).parent / "unet"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "unet_core"]


def stepwise_merge_available(unet: list[str]) -> bool:
    out = subprocess.run([*unet, "merge", "--help"], capture_output=True, text=True)
    return "--step" in out.stdout


def run_stage(commands: list[list[str]], logs: Path, name: str) -> tuple[float, list[dict]]:
    """Runs ``commands`` concurrently, each under the rusage wrapper; wall seconds and each one's figures."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    t0 = time.perf_counter()
    for i, cmd in enumerate(commands):
        tag = f"{name.replace(' ', '_')}-{i}"
        log = open(logs / f"{tag}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-c", WRAPPER, str(logs / f"{tag}.json"), *cmd],
                                       stdout=log, stderr=subprocess.STDOUT), log, tag, cmd))
    results = []
    for p, log, tag, cmd in procs:
        p.wait()
        log.close()
    wall = time.perf_counter() - t0
    for p, log, tag, cmd in procs:
        report = logs / f"{tag}.json"
        info = json.loads(report.read_text()) if report.exists() else {"rc": p.returncode}
        if p.returncode or info["rc"]:
            tail = (logs / f"{tag}.log").read_text()[-3000:]
            raise RuntimeError(f"{name} failed (exit {info['rc']}): {' '.join(cmd)}\n{tail}")
        results.append(info)
    return wall, results


def measure(result: Result, label: str, name: str, commands: list[list[str]], work: Path, mpx: float) -> Stage:
    before = du(work)
    wall, infos = run_stage(commands, work / "logs", name)
    after = du(work)
    rss = [i["maxrss_mib"] for i in infos]
    stage = Stage(label, name, len(commands), wall, sum(i["cpu_s"] for i in infos), mpx, max(rss),
                  sum(i["written"] for i in infos), after - before, after, rss)
    result.rows.append(stage)
    mark = "" if stage.peak_rss_mib <= RSS_TARGET_MIB else "  RSS over 2 GiB"
    print(f"{label:>10} {name:<22} {stage.procs:>5} {stage.wall_s:9.1f} {stage.cpu_s:9.1f} {stage.cpu_per_mpx:8.3f} "
          f"{stage.peak_rss_mib:9.0f} {stage.written / GIB:8.3f} {stage.delta / GIB:+8.3f} "
          f"{stage.disk_after / GIB:8.3f}{mark}", flush=True)
    return stage


def synth_tiles(root: Path, unet: list[str]) -> np.ndarray:
    """The ten 512² uint16 synthetic slices the stacks are tiled from."""
    import tifffile

    path = root / "synth.tif"
    if not path.exists():
        subprocess.run([*unet, "-q", "synth", "--image", str(path), "--slices", str(SYNTH_SLICES), "--size",
                        str(SYNTH_SIZE), "--seed", "0", "--density", "0.2", "--gap-px", "3", "--dtype", "uint16"],
                       check=True, capture_output=True)
    return tifffile.imread(path)


def build_tiff(path: Path, tiles: np.ndarray, slices: int, side: int) -> None:
    """A (slices, side, side) uint16 BigTIFF, one page per slice, written as it is made: slice z, tile i
    (row-major) is synthetic slice (z * n² + i) % 10 for n = side / 512 tiles per row."""
    import tifffile

    n = side // SYNTH_SIZE
    count = len(tiles)

    def pages():
        page = np.empty((side, side), np.uint16)
        for z in range(slices):
            for i in range(n * n):
                r, c = divmod(i, n)
                y, x = r * SYNTH_SIZE, c * SYNTH_SIZE
                page[y:y + SYNTH_SIZE, x:x + SYNTH_SIZE] = tiles[(z * n * n + i) % count]
            yield page

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(pages(), shape=(slices, side, side), dtype=np.uint16, photometric="minisblack")


def write_model(path: Path) -> None:
    import torch

    from unet_core.model.checkpoint import save_model
    from unet_core.model.spec import UNetSpec
    from unet_core.model.unet import UNet

    torch.manual_seed(0)
    save_model(path, UNet(UNetSpec(depth=1, base_channels=1, dropout=0.0)))


def needed_bytes(slices: int, side: int) -> int:
    tiff = slices * side * side * 2
    return int(tiff * (1 + (DISK_RATIO - 1) * DISK_MARGIN))


def label_of(slices: int, side: int) -> str:
    gib = slices * side * side * 2 / GIB
    return f"{gib:g} GiB" if gib >= 1 else f"{slices}x{side}²"


def run_size(result: Result, args: argparse.Namespace, unet: list[str], root: Path, model: Path, tiles: np.ndarray,
             slices: int, side: int, stepwise: bool) -> None:
    label = label_of(slices, side)
    work = root / f"z{slices}"
    work.mkdir()
    tiff = work / "stack.tif"
    mpx = slices * side * side / 1e6
    k = args.jobs
    stack, pred, cells, mwork = work / "S.ome.zarr", work / "P.ome.zarr", work / "cells.csv", work / "merge-work"
    parts = [str(work / f"part-{j}") for j in range(k)]
    first = len(result.rows)
    with DiskSampler(work) as sampler:  # from before the TIFF, so that its peak compares with the du figures
        t0 = time.perf_counter()
        build_tiff(tiff, tiles, slices, side)
        print(f"# {label}: {slices} x {side}² uint16 BigTIFF built in {time.perf_counter() - t0:.1f} s (not timed), "
              f"{du(tiff) / GIB:.3f} GiB on disk", flush=True)
        load0 = os.getloadavg()[0]
        measure(result, label, "ingest", [[*unet, "ingest", str(tiff), str(stack), "--voxel-size-um", "1,0.5,0.5"]],
                work, mpx)
        block = ["--block-px", str(args.block_px)] if args.block_px else []
        measure(result, label, f"predict (K={k})",
                [[*unet, "predict", str(stack), str(model), parts[j], "--job", str(j), "--jobs", str(k), "--device",
                  "cpu", "--threads", "1", "--decision", "raw", *block] for j in range(k)], work, mpx)
        base = [*unet, "merge", *parts, "--stack", str(stack), "-o", str(pred), *MERGE_OPTIONS, "--cells", str(cells)]
        if stepwise:
            for step, parallel in MERGE_STEPS:
                cmd = [*base, "--jobs", str(k), "--work", str(mwork), "--step", step]
                cmds = [[*cmd, "--job", str(j)] for j in range(k)] if parallel else [cmd]
                measure(result, label, f"merge {step}", cmds, work, mpx)
        else:
            measure(result, label, "merge (one command)", [base], work, mpx)
    stages = result.rows[first:]
    wall, cpu = sum(s.wall_s for s in stages), sum(s.cpu_s for s in stages)
    tiff_bytes = du(tiff)
    peak = max(s.disk_after for s in stages)
    print(f"{label:>10} {'total':<22} {'':>5} {wall:9.1f} {cpu:9.1f} {cpu / mpx:8.3f} "
          f"{max(s.peak_rss_mib for s in stages):9.0f} {sum(s.written for s in stages) / GIB:8.3f} {'':>8} "
          f"{peak / GIB:8.3f}")
    result.rows.append(Stage(label, "total", 0, wall, cpu, mpx, max(s.peak_rss_mib for s in stages),
                             sum(s.written for s in stages), 0, peak))
    notes = []
    scaled = wall * (128 * SIDE * SIDE) / (slices * side * side)
    big = slices * side * side * 2 >= GIB and (slices, side) != (128, SIDE)
    notes.append(f"{label}: end to end {wall:.0f} s = {wall / 60:.1f} min wall, {cpu:.0f} CPU-s ({cpu / mpx:.3f} "
                 f"CPU-s/Mpx); target for 16 GiB <= 45 min"
                 + (f" (this size scaled linearly to 16 GiB: {scaled / 60:.0f} min)" if big else "")
                 + f"; load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after (others' work inflates wall, "
                 "not CPU-s)")
    over = [s.name for s in stages if s.peak_rss_mib > RSS_TARGET_MIB]
    notes.append(f"{label}: largest peak RSS {max(s.peak_rss_mib for s in stages):.0f} MiB (target <= 2048 MiB per "
                 f"stage): {'all stages within' if not over else 'over in ' + ', '.join(over)}")
    notes.append(f"{label}: peak disk use {peak / GIB:.3f} GiB = {peak / tiff_bytes:.2f}x the TIFF (the check "
                 f"assumes {DISK_RATIO}x, with a {DISK_MARGIN}x margin on the stores); filesystem used space peaked "
                 f"{sampler.peak / GIB:.3f} GiB above its level before the TIFF (sampled every 0.5 s: sees "
                 "transient files, and other writers on the disk too)")
    with open(cells) as fh:
        notes.append(f"{label}: cells.csv has {sum(1 for _ in fh) - 1} cells")
    merge_wall = sum(s.wall_s for s in stages if s.name.startswith("merge"))
    if args.merge_k_compare:
        one = [*base, "--jobs", "1"] if stepwise else base
        cells.unlink(missing_ok=True)
        if mwork.exists():
            shutil.rmtree(mwork)
        s1 = measure(result, label, "merge K=1 (compare)", [one], work, mpx)
        how = "" if stepwise else (" (this merge has no --jobs: both runs are one process, the ratio shows "
                                   "noise only)")
        notes.append(f"{label}: merge wall K={k} {merge_wall:.1f} s, K=1 {s1.wall_s:.1f} s: ratio "
                     f"{merge_wall / s1.wall_s:.2f} (target <= 0.6 with K = 2){how}")
    for line in notes:
        print("  " + line)
    result.notes.extend(notes)
    if not args.keep:
        shutil.rmtree(work)


def markdown(result: Result, args: argparse.Namespace) -> str:
    lines = [f"Large-stack CPU chain ({time.strftime('%Y-%m-%d', time.gmtime())}, {os.cpu_count()} cores, "
             f"K = {args.jobs}, merge: {result.merge_form}; `python benchmarks/bench_scale.py "
             f"{' '.join(args.argv)}`)", "",
             "| stack | stage | processes | wall s | CPU-s | CPU-s/Mpx | peak RSS MiB | written GiB | disk after GiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in result.rows:
        name = f"**{s.name}**" if s.name == "total" else s.name
        lines.append(f"| {s.size} | {name} | {s.procs or ''} | {s.wall_s:.1f} | {s.cpu_s:.1f} | {s.cpu_per_mpx:.3f} | "
                     f"{s.peak_rss_mib:.0f} | {s.written / GIB:.3f} | {s.disk_after / GIB:.3f} |")
    lines.append("")
    lines.extend(f"- {n}" for n in result.notes)
    return "\n".join(lines) + "\n"


def compare_sizes(result: Result) -> None:
    """Per-piece stages' peak RSS, smallest against largest size (target +-20 %)."""
    sizes = list(dict.fromkeys(s.size for s in result.rows))
    if len(sizes) < 2:
        return
    small, large = sizes[0], sizes[-1]
    by = {(s.size, s.name): s for s in result.rows}
    for s in result.rows:
        if s.size != small or not s.name.startswith(PER_PIECE):
            continue
        other = by.get((large, s.name))
        if other:
            change = other.peak_rss_mib / s.peak_rss_mib - 1
            note = (f"{s.name}: peak RSS {small} {s.peak_rss_mib:.0f} MiB, {large} {other.peak_rss_mib:.0f} MiB: "
                    f"{change:+.0%} (target within +-20 %)")
            print("  " + note)
            result.notes.append(note)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="8,128", help="slice counts of 8192² to run, largest last (default 8,128: "
                   "1 GiB and 16 GiB)")
    p.add_argument("--slices", type=int, default=None, help="run this one slice count instead of --sizes")
    p.add_argument("--side", type=int, default=SIDE, help=f"slice edge px, a multiple of {SYNTH_SIZE} (default {SIDE})")
    p.add_argument("--jobs", type=int, default=2, help="K: predict jobs and merge pieces run concurrently (default 2)")
    p.add_argument("--block-px", type=int, default=None, help="predict --block-px (default: predict's)")
    p.add_argument("--workdir", type=Path, default=None, help="where the work folder is made (default: the temp dir)")
    p.add_argument("--merge-k-compare", action="store_true", help="rerun the merge with K = 1 on the same parts")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table as markdown here")
    p.add_argument("--keep", action="store_true", help="keep the TIFFs and stores")
    p.add_argument("--quick", action="store_true", help="2 x 1024², K = 2, 512-px blocks: seconds")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.quick:
        args.sizes, args.side, args.block_px = "2", 1024, args.block_px or 512
    if args.slices is not None:
        args.sizes = str(args.slices)
    args.size_list = [int(s) for s in args.sizes.split(",")]
    if args.side % SYNTH_SIZE:
        p.error(f"--side must be a multiple of {SYNTH_SIZE}")
    return args


def main(argv: list[str] | None = None) -> Result:
    args = parse_args(argv)
    base = args.workdir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    need = (sum if args.keep else max)(needed_bytes(z, args.side) for z in args.size_list)
    free = shutil.disk_usage(base).free
    if free < need:
        print(f"bench_scale: needs ~{need / GIB:.1f} GiB free in {base} for {args.sizes} x {args.side}² "
              f"({DISK_RATIO}x the TIFF, {DISK_MARGIN}x margin on the stores), has {free / GIB:.1f} GiB",
              file=sys.stderr)
        raise SystemExit(2)
    unet = unet_command()
    stepwise = stepwise_merge_available(unet)
    result = Result(merge_form="stepwise (--step, K pieces)" if stepwise else "one command (no --step in this merge)")
    root = Path(tempfile.mkdtemp(prefix="bench_scale_", dir=base))
    result.work = root
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout.strip() or "?"
    print(f"# bench_scale  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  commit {rev}  cores={os.cpu_count()}  K={args.jobs}"
          f"  merge: {result.merge_form}  work={root}  free {free / GIB:.0f} GiB, need ~{need / GIB:.1f} GiB")
    print(f"{'stack':>10} {'stage':<22} {'procs':>5} {'wall s':>9} {'CPU-s':>9} {'CPU/Mpx':>8} {'RSS MiB':>9} "
          f"{'wrt GiB':>8} {'Δdisk':>8} {'disk GiB':>8}", flush=True)
    try:
        model = root / "tiny.pt"
        write_model(model)
        tiles = synth_tiles(root, unet)
        for z in args.size_list:
            run_size(result, args, unet, root, model, tiles, z, args.side, stepwise)
        compare_sizes(result)
        if args.markdown:
            args.markdown.write_text(markdown(result, args))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
