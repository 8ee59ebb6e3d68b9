"""The work folder of a merge run in pieces: its manifest, the pieces' records, its locks.

A merge that runs as parallel pieces (``unet merge --step ...``, one Snakemake job per piece and
round) keeps everything between its rounds in one folder (``--work``; the workflow's
``results/<sample>/merge/``)::

    merge.json            manifest: format, the run's fingerprint (parts, stack, settings, K, code)
    start.done            written by ``start`` after the manifest (the workflow tracks this one)
    store.ome.zarr/       the prediction being built; ``finish`` moves it to the output path
      _scratch/seeds      uint32 seed labels of each block, numbered within the block
      _scratch/labels     uint32 provisional cell labels of each block (see block_labels)
    seeds-<k>.npz         piece k's seed record (counts, face pairs and strips)
    seed-ids.npz          the seeds' numbering (lookup table, block offsets)
    cells-<k>.npz         piece k's cell record (counts, face pairs and strips, number of rows)
    cells-<k>.rows        piece k's rows of sums, one per (block, label) (cells.ROW_DTYPE, raw;
                          cells.ROW_DTYPE_3D for the 3-D cells of a 3-D network's parts)
    cell-ids.npz          the cells' numbering after small objects are dropped
    cell-table.npy        one row of sums per cell (the CSV's numbers)
    write-<k>.csv         piece k's lines of the cell table (its range of ids)
    write-<k>.done        piece k wrote its blocks' final ids
    .piece-<k>.lock       held while piece k runs

Every record carries the manifest's fingerprint: a record of another run (other parts, settings,
K or code) is refused with one line. A record is written atomically after the piece's work, so a
killed piece leaves none and reruns alone; a step whose record exists does nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from unet_core.common.atomic import atomic_output
from unet_core.common.errors import UserInputError
from unet_core.common.lockfile import held_by_other, holding
from unet_core.common.outputs import JsonMark, Layout

WORK_FORMAT = "unet-pipeline/merge-work/1"
MANIFEST = "merge.json"
STORE = "store.ome.zarr"
_STORE_NODES = (
    "",
    "[0-9]*",
    "labels",
    *(f"labels/{name}{level}" for name in ("segmentation", "instances") for level in ("", "/[0-9]*")),
    "_scratch",
    "_scratch/seeds",
    "_scratch/labels",
)
#: How 'unet merge' recognises its own work folder: the manifest's format, and nothing in it but
#: the store being built, the records and the piece locks.
WORK_MARK = JsonMark(
    WORK_FORMAT,
    "a work folder of 'unet merge'",
    manifest=MANIFEST,
    layout=Layout(
        tuple(f"{STORE}/{n}" if n else STORE for n in _STORE_NODES),
        (
            MANIFEST,
            "start.done",
            "seeds-[0-9]*.npz",
            "seed-ids.npz",
            "cells-[0-9]*.npz",
            "cells-[0-9]*.rows",
            "cell-ids.npz",
            "cell-table.npy",
            "write-[0-9]*.csv",
            "write-[0-9]*.done",
            ".piece-[0-9]*.lock",
        ),
    ),
)


def _differing(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys whose values differ, nested dicts named by their inner keys (``result.settings``)."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if x != y:
            nested = isinstance(x, dict) and isinstance(y, dict) and not prefix
            out += _differing(x, y, f"{key}.") if nested else [f"{prefix}{key}"]
    return out


class MergeWork:
    """The work folder at ``path`` for the run described by ``manifest`` (a dict of plain data)."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = {"format": WORK_FORMAT, **manifest}
        text = json.dumps(self.manifest, sort_keys=True)
        self.fingerprint = hashlib.sha256(text.encode()).hexdigest()

    @property
    def result_fingerprint(self) -> str:
        """The fingerprint of what the output's content depends on: the manifest's ``result`` entry
        (the run settings the parts share, the stack's statistics, the merge settings but the number
        of pieces, the outputs asked for, the code), recorded in the output. Equal for any number of
        predict jobs or merge pieces and any paths, so the output's bytes are too."""
        return hashlib.sha256(json.dumps(self.manifest["result"], sort_keys=True).encode()).hexdigest()

    @property
    def store(self) -> Path:
        return self.path / STORE

    def started(self) -> bool:
        """Whether the folder holds this run's manifest (a start with equal settings) and the store
        being built (a finish killed after moving it away leaves none: start again)."""
        return (self.store / "zarr.json").is_file() and self.holds_manifest()

    def holds_manifest(self) -> bool:
        """Whether the folder holds this run's manifest."""
        try:
            found = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError):
            return False
        return found == self.manifest

    def check_started(self, step: str) -> None:
        """Raise one line unless ``start`` ran for this very run (same parts, settings, K, code)."""
        if not (self.path / MANIFEST).is_file():
            raise UserInputError(
                f"{self.path}: no merge was started here (no {MANIFEST}); run 'unet merge ... "
                "--step start' first, with the same arguments"
            )
        try:
            found = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            raise UserInputError(
                f"{self.path / MANIFEST}: unreadable ({err}); run --step start again"
            ) from None
        if found != self.manifest:
            diff = _differing(found, self.manifest)
            raise UserInputError(
                f"{self.path}: started with other inputs or settings than this --step {step} (differs in "
                f"{', '.join(diff)}); give every step the same arguments, or run --step start again"
            )

    def write_manifest(self) -> None:
        with atomic_output(self.path / MANIFEST, own=None) as tmp:
            tmp.write_text(json.dumps(self.manifest, indent=1, sort_keys=True))

    # -- records ---------------------------------------------------------------------------------
    def record_path(self, name: str) -> Path:
        return self.path / name

    def has_record(self, name: str) -> bool:
        """Whether record ``name`` of this run exists (a finished piece or round)."""
        path = self.path / name
        if not path.is_file():
            return False
        if path.suffix == ".npz":
            with contextlib.suppress(Exception), np.load(path) as data:
                return str(data["fingerprint"]) == self.fingerprint
            return False
        if path.suffix == ".done":
            with contextlib.suppress(OSError, ValueError):
                return json.loads(path.read_text()).get("fingerprint") == self.fingerprint
            return False
        return True

    def save(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        """Write record ``name`` (``.npz``) atomically, stamped with the run's fingerprint."""
        with atomic_output(self.path / name, own=None) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, fingerprint=np.asarray(self.fingerprint), **arrays)

    def load(self, name: str, *, made_by: str, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Record ``name`` of this run: all its arrays read, or only ``keys`` (a finish needs the
        number of cells, not the lookup table of every provisional id).

        Raises:
            UserInputError: missing (names the step that makes it), damaged, or of another run.
        """
        path = self.path / name
        if not path.is_file():
            raise UserInputError(f"{path}: missing; run '{made_by}' (with the same arguments) first")
        try:
            with np.load(path) as data:
                wanted = data.files if keys is None else ["fingerprint", *keys]
                out = {k: data[k] for k in wanted}
        except Exception as err:  # numpy raises several types for a damaged archive
            raise UserInputError(f"{path}: damaged record ({err}); run '{made_by}' again") from None
        if str(out.get("fingerprint")) != self.fingerprint:
            raise UserInputError(
                f"{path}: a record of another merge run (other parts, settings or K); run '{made_by}' again"
            )
        return out

    def mark_done(self, name: str, summary: dict[str, Any]) -> None:
        with atomic_output(self.path / name, own=None) as tmp:
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint, **summary}))

    # -- locks -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def piece_lock(self, k: int, out_lock: Path, owner: Path) -> Iterator[None]:
        """Hold piece ``k``'s lock; refuse while a serial step or a whole merge holds the output's."""
        holder = held_by_other(out_lock)
        if holder is not None:
            raise UserInputError(
                f"{owner}: another 'unet merge' (pid {holder.get('pid')} on host "
                f"{holder.get('host')}) is writing this output; wait for it to finish"
            )
        with holding(
            self.path / f".piece-{k}.lock",
            owner=owner,
            who="'unet merge' piece",
            what=f"running piece {k} of this merge",
        ):
            yield
