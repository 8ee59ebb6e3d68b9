"""Atomic outputs: complete or absent, never half-written."""

from __future__ import annotations

import pytest

from unet_core.common.atomic import atomic_output


def test_file_appears_only_when_complete(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_output(target, own=None) as tmp:
        tmp.write_text("hello")
        assert not target.exists() and tmp.parent == target.parent
    assert target.read_text() == "hello"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_failure_leaves_previous_directory_and_no_temporaries(tmp_path):
    target = tmp_path / "store.zarr"
    with atomic_output(target, own=None) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_output(target, own=None) as tmp:
            tmp.mkdir()
            (tmp / "a").write_text("2")
            raise RuntimeError("killed half-way")
    assert (target / "a").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["store.zarr"]


def test_directory_is_replaced(tmp_path):
    target = tmp_path / "store.zarr"
    for value in ("1", "2"):
        with atomic_output(target, own=None) as tmp:
            tmp.mkdir()
            (tmp / "a").write_text(value)
    assert (target / "a").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["store.zarr"]


def test_nothing_written_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="without writing"):
        with atomic_output(tmp_path / "x", own=None):
            pass


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    import subprocess

    from unet_core.common.atomic import _host

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out.txt.tmp-{_host()}-{dead.pid}-deadbeef"
    stale.write_text("half")
    alive = tmp_path / f".out.txt.tmp-{_host()}-1-cafecafe"      # PID 1 runs: kept
    alive.write_text("busy")
    other_host = tmp_path / f".out.txt.tmp-otherhost-{dead.pid}-0000"  # other host: kept
    other_host.write_text("theirs")
    with atomic_output(tmp_path / "out.txt", own=None) as tmp:
        tmp.write_text("done")
    assert not stale.exists() and alive.exists() and other_host.exists()
    assert (tmp_path / "out.txt").read_text() == "done"


def test_temporaries_of_killed_unreaped_processes_count_as_stale(tmp_path):
    import subprocess
    import time

    from unet_core.common.atomic import _host

    zombie = subprocess.Popen(["true"])  # exits, but is not waited for: a zombie
    time.sleep(0.3)
    stale = tmp_path / f".out.txt.tmp-{_host()}-{zombie.pid}-deadbeef"
    stale.write_text("half")
    with atomic_output(tmp_path / "out.txt", own=None) as tmp:
        tmp.write_text("done")
    zombie.wait()
    assert not stale.exists()


def test_stale_temporaries_anywhere_under_a_root_are_removed(tmp_path):
    import subprocess

    from unet_core.common.atomic import _host, remove_stale_tree

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = _host()
    (tmp_path / "a" / "b").mkdir(parents=True)
    file_tmp = tmp_path / "a" / f".image.tif.tmp-{host}-{dead.pid}-01234567"
    file_tmp.write_text("half")
    dir_tmp = tmp_path / "a" / "b" / f".stack.ome.zarr.tmp-{host}-{dead.pid}-89abcdef"
    (dir_tmp / "0").mkdir(parents=True)
    live = tmp_path / "a" / f".model.pt.tmp-{host}-1-00000000"  # PID 1 runs: kept
    live.write_text("busy")
    inside_zarr = tmp_path / "a" / "s.zarr" / f".x.tmp-{host}-{dead.pid}-0"  # never looked into
    inside_zarr.parent.mkdir()
    inside_zarr.write_text("chunk")
    final = tmp_path / "a" / "image.tif"
    final.write_text("complete")
    removed = remove_stale_tree(tmp_path)
    assert sorted(removed) == sorted([file_tmp, dir_tmp])
    assert not file_tmp.exists() and not dir_tmp.exists()
    assert live.exists() and inside_zarr.exists() and final.read_text() == "complete"
    assert remove_stale_tree(tmp_path / "missing") == []


def test_rename_refuses_what_is_not_the_stages_own_output(tmp_path):
    """The re-check at rename time: a user's file that appeared meanwhile is left alone, the
    error names the user's path (not the hidden temporary), and no temporary is left."""
    from unet_core.common.errors import UserInputError
    from unet_core.common.outputs import JsonMark

    mark = JsonMark("unet-pipeline/test/1", "a test output")
    target = tmp_path / "out.json"
    with pytest.raises(UserInputError, match=r"out\.json: output path holds a file") as err, \
            atomic_output(target, own=mark) as tmp:
        target.write_text("the user's notes")
        tmp.write_text('{"format": "unet-pipeline/test/1"}')
    assert ".tmp-" not in str(err.value)
    assert target.read_text() == "the user's notes"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    target.unlink()
    with atomic_output(target, own=mark) as tmp:  # nothing there: written
        tmp.write_text('{"format": "unet-pipeline/test/1", "n": 1}')
    with atomic_output(target, own=mark) as tmp:  # its own earlier output: replaced
        tmp.write_text('{"format": "unet-pipeline/test/1", "n": 2}')
    assert '"n": 2' in target.read_text()


def test_failure_waits_for_zarrs_writes_still_in_flight(tmp_path):
    """zarr writes concurrently on its own loop; when one write fails (a full disk) its
    siblings are still running. The failed output is removed only after they have ended, so
    none of them fails on the deleted folder and asyncio has nothing to report at exit."""
    import asyncio

    import zarr
    from zarr.core.sync import _get_loop

    zarr.create_group(tmp_path / "warm.zarr")  # starts zarr's loop as any stage does
    outcome = {}

    async def late_sibling(folder):
        await asyncio.sleep(0.3)
        (folder / "c0").write_bytes(b"chunk")
        outcome["wrote"] = True

    with pytest.raises(OSError), atomic_output(tmp_path / "out.zarr", own=None) as tmp:
        tmp.mkdir()
        future = asyncio.run_coroutine_threadsafe(late_sibling(tmp), _get_loop())
        raise OSError(28, "No space left on device")
    assert future.done() and future.exception() is None and outcome == {"wrote": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["warm.zarr"]
