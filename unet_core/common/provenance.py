"""Provenance: which code, config and inputs produced an output.

``code_hash(stage)`` hashes the source of a stage's CLI module and of every
``unet_core`` module it imports, transitively (found by reading the imports, also those
inside functions). The workflow passes it to each rule as a parameter, so Snakemake
reruns exactly the rules whose code changed, and outputs record it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from functools import cache, lru_cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # unet_core/


@cache  # the closures of a workflow's stages share most modules: each looked up once
def _module_path(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != "unet_core":
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


#: ``from A import B, C`` (also parenthesised over several lines) and ``import A, B`` statements,
#: at any indentation (imports inside functions count too). Read by pattern, not by parsing:
#: every stage's hash is computed at each workflow start and each predict job.
_FROM = re.compile(r"^[ \t]*from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#]+)", re.M)
_IMPORT = re.compile(r"^[ \t]*import[ \t]+([^\n#]+)", re.M)


@cache
def _imports(path: Path, module: str) -> frozenset[str]:
    """The ``unet_core`` modules (and candidate submodules) ``path`` imports."""
    text = path.read_text()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for base, names in _FROM.findall(text):
        level = len(base) - len(base.lstrip("."))
        base = base.lstrip(".")
        if level:
            anchor = package.split(".")
            base = ".".join(anchor[: len(anchor) - level + 1] + ([base] if base else []))
        found.add(base)
        found.update(f"{base}.{n.split()[0]}" for n in names.strip("()").replace("\n", " ").split(",") if n.strip())
    for names in _IMPORT.findall(text):
        found.update(n.split()[0] for n in names.split(",") if n.strip())
    return frozenset(f for f in found if f.startswith("unet_core"))


@lru_cache(maxsize=None)
def module_closure(module: str) -> tuple[str, ...]:
    """``module`` and every ``unet_core`` module it imports, transitively, sorted."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_path(name)
        if path is None or name in seen:
            continue
        seen.add(name)
        todo.extend(_imports(path, name))
        parent = name.rsplit(".", 1)[0]
        if parent != name and parent.startswith("unet_core"):
            todo.append(parent)  # importing a.b runs a/__init__.py too
    return tuple(sorted(seen))


def code_hash(stage: str) -> str:
    """Short sha256 over the source of ``unet_core.cli.<stage>`` and its imports."""
    digest = hashlib.sha256()
    for name in module_closure(f"unet_core.cli.{stage}"):
        digest.update(name.encode())
        digest.update(_module_path(name).read_bytes())
    return digest.hexdigest()[:16]


def sha256_files(paths: Sequence[str | os.PathLike[str]]) -> str:
    """Hex SHA-256 of the content of files and folders, in the order given.

    A file contributes its bytes; a folder (a Zarr store, a folder of TIFFs) contributes each
    file below it, sorted by relative path, as that path followed by the file's bytes. So one
    file hashes like ``sha256sum``, and renaming a file inside a folder changes the hash.
    """
    digest = hashlib.sha256()
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            digest.update(str(path.relative_to(root) if path != root else "").encode())
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()
