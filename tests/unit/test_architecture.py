"""The code's shape (docs/architecture.md): imports point one way, functions stay short."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "unet_core"
#: Lower packages never import higher ones (cli sits on top; nothing imports it).
LAYERS = ("common", "model", "io", "weights", "augment", "infer", "train", "evaluate", "cli")
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
