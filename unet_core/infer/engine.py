"""The overlap-tile engine: one block of a stack in, its class probabilities out, on one device.

The same torch code runs on a GPU and on the CPU (the CPU path is the one the exactness tests
cover), so there is one engine, not a GPU twin. Per block::

    host    read the block's read box, mirrored beyond the image borders as it is assembled
            from the stack's chunks, in its stored dtype                       (reader thread)
            upload it once (GPU: through a reused pinned buffer)
    device  cut the tiles as strided windows of the block (no per-tile host copies);
            test-time transforms; cast and normalise each tile as it is copied out; the
            network in channels-last layout (bf16 autocast on a GPU, float32 on the CPU); decision
            offsets; softmax in float32; undo the transforms; stitch (sum over the transforms,
            then / n); argmax segmentation from the full-precision probabilities; encode. Two
            classes without test-time transforms (the usual case) finish each tile while it is in
            cache: logit margin, argmax, encoded probabilities, with no block-sized float array
    host    download only the encoded probabilities and the segmentation (GPU: on a stream
            of its own, overlapping the next passes); the writer threads wait for it

No step waits for the device inside a block: the host waits only when a block's compact
result is written. :func:`run_blocks` overlaps reading and uploading the next blocks,
computing this one and writing the previous ones.

Network passes are filled across blocks and slices (:class:`TileBatcher`): a block's tiles join
a queue per tile shape, and a pass runs whenever a queue holds ``batch`` tiles, so small images
(one tile per block) reach the batch size too. Every pass has exactly ``batch`` rows (a partial
one is padded with zero tiles): convolution kernels choose their algorithm by batch size, and
a tile computed in a pass of another size could differ in its last bits. With fixed-size passes
a tile's bytes do not depend on which other tiles share its pass, so the output is the same for
any split into jobs, any block order and a resumed job (measured on the CPU: a sample's bits
differ between batch 1 and >= 2, not between batch sizes >= 2 or positions in the batch).

Where tiles start and what they read is :mod:`unet_core.infer.tiling`'s decision; this
module only executes it.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from unet_core.common.device import out_of_gpu_memory
from unet_core.common.geometry import Box
from unet_core.common.intensity import IntensityStats, Scaling
from unet_core.common.memory import reuse_freed_memory
from unet_core.common.mirror import mirror_index, read_mirrored
from unet_core.common.precision import Precision
from unet_core.common.progress import progress
from unet_core.infer.encoding import ProbabilityEncoding
from unet_core.infer.tiling import TTA, Block, Dihedral, Tiling, output_offsets, tile_read_box, transforms
from unet_core.io.ngff import ChunkCache

#: Stored dtypes torch can hold but barely compute with (on the CPU not even flip them) are staged
#: as their signed twins on every device, and widened and reinterpreted as tiles are cut.
_SIGNED_TWIN = {np.dtype(np.uint16): (np.int16, 0xFFFF), np.dtype(np.uint32): (np.int32, 0xFFFFFFFF)}


@dataclass(frozen=True)
class StagedBlock:
    """A block's raw input, on the device, with where it lies.

    Attributes:
        block: the block.
        read: (Y, X) box the block's tiles read (image coordinates; may extend past the image);
            (Z, Y, X) for a 3-D network.
        raw: (Y, X) the pixels of ``read`` on the device, mirrored beyond the image borders, as
            stored (unsigned 16/32-bit values as their signed twins, :data:`_SIGNED_TWIN`; uint64
            as float64). For a 3-D network (Z, Y, X) float32, already normalised: each slice with
            its own :class:`Scaling` (``dtype`` is then float32).
        dtype: the stored numpy dtype.
    """

    block: Block
    read: Box
    raw: torch.Tensor
    dtype: np.dtype


@dataclass(frozen=True)
class BlockResult:
    """A block's compact result on the host: (C, 1, by, bx) encoded probabilities, (1, by, bx)
    uint8 argmax classes, and a function to call once both are written (frees their buffer)."""

    block: Block
    probabilities: np.ndarray
    segmentation: np.ndarray
    release: Callable[[], None]


#: (transform, the tile's position in the block's tile grid: (row, column), or (z, row, column)).
TileItem = tuple[Dihedral, tuple[int, ...]]


@dataclass(eq=False)
class BlockWork:
    """A staged block's tile passes, in progress (:class:`TileBatcher` runs them).

    Attributes:
        staged: the block's raw input on the device.
        net: the network its tiles run through (the full network or its two-class margin).
        groups: ``(tile shape in the network's frame, items)`` in the order they must run (the
            transforms of a tile are summed in this order: :func:`_work_by_shape`).
        windows: per transform, the (ny', nx', in_y, in_x) strided tile windows of the block
            (3-D: (nz', ny', nx', in_z, in_y, in_x)).
        tile: (sy, sx) write size of a tile, px ((sz, sy, sx) for a 3-D network).
        put: ``put(transform, (C, ty, tx) output in the block's frame, (ys, xs) of the tile in the
            block's tile grid)``, called once per item, in item order (3-D: (C, tz, ty, tx), (zs, ys, xs)).
        finish: the block's result, once every item is put.
        group: index of the group now queued; ``left``: its items not yet put.
    """

    staged: StagedBlock
    net: Callable[[torch.Tensor], torch.Tensor]
    groups: list[tuple[tuple[int, ...], list[TileItem]]]
    windows: dict[Dihedral, torch.Tensor]
    tile: tuple[int, ...]
    put: Callable[[Dihedral, torch.Tensor, tuple[slice, ...]], None]
    finish: Callable[[], Any]
    group: int = 0
    left: int = 0


class TileBatcher:
    """Network passes of exactly ``engine.batch`` tiles, filled across blocks and slices.

    A block's current group of tiles joins the queue of its (network, tile shape); a pass runs
    as soon as a queue holds ``batch`` tiles (:meth:`add`), and :meth:`flush` runs the rest,
    oldest queue first, as passes padded with zero tiles. A block's next group is queued only
    when its previous one has run, so every tile sums its transforms in the fixed order whatever
    the other blocks are. ``done(work)`` is called once per block, when its last tile is put.
    """

    def __init__(self, engine: Engine, done: Callable[[BlockWork], None]) -> None:
        self.engine, self.done = engine, done
        self._queues: dict[tuple[Any, tuple[int, int]], deque[tuple[int, BlockWork, TileItem]]] = {}
        self._order = itertools.count()  # entry order: flush runs the queue with the oldest tile first

    def add(self, work: BlockWork) -> None:
        """Queue ``work``'s tiles and run every pass that is full."""
        self._enter(work)
        self._run(full_only=True)

    def flush(self) -> None:
        """Run every queued tile (the last pass of each queue padded) and finish their blocks."""
        self._run(full_only=False)

    def _enter(self, work: BlockWork) -> None:
        shape, items = work.groups[work.group]
        work.left = len(items)
        order = next(self._order)
        self._queues.setdefault((work.net, shape), deque()).extend((order, work, item) for item in items)

    def _run(self, *, full_only: bool) -> None:
        batch = self.engine.batch
        while True:
            ready = [(q[0][0], key) for key, q in self._queues.items() if len(q) >= (batch if full_only else 1)]
            if not ready:
                return
            key = min(ready)[1]
            queued = self._queues[key]
            self._pass(key, [queued.popleft() for _ in range(min(batch, len(queued)))])

    def _pass(self, key: tuple[Any, tuple[int, int]], chunk: list[tuple[int, BlockWork, TileItem]]) -> None:
        """One network pass over ``chunk``'s tiles; each output to its block, in chunk order."""
        net, shape = key
        x = self.engine._network_input([(w.staged, _forward(tr, w.windows[tr][at])) for _, w, (tr, at) in chunk])
        out = self.engine._network(x, shape, net)
        for (_, work, (tr, at)), tile_out in zip(chunk, out[: len(chunk)], strict=True):
            work.put(tr, _inverse(tr, tile_out), tuple(slice(k * n, (k + 1) * n) for k, n in zip(at, work.tile)))
            work.left -= 1
            if work.left == 0:
                work.group += 1
                if work.group < len(work.groups):
                    self._enter(work)
                else:
                    self.done(work)


class _PinnedPool:
    """Reusable page-locked host buffers (GPU transfers); acquire blocks until one is free."""

    def __init__(self, count: int) -> None:
        self._free: queue.Queue[torch.Tensor | None] = queue.Queue()
        for _ in range(count):
            self._free.put(None)  # allocated on first use, at the size then needed

    def acquire(self, nbytes: int) -> torch.Tensor:
        buf = self._free.get()
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return buf

    def release(self, buf: torch.Tensor) -> None:
        self._free.put(buf)


class Engine:
    """Overlap-tile prediction of the blocks of one stack with one model on one device.

    Args:
        model: a U-Net with a ``spec`` (valid or same padding); put in eval mode on ``device``.
        tiling: block and tile layout of the stack (its ``spec`` is the model's).
        stats: the normalisation of each slice: a function ``z -> Scaling`` (per-slice modes,
            :meth:`unet_core.io.ngff.Stack.scaler`), or one :class:`Scaling` or
            :class:`IntensityStats` (its z-score) for every slice; never per tile.
        device: where to compute.
        precision: ``fp32`` or a bf16/fp16 autocast (resolve it first: on the CPU only native bf16).
        batch: tiles per network pass, filled across blocks (:class:`TileBatcher`; a partial
            pass is padded to this size).
        tta: test-time transforms to average (probabilities only).
        offsets: (C,) decision logit offsets added before the softmax, or None.
        encoding: storage dtype of the probabilities.
        writers: threads writing results (and download buffers in flight on a GPU).
        channels_last: None (a model of the engine's own: put in eval mode on ``device``, in
            the channels-last layout, which is faster on both devices: on the CPU oneDNN then
            skips the NCHW<->blocked reorders around every convolution, measured 25-40 % less
            forward time and no per-shape reorder JIT); True/False: the caller's model, already
            placed and in the mode it wants (validation during training), fed in that layout.
        compile: run the network through ``torch.compile`` (static shapes: one graph per tile
            shape, as every pass has the batch size; compiled on first use, tens of seconds). The
            probabilities equal the eager ones up to float rounding; whether it is faster is
            measured by ``benchmarks/gpu_check.py``, not assumed.
    """

    def __init__(
        self, model: torch.nn.Module, tiling: Tiling, *,
        stats: IntensityStats | Scaling | Callable[[int], Scaling], device: torch.device,
        precision: Precision = Precision.FP32, batch: int = 1, tta: TTA | str = TTA.NONE,
        offsets: Sequence[float] | None = None, encoding: ProbabilityEncoding = ProbabilityEncoding.FLOAT32,
        writers: int = 1, channels_last: bool | None = None, compile: bool = False,
    ) -> None:
        if tiling.spec != model.spec:
            raise ValueError(f"tiling is for {tiling.spec}, the model is {model.spec}")
        self.tiling, self.spec, self.device = tiling, tiling.spec, device
        self.scaling = _per_slice(stats)
        self.precision, self.batch = Precision(precision), int(batch)
        self.tta, self.encoding = TTA(tta), ProbabilityEncoding(encoding)
        self.cuda = device.type == "cuda"
        if self.cuda and device.index is not None:
            torch.cuda.set_device(device)  # this thread's kernels and events go to the job's GPU
        self.channels_last = True if channels_last is None else channels_last
        self._layout = torch.channels_last if self.spec.dims == 2 else torch.channels_last_3d
        self.model = model
        if channels_last is None:  # a model of its own: move and lay it out; else the caller's model as it is
            self.model = model.eval().to(device).to(memory_format=self._layout)
        self.compile = bool(compile)
        self._net = torch.compile(self.model, dynamic=False) if self.compile else self.model
        margin = _margin_network(self.model)
        self._margin_net = torch.compile(margin, dynamic=False) if self.compile else margin
        self.offsets = None if offsets is None else torch.as_tensor(
            np.asarray(offsets, np.float32), device=device).view(1, -1, *(1,) * self.spec.dims)
        self.writers = max(1, int(writers))
        self._uploads = _PinnedPool(2) if self.cuda else None
        self._downloads = _PinnedPool(self.writers + 1) if self.cuda else None
        self._upload_stream = torch.cuda.Stream(device) if self.cuda else None
        self._download_stream = torch.cuda.Stream(device) if self.cuda else None
        self._cache: ChunkCache | None = None
        self._cache_lock = threading.Lock()

    # -- host -> device ------------------------------------------------------------------------
    def stage(self, image: Any, block: Block) -> StagedBlock:
        """Read ``block``'s read box from the (Z, Y, X) ``image``, mirrored beyond its borders, and
        put it on the device (thread-safe: the reader threads call it).

        The mirroring happens here, as the block is assembled from the stack's chunks
        (:func:`unet_core.common.mirror.read_mirrored` writes the in-bounds part into place and
        copies the borders from it): no second pass over the block.
        """
        read = self.tiling.block_read(block, self.tta)
        if self.tiling.volumes:
            return StagedBlock(block, read, self._upload(self._normalised_volume(image, read)), np.dtype(np.float32))
        z = block.write.offset[0]
        raw = read_mirrored(self._reader(image), (z, *read.offset), (z + 1, *read.end))[0]
        dtype = raw.dtype
        if dtype in _SIGNED_TWIN:  # CPU and GPU alike: test-time flips of the block need it on the CPU
            raw = raw.view(_SIGNED_TWIN[dtype][0])
        elif dtype == np.uint64:
            raw = raw.astype(np.float64)  # no signed twin holds it; exact below 2**53
        return StagedBlock(block, read, self._upload(raw), dtype)

    def _normalised_volume(self, image: Any, read: Box) -> np.ndarray:
        """(Z, Y, X) float32 of the 3-D ``read`` box, mirrored beyond the stack's borders, each slice
        normalised with its own :class:`Scaling` (that of the slice it mirrors) in the float32
        arithmetic of :func:`unet_core.common.intensity.normalize`."""
        raw = read_mirrored(self._reader(image), read.offset, read.end)
        out = raw.astype(np.float32)
        sources = mirror_index(np.arange(read.offset[0], read.end[0]), image.shape[0])
        for plane, z in zip(out, sources):
            scaling = self.scaling(int(z))
            plane -= np.float32(scaling.offset)
            plane /= np.float32(scaling.scale)
        return out

    def _reader(self, image: Any) -> Any:
        """``image`` itself, or for a Zarr array one :class:`ChunkCache` over it holding a block
        row's chunks plus the halo ring (each chunk is decoded about once in raster order)."""
        if not isinstance(image, zarr.Array):
            return image
        with self._cache_lock:
            if self._cache is None or self._cache.array is not image:
                cz, cy, cx = image.chunks
                halo = self.spec.context + 2 * self.spec.stride  # generous: reads grow by margins and TTA
                rows = -(-(self.tiling.block_px + 2 * halo) // cy) + 1
                cols = -(-image.shape[2] // cx) + 2
                layers = 1
                if self.tiling.volumes:  # a block's slices and their z halo
                    z = self.spec.z_axis
                    layers = -(-(self.tiling.block_z + 2 * (z.context + 2 * z.stride)) // cz) + 1
                self._cache = ChunkCache(image, max_chunks=rows * cols * layers)
            return self._cache

    def _upload(self, raw: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(raw)
        if not self.cuda:
            return host
        buf = self._uploads.acquire(raw.nbytes)
        try:
            pinned = buf[: raw.nbytes].view(host.dtype).view(host.shape)
            pinned.copy_(host)
            with torch.cuda.stream(self._upload_stream):
                dev = pinned.to(self.device, non_blocking=True)
            self._upload_stream.synchronize()  # the buffer may be reused once the copy is done
        finally:
            self._uploads.release(buf)
        return dev

    # -- on the device ---------------------------------------------------------------------
    def _network_input(self, rows: Sequence[tuple[StagedBlock, torch.Tensor]]) -> torch.Tensor:
        """(batch, 1, ty, tx) float32 network input: row k from the tile window of ``rows[k]``'s
        staged block, cast as it is copied out and normalised with its slice's :class:`Scaling` in
        the float32 arithmetic of :func:`unet_core.common.intensity.normalize`; rows past
        ``rows`` (a partial pass) are zeros, so every pass has the engine's batch size."""
        first = rows[0][1]
        x = torch.empty((max(self.batch, len(rows)), 1, *first.shape), dtype=torch.float32, device=first.device)
        for k, (staged, window) in enumerate(rows):
            if self.tiling.volumes:  # staged normalised, slice by slice
                x[k, 0].copy_(window)
                continue
            twin = _SIGNED_TWIN.get(staged.dtype)
            if twin:  # staged as the signed twin: widen, then drop the sign extension
                window = window.to(torch.int64 if staged.dtype == np.uint32 else torch.int32) & twin[1]
            x[k, 0].copy_(window)
            scaling = self.scaling(staged.block.write.offset[0])
            x[k].sub_(np.float32(scaling.offset)).div_(np.float32(scaling.scale))
        x[len(rows):].zero_()
        return x

    def block_output(self, staged: StagedBlock, *, logits: bool = False) -> torch.Tensor:
        """(C, by, bx) float32 of the staged block alone: probabilities averaged over the test-time
        transforms, or (``logits=True``, no transforms, no offsets) the raw network logits."""
        return self._alone(self._output_work(staged, logits=logits))

    def block_two_class(self, staged: StagedBlock) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored (2, by, bx) probabilities, (by, bx) uint8 argmax classes) of the staged block
        alone, for a two-class model without test-time transforms (:meth:`_two_class_work`)."""
        return self._alone(self._two_class_work(staged))

    def block_work(self, staged: StagedBlock) -> BlockWork:
        """The tile passes of :meth:`predict` for ``staged``; ``finish()`` gives (stored
        probabilities, uint8 argmax classes): the two-class tile path where it applies, else
        the averaged probabilities, encoded."""
        if self.spec.n_classes == 2 and self.tta is TTA.NONE:
            return self._two_class_work(staged)
        return self._output_work(staged, encode=True)

    def _output_work(self, staged: StagedBlock, *, logits: bool = False, encode: bool = False) -> BlockWork:
        """Passes of the full network; ``finish()``: the (C, by, bx) float32 probabilities averaged
        over the transforms (or the logits, see :meth:`block_output`), or with ``encode`` their
        :meth:`encode`."""
        trs = (Dihedral(),) if logits else transforms(self.tta)
        canvas = torch.empty((self.spec.n_classes, *self._canvas_shape(staged.block)), dtype=torch.float32,
                             device=staged.raw.device)

        def put(tr: Dihedral, tile_out: torch.Tensor, where: tuple[slice, ...]) -> None:
            target = canvas[(slice(None), *where)]
            if logits:
                target.copy_(tile_out)
            else:  # every tile is written once per transform, the first transform first: set, then add
                class_probabilities(tile_out, self.offsets, out=target, add=tr != trs[0],
                                    tails=self.encoding is not ProbabilityEncoding.UINT8)

        def finish() -> Any:
            if len(trs) > 1:
                canvas.div_(np.float32(len(trs)))
            probs = _crop(canvas, self.tiling.region(staged.block))
            return self.encode(probs) if encode else probs

        return self._work(staged, trs, put, finish, self._net)

    def _two_class_work(self, staged: StagedBlock) -> BlockWork:
        """Passes of a two-class model without test-time transforms, each tile finished while its
        output is in cache; ``finish()``: (stored (2, by, bx) probabilities, (by, bx) uint8 classes).

        Everything follows from the logit margin d = (l1 - l0) + (o1 - o0), which the network
        computes as one output channel (:meth:`unet_core.model.unet.UNet.margin`: its head folded):
        the argmax is d > 0 (p1 > p0 exactly where the margin is positive, decided before any
        rounding), and p1 = sigmoid(d), p0 = sigmoid(-d) (:meth:`ProbabilityEncoding.encode_margin`).
        No block-sized float array is made: on a CPU the post-processing is memory-bound, and this
        reads one output plane per tile, once.
        """
        block, device = staged.block, staged.raw.device
        region, shape = self.tiling.region(block), self._canvas_shape(block)
        stored = torch.empty((2, *shape), dtype=self.encoding.torch_dtype, device=device)
        seg = torch.empty(shape, dtype=torch.uint8, device=device)
        offset = 0.0 if self.offsets is None else self.offsets[0, 1] - self.offsets[0, 0]
        tile = [s for _, s in self.tiling.tile_grid(block)]
        margin = torch.empty(tile, dtype=torch.float32, device=device)  # reused by every tile

        def put(tr: Dihedral, tile_out: torch.Tensor, where: tuple[slice, ...]) -> None:
            torch.add(tile_out[0], offset, out=margin)  # a copy of its own: encoding overwrites it
            torch.gt(margin, 0, out=seg[where].view(torch.bool))
            self.encoding.encode_margin(margin, out=stored[(slice(None), *where)])

        return self._work(staged, (Dihedral(),), put, lambda: (_crop(stored, region), _crop(seg, region)),
                          self._margin_net)

    def _canvas_shape(self, block: Block) -> tuple[int, ...]:
        """(Y, X) (3-D: (Z, Y, X)) of the block's tile grid: the block rounded up to whole tiles."""
        return tuple(n * s for n, s in self.tiling.tile_grid(block))

    def _work(self, staged: StagedBlock, trs: Sequence[Dihedral],
              put: Callable[[Dihedral, torch.Tensor, tuple[slice, ...]], None], finish: Callable[[], Any],
              net: Callable[[torch.Tensor], torch.Tensor]) -> BlockWork:
        """The staged block's tiles under each transform of ``trs`` (in this order) through
        ``net``, each output handed to ``put`` (see :class:`BlockWork`)."""
        block, read, image = staged.block, staged.read, staged.raw
        if self.cuda:
            image.record_stream(torch.cuda.current_stream(self.device))
        grid = self.tiling.tile_grid(block)
        first = self.tiling.tiles(block)[0]
        size = tuple(s for _, s in grid)
        windows = {tr: self._windows(image, first, read, tr, size) for tr in trs}
        return BlockWork(staged, net, list(_work_by_shape(trs, grid)), windows, size, put, finish)

    def _alone(self, work: BlockWork) -> Any:
        """Run one block's passes by themselves (the last one padded); its ``finish()``."""
        batcher = TileBatcher(self, lambda w: None)
        batcher.add(work)
        batcher.flush()
        return work.finish()

    def _windows(self, image: torch.Tensor, first: Box, read: Box, tr: Dihedral, step: tuple[int, ...]) -> torch.Tensor:
        """(ny', nx', in_y, in_x) (3-D: (nz', ny', nx', in_z, in_y, in_x)) strided view: the read
        boxes of all tiles under ``tr``."""
        box = tile_read_box(first, self.spec, tr).relative_to(read)
        view = image[tuple(slice(o, None) for o in box.offset)]
        for axis, (n, s) in enumerate(zip(box.shape, step)):
            view = view.unfold(axis, n, s)
        return view

    def _network(self, x: torch.Tensor, shape: tuple[int, ...],
                 net: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``net``'s outputs kept for tiles of (transformed) write ``shape``: (B, C, *shape) float32 views."""
        if self.channels_last:
            x = x.contiguous(memory_format=self._layout)
        dtype = self.precision.autocast_dtype
        with torch.inference_mode(), (torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()):
            out = net(x)
        kept = tuple(slice(o, o + n) for o, n in zip(output_offsets(self.spec, shape), shape, strict=True))
        return out[(slice(None), slice(None), *kept)].float()

    def encode(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, by, bx) float32 probabilities -> (stored probabilities, uint8 argmax classes).

        The argmax (ties to the lower class) is taken first, from the full-precision values;
        the encoding may then reuse ``probs``' memory.
        """
        if probs.shape[0] > 256:
            raise ValueError(f"{probs.shape[0]} classes do not fit uint8")
        seg = argmax_classes(probs)
        return self.encoding.encode(probs, inplace=True), seg

    # -- device -> host ------------------------------------------------------------------------
    def download(self, block: Block, probs: torch.Tensor, seg: torch.Tensor) -> Callable[[], BlockResult]:
        """Start copying a block's encoded result to the host; the returned function waits for it.

        On a GPU the copy runs on a stream of its own, after the compute stream's work so far (which
        made the result): it overlaps the next passes instead of queueing between them.
        """
        shape_p, shape_s = (probs.shape[0], *block.write.shape), block.write.shape
        if not self.cuda:
            result = BlockResult(block, probs.numpy().reshape(shape_p), seg.numpy().reshape(shape_s), lambda: None)
            return lambda: result
        nbytes_p = probs.numel() * probs.element_size()
        buf = self._downloads.acquire(nbytes_p + seg.numel())
        host_p = buf[:nbytes_p].view(probs.dtype).view(probs.shape)
        host_s = buf[nbytes_p : nbytes_p + seg.numel()].view(seg.shape)
        stream = self._download_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            host_p.copy_(probs, non_blocking=True)
            host_s.copy_(seg, non_blocking=True)
        for result in (probs, seg):  # made on the compute stream: keep their memory until the copy is done
            result.record_stream(stream)
        done = torch.cuda.Event()
        done.record(stream)

        def wait() -> BlockResult:
            done.synchronize()
            return BlockResult(block, host_p.numpy().reshape(shape_p), host_s.numpy().reshape(shape_s),
                               lambda: self._downloads.release(buf))

        return wait

    def predict(self, staged: StagedBlock) -> Callable[[], BlockResult]:
        """All device work of one staged block by itself; returns the waiter of its download."""
        waiters: list[Callable[[], BlockResult]] = []
        self.predict_blocks([staged], waiters.append)
        return waiters[0]

    def predict_blocks(self, blocks: Iterable[StagedBlock], deliver: Callable[[Callable[[], BlockResult]], None]) -> None:
        """All device work of the staged ``blocks``, their tiles batched across blocks
        (:class:`TileBatcher`); ``deliver`` gets each block's download waiter as soon as the
        download is started (the block's last pass may come with later blocks)."""
        batcher = TileBatcher(self, lambda work: deliver(self.download(work.staged.block, *work.finish())))
        with out_of_gpu_memory(f"at tile {self.tiling.tile_out} px, batch {self.batch}, tta {self.tta.value}",
                               "lower predict.batch_size (--batch) or predict.tile_out (--tile-out)"):
            for staged in blocks:
                batcher.add(self.block_work(staged))
            batcher.flush()


def _margin_network(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> (N, 1, ...)`` logit margin l1 - l0 of a two-class ``model``: its folded head where it
    has one (:meth:`unet_core.model.unet.UNet.margin`), else the difference of its two logits."""
    folded = getattr(model, "margin", None)
    if folded is not None:
        return folded

    def difference(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        return out[:, 1:] - out[:, :1]

    return difference


def _crop(canvas: torch.Tensor, region: Box) -> torch.Tensor:
    """The block's own part of a tile-grid canvas: its trailing axes cut to ``region``'s shape
    ((by, bx), or (bz, by, bx) for a 3-D network: :meth:`Tiling.region`)."""
    return canvas[(..., *(slice(0, n) for n in region.shape))]


def _per_slice(stats: IntensityStats | Scaling | Callable[[int], Scaling]) -> Callable[[int], Scaling]:
    """``z -> Scaling`` from any of the engine's ``stats`` forms."""
    if isinstance(stats, IntensityStats):
        stats = stats.scaling()
    if isinstance(stats, Scaling):
        return lambda z, s=stats: s
    return stats


def class_probabilities(logits: torch.Tensor, offsets: torch.Tensor | None, *, out: torch.Tensor,
                        add: bool = False, tails: bool = True) -> None:
    """Softmax over the classes of one tile's (C, Y, X) float32 ``logits`` plus the decision
    ``offsets``, written into (or, with ``add``, added to) ``out``.

    Two classes take the equivalent logistic form p1 = sigmoid(l1 - l0), written straight into
    ``out``: fewer passes over the pixels than a general softmax. ``p0`` is sigmoid(l0 - l1),
    accurate to float32 relative precision also where it is tiny, or, with ``tails=False``
    (uint8 storage, which rounds to 1/255 anyway), the cheaper 1 - p1 (absolute error < 1e-7).
    """
    if offsets is not None:
        logits = logits + offsets[0]
    if logits.shape[0] != 2:
        probs = torch.softmax(logits, dim=0)
        out.add_(probs) if add else out.copy_(probs)
        return
    diff = logits[1] - logits[0]
    one = torch.ones((), dtype=diff.dtype, device=diff.device)
    if add:
        p1 = torch.sigmoid(diff)
        out[0].add_(torch.sigmoid(diff.neg_()) if tails else torch.sub(one, p1))
        out[1].add_(p1)
        return
    torch.sigmoid(diff, out=out[1])
    if tails:
        torch.sigmoid(diff.neg_(), out=out[0])
    else:
        torch.sub(one, out[1], out=out[0])


def argmax_classes(probs: torch.Tensor) -> torch.Tensor:
    """(C, ...) -> (...) uint8 index of the largest value, ties to the lower class.

    Elementwise over the classes: a reduction over the leading, strided axis is several times
    slower on the CPU than C - 1 comparisons.
    """
    if probs.shape[0] == 2:
        return (probs[1] > probs[0]).view(torch.uint8)
    best, index = probs[0].clone(), torch.zeros(probs.shape[1:], dtype=torch.uint8, device=probs.device)
    for c in range(1, probs.shape[0]):
        index.masked_fill_(probs[c] > best, c)
        torch.maximum(best, probs[c], out=best)
    return index


def _work_by_shape(trs: Sequence[Dihedral], grid: Sequence[tuple[int, int]]) -> Iterator[tuple[tuple[int, ...], list]]:
    """``(tile shape in the network's frame, [(transform, (i, j)), ...])`` groups for a tile
    ``grid`` of ``(n, S)`` per axis: transforms in their fixed order, so every pixel sums its
    transforms in the same order whatever the batch."""
    size = tuple(s for _, s in grid)
    groups: dict[bool, list] = {}
    for tr in trs:
        groups.setdefault(tr.transpose, []).extend((tr, at) for at in itertools.product(*(range(n) for n, _ in grid)))
    for transposed, items in groups.items():
        yield ((*size[:-2], size[-1], size[-2]) if transposed else size), items


def _forward(t: Dihedral, tile: torch.Tensor) -> torch.Tensor:
    """Apply ``t`` to the last two axes of ``tile`` (flip, then transpose)."""
    dims = [d for d, flip in ((-2, t.flip_y), (-1, t.flip_x)) if flip]
    if dims:
        tile = tile.flip(dims)
    return tile.transpose(-1, -2) if t.transpose else tile


def _inverse(t: Dihedral, out: torch.Tensor) -> torch.Tensor:
    """Undo ``t`` on the last two axes of ``out`` (transpose back, then flip)."""
    if t.transpose:
        out = out.transpose(-1, -2)
    dims = [d for d, flip in ((-2, t.flip_y), (-1, t.flip_x)) if flip]
    return out.flip(dims) if dims else out


def run_blocks(
    engine: Engine, image: Any, blocks: Sequence[Block], write: Callable[[BlockResult], None], *,
    desc: str, readers: int = 1,
) -> None:
    """Predict ``blocks`` of the (Z, Y, X) ``image`` and hand each result to ``write`` (called in
    writer threads, any order), overlapping reading/uploading, computing and writing.

    Errors of any thread are raised here; ``write`` is never called twice for a block.
    """
    if not engine.tiling.volumes:
        reuse_freed_memory()  # block-sized host tensors come and go: reuse their pages
    # A 3-D network keeps glibc's own thresholds: its activations (up to 290 MB a pass at base 32,
    # tiles 48 x 220 x 220) carved from a heap that keeps everything freed fragment it from the
    # second pass on: a job's peak grew from 1.33 to 1.77-1.86 GB, varying from run to run, for
    # +7 % CPU without (page faults; wall within noise). benchmarks/RESULTS.md, "3-D peak RSS".
    def finish(wait: Callable[[], BlockResult]) -> None:
        result = wait()
        try:
            write(result)
        finally:
            result.release()

    with (
        ThreadPoolExecutor(readers, thread_name_prefix="read") as reader,
        ThreadPoolExecutor(engine.writers, thread_name_prefix="write") as writer,
    ):
        staged: list[Future] = [reader.submit(engine.stage, image, b) for b in blocks[:readers]]
        writes: list[Future] = []

        def in_order() -> Iterator[StagedBlock]:
            for i, _ in enumerate(progress(blocks, desc=desc, unit="block")):
                current = staged.pop(0).result()
                if i + readers < len(blocks):
                    staged.append(reader.submit(engine.stage, image, blocks[i + readers]))
                yield current

        def deliver(wait: Callable[[], BlockResult]) -> None:  # at most `writers` writes (and buffers) in flight
            writes.append(writer.submit(finish, wait))
            while writes and writes[0].done():
                writes.pop(0).result()
            if len(writes) > engine.writers:
                writes.pop(0).result()

        engine.predict_blocks(in_order(), deliver)
        for future in writes:
            future.result()
