"""The code's shape (docs/architecture.md): imports point one way, functions stay short."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "unet_core"
WORKFLOW = PACKAGE.parent / "workflow"
#: Lower packages never import higher ones (cli sits on top; nothing imports it; the workflow's door
#: sits below it, reaching every stage's output marks).
LAYERS = ("common", "model", "io", "synth", "weights", "augment", "infer", "train", "evaluate", "export", "workflow",
          "cli")
#: The one module of the package that workflow/Snakefile and workflow/rules/*.smk import.
DOOR = "unet_core.workflow.door"
MAX_FUNCTION_LINES = 80
#: Declarative argparse tables.
LONG_ALLOWED = {("cli", "add_parser")}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name != "__init__.py")


def _layer(path: Path) -> str:
    if path == PACKAGE / "__main__.py":  # `python -m unet_core`: the CLI's other entry point
        return "cli"
    return path.relative_to(PACKAGE).parts[0]


def _imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "unet_core" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_module_sits_in_a_known_layer() -> None:
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert not loose, f"modules outside a stage package: {loose}"
    assert {_layer(p) for p in _modules()} == set(LAYERS)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    mine = LAYERS.index(_layer(path))
    upward = sorted(pkg for pkg in _imported_packages(path) if pkg in LAYERS and LAYERS.index(pkg) > mine)
    assert not upward, f"{path.relative_to(PACKAGE)} imports higher layer(s) {upward}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_imports(path: Path, known: set[str]) -> set[str]:
    """The unet_core modules ``path`` imports anywhere in it (functions and TYPE_CHECKING blocks too)."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from package import module` imports the module; `from module import name` the module
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    return {name for name in found if name in known} - {_module_name(path)}


def _import_cycle() -> list[str] | None:
    """One cycle of module imports inside the package, or None (depth-first search)."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: sorted(_module_imports(path, set(paths))) for name, path in paths.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        stack.append(name)
        for dep in graph[name]:
            if state.get(dep) == 1:
                return [*stack[stack.index(dep):], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def test_no_import_cycles() -> None:
    """No module imports one that (directly or through others) imports it back, not even for typing."""
    cycle = _import_cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_functions_are_short() -> None:
    long = []
    for path in _modules():
        rel = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                allowed = (rel, node.name) in LONG_ALLOWED or (_layer(path), node.name) in LONG_ALLOWED
                if lines > MAX_FUNCTION_LINES and not allowed:
                    long.append(f"{rel}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 80 lines: " + "; ".join(long)


def _workflow_files() -> list[Path]:
    return [WORKFLOW / "Snakefile", *sorted((WORKFLOW / "rules").glob("*.smk"))]


def _workflow_package_names(path: Path) -> list[str]:
    """Every dotted name starting with ``unet_core`` in the code of a Snakemake file (its import
    lines, and strings naming a module such as 'unet_core.io.ingest:STACK_MARK'); comments left out.
    Snakemake files are not Python, so they are read line by line."""
    names = []
    for line in path.read_text().splitlines():
        code = line.split("#", 1)[0]
        names += re.findall(r"\bunet_core(?:\.[A-Za-z_]\w*)*", code)
        if re.match(r"\s*import\s+unet_core\b", code):
            names.append(f"`{code.strip()}` (binds the whole package)")
    return names


@pytest.mark.parametrize("path", _workflow_files(), ids=lambda p: p.name)
def test_workflow_enters_the_package_by_its_door_only(path: Path) -> None:
    """The workflow names no module of unet_core but the door (no import of another, no string
    resolved at run time): what a dry run loads stays what the door imports."""
    others = sorted({name for name in _workflow_package_names(path) if name != DOOR})
    assert not others, f"workflow/{path.relative_to(WORKFLOW)} names {others}; import from {DOOR} only"


def test_the_workflow_imports_the_door() -> None:
    """The door is found where the workflow imports it (the parser above sees its imports)."""
    assert any(DOOR in _workflow_package_names(p) for p in _workflow_files())


def test_the_door_imports_neither_torch_nor_jsonschema() -> None:
    """Every snakemake call (a dry run too) imports the door: no torch (seconds), no jsonschema
    (the GPU machine lacks it), no zarr or dask, checked in a fresh interpreter."""
    heavy = ("torch", "jsonschema", "zarr", "dask", "scipy", "tifffile")
    code = f"import sys, {DOOR}; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "", f"importing {DOOR} imports {res.stdout.strip()}"
