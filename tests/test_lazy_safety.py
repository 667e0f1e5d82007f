"""LazyCheckpointer safety: a checkpoint directory is one checkpointer's (in this process and
across processes), a load or cold copy keeps the bytes it reads until it is done, commit order
does not follow the wall clock, a full host tier does not stall the optimizer step, prefault
stays within the checkpointer's share, the manifest rename is the commit point, and leftovers of
earlier formats are cleaned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from tiered.checkpoint import CheckpointError, LazyCheckpointer
from tiered.store import TieredStore

T = 30.0
MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)


def cfg(tmp_path: Path, name: str = "nvme", *, host: str = "32MiB", flash: bool = False) -> dict:
    tiers = {"host": {"capacity": host}, "nvme": {"path": str(tmp_path / name), "capacity": "64MiB"}}
    if flash:
        tiers["flash"] = {"path": str(tmp_path / "flash"), "capacity": "64MiB"}
    return {"tiers": tiers, "engine": {"workers": 2, "chunk": "1MiB"}}


_CHILD = """
import json, sys, torch
from tiered.checkpoint import LazyCheckpointer, CheckpointError
cfg, kw = json.loads(sys.argv[1]), json.loads(sys.argv[2])
try:
    with LazyCheckpointer(cfg, prefault=False, keep_last=1, **kw) as ck:
        ck.save({"x": torch.zeros(4)}, 50).wait(30)
        print("OPENED", ck.steps())
except CheckpointError as e:
    print("REFUSED", e)
