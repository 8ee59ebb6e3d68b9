"""Output ownership: a stage replaces only its own earlier output of the same kind.

The rule every stage follows (:func:`claim_outputs`, called with the stage's output and input
paths before any work; :func:`unet_core.common.atomic.atomic_output` checks the output again
just before it renames its temporary into place):

* an output path that equals, lies inside, or contains one of the stage's inputs is refused
  (paths compared after resolving links and ``..``);
* where nothing stands at an output path, the output is written;
* where this stage's own earlier output of the same kind stands, recognised by its *mark*
  (table below), it is replaced, atomically;
* anything else in the way (a user's file or folder, another stage's output, an output of an
  older version without the mark, a link) is refused with one line naming the path.
  The user moves it away or chooses another output path; nothing is deleted.

How each kind of output is recognised (its mark):

================================  =====================================================================
output                            mark
================================  =====================================================================
Zarr store (``ingest``,           ``zarr.json`` of the store's root: ``attributes.unet.stage`` names
``weights``, ``augment``,         the stage (and ``attributes.unet.format`` its format); the store
``merge``)                        holds only the stage's arrays and groups (its :class:`Layout`)
predict part store                ``part.json`` inside it with ``format`` = ``unet-pipeline/predict-part/2``
                                  (or ``/1``, written by earlier versions); holds only its layout
TIFF (``synth``, ``merge         the first page's ImageDescription is JSON with ``generator`` =
--tiff``)                         ``unet synth`` / ``unet merge``
JSON file (``class_weights.json``,  ``format`` = ``unet-pipeline/class-weights/1``,
``metrics.json``,                 ``unet-pipeline/metrics/1``, ``unet-pipeline/model-card/1``
``model_card.json``)
``model.pt``, ``state.pt``        PyTorch archive whose ``format`` key is ``unet-pipeline/model/1`` /
                                  ``unet-pipeline/train-state/1``
``model.ts``                      TorchScript archive holding the extra file ``unet_spec.json``
PNG figure                        PNG text chunk ``Software`` = ``unet-pipeline <stage>``
CSV table                         the stage's own header row
output folder (``train            every entry is one of the stage's files, each with its mark (an
--out-dir``, ``evaluate -o``)     empty folder holds nothing to lose)
================================  =====================================================================

An empty folder standing where a folder or Zarr store is to be written is replaced too: it
holds no data. A store that carries the mark but also holds something the stage never writes
(a user's annotation added to it, a note, a link) is not: replacing it would delete that too.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import struct
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from unet_core.common.errors import UserInputError

#: What the PNG figures carry in their ``Software`` text chunk, followed by the stage name.
PNG_SOFTWARE = "unet-pipeline"
#: Hidden temporaries of atomic outputs (see :mod:`unet_core.common.atomic`) contain this.
_TMP_MARK = ".tmp-"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Mark(ABC):
    """How one kind of output is recognised. Subclasses say what they look for."""

    #: Whether the output is a directory (a Zarr store, a part store, a folder of files).
    directory: bool = False

    @property
    @abstractmethod
    def what(self) -> str:
        """The kind of output, for messages (e.g. "an OME-Zarr store written by 'unet ingest'")."""

    @abstractmethod
    def _carries_mark(self, path: Path) -> bool:
        """Whether ``path`` (which exists) carries the mark; never raises for unreadable content."""

    def foreign_entry(self, path: Path) -> Path | None:
        """The entry inside the folder ``path`` that keeps it from being recognised although it
        carries the mark (for messages); None where there is none or the mark itself is missing."""
        return None

    def recognises(self, path: str | os.PathLike[str]) -> bool:
        """Whether the thing at ``path`` is an output of this kind that may be replaced.

        A link never is (a stage writes no output through a link, and a folder cannot be put in
        place over one); an empty directory is, where this kind is a directory.
        """
        path = Path(path)
        try:
            if path.is_symlink() or not path.exists():
                return False
            if self.directory and path.is_dir() and not any(path.iterdir()):
                return True
            return self._carries_mark(path)
        except OSError:
            return False


def _read_json(path: Path) -> object:
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read(1 << 24))
    except (OSError, ValueError):
        return None


def _is_temporary(name: str) -> bool:
    """Whether ``name`` is a hidden temporary of an atomic output (``.NAME.tmp-...``)."""
    return name.startswith(".") and _TMP_MARK in name


def _temporary_of(name: str) -> str:
    """The final name of the temporary ``name`` (see :func:`_is_temporary`)."""
    return name[1:].split(_TMP_MARK, 1)[0]


@dataclass(frozen=True)
class Layout:
    """What a stage writes inside an output folder (a Zarr store, a part store).

    ``nodes`` are the Zarr groups and arrays (their ``zarr.json``, and an array's chunks under
    ``c/``), ``files`` any other files or folders, both as paths relative to the folder whose
    '/'-separated parts are :func:`fnmatch.fnmatchcase` patterns (``""`` is the folder itself).
    Also allowed: hidden temporaries of those files left by a killed run, and Snakemake's
    ``.snakemake_timestamp`` flag of a directory output. Links are never the stage's.
    """

    nodes: tuple[str, ...]
    files: tuple[str, ...] = ()

    @staticmethod
    def _matches(rel: str, patterns: tuple[str, ...]) -> bool:
        parts = rel.split("/") if rel else []
        return any(len(parts) == len(pat) and all(map(fnmatch.fnmatchcase, parts, pat))
                   for pat in (p.split("/") if p else [] for p in patterns))

    def foreign_entry(self, root: Path) -> Path | None:
        """The first entry below ``root`` that is not the stage's (None: all of it is)."""
        todo = [root]
        while todo:
            folder = todo.pop()
            here = folder.relative_to(root).as_posix() if folder != root else ""
            for entry in sorted(folder.iterdir()):
                rel = f"{here}/{entry.name}" if here else entry.name
                name = entry.name
                if entry.is_symlink():
                    return entry
                if self._matches(rel, self.nodes) or self._matches(rel, self.files):
                    if entry.is_dir():
                        todo.append(entry)
                    elif self._matches(rel, self.nodes):  # a node is a folder
                        return entry
                    continue
                node_file = self._matches(here, self.nodes) and (
                    (name == "zarr.json" and entry.is_file()) or (name == "c" and entry.is_dir()))  # chunks
                temporary = _is_temporary(name) and self._matches(
                    f"{here}/{_temporary_of(name)}" if here else _temporary_of(name), self.files)
                if not (node_file or temporary or (rel == ".snakemake_timestamp" and entry.is_file())):
                    return entry
        return None


