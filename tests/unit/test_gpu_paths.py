"""The CUDA branches of prediction and training, tested on the CPU (issue 34, item 2).

No GPU is needed: ``torch.cuda`` streams, events, ``record_stream`` and pinned memory are
replaced by CPU stand-ins (:func:`cuda_on_cpu`), and the engine is told it is on CUDA, so its
GPU-only steps run (pinned upload and download buffers, the upload stream, non-blocking copies,
events, ``record_stream``) on CPU tensors. What those steps do to the data, which device each
operation sees (the ``meta`` device) and where the host waits for the device are then checked.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import unet_core.infer.engine as engine_module
from unet_core.common.intensity import IntensityStats
from unet_core.common.precision import Precision
from unet_core.infer.engine import Engine, run_blocks
from unet_core.infer.tiling import Tiling
from unet_core.model.spec import UNetSpec
from unet_core.model.unet import UNet

TINY = UNetSpec(depth=2, base_channels=4, dropout=0.0)  # stride 4, context 20
THREE = UNetSpec(depth=2, base_channels=4, dropout=0.0, n_classes=3)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in tests/conftest.py


_calls_lock = threading.Lock()


def _bump(calls: Counter, key: str) -> None:
    """``calls[key] += 1`` from any thread (the engine's readers and writers call the stubs)."""
    with _calls_lock:
        calls[key] += 1


#: What the stubs did to streams, in order: ("wait_stream", stream, waited-for stream),
#: ("event.record", stream), ("record_stream", stream), ("upload", current stream), by stream name
#: (the default stream is "compute"); list.append is atomic, the reader threads log too.
_stream_log: list[tuple[str, ...]] = []


class FakeStream:
    """A CUDA stream stand-in: every call is recorded, nothing waits."""

    def __init__(self, calls: Counter, name: str = "compute", *args, **kwargs) -> None:
        self.calls, self.name = calls, name

    def synchronize(self) -> None:
        _bump(self.calls, "stream.synchronize")
        _note_sync("stream.synchronize")

    def wait_stream(self, other) -> None:
        _bump(self.calls, "stream.wait_stream")
        _stream_log.append(("wait_stream", self.name, other.name))

    def wait_event(self, event) -> None:
        _bump(self.calls, "stream.wait_event")

    def record_event(self, event=None):
        _bump(self.calls, "stream.record_event")
        return event or FakeEvent(self.calls)


class FakeEvent:
    def __init__(self, calls: Counter, *args, **kwargs) -> None:
        self.calls = calls

    def record(self, stream=None) -> None:
        _bump(self.calls, "event.record")
        _stream_log.append(("event.record", (stream or torch.cuda.current_stream()).name))

    def synchronize(self) -> None:
        _bump(self.calls, "event.synchronize")
        _note_sync("event.synchronize")

    def wait(self, stream=None) -> None:
        _bump(self.calls, "event.wait")

    def query(self) -> bool:
        return True


# -- host synchronisations, counted per window (see count_syncs) ---------------------------------
_window = threading.local()  # this thread's window name
_syncs: dict = {"counts": None, "host_memory": lambda t: False}
_syncs_lock = threading.Lock()  # reader, writer and main threads count into one Counter


def _note_sync(kind: str, tensor: torch.Tensor | None = None) -> None:
    counts, name = _syncs["counts"], getattr(_window, "name", None)
    if counts is None or name is None:
        return
    if tensor is not None and _syncs["host_memory"](tensor):
        kind += " (host memory)"  # e.g. .numpy() of a pinned download buffer: no wait for the device
    with _syncs_lock:
        counts[(name, kind)] += 1


@contextlib.contextmanager
def sync_window(name: str):
    """Count this thread's host synchronisations under ``name`` while inside."""
    before = getattr(_window, "name", None)
    _window.name = name
    try:
        yield
    finally:
        _window.name = before


class ScalarReads(TorchDispatchMode):
    """Every operator that makes the host wait for a device value (``.item()``, ``bool()``,
    ``int()``, ``float()`` and their C++ callers all end in ``_local_scalar_dense``; ``nonzero``
    and friends need the result's size)."""

    WAITING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.WAITING:
            _note_sync(f"aten.{func.__name__}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    """Stub ``torch.cuda``'s streams, events, synchronisation and pinned memory with CPU stand-ins
    and make the engine believe it is on CUDA. Yields ``(calls, pinned)``: a Counter of the stubs'
    calls and the data pointers of every pinned buffer made. A non-blocking ``.to()`` onto the
    tensor's own device returns a copy, as an upload to a GPU does (the CPU would return the
    pinned buffer itself, which the pool hands out again). Streams have names
    (``torch.cuda.stream`` sets this thread's current one; the default is "compute") and their
    use is logged in :data:`_stream_log`."""
    calls: Counter = Counter()
    pinned: set[int] = set()
    _stream_log.clear()
    compute, current, names = FakeStream(calls), threading.local(), itertools.count()
    real_empty, real_to = torch.empty, torch.Tensor.to

    def empty(*args, pin_memory: bool = False, **kwargs):
        out = real_empty(*args, **kwargs)
        if pin_memory:
            _bump(calls, "pinned buffer")
            pinned.add(out.untyped_storage().data_ptr())
        return out

    def pin(self, *args, **kwargs):
        _bump(calls, "Tensor.pin_memory")
        out = self.clone()
        pinned.add(out.untyped_storage().data_ptr())
        return out

    def to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if kwargs.get("non_blocking"):
            _bump(calls, "non_blocking to")
            _stream_log.append(("upload", current_stream().name))
            if out.data_ptr() == self.data_ptr():
                out = out.clone()
        return out

    def current_stream(device=None) -> FakeStream:
        return getattr(current, "stream", compute)

    @contextlib.contextmanager
    def on_stream(stream):
        _bump(calls, "stream context")
        before, current.stream = current_stream(), stream
        try:
            yield
        finally:
            current.stream = before

    def record_stream(self, stream) -> None:
        _bump(calls, "record_stream")
        _stream_log.append(("record_stream", stream.name))

    def synchronize(device=None) -> None:
        _bump(calls, "cuda.synchronize")
        _note_sync("cuda.synchronize")

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: self.untyped_storage().data_ptr() in pinned)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "record_stream", record_stream)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: FakeStream(calls, f"stream {next(names)}"))
    monkeypatch.setattr(torch.cuda, "Event", lambda *a, **k: FakeEvent(calls))
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    # the engine's CUDA flag: set in __init__ from device.type; read by every branch
    monkeypatch.setattr(Engine, "cuda", property(lambda self: True, lambda self, value: None), raising=False)
    yield calls, pinned


def _image(dtype, shape) -> np.ndarray:
    rng = np.random.default_rng(11)
    if np.issubdtype(dtype, np.floating):
        return rng.normal(100, 30, shape).astype(dtype)
    info = np.iinfo(dtype)  # values over the whole range, above the sign bit of the uint16 twin too
    return rng.integers(max(info.min, -(2**20)), min(info.max, 2**20), shape, endpoint=True).astype(dtype)


def _predict_all(model, image, *, readers: int, writers: int, **kw) -> dict[tuple, tuple[bytes, bytes]]:
    tiling = Tiling(image.shape, model.spec, block_px=32, tile_out=12)
    reference = image.astype(np.float64)
    stats = IntensityStats(float(reference.mean()), float(reference.std()) + 1.0)
    engine = Engine(model, tiling, stats=stats, device=torch.device("cpu"), writers=writers, **kw)
    out: dict[tuple, tuple[bytes, bytes]] = {}
    lock = threading.Lock()

    def write(result) -> None:
        with lock:
            out[result.block.index] = (result.probabilities.tobytes(), result.segmentation.tobytes())

    run_blocks(engine, image, list(tiling.blocks()), write, desc="test", readers=readers)
    assert len(out) == len(list(tiling.blocks()))
    return out


# (a) ------------------------------------------------------------------------------------------
SHAPE = (2, 45, 38)  # 2 x 2 blocks of 32 px per slice, cut by the image edge; 3 x 3 tiles of 12 px


@pytest.mark.parametrize("encoding", ["uint8", "float16", "float32"])
@pytest.mark.parametrize("tta", ["none", "flips", "d4"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_cuda_branch_gives_the_cpu_paths_bytes(request, dtype, tta: str, encoding: str) -> None:
    # the CUDA branch stages through pinned buffers and an upload stream, downloads through pinned
    # buffers and events; with the device work itself on the CPU it must give the CPU path's bytes,
    # for every stored dtype (uint16's signed twin), transform set and encoding, with edge blocks
    # and partial batches (batch 4 of 9 tiles; 36 with d4)
    image = _image(dtype, SHAPE)
    torch.manual_seed(0)
    models = {"2 classes": UNet(TINY).eval(), "3 classes": UNet(THREE).eval()}
    kw = {"tta": tta, "encoding": encoding, "batch": 4, "offsets": None}
    cpu = {name: _predict_all(m, image, readers=1, writers=1, **kw) for name, m in models.items()}
    calls, pinned = request.getfixturevalue("cuda_on_cpu")
    for name, m in models.items():
        cuda = _predict_all(m, image, readers=2, writers=2, **kw)
        assert cuda.keys() == cpu[name].keys()
        bad = [b for b in cuda if cuda[b] != cpu[name][b]]
        assert not bad, f"{name}: blocks {bad} differ from the CPU path"
    blocks = 2 * len(cpu["2 classes"])
    # per block: record_stream of the staged block (compute stream) and of its two results (download
    # stream); a stream context for the upload and one for the download
    assert calls["record_stream"] == 3 * blocks and calls["event.synchronize"] == blocks
    assert calls["stream context"] == 2 * blocks and calls["non_blocking to"] == blocks  # the uploads
    # pinned buffers are reused (a pool of 2 upload and writers + 1 download buffers per engine, each
    # made again only when a larger block needs it): fewer allocations than transfers
    assert 0 < calls["pinned buffer"] < 2 * blocks, (calls["pinned buffer"], blocks)


# (b) ------------------------------------------------------------------------------------------
class OneDevice(TorchDispatchMode):
    """Raise on any operation whose tensor arguments lie on more than one device.

    Copies between devices (``copy_``, ``_to_copy``) are the transfers themselves; a copy from
    the meta device into host memory (the download) is skipped, its destination returned as is.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.transfers: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        name = func.__name__.split(".")[0]
        self.ops[name] += 1
        if len(devices) > 1:
            if name in ("copy_", "_to_copy", "_copy_from"):
                self.transfers[tuple(sorted(str(d) for d in devices))] += 1
                if name == "copy_" and args[1].device.type == "meta":
                    return args[0]  # the download: nothing to copy out of meta tensors
            else:
                raise AssertionError(f"{func} mixes devices {sorted(map(str, devices))}")
        return func(*args, **kwargs)


@pytest.mark.parametrize(("spec", "tta", "offsets"), [(TINY, "none", None), (TINY, "none", [0.2, -0.1]),
                                                       (TINY, "d4", [0.2, -0.1]), (THREE, "flips", None)],
                         ids=["two-class", "two-class-offsets", "d4-offsets", "three-class-flips"])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_device_work_stays_on_the_device(cuda_on_cpu, dtype, spec, tta, offsets) -> None:
    # every block is uploaded once and every later tensor of the block's work is made on the
    # engine's device: on the meta device (no data, shapes only) a forgotten .to(device) or a
    # tensor made without device= is an operation that mixes meta and CPU tensors
    torch.manual_seed(0)
    image = _image(dtype, (1, 45, 38))
    tiling = Tiling(image.shape, spec, block_px=32, tile_out=12)
    stats = IntensityStats(float(image.mean()), float(image.std()) + 1.0)
    mode = OneDevice()
    engine = Engine(UNet(spec), tiling, stats=stats, device=torch.device("meta"), batch=4, tta=tta,
                    offsets=offsets, encoding="uint8")
    assert all(p.device.type == "meta" for p in engine.model.parameters())
    with mode:
        for block in list(tiling.blocks()):
            staged = engine.stage(image, block)
            assert staged.raw.device.type == "meta"
            result = engine.predict(staged)()
            assert result.probabilities.shape == (spec.n_classes, 1, *block.plane.shape)
            result.release()
    assert mode.ops["conv2d"] > 0, " ".join(sorted(mode.ops))
    # the only operations that see both devices: per block the two downloads (meta -> pinned host
    # buffer: probabilities, segmentation); the upload is a _to_copy of the host tensor to the device
    assert mode.transfers == {("cpu", "meta"): 2 * len(list(tiling.blocks()))}, mode.transfers


# (c) ------------------------------------------------------------------------------------------
@pytest.fixture
def count_syncs(monkeypatch):
    """Count host synchronisations (item, tolist, cpu, numpy, bool, torch.cuda.synchronize, the
    stubs' stream/event synchronize, and the waiting aten operators) inside :func:`sync_window`s.
    Yields the Counter of ``(window, kind)``."""
    counts: Counter = Counter()
    _syncs.update(counts=counts, host_memory=lambda t: False)
    for name in ("item", "tolist", "cpu", "numpy", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **kw):
            _note_sync(f"Tensor.{_name}", self)
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    mode = ScalarReads()
    with mode:
        yield counts
    _syncs.update(counts=None, host_memory=lambda t: False)


def _windows_per_thread(monkeypatch, engine: Engine) -> None:
    """Count the engine's stage (reader), predict_blocks (issuing thread) and download wait (writer)."""
    stage, predict_blocks = engine.stage, engine.predict_blocks

    def staged(*a, **k):
        with sync_window("stage"), ScalarReads():
            return stage(*a, **k)

    def predicted(blocks, deliver):
        def delivered(wait):
            def waited():
                with sync_window("download wait"), ScalarReads():
                    return wait()

            deliver(waited)

        with sync_window("predict"):
            predict_blocks(blocks, delivered)

    monkeypatch.setattr(engine, "stage", staged)
    monkeypatch.setattr(engine, "predict_blocks", predicted)


@pytest.mark.parametrize(("spec", "tta"), [(TINY, "none"), (TINY, "d4"), (THREE, "flips")])
def test_prediction_waits_for_the_device_once_per_block_at_its_download(cuda_on_cpu, count_syncs, monkeypatch,
                                                                       spec, tta) -> None:
    calls, pinned = cuda_on_cpu
    _syncs["host_memory"] = lambda t: t.untyped_storage().data_ptr() in pinned
    image = _image(np.uint16, SHAPE)
    tiling = Tiling(image.shape, spec, block_px=32, tile_out=12)
    torch.manual_seed(0)
    engine = Engine(UNet(spec), tiling, stats=IntensityStats(1000.0, 500.0), device=torch.device("cpu"),
                    batch=4, tta=tta, offsets=[0.1] * spec.n_classes, writers=2)
    _windows_per_thread(monkeypatch, engine)
    written = []
    run_blocks(engine, image, list(tiling.blocks()), lambda r: written.append(r.block), desc="test", readers=2)
    n = len(list(tiling.blocks()))
    assert len(written) == n
    syncs = {k: v for k, v in count_syncs.items() if "(host memory)" not in k[1]}
    # the thread that issues the device work never waits: 0 per tile, 0 per block
    assert not {k: v for k, v in syncs.items() if k[0] == "predict"}, syncs
    # the writer waits once per block, for the download's event; reading the pinned buffer then is host memory
    assert {k: v for k, v in syncs.items() if k[0] == "download wait"} == {("download wait", "event.synchronize"): n}
    # the reader waits once per block for its own upload on the upload stream (the pinned buffer
    # is reused after it; the compute stream is not waited for)
    assert {k: v for k, v in syncs.items() if k[0] == "stage"} == {("stage", "stream.synchronize"): n}
    assert count_syncs[("download wait", "Tensor.numpy (host memory)")] == 2 * n


@pytest.mark.parametrize("background", [False, True], ids=["sync-state", "background-state"])
def test_training_steps_do_not_wait_for_the_device_between_host_points(tmp_path: Path, cuda_on_cpu, count_syncs,
                                                                      monkeypatch, background: bool) -> None:
    # the training step with the CUDA runtime's fused optimizer and non-blocking uploads, its loss
    # summed on the device: no host synchronisation of any kind (also none from inside torch: the
    # waiting aten operators) except at log, validation and checkpoint iterations; with
    # ``background`` state.pt is written as on CUDA (a host copy at the checkpoint iteration, the
    # file on a background thread, which must not add waits to the steps)
    import unet_core.train.loop as loop
    import unet_core.train.runtime as runtime_module
    from test_train import make_augmented, tiny_config

    monkeypatch.setattr(runtime_module.Runtime, "fused_optimizer", property(lambda self: True))
    monkeypatch.setattr(loop, "background_checkpoints", lambda runtime: background)
    iteration = [0]
    original_step, original_add, original_point = loop._step, loop.LossMeter.add, loop._host_point

    def step(s, batch):
        with sync_window(f"step {iteration[0] + 1}"):
            return original_step(s, batch)

    def add(self, loss, it):
        iteration[0] = it
        with sync_window(f"step {it}"):
            return original_add(self, loss, it)

    def point(s, meter, bar):
        with sync_window(f"host point {s.progress.iteration}"):
            return original_point(s, meter, bar)

    monkeypatch.setattr(loop, "_step", step)
    monkeypatch.setattr(loop.LossMeter, "add", add)
    monkeypatch.setattr(loop, "_host_point", point)
    aug = make_augmented(tmp_path / "aug.zarr", n=2)
    cfg = tiny_config(iterations=12, optimizer="sgd", log_every=4, validate_every=12, checkpoint_every=6)
    loop.train([aug], out_dir=tmp_path / "run", spec=TINY, config=cfg)
    windows = {w for w, _ in count_syncs}
    host_points = {4, 6, 8, 12}
    quiet = {w: k for (w, k) in count_syncs if w.startswith("step") or
             (w.startswith("host point") and int(w.split()[-1]) not in host_points)}
    assert not quiet, f"host synchronisations between host points: {quiet}"
    for it in host_points:  # the counter sees the one read that is there: the loss sums' tolist
        assert count_syncs[(f"host point {it}", "Tensor.tolist")] == 1, sorted(count_syncs.items())
    assert windows >= {f"host point {it}" for it in host_points}


# (d) ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "tta", "encoding"), [(TINY, "none", "float32"), (TINY, "flips", "float32"),
                                                       (THREE, "none", "uint8")])
