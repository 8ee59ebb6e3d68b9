"""Import a script as the lent GPU machine would: only what that machine has, or what travels with it.

    python scripts/gpu_import_gate.py --machine scripts/gpu-machine-packages.txt \\
        [--run="--quick --device cpu"] benchmarks/gpu_check.py --carried zarr numcodecs dask ...

Before anything else a ``sys.meta_path`` finder is installed, in front of the usual ones, that
refuses every top-level module that is neither in the standard library (``sys.stdlib_module_names``),
nor a package of the machine's list (``--machine``: distribution names, one a line), nor a carried
wheel (``--carried``), nor a file of this repository (``unet_core``, ``benchmarks/benchlib.py``). A
refused module is absent as on that machine (``ModuleNotFoundError``; ``find_spec`` gives None), so
code that treats a module as optional goes on as it would there. Then the script is imported (its
``main`` not run), and with ``--run`` its ``main(ARGS)`` runs too (``--run`` holds them as one word;
lazy imports on that path are gated too).

A command runs gated too: ``--module unet_core.cli -- ingest A B ...`` imports the module and runs
its ``main`` with the arguments after ``--`` (``gpu-session.sh --dry-run``'s ``unet`` shim does, so
every workflow stage of the dry run sees only what the machine will have); the exit status is then
that of ``main``.

Prints one line and exits 0 when the script got through, 1 naming the refused module otherwise.
``scripts/gpu-session.sh gate`` runs it (``prepare`` does, before anything is fetched), as does
``tests/unit/test_benchmarks.py``, so a missing wheel is found here, not on the GPU machine.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import re
import shlex
import sys
import sysconfig
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STDLIB = {Path(sysconfig.get_path(key)).resolve() for key in ("stdlib", "platstdlib")}

#: Distributions whose import names their normalised names do not give, for packages of the
#: machine's list that are not installed here (installed ones are read from their metadata).
ALIASES = {
    "pyyaml": ["yaml"], "scikit-image": ["skimage"], "scikit-learn": ["sklearn"], "pillow": ["PIL"],
    "opencv-python-headless": ["cv2"], "protobuf": ["google"], "python-dateutil": ["dateutil"],
    "nvidia-ml-py": ["pynvml"], "py-cpuinfo": ["cpuinfo"], "attrs": ["attr", "attrs"],
    "cupy-cuda13x": ["cupy"], "cuda-bindings": ["cuda"], "cuda-core": ["cuda"], "cuda-pathfinder": ["cuda"],
}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_package_list(path: Path) -> list[str]:
    """The distribution names of a package list (``#`` comments, ``name==version`` lines)."""
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.split(r"[=<>!~\[ ;]", line, maxsplit=1)[0])
    return names


def import_names(distributions: list[str]) -> set[str]:
    """The top-level module names the given distributions provide: from the metadata of those
    installed here, else :data:`ALIASES`, else the name with ``-`` as ``_``."""
    from importlib.metadata import packages_distributions

    provided: dict[str, set[str]] = {}
    for module, dists in packages_distributions().items():
        for dist in dists:
            provided.setdefault(_normalise(dist), set()).add(module)
    names: set[str] = set()
    for dist in map(_normalise, distributions):
        names |= provided.get(dist, set()) | set(ALIASES.get(dist, [])) | {dist.replace("-", "_")}
    return names


class Gate(importlib.abc.MetaPathFinder):
    """The one entry of ``sys.meta_path``, in front of the finders it replaces: it asks them, and
    hides each top-level module outside ``allowed``, the standard library and this repository, so
    that both ``import x`` (``ModuleNotFoundError``) and ``importlib.util.find_spec("x")`` (None)
    see it absent, as on the machine."""

    def __init__(self, allowed: set[str], finders: list) -> None:
        self.allowed = allowed
        self.finders = finders
        self.refused: list[str] = []

    def find_spec(self, fullname, path, target=None):  # the MetaPathFinder protocol
        spec = None
        for finder in self.finders:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        top = fullname.partition(".")[0]
        if spec is None or path is not None or top in self.allowed or top in sys.stdlib_module_names:
            return spec  # absent anyway, a submodule (its package got through), or allowed
        origin = Path(spec.origin).resolve() if spec.origin and spec.has_location else None
        if origin is not None and not {"site-packages", "dist-packages"} & set(origin.parts) and any(
                origin.is_relative_to(d) for d in (REPO, *STDLIB)):
            # this repository's own code (it travels with the checkout), or the standard library's
            # files not listed by name (_sysconfigdata_*); an installed package (a venv inside the
            # checkout too) is neither
            return spec
        self.refused.append(top)
        return None


def main(argv: list[str] | None = None) -> int:
    import argparse

    argv = sys.argv[1:] if argv is None else list(argv)
    program = argv[argv.index("--") + 1 :] if "--" in argv else None  # a command's own arguments
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("script", type=Path, nargs="?", help="a script file (or --module)")
    parser.add_argument("--module", default=None, help="an importable module instead of a script file")
    parser.add_argument("--machine", type=Path, required=True, help="the machine's package list")
    parser.add_argument("--carried", nargs="*", default=[], help="distributions carried as wheels")
    parser.add_argument("--run", default=None,
                        help='then run main() with these arguments, as one word: --run="--quick --device cpu"')
    args = parser.parse_args(argv)
    if (args.script is None) == (args.module is None):
        parser.error("give a script file or --module NAME")
    if program is not None and args.run is not None:
        parser.error("give the arguments of main either after -- or with --run, not both")
    run = program if program is not None else (shlex.split(args.run) if args.run is not None else None)
    allowed = import_names(read_package_list(args.machine) + args.carried)
    gate = Gate(allowed, list(sys.meta_path))
    sys.meta_path[:] = [gate]
    sys.path.insert(0, str(REPO))
    name = args.module or args.script.name
    status = None
    try:
        if args.module:
            module = importlib.import_module(args.module)
        else:
            script = args.script.resolve()
            sys.path.insert(0, str(script.parent))
            spec = importlib.util.spec_from_file_location(script.stem, script)
            module = importlib.util.module_from_spec(spec)
            sys.modules[script.stem] = module  # dataclasses look their module up there
            spec.loader.exec_module(module)
        if run is not None:
            status = module.main(run)
    except ModuleNotFoundError as err:
        if err.name in gate.refused:
            print(f"import gate: {name} needs {err.name!r}, which the GPU machine lacks: add its "
                  "wheel to PACKAGES in scripts/gpu-session.sh, or import it only where it is used", flush=True)
            traceback.print_exc()
            return 1
        raise
    optional = sorted(set(gate.refused))
    if isinstance(status, int) and status != 0:  # the command failed: the refused modules may be why
        print(f"import gate: {name} exited {status}"
              + (f"; absent on the GPU machine and refused: {', '.join(optional)}" if optional else ""))
        return status
    done = "ran" if run is not None else "imported"
    print(f"import gate: {name} {done} with only the standard library, {args.machine.name} "
          "and the carried wheels"
          + (f" (absent there and treated as optional: {', '.join(optional)})" if optional else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