class _LaidOutMark(Mark):
    """A folder output recognised by a mark in one file of it (:meth:`_marked`) and, where the
    subclass gives a ``layout``, by holding nothing else than that layout allows."""

    layout: Layout | None

    @abstractmethod
    def _marked(self, path: Path) -> bool:
        """Whether ``path`` carries the mark itself, whatever else it holds."""

    def _carries_mark(self, path: Path) -> bool:
        return self._marked(path) and (self.layout is None or self.layout.foreign_entry(path) is None)

    def foreign_entry(self, path: Path) -> Path | None:
        if self.layout is None or not self._marked(path):
            return None
        return self.layout.foreign_entry(path)


@dataclass(frozen=True)
class ZarrMark(_LaidOutMark):
    """A Zarr v3 store whose root attributes hold ``unet.stage == stage`` and which holds only
    what ``layout`` allows (where given)."""

    stage: str
    layout: Layout | None = None
    directory: bool = field(default=True, init=False)

    @property
    def what(self) -> str:
        return f"a Zarr store written by 'unet {self.stage}'"

    def _marked(self, path: Path) -> bool:
        meta = _read_json(path / "zarr.json") if path.is_dir() else None
        attrs = meta.get("attributes") if isinstance(meta, dict) else None
        unet = attrs.get("unet") if isinstance(attrs, dict) else None
        return isinstance(unet, dict) and unet.get("stage") == self.stage


@dataclass(frozen=True)
class JsonMark(_LaidOutMark):
    """A JSON file (or, with ``manifest``, a folder holding that JSON file) whose ``format`` is ``format``."""

    format: str
    description: str
    manifest: str | None = None
    #: Formats of earlier versions of the same output, also replaceable (a rerun after an upgrade).
    older: tuple[str, ...] = ()
    #: With ``manifest``: everything the folder may hold (None: anything).
    layout: Layout | None = None

    @property
    def directory(self) -> bool:  # type: ignore[override]
        return self.manifest is not None

    @property
    def what(self) -> str:
        return self.description

    def _marked(self, path: Path) -> bool:
        target = path / self.manifest if self.manifest else path
        if not target.is_file():
            return False
        data = _read_json(target)
        return isinstance(data, dict) and data.get("format") in (self.format, *self.older)