def test_bf16_autocast_prediction_runs_finite_and_near_fp32(spec, tta: str, encoding: str) -> None:
    # the engine's autocast branch (the GPU's default precision) on the CPU: finite probabilities
    # that sum to 1, within bf16 rounding of float32: measured on this net max |dp| 0.007-0.030,
    # mean 0.0013-0.0021 per block; bounds 0.06 and 0.005
    torch.manual_seed(2)
    model = UNet(spec).eval()
    image = _image(np.float32, (1, 45, 38))
    tiling = Tiling(image.shape, spec, block_px=32, tile_out=12)
    stats = IntensityStats(float(image.mean()), float(image.std()))
    out = {}
    for precision in (Precision.FP32, Precision.BF16):
        engine = Engine(model, tiling, stats=stats, device=torch.device("cpu"), precision=precision, batch=3,
                        tta=tta, encoding=encoding)
        out[precision] = [engine.predict(engine.stage(image, b))() for b in list(tiling.blocks())]
    for a, b in zip(out[Precision.FP32], out[Precision.BF16], strict=True):
        p32, p16 = (r.probabilities.astype(np.float32) / (255 if encoding == "uint8" else 1) for r in (a, b))
        assert np.isfinite(p16).all()
        assert np.abs(p16.sum(axis=0) - 1).max() <= (3 / 255 if encoding == "uint8" else 1e-5)
        assert not np.array_equal(p16, p32)  # autocast did run in bf16
        dp = np.abs(p16 - p32)
        assert dp.max() <= 0.06 and dp.mean() <= 0.005, (dp.max(), dp.mean())


