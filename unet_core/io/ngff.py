"""OME-Zarr (NGFF 0.5, Zarr v3) adapter: the project's on-disk image format.

Layout of a stack written by ``unet ingest`` (and of a prediction written by ``unet merge``)::

    stack.ome.zarr/            group; attrs["ome"]["multiscales"], attrs["unet"] (provenance)
      0, 1, 2 ...              image pyramid, axes (z, y, x); 0 = full resolution
      labels/                  group; attrs["ome"]["labels"] = ["gt"]
        gt/                    label image group (multiscales + image-label metadata)
          0, 1 ...             integer labels, same shape/chunks as image level 0

Only this module knows the layout; stages call :func:`open_stack` and the writers below.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.codec_pipeline import BatchedCodecPipeline
from zarr.registry import register_pipeline
from zarr.storage import LocalStore

from unet_core.common.config_values import all_finite
from unet_core.common.errors import UserInputError
from unet_core.common.geometry import Box
from unet_core.common.intensity import (
    IntensityStats,
    Normalisation,
    Scaling,
    StackIntensity,
    impossible_statistics,
    slice_stats_from_attrs,
)
from unet_core.common.labels import LabelKind, binary_foreground

NGFF_VERSION = "0.5"
LABEL_NAME = "gt"


def _damaged_chunk(path: object, err: BaseException) -> UserInputError:
    """The one-line error for a chunk file that does not decode (its path named)."""
    return UserInputError(f"{path}: damaged Zarr chunk ({err}); re-create the store")


class ChunkNamingPipeline(BatchedCodecPipeline):
    """zarr's codec pipeline, except that a chunk which cannot be read into its array (a file
    cut short or overwritten by a disk or copy error) is a :class:`UserInputError` naming its
    file, wherever a stage reads a Zarr array (Dask tasks included), not a codec traceback.
    Installed for every Zarr array this process opens (zarr's ``codec_pipeline.path``)."""

    async def decode_batch(self, chunk_bytes_and_specs):  # type: ignore[no-untyped-def]
        pairs = list(chunk_bytes_and_specs)
        if self.bytes_bytes_codecs and isinstance(self.bytes_bytes_codecs[-1], BloscCodec):
            for chunk_bytes, _ in pairs:
                if chunk_bytes is not None:
                    _check_blosc_length(chunk_bytes.as_numpy_array())
        decoded = list(await super().decode_batch(pairs))
        for chunk in decoded:
            if chunk is not None:
                _check_finite(chunk.as_numpy_array())
        return decoded

    async def read_batch(self, batch_info, out, drop_axes=()) -> None:  # type: ignore[no-untyped-def]
        batch_info = list(batch_info)
        try:
            await super().read_batch(batch_info, out, drop_axes)
        except (UserInputError, OSError, MemoryError):
            raise
        except Exception as err:  # a codec or the chunk's size: the bytes are damaged
            getter = batch_info[0][0]  # zarr reads one chunk per batch (codec_pipeline.batch_size 1)
            store = getattr(getter, "store", None)
            raise _damaged_chunk(Path(store.root) / getter.path if isinstance(store, LocalStore) else getter,
                                 err) from None


def _check_blosc_length(data: np.ndarray) -> None:
    """Raise ValueError unless ``data`` (a chunk's bytes) is as long as its Blosc header says.

    Blosc stores incompressible data as a copy, and its decoder reads as many bytes as the header's
    compressed size (bytes 12-15, little-endian) from any buffer: a chunk cut short inside its data
    would decode into garbage silently."""
    if data.size < 16:
        raise ValueError(f"{data.size} bytes, shorter than a Blosc header")
    expected = int(data[12:16].view("<u4")[0])
    if expected != data.size:
        raise ValueError(f"{data.size} bytes where its Blosc header says {expected}")


def _check_finite(data: np.ndarray) -> None:
    """Raise ValueError where a decoded float chunk holds NaN or Inf: no stage writes them (ingest
    refuses them, every stage's float outputs are bounded), so they mean a store edited or damaged
    after it was written, and would pass through normalisation and the network into the results."""
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise ValueError("it holds NaN or Inf values, which no stage writes")


register_pipeline(ChunkNamingPipeline)
zarr.config.set({"codec_pipeline.path": f"{__name__}.{ChunkNamingPipeline.__qualname__}"})


def compressor() -> BloscCodec:
    """The project's compressor: Blosc/zstd level 5 with bit-shuffle."""
    return BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")


def fast_compressor() -> BloscCodec:
    """For intermediate stores read once (predict's part stores): Blosc/LZ4, several times faster
    to write than :func:`compressor` at a somewhat larger size."""
    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


def create_array(
    group: zarr.Group,
    name: str,
    *,
    shape: Sequence[int],
    dtype: Any,
    chunks: Sequence[int],
    dimension_names: Sequence[str] | None = None,
    fill_value: Any = 0,
    compressors: BloscCodec | None = None,
) -> zarr.Array:
    """Create a compressed Zarr v3 array in ``group`` (explicit dtype and chunks; the project's
    :func:`compressor` unless ``compressors`` is given)."""
    chunks = tuple(min(int(c), max(int(s), 1)) for c, s in zip(chunks, shape, strict=True))
    return group.create_array(
        name,
        shape=tuple(int(s) for s in shape),
        dtype=np.dtype(dtype),
        chunks=chunks,
        compressors=compressors or compressor(),
        fill_value=fill_value,
        dimension_names=tuple(dimension_names) if dimension_names else None,
    )


def axes_metadata(axes: str, unit: str | None) -> list[dict[str, str]]:
    """NGFF ``axes`` entries for an axis string such as ``"zyx"`` or ``"czyx"``."""
    out = []
    for a in axes:
        if a == "c":
            out.append({"name": "c", "type": "channel"})
        else:
            entry = {"name": a, "type": "space"}
            if unit:
                entry["unit"] = unit
            out.append(entry)
    return out


def pyramid_levels(shape: Sequence[int], *, min_size: int = 256, max_levels: int = 6) -> int:
    """Levels of a 2x (Y, X) pyramid until the smaller plane axis is below ``min_size``."""
    levels, y, x = 1, shape[-2], shape[-1]
    while min(y, x) // 2 >= min_size and levels < max_levels:
        y, x, levels = y // 2, x // 2, levels + 1
    return levels


def multiscales_metadata(
    axes: str, scale: Sequence[float], levels: int, *, unit: str | None, name: str
) -> dict[str, Any]:
    """The ``multiscales`` entry for ``levels`` levels, each 2x coarser in y and x."""
    datasets = []
    for level in range(levels):
        s = [float(v) for v in scale]
        s[-1] *= 2**level
        s[-2] *= 2**level
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": s}]})
    return {"name": name, "axes": axes_metadata(axes, unit), "datasets": datasets}


def downsample_plane(plane: np.ndarray, *, labels: bool) -> np.ndarray:
    """Halve the last two axes: 2x2 mean for images, top-left pick for labels (no blending).

    Integer images are rounded half up; odd trailing rows/columns are dropped.
    """
    y, x = plane.shape[-2] // 2 * 2, plane.shape[-1] // 2 * 2
    if labels:
        return plane[..., :y:2, :x:2]
    quads = (plane[..., 0:y:2, 0:x:2], plane[..., 1:y:2, 0:x:2], plane[..., 0:y:2, 1:x:2], plane[..., 1:y:2, 1:x:2])
    if plane.dtype.kind in "iub":
        if plane.dtype.itemsize <= 2:  # 8/16-bit data: 4x its range fits a 32-bit accumulator
            acc = quads[0].astype(np.int32 if plane.dtype.kind == "i" else np.uint32)
            for q in quads[1:]:
                acc += q
            acc += 2
            acc >>= 2  # floor division by 4 (arithmetic shift for signed types): rounds half up
            return acc.astype(plane.dtype)
        wide = np.int64 if plane.dtype.kind == "i" else np.uint64
        quads = tuple(q.astype(wide) for q in quads)
        # quotients and remainders by 4 separately: no overflow even for 64-bit extremes
        acc = sum(q >> 2 for q in quads) + ((sum(q & 3 for q in quads) + 2) >> 2)
        return acc.astype(plane.dtype)
    acc = quads[0].astype(np.float64)
    for q in quads[1:]:
        acc += q
    return (acc * 0.25).astype(plane.dtype)


@dataclass
class PyramidWriter:
    """The one writer of multiscale images (and label images): plane by plane or block by block.

    Create it, write level-0 data with :meth:`write_plane` (a whole plane at a leading index)
    or :meth:`write_block` (a region of a plane), in any order, then call :meth:`finish` to
    wait for the writes and store the NGFF metadata (or :meth:`close` to abandon them). Each
    write also fills every coarser level (2x2 mean for images, top-left pick for labels;
    :func:`downsample_plane`). Writes run behind the caller in a small thread pool
    (compression releases the GIL), at most ``inflight`` at a time, so reading the next plane
    overlaps with compressing the last; writes that share a chunk never run at once.

    Attributes:
        group: the multiscale group; levels are its arrays ``"0"``, ``"1"``, ...
        shape: level-0 shape; the last two axes are (Y, X).
        dtype: array dtype.
        chunks: level-0 chunk shape.
        scale: physical voxel size per axis at level 0, in ``unit``.
        levels: number of levels (0: :func:`pyramid_levels` of the shape).
        create: create the level arrays (False: open those an earlier process created with the
            same arguments, e.g. one piece of a parallel merge).
        downscale_chunks: halve the (Y, X) chunk edges with every level, so that block-aligned
            writes of ``chunks``-sized blocks fill exactly one chunk per level (merge's
            layout); the level count is then capped where the chunk edge stops being even.
            Otherwise every level has ``chunks`` (ingest's layout).
    """

    group: zarr.Group
    shape: tuple[int, ...]
    dtype: Any
    chunks: tuple[int, ...]
    scale: tuple[float, ...]
    unit: str | None = None
    axes: str = "zyx"
    labels: bool = False
    name: str = "image"
    levels: int = 0
    inflight: int = 3
    downscale_chunks: bool = False
    create: bool = True
    arrays: list[zarr.Array] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.levels = self.levels or pyramid_levels(self.shape)
        if self.downscale_chunks:
            self.levels = min(self.levels, _even_halvings(self.chunks[-2], self.chunks[-1]) + 1)
        shape = list(self.shape)
        for level in range(self.levels):
            if not self.create:  # the arrays exist (another process created them): write into them
                self.arrays.append(self.group[str(level)])
                continue
            chunks = list(self.chunks)
            if self.downscale_chunks:
                chunks[-2], chunks[-1] = chunks[-2] >> level, chunks[-1] >> level
            self.arrays.append(create_array(self.group, str(level), shape=shape, dtype=self.dtype, chunks=chunks,
                                            dimension_names=list(self.axes)))
            shape[-2] //= 2
            shape[-1] //= 2
        self._pool = ThreadPoolExecutor(max_workers=self.inflight, thread_name_prefix="zarr-write")
        self._pending: deque[Future] = deque()
        self._locks: dict[tuple, threading.Lock] = {}

    def write_plane(self, index: tuple | int, plane: np.ndarray) -> None:
        """Queue one whole plane (the last two axes) at leading index ``index`` for every level."""
        self.write_block(index, (0, 0), plane)

    def write_block(self, index: tuple | int, offset: Sequence[int], data: np.ndarray) -> None:
        """Queue ``data`` (..., y, x) at leading index ``index`` and plane offset ``offset`` (y, x).

        The offset must be a multiple of ``2**(levels - 1)`` so every level stays aligned (it
        is, for blocks on a grid of the chunk size).
        """
        index = (index,) if isinstance(index, int) else tuple(index)
        while len(self._pending) >= self.inflight:
            self._pending.popleft().result()
        lock = self._locks.setdefault(self._chunk_key(index, offset), threading.Lock())
        # downsampling runs in the pool too, overlapping the caller's reading of the next plane
        self._pending.append(self._pool.submit(self._write_levels, index, tuple(offset), data, lock))

    def flush(self) -> None:
        """Wait for every queued write (re-raising its error): the arrays are then complete."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Wait for queued writes and stop the pool (errors of abandoned writes are dropped)."""
        while self._pending:
            self._pending.popleft().exception()
        self._pool.shutdown(wait=True)

    def finish(self, extra: dict[str, Any] | None = None) -> None:
        """Wait for every queued write (re-raising its error) and store the metadata."""
        self.flush()
        self._pool.shutdown(wait=True)
        ome: dict[str, Any] = {
            "version": NGFF_VERSION,
            "multiscales": [multiscales_metadata(self.axes, self.scale, self.levels, unit=self.unit, name=self.name)],
        }
        if extra:
            ome.update(extra)
        attrs = dict(self.group.attrs)
        attrs["ome"] = ome
        self.group.attrs.update(attrs)

    def _chunk_key(self, index: tuple, offset: Sequence[int]) -> tuple:
        """Writes with one key touch the same chunks at some level and run one at a time (a chunk
        is read, modified and written back by every write into it). With ``downscale_chunks``
        a chunk-aligned block owns its chunk at every level; otherwise whole planes share the
        chunks of their leading-axis chunk row."""
        lead = tuple(i // c if isinstance(i, int) else None for i, c in zip(index, self.chunks, strict=False))
        if not self.downscale_chunks:
            return lead
        return (*lead, offset[0] // self.chunks[-2], offset[1] // self.chunks[-1])

    def _write_levels(self, index: tuple, offset: tuple[int, int], data: np.ndarray, lock: threading.Lock) -> None:
        (y0, x0) = offset
        with lock:
            for level, arr in enumerate(self.arrays):
                if level:
                    data = downsample_plane(data, labels=self.labels)
                oy, ox = y0 >> level, x0 >> level
                h, w = min(data.shape[-2], arr.shape[-2] - oy), min(data.shape[-1], arr.shape[-1] - ox)
                arr[(*index, slice(oy, oy + h), slice(ox, ox + w))] = data[..., :h, :w]


def _even_halvings(*edges: int) -> int:
    """How often every edge can be halved and stay an integer."""
    k = 0
    while all(e % (2 << k) == 0 for e in edges):
        k += 1
    return k


def direct_chunk_reader(array: zarr.Array) -> Callable[[tuple[int, ...]], np.ndarray] | None:
    """``chunk key -> whole decoded chunk`` for arrays laid out as this project writes them (Zarr
    v3 in a local store, regular chunks, codecs ``bytes`` + Blosc, no sharding); None for any other.

    Why: zarr's read path costs about 1 ms of Python per chunk (event loop, indexing, buffer
    objects; under the GIL), four times the Blosc decode of a 512² uint16 chunk. Here a chunk is
    one file read and one call of the numcodecs Blosc decoder zarr itself uses (it releases the
    GIL). A chunk without a file holds the fill value, as zarr reads it.
    """
    try:
        meta, store = array.metadata, array.store_path.store
        codecs = tuple(meta.codecs)
        ok = (meta.zarr_format == 3 and isinstance(store, LocalStore) and isinstance(meta.chunk_grid, RegularChunkGrid)
              and len(codecs) == 2 and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], BloscCodec))
    except AttributeError:  # metadata of another kind or zarr version: zarr's own read path
        return None
    if not ok:
        return None
    from numcodecs import blosc

    folder = Path(store.root) / array.store_path.path
    shape, fill = tuple(int(c) for c in array.chunks), array.fill_value
    big = codecs[0].endian is not None and codecs[0].endian.value == "big"
    stored = array.dtype.newbyteorder(">" if big else "<")

    def read(key: tuple[int, ...]) -> np.ndarray:
        path = folder / meta.encode_chunk_key(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return np.full(shape, fill, array.dtype)
        try:
            _check_blosc_length(np.frombuffer(raw, np.uint8))
            data = np.frombuffer(blosc.decompress(raw), stored).reshape(shape).astype(array.dtype, copy=False)
            _check_finite(data)
        except (RuntimeError, ValueError) as err:  # not a Blosc frame, not the chunk's size, NaN
            raise _damaged_chunk(path, err) from None
        return data

    return read


class ChunkCache:
    """Reads boxes of a Zarr array through a cache of decoded chunks (least recently used dropped first).

    Blocks read with a halo overlap their neighbours' chunks: a 2048-px block with a 92-px halo
    over 512-px chunks decodes a ring of 20 chunks around its 16, 2.25x its own pixels. Read in
    raster order through this cache, each chunk is decoded about once. Chunks of the project's own
    layout are read by :func:`direct_chunk_reader`, others through zarr. Thread-safe.

    Args:
        array: a (Z, Y, X) Zarr array.
        max_chunks: chunks kept (e.g. a block row's worth, so the next row finds its halo).
    """

    def __init__(self, array: zarr.Array, max_chunks: int) -> None:
        self.array, self.max_chunks = array, max(1, int(max_chunks))
        self.chunks = tuple(int(c) for c in array.chunks)
        self._cache: dict[tuple[int, ...], np.ndarray] = {}
        self._lock = threading.Lock()
        self._direct = direct_chunk_reader(array)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    def _chunk(self, key: tuple[int, ...]) -> np.ndarray:
        with self._lock:
            hit = self._cache.pop(key, None)
            if hit is not None:
                self._cache[key] = hit  # most recently used last
                return hit
        box = Box(tuple(k * c for k, c in zip(key, self.chunks)), self.chunks).intersect(Box.from_shape(self.shape))
        if self._direct is not None:  # the stored chunk is whole: crop an edge chunk to the array
            data = self._direct(key)[tuple(slice(0, n) for n in box.shape)]
        else:
            data = np.asarray(self.array[box.to_slices()])
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self.max_chunks:
                self._cache.pop(next(iter(self._cache)))
        return data

    def read_into(self, index: tuple[slice, ...], out: np.ndarray) -> None:
        """Copy the box of step-1 slices ``index`` (one per axis, within the array) into ``out``
        (an array of the box's shape, e.g. a view into a larger buffer): no intermediate copy."""
        box = Box(tuple(s.start for s in index), tuple(s.stop - s.start for s in index))
        first = [o // c for o, c in zip(box.offset, self.chunks)]
        last = [(e - 1) // c for e, c in zip(box.end, self.chunks)]
        for key in product(*(range(a, b + 1) for a, b in zip(first, last))):
            chunk_box = Box(tuple(k * c for k, c in zip(key, self.chunks)), self.chunks)
            part = chunk_box.intersect(box)
            out[part.relative_to(box).to_slices()] = self._chunk(key)[part.relative_to(chunk_box).to_slices()]

    def __getitem__(self, index: tuple) -> np.ndarray:
        """``cache[z, ys, xs]`` with step-1 slices (an integer z drops that axis)."""
        z, ys, xs = index
        zs = slice(z, z + 1) if isinstance(z, (int, np.integer)) else z
        out = np.empty((zs.stop - zs.start, ys.stop - ys.start, xs.stop - xs.start), self.dtype)
        self.read_into((zs, ys, xs), out)
        return out[0] if zs is not z else out


def open_group(path: str | os.PathLike[str], *, hint: str) -> zarr.Group:
    """Open a Zarr group for reading, or raise one line naming the path and what to do.

    Args:
        hint: what the caller expected, e.g. "run 'unet ingest' first".

    Raises:
        UserInputError: no ``zarr.json`` there, or metadata zarr cannot read.
    """
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise UserInputError(f"{path}: not a Zarr store ({hint})")
    try:
        return zarr.open_group(path, mode="r")
    except Exception as err:  # zarr raises several types for damaged metadata
        raise UserInputError(f"{path}: cannot open Zarr group ({err})") from err


def label_group(root: zarr.Group, name: str = LABEL_NAME) -> zarr.Group:
    """Create ``labels/<name>`` under an image group and register it in ``labels``."""
    labels = root.require_group("labels")
    existing = list(dict(labels.attrs).get("ome", {}).get("labels", []))
    if name not in existing:
        existing.append(name)
    labels.attrs.update({"ome": {"version": NGFF_VERSION, "labels": existing}})
    return labels.create_group(name)


IMAGE_LABEL = {"image-label": {"version": NGFF_VERSION, "source": {"image": "../../"}}}


@dataclass
class Stack:
    """An ingested stack opened for reading (arrays are lazy Zarr arrays).

    Attributes:
        path: the ``.ome.zarr`` directory.
        image: (Z, Y, X) raw grey values at full resolution.
        labels: (Z, Y, X) integer ground truth, or None.
        label_kind: :class:`LabelKind` (parsed once, here): ``instance`` (0 = background, every
            other value one object), ``binary`` (two values; the larger one is foreground) or None.
        intensity: mean/std of the raw grey values over the whole stack.
        scale: physical size of a voxel per axis (z, y, x), in ``unit``.
        unit: NGFF unit name or None.
        attrs: the ``unet`` provenance attributes.
    """

    path: Path
    image: zarr.Array
    labels: zarr.Array | None
    label_kind: LabelKind | None
    intensity: IntensityStats
    scale: tuple[float, ...]
    unit: str | None
    attrs: dict[str, Any]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape)

    def binary_foreground(self, slices: Sequence[int] | None = None) -> int | None:
        """The value meaning cell interior of binary labels (None for other labels): ingest's record
        ``foreground_value``; for stacks ingested before it, the same rule
        (:func:`unet_core.common.labels.binary_foreground`) on the values ingest saw, or on those of
        ``slices`` (None: all) where it saw too many.

        Raises:
            UserInputError: labels marked binary holding more than two values.
        """
        if self.label_kind is not LabelKind.BINARY:
            return None
        if "foreground_value" in self.attrs:
            return int(self.attrs["foreground_value"])
        values = {int(v) for v in self.attrs.get("label_values_seen") or ()}
        if not values:
            for z in range(self.shape[0]) if slices is None else slices:
                values.update(int(v) for v in np.unique(np.asarray(self.labels[z])))
                if len(values) > 2:
                    break
        try:
            return binary_foreground(values)
        except ValueError as err:
            raise UserInputError(f"{self.path}: labels are marked binary but {err}; re-ingest with "
                                 "--label-kind instance") from None

    @property
    def voxel_size_given(self) -> bool:
        """Whether ingest was given the voxel size (by the file's metadata or ``--voxel-size-um``);
        False where 1 µm stood in for an axis the file left out, and for stacks ingested before
        ingest recorded it (unknown). The 3-D stages refuse a stack without it: their distances,
        sizes and the anisotropy of the network are in µm."""
        return self.attrs.get("voxel_size_given") is True

    def volume_voxel_size(self, *, needs: str) -> tuple[float, float, float]:
        """The voxel size (dz, dy, dx), µm, of this stack used as a volume by a 3-D mode (``needs``:
        what uses it, for the message, e.g. ``"--dims 3"``) — the one check every 3-D stage makes.

        Raises:
            UserInputError: a single slice (no z to convolve or to join cells along), or a voxel
                size ingest was not given (:attr:`voxel_size_given`: the 1 µm that stood in would be
                taken for the z spacing).
        """
        if self.shape[0] < 2:
            raise UserInputError(f"{self.path}: a single slice ({'x'.join(map(str, self.shape))}); {needs} needs a "
                                 "volume of several slices (use a 2-D mode for single slices)")
        if not self.voxel_size_given:
            raise UserInputError(f"{self.path}: its voxel size was not given at ingest (1 µm stood in, or the stack "
                                 f"predates the record); {needs} measures in µm: ingest it again with "
                                 "--voxel-size-um z,y,x (or from a TIFF that records it)")
        return tuple(float(v) for v in self.scale)  # type: ignore[return-value]

    @property
    def name(self) -> str:
        """The sample's name for titles: ingest's ``--name`` (the workflow's sample), else the
        folder holding the store, else the store's own name."""
        given = self.attrs.get("name")
        if given:
            return str(given)
        in_folder = self.path.name == "stack.ome.zarr" and self.path.parent.name
        return self.path.parent.name if in_folder else self.path.name

    @property
    def intensities(self) -> StackIntensity:
        """The stack's and each slice's intensity statistics (per slice: None if ingested before
        they were stored)."""
        stored = self.attrs.get("slice_intensity")
        try:
            slices = tuple(slice_stats_from_attrs(stored)) if stored else None
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise UserInputError(f"{self.path}: damaged per-slice intensity records ({err}); "
                                 "ingest it again") from None
        if slices is not None and not all(all_finite(*vars(s).values()) for s in slices):
            raise UserInputError(f"{self.path}: per-slice intensity records hold NaN, Inf or text; "
                                 "ingest it again")
        if slices is not None and len(slices) != self.shape[0]:
            raise UserInputError(f"{self.path}: {len(slices)} per-slice intensity records for "
                                 f"{self.shape[0]} slices; ingest it again")
        if slices is not None:  # finite but no data's: the probabilities collapsed silently
            for z, s in enumerate(slices):
                if why := impossible_statistics(s.mean, s.std, s.minimum, s.maximum, (s.low, s.high)):
                    raise UserInputError(f"{self.path}: per-slice intensity records of slice {z} are impossible "
                                         f"({why}); ingest it again")
            low, high = min(s.minimum for s in slices), max(s.maximum for s in slices)
            if why := impossible_statistics(self.intensity.mean, self.intensity.std, low, high):
                raise UserInputError(f"{self.path}: intensity statistics (mean {self.intensity.mean}, std "
                                     f"{self.intensity.std}) are impossible ({why}); ingest it again")
        return StackIntensity(self.intensity, slices, str(self.path))

    def check_made_from(self, recorded: Any, *, result: str | os.PathLike[str]) -> None:
        """Raise unless ``recorded``, the intensity statistics a result (a part store, a prediction)
        copied from the stack it was made from, are this stack's: another stack of the same shape
        (another sample, ISBI's test volume for its training volume) is not accepted in its place.

        Raises:
            UserInputError: they differ (None, a result written before they were recorded, passes).
        """
        if recorded is not None and recorded != self.intensity.to_dict():
            raise UserInputError(
                f"{result}: made from another stack than {self.path} (intensity statistics {recorded} there, "
                f"{self.intensity.to_dict()} here); pass the stack it was made from")

    def scaler(self, mode: Normalisation | str) -> Callable[[int], Scaling]:
        """``z -> Scaling``: the normalisation of each slice under ``mode``
        (:meth:`unet_core.common.intensity.StackIntensity.scaler`)."""
        return self.intensities.scaler(Normalisation(mode))  # a mode by name enters here (API, tests)


def recorded_intensity(attrs: Mapping[str, Any]) -> Any:
    """The stack intensity statistics a store made from a stack (a prediction, a weights store)
    recorded in its ``attrs["unet"]["intensity"]``, for :meth:`Stack.check_made_from` (None: none)."""
    unet = attrs.get("unet")
    return unet.get("intensity") if isinstance(unet, Mapping) else None


def _label_kind(path: Path, value: Any, *, required: bool) -> LabelKind | None:
    """A stack's label kind, parsed once where it is read; an unknown one is refused where the labels
    are needed (None otherwise)."""
    try:
        return LabelKind(value)
    except ValueError:
        if not required:
            return None
        raise UserInputError(f"{path}: label kind {value!r} in attrs['unet'] is not one of "
                             f"{', '.join(k.value for k in LabelKind)}; re-ingest with --label-kind") from None


def open_stack(path: str | os.PathLike[str], *, require_labels: bool = False) -> Stack:
    """Open a stack written by ``unet ingest``.

    Raises:
        UserInputError: missing store, not a unet-pipeline stack, or labels required but absent.
    """
    path = Path(path)
    root = open_group(path, hint="run 'unet ingest' first")
    attrs = dict(root.attrs)
    unet = attrs.get("unet", {})
    if "0" not in root or "intensity" not in unet:
        raise UserInputError(f"{path}: not a stack written by 'unet ingest' (missing image or attributes)")
    image = root["0"]
    labels = None
    label_kind = None
    if "labels" in root and LABEL_NAME in root["labels"]:
        labels = root["labels"][LABEL_NAME]["0"]
        label_kind = _label_kind(path, unet.get("label_kind"), required=require_labels)
    if require_labels and labels is None:
        raise UserInputError(f"{path}: has no ground-truth labels (ingest it with --labels)")
    if not isinstance(image, zarr.Array) or image.ndim != 3 or min(image.shape) < 1:
        raise UserInputError(f"{path}: image '0' of shape {getattr(image, 'shape', None)} is not a non-empty "
                             "(Z, Y, X) volume; ingest it again")
    if labels is not None and (not isinstance(labels, zarr.Array) or labels.shape != image.shape):
        raise UserInputError(f"{path}: labels {getattr(labels, 'shape', None)} and image {image.shape} "
                             "differ in shape; re-ingest with matching stacks")
    try:
        ms = attrs["ome"]["multiscales"][0]
        scale = tuple(float(v) for v in ms["datasets"][0]["coordinateTransformations"][0]["scale"])
        unit = ms["axes"][-1].get("unit")
        intensity = IntensityStats.from_dict(unet["intensity"])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        raise UserInputError(f"{path}: damaged stack attributes ({type(err).__name__}: {err}); "
                             "ingest it again") from None
    if len(scale) != 3 or not all_finite(*scale) or min(scale) <= 0:
        raise UserInputError(f"{path}: voxel size {scale} is not three finite sizes > 0; ingest it again")
    if not all_finite(intensity.mean, intensity.std) or intensity.std < 0:
        raise UserInputError(f"{path}: intensity statistics (mean {intensity.mean}, std {intensity.std}) "
                             "are not finite numbers with std >= 0; ingest it again")
    return Stack(path, image, labels, label_kind, intensity, scale, unit, unet)

