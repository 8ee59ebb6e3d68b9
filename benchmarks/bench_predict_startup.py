"""Start-up of ``unet predict`` (issue 34): from process start to its "blocks to do" log line.

Run: ``.venv/bin/python benchmarks/bench_predict_startup.py [--repeats 5] [--depth 4 --base-channels 64]``

Builds, in a temporary folder, a paper-net ``model.pt`` (depth 4, base 64: 31 M parameters,
124 MB, written by the project's ``save_model``) and a one-block 512² uint16 stack, runs
``unet predict STACK MODEL PART --device cpu`` once to warm the file cache, then ``repeats``
times, each in a fresh process into a fresh part store, timing from just before the process
is started to the moment its "blocks to do" line arrives on stderr (the process is then left
to finish its one block, untimed). ``python -c 'import torch'`` is timed the same way, and the
median of each and their difference (start-up beyond importing torch: reading and checking
the model, the stack, the part store, the engine) are printed, in wall time and in CPU time of
the process (all threads; less disturbed by other load on the machine). Timings are never asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def time_to_line(cmd: list[str], marker: str | None, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process, all threads) from starting ``cmd`` to ``marker``
    on its stderr (None: to its exit). The CPU time is read from /proc at the line (10 ms ticks),
    or from the process's resource usage at its exit: less disturbed by other load than wall time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    seconds = cpu = None
    for line in proc.stderr:
        if seconds is None and marker is not None and marker in line:
            seconds = time.perf_counter() - t0
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()
            cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode})")
    if seconds is None:
        if marker is not None:
            raise SystemExit(f"{' '.join(cmd)}: no line with {marker!r}")
        seconds, cpu = time.perf_counter() - t0, usage.ru_utime + usage.ru_stime
    return seconds, cpu


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--base-channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=512, help="edge of the one-slice stack, px (one block)")
    args = parser.parse_args(argv)

    import benchlib as B
    import torch

    from unet_core.model.checkpoint import save_model
    from unet_core.model.spec import UNetSpec

    unet = [sys.executable, "-m", "unet_core"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        spec = UNetSpec(depth=args.depth, base_channels=args.base_channels, dropout=0.0)
        model = Path(tmp) / "model.pt"
        save_model(model, B.random_net(spec))
        stack = B.write_stack(Path(tmp) / "stack.ome.zarr", B.smooth_stack(1, args.size))
        params = sum(p.numel() for p in B.random_net(spec).parameters())
        print(f"model: depth {args.depth}, base {args.base_channels}, {params / 1e6:.1f} M parameters, "
              f"{model.stat().st_size / 1e6:.0f} MB; stack 1 x {args.size}² uint16; torch {torch.__version__}, "
              f"{os.cpu_count()} CPUs")

        def predict(i: int) -> tuple[float, float]:
            part = Path(tmp) / f"part-{i}"
            seconds = time_to_line([*unet, "predict", str(stack), str(model), str(part), "--device", "cpu"],
                                   "blocks to do", env)
            shutil.rmtree(part)
            return seconds

        predict(-1)  # warm the file cache (model, stack, the package's modules)
        imports, starts = [], []
        for i in range(args.repeats):  # interleaved: load changes hit both
            imports.append(time_to_line([sys.executable, "-c", "import torch"], None, env))
            starts.append(predict(i))
    result = {}
    for k, what in enumerate(("wall", "cpu")):
        result[f"import_torch_{what}_s"] = statistics.median(t[k] for t in imports)
        result[f"to_blocks_line_{what}_s"] = statistics.median(t[k] for t in starts)
        result[f"startup_{what}_s"] = result[f"to_blocks_line_{what}_s"] - result[f"import_torch_{what}_s"]
        print(f"{what} time, median of {args.repeats}:")
        print(f"  python -c 'import torch'          {result[f'import_torch_{what}_s']:.3f} s  "
              f"({', '.join(f'{t[k]:.3f}' for t in imports)})")
        print(f"  unet predict to 'blocks to do'    {result[f'to_blocks_line_{what}_s']:.3f} s  "
              f"({', '.join(f'{t[k]:.3f}' for t in starts)})")
        print(f"  start-up beyond importing torch   {result[f'startup_{what}_s']:.3f} s")
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return result


if __name__ == "__main__":
    main()