def test_bf16_autocast_loss_is_finite_and_within_one_percent_of_fp32(tmp_path: Path) -> None:
    # the training loss under the CPU's bf16 autocast and its backward: finite loss and gradients,
    # loss within 1 % of float32 (the logits are cast to float32 before the softmax)
    from test_train import make_augmented
    from unet_core.train.data import AugmentedTiles
    from unet_core.train.runtime import Runtime, batch_loss

    data = AugmentedTiles([make_augmented(tmp_path / "aug.zarr", n=3, seed=2)], spec=TINY)
    image, classes, weights = (torch.stack(t) for t in zip(*(data[i] for i in range(3)), strict=True))
    torch.manual_seed(0)
    model = UNet(TINY)
    cpu = torch.device("cpu")
    losses, grads = {}, {}
    for precision in (Precision.FP32, Precision.BF16):
        model.zero_grad()
        loss = batch_loss(model, image, classes, weights, runtime=Runtime(cpu, precision, False, ""))
        loss.backward()
        losses[precision] = float(loss.detach())
        grads[precision] = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert loss.dtype == torch.float32 and math.isfinite(losses[precision])
        assert torch.isfinite(grads[precision]).all()
    fp32, bf16 = losses[Precision.FP32], losses[Precision.BF16]
    assert bf16 != fp32 and abs(bf16 - fp32) <= 1e-2 * abs(fp32), (bf16, fp32)
    cos = torch.nn.functional.cosine_similarity(grads[Precision.FP32], grads[Precision.BF16], dim=0)
    assert cos > 0.99, float(cos)