@dataclass(frozen=True)
class TiffMark(Mark):
    """A TIFF whose first ImageDescription is JSON with ``generator == generator``."""

    generator: str

    @property
    def what(self) -> str:
        return f"a TIFF written by '{self.generator}'"

    def _carries_mark(self, path: Path) -> bool:
        import tifffile

        if not path.is_file():
            return False
        try:
            with tifffile.TiffFile(path) as tif:
                description = tif.pages.first.description if len(tif.pages) else ""
        except (tifffile.TiffFileError, ValueError, OSError, EOFError, struct.error, IndexError):
            return False
        try:
            data = json.loads(description)
        except ValueError:
            return False
        return isinstance(data, dict) and data.get("generator") == self.generator


@dataclass(frozen=True)
class ZipMark(Mark):
    """A zip archive (PyTorch and TorchScript files are) with a member whose name ends with
    ``member`` and, if ``contains`` is given, whose bytes contain it.

    For ``torch.save`` files the member is ``data.pkl``, the pickled top-level dict (tensors are
    separate members, so it is small) and ``contains`` the value of its ``format`` key.
    """

    member: str
    description: str
    contains: bytes | None = None

    @property
    def what(self) -> str:
        return self.description

    def _carries_mark(self, path: Path) -> bool:
        if not path.is_file():
            return False
        try:
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n == self.member or n.endswith("/" + self.member)]
                if not names:
                    return False
                if self.contains is None:
                    return True
                with archive.open(names[0]) as fh:
                    return self.contains in fh.read(1 << 24)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError):
            return False


def torch_file_mark(format: str, description: str) -> ZipMark:
    """The mark of a ``torch.save`` file whose top-level ``format`` key is ``format``."""
    return ZipMark("data.pkl", description, contains=format.encode())


@dataclass(frozen=True)
class PngMark(Mark):
    """A PNG whose ``Software`` text chunk is ``unet-pipeline <stage>`` (see :func:`png_metadata`)."""

    stage: str

    @property
    def what(self) -> str:
        return f"a PNG figure written by 'unet {self.stage}'"

    def _carries_mark(self, path: Path) -> bool:
        return path.is_file() and png_text(path).get("Software") == png_metadata(self.stage)["Software"]


def png_metadata(stage: str) -> dict[str, str]:
    """PNG text chunks of a figure written by ``stage`` (pass to matplotlib's ``savefig(metadata=...)``)."""
    return {"Software": f"{PNG_SOFTWARE} {stage}"}


def png_text(path: Path) -> dict[str, str]:
    """The ``tEXt`` chunks before the image data of a PNG file ({} if it is none)."""
    found: dict[str, str] = {}
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != _PNG_SIGNATURE:
                return found
            while True:
                head = fh.read(8)
                if len(head) < 8:
                    return found
                length, kind = struct.unpack(">I4s", head)
                if kind in (b"IDAT", b"IEND") or length > 1 << 20:
                    return found
                data = fh.read(length)
                fh.read(4)  # CRC
                if kind == b"tEXt" and b"\0" in data:
                    key, value = data.split(b"\0", 1)
                    found[key.decode("latin-1")] = value.decode("latin-1")
    except OSError:
        return found


@dataclass(frozen=True)
class CsvMark(Mark):
    """A CSV table whose header row starts with ``header``."""

    header: str
    description: str

    @property
    def what(self) -> str:
        return self.description

    def _carries_mark(self, path: Path) -> bool:
        if not path.is_file():
            return False
        with open(path, "rb") as fh:
            first = fh.readline(1 << 16).decode("utf-8", "replace").rstrip("\r\n")
        return first.startswith(self.header)


