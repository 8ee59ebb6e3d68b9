"""The part store: what one ``unet predict`` job writes and ``unet merge`` reads.

A part store is a directory written by exactly one predict job (jobs never share a file)::

    part/
      part.json            manifest: format, geometry, model hash, settings (written first)
      probabilities/       Zarr v3 array (C, Z, Y, X) in the run's encoding (uint8 codes
                           round(255 p) by default; :mod:`unet_core.infer.encoding`), chunks
                           (C, Bz, B, B) = one chunk per block (Bz = 1 for a 2-D model, the
                           tiling's ``block_z`` slices for a 3-D one); only this job's blocks
                           are stored
      segmentation/        Zarr v3 array uint8 (Z, Y, X): the argmax class, computed from the
                           full-precision probabilities; chunks (Bz, B, B)
      done/<bz>.<by>.<bx>  per-block completion marker: an empty file created after the
                           block's chunks are written (a killed job leaves no block that looks
                           finished; a rerun recomputes only blocks without a marker)
      COMPLETE             written last (atomically) with the job summary
    .part.lock             (next to the store) held while a job writes it: host, PID and
                           start time of that process

A part store belongs to one run at a time: a job holds the lock file for as long as it
writes (refreshing its modification time every :data:`unet_core.common.lockfile.LOCK_HEARTBEAT_S` seconds), and a
second job on the same store is refused with one line while the first runs. A lock whose
process is gone is taken over, so a killed job never blocks its rerun: on the same host when
its PID (with its start time) no longer runs, from another host (a shared file system, a
requeued cluster job) when it has not been refreshed for :data:`unet_core.common.lockfile.LOCK_STALE_S` seconds. ``part.json`` is the store's mark
(:data:`PART_MARK`, :mod:`unet_core.common.outputs`): a store with another run's settings is
replaced (it is predict's own output), anything else at the path is refused.

The manifest's settings are everything a part's blocks depend on: a rerun reuses the blocks
of a store only when its settings are equal, and merge accepts parts only when they agree on
the settings of one run (:data:`RUN_KEYS`; the tiling among them, with a 3-D model's z blocking,
so parts blocked differently along z never merge together). This module is the only place that knows the
layout; :mod:`unet_core.infer.predict` writes it and :mod:`unet_core.infer.merge` reads it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from unet_core.common.atomic import atomic_output, ensure_writable_parent, remove_stale_tree
from unet_core.common.errors import UserInputError
from unet_core.common.lockfile import holding
from unet_core.common.outputs import JsonMark, Layout, check_replaceable
from unet_core.infer.tiling import Block, Tiling
from unet_core.io.ngff import create_array, fast_compressor

log = logging.getLogger(__name__)

PART_FORMAT = "unet-pipeline/predict-part/2"
#: Formats of earlier versions, refused with a line that names them (float32 only, no segmentation).
OLD_FORMATS = {"unet-pipeline/predict-part/1": "unet-pipeline 0.1 before compact outputs"}
PROBABILITIES, SEGMENTATION = "probabilities", "segmentation"
MANIFEST, DONE, COMPLETE = "part.json", "done", "COMPLETE"
#: How 'unet predict' recognises its own part stores: the manifest's format, and nothing in them but
#: the arrays, the manifest and the completion markers.
PART_MARK = JsonMark(PART_FORMAT, "a part store written by 'unet predict'", manifest=MANIFEST,
                     older=tuple(OLD_FORMATS),
                     layout=Layout(("", PROBABILITIES, SEGMENTATION),
                                   (MANIFEST, COMPLETE, DONE, f"{DONE}/[0-9]*.[0-9]*.[0-9]*")))
#: Settings that all parts of one run share (merge refuses parts that differ in any of them).
RUN_KEYS = ("stack", "shape", "model_sha256", "tiling", "jobs", "tta", "precision", "intensity", "logit_offsets",
            "probabilities", "batch", "backend", "cell_channel")


@dataclass(frozen=True)
class PartStore:
    """One job's part store at ``path`` (which need not exist yet)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # -- reading ----------------------------------------------------------------------------
    def settings(self) -> dict[str, Any] | None:
        """The manifest's settings, or None where there is no readable manifest (or it holds no dict)."""
        try:
            settings = json.loads((self.path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return settings if isinstance(settings, dict) else None

    @property
    def complete(self) -> bool:
        """Whether the job finished (its ``COMPLETE`` marker exists)."""
        return (self.path / COMPLETE).is_file()

    def is_done(self, block: Block) -> bool:
        return (self.path / DONE / block.name).is_file()

    def done_blocks(self) -> frozenset[str]:
        """Names of the blocks marked finished."""
        done = self.path / DONE
        if not done.is_dir():
            return frozenset()
        return frozenset(p.name for p in done.iterdir() if not p.name.startswith("."))

    def probabilities(self, mode: str = "r") -> zarr.Array:
        return zarr.open_array(self.path / PROBABILITIES, mode=mode)

    def segmentation(self, mode: str = "r") -> zarr.Array:
        return zarr.open_array(self.path / SEGMENTATION, mode=mode)

    # -- the lock ---------------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        """The lock file, a hidden sibling of the store (it survives the store's replacement)."""
        return self.path.with_name(f".{self.path.name}.lock")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store for this process while the block is entered (:mod:`unet_core.common.lockfile`).

        Raises:
            UserInputError: another live process holds it (named, with its host and PID).
        """
        with holding(self.lock_path, owner=self.path, who="'unet predict'", what="writing this part store"):
            yield

    # -- writing ----------------------------------------------------------------------------
    def open_for_job(self, settings: dict[str, Any], tiling: Tiling, dtype: np.dtype) -> PartArrays:
        """The arrays to write, reusing the store when its settings are equal (resume).

        Call it holding :meth:`locked`. A store written with other settings is replaced by an
        empty one (atomically); anything else at the path is refused. The job is marked
        incomplete until :meth:`mark_complete`.

        Raises:
            UserInputError: something other than a part store stands at the path.
        """
        check_replaceable(self.path, PART_MARK)
        if self.complete:  # a rerun: the job is complete again only when it ends
            (self.path / COMPLETE).unlink()
        if self.settings() == settings and (self.path / SEGMENTATION / "zarr.json").is_file():
            # markers are created in place now; a killed job of an older version may have left
            # the hidden temporary of one (one listing per job, never per block)
            remove_stale_tree(self.path / DONE, max_depth=0)
            return self._arrays_to_write()
        if (self.path / MANIFEST).is_file():
            log.warning("%s: written with other settings; starting it afresh", self.path)
        with atomic_output(self.path, own=PART_MARK) as tmp:
            tmp.mkdir()
            root = zarr.open_group(tmp, mode="w")
            z, y, x = tiling.shape
            b, bz, c = tiling.block_px, tiling.block_z, tiling.spec.n_classes  # one chunk per block
            create_array(root, PROBABILITIES, shape=(c, z, y, x), dtype=dtype, chunks=(c, bz, b, b),
                         dimension_names=list("czyx"), compressors=fast_compressor())
            create_array(root, SEGMENTATION, shape=(z, y, x), dtype=np.uint8, chunks=(bz, b, b),
                         dimension_names=list("zyx"), compressors=fast_compressor())
            (tmp / DONE).mkdir()
            (tmp / MANIFEST).write_text(json.dumps(settings, indent=1, sort_keys=True))
        return self._arrays_to_write()

    def _arrays_to_write(self) -> PartArrays:
        # write_empty_chunks: store every chunk as given. zarr's default compares each chunk
        # with the fill value before encoding it (a full extra pass, about twice the cost of LZ4
        # on the uint8 probabilities) only to omit chunks a part store almost never has
        config = {"write_empty_chunks": True}
        return PartArrays(self.probabilities("r+").with_config(config), self.segmentation("r+").with_config(config))

    def mark_done(self, block: Block) -> None:
        """Record that ``block``'s chunks are written: an empty file whose existence is the record.

        Created in one step (``open(O_CREAT)``), after the block's chunks: a killed job leaves it
        whole or absent, so it needs no temporary and no rename, and costs the same whatever the
        number of markers already there (it never lists ``done/``; the temporaries of an older
        version's killed jobs are removed once per job, in :meth:`open_for_job`).
        """
        path = self.path / DONE / block.name
        try:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
        except FileNotFoundError:  # done/ deleted under a resumed store: create it again
            ensure_writable_parent(path)
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)

    def mark_complete(self, summary: dict[str, Any]) -> None:
        """Write ``COMPLETE`` with the job summary: the last thing a job does."""
        with atomic_output(self.path / COMPLETE, own=None) as tmp:
            tmp.write_text(json.dumps(summary, indent=1))


@dataclass(frozen=True)
class PartArrays:
    """A part store's arrays, open for writing blocks."""

    probabilities: zarr.Array
    segmentation: zarr.Array

    def write(self, block: Block, probabilities: np.ndarray, segmentation: np.ndarray) -> None:
        """Write one block: (C, bz, by, bx) encoded probabilities and (bz, by, bx) uint8 classes
        (bz = 1 for a 2-D model)."""
        self.probabilities[(slice(None), *block.write.to_slices())] = probabilities
        self.segmentation[block.write.to_slices()] = segmentation


@dataclass(frozen=True)
class Part:
    """A finished part store with its settings and finished blocks."""

    store: PartStore
    settings: dict[str, Any]
    done: frozenset[str]

    @property
    def path(self) -> Path:
        return self.store.path

    @property
    def job(self) -> int:
        return int(self.settings["job"])


def open_parts(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[Part], Tiling]:
    """Open and cross-check the part stores of one run: complete, same settings, jobs 0..N-1 once.

    Returns:
        The parts sorted by job, and the run's tiling.

    Raises:
        UserInputError: a missing or unfinished part, parts of different runs, a missing job
            or an unfinished block.
    """
    if not paths:
        raise UserInputError("no part stores given (pass the OUT_PART directories of all 'unet predict' jobs)")
    parts = [_open_part(PartStore(p)) for p in paths]
    _check_one_run(parts)
    parts.sort(key=lambda part: part.job)
    tiling = Tiling.from_dict(parts[0].settings["tiling"])
    jobs = parts[0].settings["jobs"]
    for part in parts:
        mine = tiling.job_blocks(part.job, jobs)
        if missing := sorted({b.name for b in mine} - part.done):
            raise UserInputError(f"{part.path}: {len(missing)} block(s) not finished (e.g. {missing[0]}); rerun its job")
        _check_arrays(part, tiling, mine)
    return parts, tiling


def _check_arrays(part: Part, tiling: Tiling, blocks: Sequence[Block]) -> None:
    """Raise unless the part's arrays have the run's shape and hold a chunk for each of its
    finished blocks: every block's chunk is written (``write_empty_chunks``), so a missing one
    is a store copied or damaged in part, which zarr would read as zeros without a word."""
    arrays = {PROBABILITIES: ((tiling.spec.n_classes, *tiling.shape), (0,)), SEGMENTATION: (tiling.shape, ())}
    for name, (shape, lead) in arrays.items():
        try:
            array = zarr.open_array(part.path / name, mode="r")
        except Exception as err:  # zarr raises several types for missing or damaged metadata
            raise UserInputError(f"{part.path}: cannot open its array {name!r} ({err}); "
                                 "rerun its job") from err
        if tuple(array.shape) != tuple(shape):
            raise UserInputError(f"{part.path}: array {name!r} has shape {tuple(array.shape)}, the run's is "
                                 f"{tuple(shape)}; rerun its job")
        for block in blocks:
            chunk = part.path / name / array.metadata.encode_chunk_key((*lead, *block.index))
            if not chunk.is_file():
                raise UserInputError(f"{chunk}: missing chunk of the finished block {block.name} (a store "
                                     "copied or damaged in part); copy it again or rerun its job")


def _open_part(store: PartStore) -> Part:
    if not (store.path / MANIFEST).is_file():
        raise UserInputError(f"{store.path}: not a 'unet predict' part store (no {MANIFEST})")
    settings = store.settings()
    found = None if settings is None else settings.get("format")
    if found in OLD_FORMATS:
        raise UserInputError(f"{store.path}: part format {found!r} written by {OLD_FORMATS[found]}; this version "
                             f"reads {PART_FORMAT!r}: rerun 'unet predict' for it")
    if found != PART_FORMAT:
        raise UserInputError(f"{store.path}: unknown part format {found!r}")
    if not store.complete:
        raise UserInputError(f"{store.path}: job {settings['job']} did not finish; rerun 'unet predict' for it")
    return Part(store, settings, store.done_blocks())


def _check_one_run(parts: list[Part]) -> None:
    ref = parts[0]
    for part in parts[1:]:
        diff = [k for k in RUN_KEYS if part.settings.get(k) != ref.settings.get(k)]
        if diff:
            raise UserInputError(f"{part.path}: from another run than {ref.path} (differs in {', '.join(diff)}); "
                                 "predict every job with the same stack, model and settings: rerun 'unet predict' "
                                 "for the part(s) of the other run (a rerun of the workflow redoes them)")
    jobs = ref.settings["jobs"]
    seen = sorted(part.job for part in parts)
    if seen != list(range(jobs)):
        missing = sorted(set(range(jobs)) - set(seen))
        dup = sorted({j for j in seen if seen.count(j) > 1})
        problems = [f"missing job(s) {missing}"] if missing else []
        problems += [f"job(s) {dup} given twice"] if dup else []
        raise UserInputError(f"parts of a {jobs}-job run: {'; '.join(problems)}; pass each job's part once")
