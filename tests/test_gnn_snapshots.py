"""Worker snapshots of a TieredFeatureStore: extents handed to worker copies (forked
children, pickled copies) are released once no process holding the snapshot remains, so a
loop of fork/pickle + feature write-back keeps storage bounded; a live copy keeps reading its
rows while the parent writes; a copy whose store was closed fails clearly; a worker copy
refuses open() and lists its snapshot's attributes."""

from __future__ import annotations

import os
import pickle
import select
import signal
import time

import pytest
import torch

pytest.importorskip("torch_geometric")

from helpers import store_config  # noqa: E402
from tiered.gnn.feature_store import FeatureStoreError, TieredFeatureStore  # noqa: E402
from tiered.store import TieredStore  # noqa: E402


def config(tmp_path, nvme: str = "16MiB") -> dict:
    return store_config(tmp_path, "32MiB", nvme)


def fstore(store) -> TieredFeatureStore:
    return TieredFeatureStore(store, chunk_bytes=64 << 10, cache_bytes=64 << 10, scratch_bytes=64 << 10,
                              max_read=16 << 10, timeout=20.0).open()


def _fork_and_exit() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["fork", "pickle", "copy"])
def test_handing_out_snapshots_between_updates_keeps_storage_bounded(tmp_path, mode):
    """Each epoch hands the store to workers (fork, pickle, a loaded copy that is closed) and
    then writes the features back: the replaced versions are freed, not pinned until close."""
    with TieredStore(config(tmp_path)) as s, fstore(s) as fs:
        fs.put_tensor(torch.randn(4000, 32), group_name=None, attr_name="x", index=None)  # 500 KiB
        tier = s._tiers["nvme"]
        start = tier.used
        for _epoch in range(40):  # 40 x 500 KiB > the 16 MiB tier if every version stays pinned
            if mode == "fork":
                _fork_and_exit()
            elif mode == "pickle":
                pickle.dumps(fs)
            else:
                c = pickle.loads(pickle.dumps(fs))
                c.get_tensor(group_name=None, attr_name="x", index=torch.tensor([1, 2]))
                c.close()
            fs.update_tensor(torch.randn(4000, 32), group_name=None, attr_name="x", index=None)
            fs.update_tensor(torch.randn(3, 32), group_name=None, attr_name="x", index=torch.tensor([0, 5, 3999]))
        assert tier.used <= 3 * start


def test_repeated_forks_without_writes_share_one_snapshot(tmp_path):
    with TieredStore(config(tmp_path)) as s, fstore(s) as fs:
        fs.put_tensor(torch.randn(4000, 32), group_name=None, attr_name="x", index=None)
        first = pickle.loads(pickle.dumps(fs))
        for _ in range(5):
            _fork_and_exit()
        again = pickle.loads(pickle.dumps(fs))
        assert first._worker.lock_path == again._worker.lock_path
        first.close(), again.close()


def _wait_readable(fd: int, timeout: float = 30.0) -> bytes:
    r, _w, _x = select.select([fd], [], [], timeout)
    assert r, "child did not answer in time"
    return os.read(fd, 64)