# (e) ------------------------------------------------------------------------------------------
def test_compiled_engines_make_one_graph_per_network_and_input_shape(monkeypatch) -> None:
    # torch.compile(dynamic=False) makes a graph per network input shape (tile shape x transposed;
    # passes are padded to the batch size) and falls back to eager, with only a warning, past dynamo's recompile limit
    # per function; counted with a backend that wraps aot_eager (CPU, no inductor), over engines
    # of one model (two-class margin and d4 full forward) on a stack with edge blocks
    import torch._dynamo

    graphs: list[tuple] = []

    def counting(gm, example_inputs):
        graphs.append(next(tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 4
                           and t.shape[1] == 1 and t.shape[2] > 3))  # the network input (B, 1, Y, X)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=counting, **kw))
    fed: list[tuple] = []
    network = Engine._network

    def recording(self, x, shape, net):
        fed.append(("margin" if net is self._margin_net else "forward", tuple(x.shape)))
        return network(self, x, shape, net)

    monkeypatch.setattr(Engine, "_network", recording)
    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        model = UNet(TINY).eval()
        image = _image(np.float32, (1, 45, 38))
        tiling = Tiling(image.shape, TINY, block_px=32, tile_out=12)
        stats = IntensityStats(float(image.mean()), float(image.std()))
        runs = []
        for tta in ("none", "d4", "none"):  # the third: a new engine over the same model and shapes
            kw = {"stats": stats, "device": torch.device("cpu"), "batch": 4, "tta": tta, "channels_last": False}
            before, fed_before = len(graphs), len(fed)
            engine = Engine(model, tiling, compile=True, **kw)
            eager = Engine(model, tiling, **kw)
            for block in tiling.blocks():
                got = engine.predict(engine.stage(image, block))().probabilities
                want = eager.predict(eager.stage(image, block))().probabilities
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
            new = set(fed[fed_before:]) - set(fed[:fed_before])
            runs.append((sorted(graphs[before:]), sorted(shape for _, shape in new)))
        margin, forward, again = runs
        # every new input shape fed got a graph of its own, once (no eager fallback, no recompile):
        # the two-class margin network 4 (the 2 x 2 blocks' four tile shapes; every pass has the
        # batch size, a partial one padded), the d4 forward 4 (two tile shapes, each also transposed)
        assert margin[0] == margin[1] and len(margin[0]) == 4, margin
        assert forward[0] == forward[1] and len(forward[0]) == 4, forward
        assert again == ([], []), again  # a second engine over the same model compiles nothing
        limit = getattr(torch._dynamo.config, "recompile_limit", None) or torch._dynamo.config.cache_size_limit
        assert len(margin[0]) <= limit and len(forward[0]) <= limit  # per compiled function
    finally:
        torch._dynamo.reset()