"""


def run_child(c: dict, **kw) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(c), json.dumps(kw)], capture_output=True,
                       text=True, timeout=90, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.parametrize("role", ["directory", "cold_directory"])
def test_another_process_with_its_own_store_is_refused_the_directory(tmp_path, role):
    d = tmp_path / "shared-ckpt"
    kw = {"directory": str(d)} if role == "directory" else {"cold_directory": str(d)}
    with LazyCheckpointer(cfg(tmp_path, "a"), prefault=False, keep_last=1, **kw) as ck:
        ck.save({"x": torch.ones(4)}, 7).wait(T)
        out = run_child(cfg(tmp_path, "b"), **kw)
        assert out.startswith("REFUSED") and "another process" in out and str(d) in out, out
        assert ck.steps() == {7: "storage"} and torch.equal(ck.load()["x"], torch.ones(4))
    assert run_child(cfg(tmp_path, "b"), **kw).startswith("OPENED")  # released on close


def test_a_cold_directory_that_is_another_checkpointers_directory_is_refused(tmp_path):
    with TieredStore(cfg(tmp_path, flash=True)) as s:
        a = LazyCheckpointer(store=s, cold_tier="flash", keep_last=1, prefault=False).open()
        try:
            b = LazyCheckpointer(store=s, tier="flash", keep_last=1, prefault=False)
            with pytest.raises(CheckpointError, match=r"directory=.*already in use in this process as the "
                                                      r"cold_directory"):
                b.open()
            nested = LazyCheckpointer(store=s, name="other", directory=a.directory / "sub", prefault=False)
            with pytest.raises(CheckpointError, match="already in use"):
                nested.open()
        finally:
            a.close()
        with pytest.raises(CheckpointError, match="overlap"):
            LazyCheckpointer(store=s, directory=tmp_path / "d", cold_directory=tmp_path / "d", prefault=False).open()
        LazyCheckpointer(store=s, tier="flash", prefault=False).open().close()  # free again


@pytest.mark.parametrize("meanwhile", ["retire", "resave", "delete"])
def test_a_load_keeps_the_bytes_it_reads_while_the_step_is_retired(tmp_path, meanwhile):
    """While load(1) reads, the step is retired (keep_last=1), saved again or deleted: the load
    still returns the bytes of the manifest it read, and they are freed afterwards."""
    with TieredStore(cfg(tmp_path)) as s, LazyCheckpointer(store=s, keep_last=1, prefault=False) as ck:
        ck.save({"x": torch.full((MiB,), 1.0)}, 1).wait(T)
        orig, fired = ck._read_parts, []

        def read_parts(t, paths, put, where):
            if not fired:
                fired.append(1)
                if meanwhile == "delete":
                    ck.delete(1)
                else:
                    ck.save({"x": torch.full((MiB,), 2.0)}, 2 if meanwhile == "retire" else 1).wait(T)
            return orig(t, paths, put, where)

        ck._read_parts = read_parts
        got = ck.load(1)["x"]
        assert fired and bool((got == 1.0).all())
        assert len(s.retained(ck._tag_prefix)) == (0 if meanwhile == "delete" else 1)  # released after the load


def test_keep_last_follows_commit_order_when_the_wall_clock_steps_back(tmp_path, monkeypatch):
    import tiered.checkpoint.commit as commit

    c = cfg(tmp_path)
    with LazyCheckpointer(c, keep_last=1, prefault=False) as ck:
        ck.save({"x": torch.ones(4)}, 10).wait(T)
        monkeypatch.setattr(commit, "time", types.SimpleNamespace(time=lambda: time.time() - 3600.0,
                                                                  perf_counter=time.perf_counter))
        ck.save({"x": torch.full((4,), 11.0)}, 11).wait(T)
        assert ck.steps() == {11: "storage"} and ck.latest() == 11
    with LazyCheckpointer(c, keep_last=1, prefault=False) as ck:  # the order survives a restart
        monkeypatch.undo()
        ck.save({"x": torch.full((4,), 9.0)}, 9).wait(T)
        assert ck.steps() == {9: "storage"}


def test_a_failure_after_the_manifest_rename_keeps_the_checkpoint(tmp_path, monkeypatch):
    """The rename is the commit point: if fsync of the directory fails after it, the step stays
    loadable (its bytes retained) and the failure is reported by the next call."""
    import tiered.atomic as atomic
    import tiered.checkpoint.commit as commit

    with LazyCheckpointer(cfg(tmp_path), prefault=False) as ck:
        real, calls = atomic.fsync_dir, []

        def failing(d):
            if Path(d) == ck.directory and not calls:
                calls.append(d)
                raise OSError(5, "Input/output error (injected)")
            return real(d)

        monkeypatch.setattr(atomic, "fsync_dir", failing)
        monkeypatch.setattr(commit, "fsync_dir", failing)
        h = ck.save({"x": torch.arange(8.0)}, 1)
        try:
            h.wait(T)
        except OSError:
            pass
        assert calls and ck.steps() == {1: "storage"}
        assert torch.equal(ck.load(1)["x"], torch.arange(8.0))  # its bytes are still retained
        with pytest.raises(CheckpointError, match="injected"):
            ck.wait_all(T)
        assert h.wait(T)["step"] == 1


def test_data_files_of_interrupted_format_1_saves_are_removed_on_open(tmp_path):
    c = cfg(tmp_path)
    with LazyCheckpointer(c, prefault=False) as ck:
        d = ck.directory
    (d / "step-000000000003-deadbeef.data").write_bytes(b"\0" * 4096)  # no manifest names it
    (d / "notes.data").write_bytes(b"x")  # not a checkpoint's
    with LazyCheckpointer(c, prefault=False):
        assert sorted(p.name for p in d.glob("*.data")) == ["notes.data"]


def test_a_retire_waits_for_a_re_save_between_reading_the_old_manifest_and_dropping_it(tmp_path, monkeypatch):
    import threading

    import tiered.checkpoint.commit as commit

    with LazyCheckpointer(cfg(tmp_path), keep_last=2, prefault=False) as ck:
        ck.save({"x": torch.ones(4)}, 1).wait(T)
        ck.save({"x": torch.ones(4)}, 2).wait(T)
        real, inside = commit.read_manifest, []

        def read_manifest(path):
            if threading.current_thread().name == "tiered-ckpt-commit" and not inside:
                retire = threading.Thread(target=ck._retire, args=(ck.directory, 1))
                retire.start()
                retire.join(1.0)
                inside.append(not retire.is_alive())  # True: it ran while the re-save was half done
            return real(path)

        monkeypatch.setattr(commit, "read_manifest", read_manifest)
        ck.save({"x": torch.full((4,), 5.0)}, 1).wait(T)  # step 1 again
        monkeypatch.undo()
        assert inside == [False]
        for _ in range(100):  # the retire thread runs once the re-save is done
            if ck.steps() == {1: "storage"}:
                break
            time.sleep(0.05)
        assert ck.steps() == {1: "storage"} and torch.equal(ck.load(1)["x"], torch.full((4,), 5.0))


def test_a_full_host_tier_does_not_stall_the_optimizer_step(tmp_path):
    """Another owner holds most of the host tier: the background thread waits for a buffer
    without claiming the parameter's piece, so the step hook copies it privately at once."""
    with TieredStore(cfg(tmp_path)) as s, \
            LazyCheckpointer(store=s, host_buffer="8MiB", host_wait=4.0, prefault=False) as ck:
        w = torch.nn.Parameter(torch.randn(2 * MiB))  # 8 MiB: one piece
        opt = torch.optim.SGD([w], lr=0.1)
        ck.attach(opt)
        want = w.detach().clone()
        held = s.alloc_host(28 * MiB, owner="kv")
        try:
            w.grad = torch.ones_like(w)
            h = ck.save({"w": w}, 1)
            time.sleep(0.3)  # the background thread is waiting for host memory
            t0 = time.perf_counter()
            opt.step()
            assert time.perf_counter() - t0 < 2.0
        finally:
            held.release()
        h.wait(T)
        assert torch.equal(ck.load(1)["w"], want)
        held = s.alloc_host(28 * MiB, owner="kv")  # never given back: the save fails after host_wait
        try:
            t0 = time.perf_counter()
            with pytest.raises(CheckpointError, match=r"host_wait=4\.0 s"):
                ck.save({"w": w}, 2).wait(T)
            assert time.perf_counter() - t0 >= 3.5
        finally:
            held.release()


def test_a_forked_child_does_not_keep_the_directory_locked(tmp_path):
    """A child forked while the checkpointer is open (e.g. DataLoader workers) closes its copy of
    the lock: the parent can close and open the directory again while the child lives."""
    import multiprocessing as mp

    c = cfg(tmp_path)
    ck = LazyCheckpointer(c, prefault=False).open()
    child = mp.get_context("fork").Process(target=time.sleep, args=(30,))
    child.start()
    try:
        ck.close()
        LazyCheckpointer(c, prefault=False).open().close()
    finally:
        child.terminate()
        child.join(T)
