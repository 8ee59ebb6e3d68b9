"""state.pt written beside the steps on CUDA (issue 34, item 3), tested on the CPU.

On CUDA the loop copies the state to host memory between two steps and writes it on a background
thread (:class:`unet_core.train.state.BackgroundStateWriter`); on the CPU it writes synchronously, as
before. Here the background path is switched on for CPU runs (``loop.background_checkpoints``) and
every write is held back until the loop has taken the next step, so a snapshot that shared a tensor
with the live optimizer, or a write that stalled the loop, shows.
"""

from __future__ import annotations

import errno
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_train import make_augmented, tiny_config

import unet_core.train.state as state_module
from unet_core.model.checkpoint import safe_load
from unet_core.model.spec import UNetSpec
from unet_core.train import loop
from unet_core.train.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in tests/conftest.py

SPEC = UNetSpec(depth=2, base_channels=4, dropout=0.5)  # dropout: the RNG state must be restored too
#: Longest a held-back write waits for the loop's next step, s (the synchronous path never gets one).
HOLD_S = 2.0


class _Crash(Exception):
    pass


class HeldWrites:
    """``write_torch_file`` of the state writer, started only after the loop has completed the step
    after the snapshot's iteration (except the final one); records what each write saw."""

    def __init__(self, iterations: int, *, hold: bool) -> None:
        self.iterations, self.hold = iterations, hold
        self.completed = 0  # iterations the loop has completed (on_iteration)
        self.stepped = threading.Condition()
        self.log: list[tuple[int, bool, str]] = []  # (snapshot iteration, loop went on meanwhile, thread)
        self.write = state_module.write_torch_file

    def on_iteration(self, i: int) -> None:
        with self.stepped:
            self.completed = i
            self.stepped.notify_all()

    def __call__(self, path, obj, **kwargs) -> None:
        it = obj["iteration"]
        with self.stepped:
            went_on = it == self.iterations or self.stepped.wait_for(lambda: self.completed > it,
                                                                     HOLD_S if self.hold else 0.0)
        self.log.append((it, went_on, threading.current_thread().name))
        self.write(path, obj, **kwargs)


def _run(tmp_path: Path, name: str, *, background: bool, monkeypatch, crash_at: int | None = None,
         resume: bool = False, hold: bool | None = None) -> HeldWrites:
    """Train the tiny net (8 iterations, state.pt every 2) into ``tmp_path / name``; writes are held
    back (``hold``, default: on the background path only) until the loop has stepped on."""
    cfg = tiny_config(iterations=8, optimizer="adam", checkpoint_every=2, validate_every=4, log_every=2)
    held = HeldWrites(cfg.iterations, hold=background if hold is None else hold)
    monkeypatch.setattr(loop, "background_checkpoints", lambda runtime: background)
    monkeypatch.setattr(state_module, "write_torch_file", held)

    def tick(i: int) -> None:
        held.on_iteration(i)
        if i == crash_at:
            raise _Crash

    train([tmp_path / "aug.zarr"], out_dir=tmp_path / name, spec=SPEC, config=cfg, on_iteration=tick, resume=resume)
    return held


def _assert_same_state(a: dict, b: dict) -> None:
    """Model, optimizer, RNG states, iteration and history equal (the recorded seconds aside)."""
    assert a["iteration"] == b["iteration"]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].keys() == sb[key].keys()
        assert all(torch.equal(sa[key][n], sb[key][n]) for n in sa[key]), f"optimizer state {key} differs"
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and a["rng"]["numpy"] == b["rng"]["numpy"]
    ha, hb = dict(a["history"]), dict(b["history"])
    ha.pop("train_seconds"), hb.pop("train_seconds")
    for rows in (ha["rows"], hb["rows"]):
        for row in rows:
            row.pop("train_seconds"), row.pop("tiles_per_s")
    assert ha == hb


def test_background_checkpoints_only_on_cuda() -> None:
    assert loop.background_checkpoints(SimpleNamespace(device=torch.device("cuda", 0)))
    assert not loop.background_checkpoints(SimpleNamespace(device=torch.device("cpu")))


def test_background_writes_run_beside_the_steps_and_hold_the_snapshot_of_their_iteration(
    tmp_path: Path, monkeypatch
) -> None:
    make_augmented(tmp_path / "aug.zarr", n=3)
    sync = _run(tmp_path, "sync", background=False, monkeypatch=monkeypatch, hold=True)
    assert [went_on for _, went_on, _ in sync.log] == [False, False, False, True]  # the step waited
    held = _run(tmp_path, "bg", background=True, monkeypatch=monkeypatch)
    assert [it for it, _, _ in held.log] == [2, 4, 6, 8]
    assert all(went_on for _, went_on, _ in held.log), held.log  # the loop stepped on during each write
    assert all(thread.startswith("state.pt") for _, _, thread in held.log)
    _assert_same_state(safe_load(tmp_path / "sync" / "state.pt"), safe_load(tmp_path / "bg" / "state.pt"))
    a, b = (safe_load(tmp_path / d / "model.pt")["state_dict"] for d in ("sync", "bg"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [t for t in threading.enumerate() if t.name.startswith("state.pt")]  # the thread stopped


def test_a_crash_finishes_the_write_in_flight_and_the_resume_is_bit_identical(tmp_path: Path, monkeypatch) -> None:
    make_augmented(tmp_path / "aug.zarr", n=3)
    with pytest.raises(_Crash):
        _run(tmp_path, "sync", background=False, monkeypatch=monkeypatch, crash_at=5)
    with pytest.raises(_Crash):  # at 5 the write of iteration 4 is still held back
        _run(tmp_path, "bg", background=True, monkeypatch=monkeypatch, crash_at=5)
    cut = safe_load(tmp_path / "bg" / "state.pt")
    assert cut["iteration"] == 4
    _assert_same_state(safe_load(tmp_path / "sync" / "state.pt"), cut)
    _run(tmp_path, "ref", background=False, monkeypatch=monkeypatch)
    _run(tmp_path, "bg", background=True, monkeypatch=monkeypatch, resume=True)
    a, b = (safe_load(tmp_path / d / "model.pt")["state_dict"] for d in ("ref", "bg"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "bg").glob(".state.pt.tmp-*"))


def test_a_failed_background_write_stops_the_run_and_keeps_the_last_state(tmp_path: Path, monkeypatch) -> None:
    make_augmented(tmp_path / "aug.zarr", n=3)
    write = state_module.write_torch_file

    def full_disk(path, obj, **kwargs) -> None:
        if obj["iteration"] >= 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write(path, obj, **kwargs)

    monkeypatch.setattr(loop, "background_checkpoints", lambda runtime: True)
    monkeypatch.setattr(state_module, "write_torch_file", full_disk)
    cfg = tiny_config(iterations=8, checkpoint_every=2, validate_every=4, log_every=2)
    with pytest.raises(OSError) as err:
        train([tmp_path / "aug.zarr"], out_dir=tmp_path / "run", spec=SPEC, config=cfg)
    assert err.value.errno == errno.ENOSPC
    assert safe_load(tmp_path / "run" / "state.pt")["iteration"] == 2
    assert not (tmp_path / "run" / "model.pt").exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("state.pt")]