# item 3 -----------------------------------------------------------------------------------------
def test_training_uploads_classes_as_uint8_and_widens_them_on_the_device(tmp_path: Path, monkeypatch) -> None:
    """The loader hands classes over as stored (uint8: 1 byte per pixel through worker pipes, pinned
    memory and the upload instead of 8); the step widens them to int64 on the device."""
    import unet_core.train.loop as loop
    from test_train import make_augmented, tiny_config

    uploads, targets = [], []
    real_to, real_loss = torch.Tensor.to, loop.batch_loss

    def to(self, *args, **kwargs):
        if kwargs.get("non_blocking"):
            uploads.append(self.dtype)
        return real_to(self, *args, **kwargs)

    def loss(forward, image, classes, weights, *, runtime):
        targets.append((classes.dtype, classes.device.type))
        return real_loss(forward, image, classes, weights, runtime=runtime)

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(loop, "batch_loss", loss)
    aug = make_augmented(tmp_path / "aug.zarr", n=2)
    loop.train([aug], out_dir=tmp_path / "run", spec=TINY, config=tiny_config(iterations=2, validate_every=2,
                                                                                checkpoint_every=2))
    assert Counter(uploads) == Counter({torch.float32: 4, torch.uint8: 2}), uploads  # image, weights, classes
    assert targets == [(torch.int64, "cpu")] * 2


