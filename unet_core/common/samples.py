"""The samples table: which stacks a workflow run ingests, trains on, validates with and predicts.

A tab-separated file (``config/samples.tsv``; ``#`` starts a comment line) with the header
``name image labels slices role``. It is read once when the workflow starts, so every mistake in
it stops the run there with one line naming the file, the line and the column, before any stage
has run.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unet_core.common.config_values import schema_problem
from unet_core.common.errors import ConfigError, UserInputError
from unet_core.common.outputs import resolved_path
from unet_core.common.slices import Ranges, count, first, merged, slice_ranges


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the table's non-empty, non-comment lines."""
    if not path.is_file():
        raise ConfigError(f"config samples = {str(path)!r}: no such file (a path relative to the directory "
                          "snakemake runs in, usually the repository root)")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM, as spreadsheet programs write, is not a column name
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the samples table ({err})") from None
    return [(n, line) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]


def _check_header(path: Path, number: int, header: str, columns: Sequence[str]) -> None:
    """The header must name every required column, separated by tabs."""
    found = [c.strip() for c in header.split("\t")]
    missing = [c for c in columns if c not in found]
    if missing:
        hint = " (it has no tab: separate the columns by tabs, not spaces)" if "\t" not in header else ""
        raise ConfigError(f"{path} line {number}: the first line must be the header {' '.join(columns)}, "
                          f"separated by tabs; missing column(s) {', '.join(missing)}{hint}")


def read_samples(
    path: str | Path, schema: Mapping[str, Any], *, need_train: bool
) -> dict[str, dict[str, str]]:
    """The samples table as ``{name: row}``, every row checked against ``schema`` (one row's schema).

    Args:
        path: the table.
        schema: JSON Schema of one row (``workflow/schemas/samples.schema.yaml``).
        need_train: whether a ``train`` row is required (not with ``model_file``).

    Raises:
        ConfigError: a missing or unreadable file, a header without the columns (or with spaces for
            tabs), a row with more cells than the header, a value the schema refuses, a name given
            twice, a train or val row without labels, no train row where one is needed. The message
            names the file and line.
    """
    path = Path(path)
    required = tuple(schema.get("required", ()))  # the columns, in the schema's (and README's) order
    optional = [k for k in schema.get("properties", {}) if k not in required]  # empty where left out
    lines = _lines(path)
    if not lines:
        raise ConfigError(f"{path}: the samples table is empty (it needs the header {' '.join(required)})")
    _check_header(path, *lines[0], required)
    reader = csv.DictReader([text for _, text in lines], delimiter="\t", quoting=csv.QUOTE_NONE,
                            restkey="\0extra")
    table: dict[str, dict[str, str]] = {}
    for (number, _), raw in zip(lines[1:], reader, strict=True):
        where = f"{path} line {number}"
        if "\0extra" in raw:
            raise ConfigError(f"{where}: more cells than the header has columns (a tab too many?)")
        row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
        row.update({k: "" for k in optional if k not in row})
        problem = schema_problem(row, schema, [where], noun="column")
        if problem:
            raise ConfigError(problem)
        if row["name"] in table:
            raise ConfigError(f"{where}: sample name {row['name']!r} appears twice")
        if row["role"] in ("train", "val") and not row["labels"]:
            raise ConfigError(f"{where}: sample {row['name']!r} has role {row['role']} but no labels")
        table[row["name"]] = row
    if need_train and not any(r["role"] == "train" for r in table.values()):
        raise ConfigError(f"{path}: no sample has role 'train' "
                          "(or set model_file to predict with a trained model)")
    return table


def _ranges(row: Mapping[str, str]) -> Ranges | None:
    """The row's slice ranges, or None for all of them."""
    try:
        return slice_ranges(row["slices"], what=row["name"])
    except UserInputError as err:
        raise ConfigError(f"sample {row['name']!r}: {err}") from None


def _common(a: Ranges | None, b: Ranges | None) -> Ranges | None:
    """The slices two rows' ranges share, merged (None: all slices, where both take all)."""
    if a is None or b is None:
        return None if a is None and b is None else merged(b if a is None else a)
    return merged([(max(l1, l2), min(h1, h2)) for l1, h1 in a for l2, h2 in b if max(l1, l2) <= min(h1, h2)])


def shared_slices(table: Mapping[str, Mapping[str, str]]) -> list[str]:
    """One line for each training row that shares slices of the same image file with a row whose
    results are judged (``val``, or ``predict`` with labels): validation would then choose the
    checkpoint, or the scores would be computed, on slices the network was trained on."""
    judged = [r for r in table.values() if r["role"] == "val" or (r["role"] == "predict" and r["labels"])]
    judged_by = {"val": "validation (which chooses the checkpoint)", "predict": "the scores"}
    found = []
    for train in (r for r in table.values() if r["role"] == "train"):
        for other in judged:
            if resolved_path(train["image"]) != resolved_path(other["image"]):
                continue
            common = _common(_ranges(train), _ranges(other))
            if common is None or common:
                shown = "all" if common is None else (
                    ", ".join(map(str, first(common, 8))) + (" ..." if count(common) > 8 else ""))
                found.append(f"samples: train sample {train['name']!r} and {other['role']} sample "
                             f"{other['name']!r} share slice(s) {shown} of {train['image']}: "
                             f"{judged_by[other['role']]} would include slices the network was trained on")
    return found