@dataclass(frozen=True)
class FolderMark(Mark):
    """A folder holding only the stage's files (by name), each carrying its own mark.

    Hidden temporaries of those files (``.NAME.tmp-...``, left by a killed run and removed by
    the next) may be there too.
    """

    files: Mapping[str, Mark]
    description: str
    directory: bool = field(default=True, init=False)

    @property
    def what(self) -> str:
        return self.description

    def _carries_mark(self, path: Path) -> bool:
        return path.is_dir() and self.foreign_entry(path) is None

    def foreign_entry(self, path: Path) -> Path | None:
        """The first entry of the folder ``path`` that keeps it from being recognised (for messages)."""
        for entry in sorted(path.iterdir()):
            name = entry.name
            if _is_temporary(name) and _temporary_of(name) in self.files:
                continue
            mark = self.files.get(name)
            if mark is None or not mark.recognises(entry):
                return entry
        return None


def not_own_message(path: Path, mark: Mark, remedy: str = "choose another output path") -> str:
    """The one-line refusal for ``path``, which stands where an output of kind ``mark`` goes;
    ``remedy`` is the second way out offered beside moving it away."""
    detail = ""
    if os.path.islink(path) and path.exists():
        return (f"{path}: output path is a link (to {os.readlink(path)}), and no stage writes through a "
                f"link; it is left untouched: give the link's target instead, or {remedy}")
    if os.path.islink(path):
        found = "a broken link"
    elif path.is_dir():
        found = "a folder"
        entry = mark.foreign_entry(path)
        detail = (f" (it holds {entry.relative_to(path).as_posix()!r}, which that stage did not write)"
                  if entry is not None else "")
    else:
        found = "a file"
    return (f"{path}: output path holds {found} that is not {mark.what}{detail}; it is left untouched: "
            f"move it away or {remedy}")


def check_replaceable(path: str | os.PathLike[str], mark: Mark,
                      remedy: str = "choose another output path") -> None:
    """Raise unless nothing stands at ``path`` or it is an output of kind ``mark``.

    Raises:
        UserInputError: something else is in the way (one line naming ``path`` and, beside
            moving it away, ``remedy``).
    """
    path = Path(path)
    if os.path.lexists(path) and not mark.recognises(path):
        raise UserInputError(not_own_message(path, mark, remedy))


def resolved_path(path: str | os.PathLike[str]) -> Path:
    """The absolute path with links resolved before each ``..``, as the file system reads it
    (``LINK/..`` is the folder above the link's target; a lexical ``..`` would drop the link).

    Raises:
        UserInputError: the path runs into a loop of symbolic links (``ln -s b a; ln -s a b``).
    """
    try:
        return Path(path).resolve(strict=False)
    except (RuntimeError, OSError) as err:  # RuntimeError before Python 3.13, OSError (ELOOP) since
        if isinstance(err, OSError) and err.errno != errno.ELOOP:
            raise
        raise UserInputError(f"{path}: a loop of symbolic links (a link that leads back to itself); "
                             "give the path of a real file or folder") from None


def claim_outputs(
    outputs: Iterable[tuple[str | os.PathLike[str] | None, Mark]],
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> None:
    """Check, before any work, that a stage may write ``outputs``.

    Args:
        outputs: (path, kind) of every output the stage will write or replace; entries whose
            path is None (an optional output not asked for) are skipped.
        inputs: every path the stage reads (None entries are skipped).

    Raises:
        UserInputError: an output equals, lies inside or contains an input or another output,
            or something other than the stage's own earlier output stands at an output path.
    """
    ins = [(p, resolved_path(p)) for p in inputs if p is not None]
    outs = [(Path(p), resolved_path(p), mark) for p, mark in outputs if p is not None]
    for i, (out, real, _) in enumerate(outs):
        for other, other_real in ins:
            if real == other_real:
                raise UserInputError(f"{out}: output path is the input {other}; choose another output path")
            if real in other_real.parents:
                raise UserInputError(
                    f"{out}: output path contains the input {other}; writing it would replace that input; "
                    "choose another output path")
            if other_real in real.parents:
                raise UserInputError(f"{out}: output path lies inside the input {other}; choose another output path")
        for other, other_real, _ in outs[i + 1:]:
            if real == other_real or real in other_real.parents or other_real in real.parents:
                raise UserInputError(f"{out}: output path overlaps the other output {other}; give each its own path")
    for out, _, mark in outs:
        check_replaceable(out, mark)