def _reap(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child did not exit")
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_live_copies_read_their_rows_while_the_parent_writes(tmp_path):
    """A loaded copy and a forked child keep reading the rows they got while the parent
    replaces them and writes over freed space; once both are gone the old version is freed."""
    x = torch.randn(4000, 32)
    idx = torch.arange(0, 4000, 7)
    want = x[idx].numpy().tobytes()
    with TieredStore(config(tmp_path)) as s, fstore(s) as fs:
        fs.put_tensor(x, group_name=None, attr_name="x", index=None)
        copy = pickle.loads(pickle.dumps(fs))
        go_r, go_w = os.pipe()
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # reads after the parent has written; answers through a pipe
            ok = b"0"
            try:
                torch.set_num_threads(1)  # as a DataLoader worker does: the parent's OpenMP pool is gone
                select.select([go_r], [], [], 30.0)
                got = fs.get_tensor(group_name=None, attr_name="x", index=idx)
                ok = b"1" if got.numpy().tobytes() == want else b"0"
            finally:
                os.write(res_w, ok)
                os._exit(0)
        os.close(go_r), os.close(res_w)
        try:
            tier = s._tiers["nvme"]
            for i in range(6):  # replace, and fill freed space with other data
                fs.update_tensor(torch.full((4000, 32), float(i)), group_name=None, attr_name="x", index=None)
                fs.put_tensor(torch.full((4000, 32), -1.0), group_name=None, attr_name=f"w{i % 2}", index=None)
            assert torch.equal(copy.get_tensor(group_name=None, attr_name="x", index=None), x)
            os.write(go_w, b"g")
            assert _wait_readable(res_r) == b"1"
        finally:
            os.close(go_w)
            _reap(pid)
            os.close(res_r)
        pinned = tier.used
        copy.close()
        fs.update_tensor(torch.zeros(1, 32), group_name=None, attr_name="x", index=torch.tensor([0]))
        assert tier.used <= pinned - x.numel() * 4 // 2  # x's extents were released


def test_a_copy_of_a_closed_store_fails_clearly(tmp_path):
    x = torch.randn(4000, 32)
    with TieredStore(config(tmp_path)) as s:
        fs = fstore(s)
        fs.put_tensor(x, group_name=None, attr_name="x", index=None)
        copy = pickle.loads(pickle.dumps(fs))
        blob = pickle.dumps(fs)
        assert torch.equal(copy.get_tensor(group_name=None, attr_name="x", index=torch.tensor([3])), x[3:4])
        fs.close()
        fs2 = fstore(s)  # reopened: its writes may reuse the closed session's extents
        fs2.put_tensor(torch.zeros(4000, 32), group_name=None, attr_name="y", index=None)
        with pytest.raises(FeatureStoreError, match=r"closed|released"):
            copy.get_tensor(group_name=None, attr_name="x", index=torch.tensor([3]))
        late = pickle.loads(blob)
        with pytest.raises(FeatureStoreError, match=r"closed|released"):
            late.get_tensor(group_name=None, attr_name="x", index=None)
        copy.close(), late.close()
        fs2.close()
        assert not list((s.root / "gnn-snapshots").glob("**/*.lock"))  # nothing left behind


def test_a_worker_copy_refuses_open_and_lists_its_attributes(tmp_path):
    with TieredStore(config(tmp_path)) as s, fstore(s) as fs:
        fs.put_tensor(torch.randn(10, 3), group_name="p", attr_name="x", index=None)
        copy = pickle.loads(pickle.dumps(fs))
        with pytest.raises(FeatureStoreError, match="read-only copy"):
            copy.open()
        with pytest.raises(FeatureStoreError, match="read-only copy"):
            with copy:
                pass
        got = copy.attributes()
        assert [(d["group"], d["attr"], tuple(d["shape"]), d["dtype"]) for d in got] == [("p", "x", (10, 3), "float32")]
        copy.close()


def test_close_releases_handed_out_extents_even_when_an_attribute_fails_to_shut_down(tmp_path, monkeypatch):
    x = torch.randn(4000, 32)
    with TieredStore(config(tmp_path)) as s:
        fs = fstore(s)
        fs.put_tensor(x, group_name=None, attr_name="x", index=None)
        tier = s._tiers["nvme"]
        base = tier.used
        copy = pickle.loads(pickle.dumps(fs))  # holds the first version
        fs.update_tensor(torch.zeros(4000, 32), group_name=None, attr_name="x", index=None)
        assert tier.used >= 2 * base - 4096

        def broken(a):
            raise FeatureStoreError("injected: prefetches still running")

        monkeypatch.setattr(fs, "_shutdown_attr", broken)
        with pytest.raises(FeatureStoreError, match="injected"):
            fs.close()
        assert tier.used <= base + 4096  # the copy's extents were given back anyway
        copy.close()


def test_a_snapshot_racing_close_is_refused(tmp_path, monkeypatch):
    """close() between a snapshot's open check and its leases: the snapshot fails, leasing nothing."""
    with TieredStore(config(tmp_path)) as s:
        fs = fstore(s)
        fs.put_tensor(torch.randn(4000, 32), group_name=None, attr_name="x", index=None)
        real = fs._check_open

        def check_then_close():
            real()
            monkeypatch.setattr(fs, "_check_open", real)
            fs.close()

        monkeypatch.setattr(fs, "_check_open", check_then_close)
        with pytest.raises(FeatureStoreError, match="not open"):
            pickle.dumps(fs)
        assert s._tiers["nvme"].used == 0 or all(
            e.readers == 0 for m in s._objects.values() for e in [m.extent])


def _read_in_spawned_child(fs, idx, conn) -> None:
    try:
        got = fs.get_tensor(group_name=None, attr_name="x", index=idx)
        conn.send(got.numpy().tobytes())
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(repr(e))
    fs.close()


@pytest.mark.timeout(180)
def test_a_spawned_process_holds_its_snapshot_from_the_moment_it_is_started(tmp_path):
    """The parent replaces the attribute right after start(), before the child has even
    unpickled its copy: the child still reads the rows it was started with."""
    import multiprocessing as mp

    x = torch.randn(4000, 32)
    idx = torch.arange(0, 4000, 3)
    ctx = mp.get_context("spawn")
    with TieredStore(config(tmp_path)) as s, fstore(s) as fs:
        fs.put_tensor(x, group_name=None, attr_name="x", index=None)
        ours, theirs = ctx.Pipe()
        p = ctx.Process(target=_read_in_spawned_child, args=(fs, idx, theirs))
        p.start()
        try:
            for i in range(4):
                fs.update_tensor(torch.full((4000, 32), float(i)), group_name=None, attr_name="x", index=None)
                fs.put_tensor(torch.full((4000, 32), -1.0), group_name=None, attr_name=f"w{i % 2}", index=None)
            assert ours.poll(120), "the spawned child did not answer"
            got = ours.recv()
            assert got == x[idx].numpy().tobytes(), got if isinstance(got, str) else "rows differ"
        finally:
            p.join(60)
            if p.is_alive():
                p.kill()
                p.join()


def test_lock_files_of_a_process_that_died_are_removed_on_open(tmp_path):
    with TieredStore(config(tmp_path)) as s:
        with fstore(s) as fs:
            live = next((s.root / "gnn-snapshots").iterdir()).name
        tag = live.split("-")[0]
        dead = s.root / "gnn-snapshots" / f"{tag}-{2**22 + 12345}-0123456789abcdef"  # above pid_max: not running
        dead.mkdir()
        (dead / "s1.lock").touch()
        with fstore(s):
            assert not dead.exists()
        assert not list((s.root / "gnn-snapshots").iterdir())  # close removed its own