def test_downloads_run_on_their_own_stream_after_the_compute_stream(cuda_on_cpu, monkeypatch) -> None:
    """A block's result is copied to the host on a stream of its own (one per engine, neither the
    compute nor the upload stream), which first waits for the compute stream; the copies are issued
    on it, the results' memory is kept for it (record_stream) and the writer's event is recorded on
    it. On the compute stream the copy queued between two blocks' passes."""
    real_copy = torch.Tensor.copy_

    def copy_(self, src, non_blocking: bool = False):
        if non_blocking:
            _stream_log.append(("download", torch.cuda.current_stream().name))
        return real_copy(self, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    image = _image(np.uint16, SHAPE)
    n = len(list(Tiling(image.shape, TINY, block_px=32, tile_out=12).blocks()))
    for spec, tta in ((TINY, "none"), (THREE, "flips")):
        _stream_log.clear()
        torch.manual_seed(0)
        _predict_all(UNet(spec).eval(), image, readers=2, writers=2, tta=tta, batch=4)
        log = Counter(_stream_log)
        uploads = {entry[1] for entry in log if entry[0] == "upload"}
        downloads = {entry[1] for entry in log if entry[0] == "download"}
        assert len(uploads) == 1 and len(downloads) == 1, log
        (up,), (down,) = uploads, downloads
        assert down not in (up, "compute") and up != "compute", log
        assert log == {("upload", up): n, ("record_stream", "compute"): n, ("wait_stream", down, "compute"): n,
                       ("download", down): 2 * n, ("record_stream", down): 2 * n, ("event.record", down): n}, log
        order = [entry for entry in _stream_log if entry[0] != "upload"]  # the reader threads' entries interleave
        first = order.index(("wait_stream", down, "compute"))
        assert order[first + 1 : first + 6] == [("download", down)] * 2 + [("record_stream", down)] * 2 + [
            ("event.record", down)], order
