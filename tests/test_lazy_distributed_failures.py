"""DistributedCheckpointer when something fails: a save that raises on one rank only, a global
record whose old records cannot be retired, a lost global directory, a re-save of a step still
being committed, global commits that keep failing, a rank 0 that cannot open the global directory.
Every rank must reach the same verdict, no step may pair the bytes of different saves, and no
committed local copy may be deleted while a global record names it."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import run_ranks
from test_lazy_distributed import _cfg, _init

pytestmark = pytest.mark.timeout(120)
JOIN_S = 60
COLL_S = 10.0  # the checkpointer's collective timeout




def _open(root: str, **kw):
    from tiered.checkpoint import DistributedCheckpointer

    return DistributedCheckpointer(_cfg(root), host_buffer="8MiB", prefault=False, timeout=COLL_S, **kw).open()


def _state(rank: int, step: int) -> dict:
    return {"w": torch.full((4,), float(100 * rank + step)), "meta": {"step": step}}


def _record_steps(ck) -> dict[int, list[int]]:
    """Global record -> the step of each rank's retention it names (ckpt:<dir>:<step>:<token>)."""
    out = {}
    for d in sorted(ck.global_directory.glob("step-*")):
        doc = json.loads((d / ".metadata.json").read_text())
        out[doc["global"]["step"]] = [int(tag.split(":")[2]) for tag in doc["global"]["retain_tags"]]
    return out


def _records(ck) -> list[str]:
    return sorted(p.name for p in ck.global_directory.iterdir() if p.name.startswith("step-"))


# ------------------------------------------------------------------ saves stay paired across ranks


def _misalign_rank(rank: int, world: int, root: str, init: str) -> None:
    import torch.distributed as dist

    from tiered.checkpoint import CheckpointError, LazyCheckpointer

    _init(rank, world, init)
    try:
        ck = _open(root)
        try:
            ck.save(_state(rank, 1), 1).wait(JOIN_S)
            # rank 1's local commit of step 2 fails; wait_all reports it on every rank, once
            orig = ck._commit
            if rank == 1:
                def failing(h):
                    if h.step == 2:
                        raise OSError("injected disk error")
                    return orig(h)

                ck._commit = failing
            ck.save(_state(rank, 2), 2)
            with pytest.raises(CheckpointError, match="step 2"):
                ck.wait_all(JOIN_S)
            if rank == 1:
                ck._commit = orig
            h3 = ck.save(_state(rank, 3), 3)  # nothing left to raise here, on either rank
            assert h3.wait(JOIN_S)["step"] == 3
            # a save that raises on rank 1 only: rank 0's step 4 fails, step 5 pairs with step 5
            hs = {}
            if rank == 1:
                real = LazyCheckpointer.save

                def refusing(*a):
                    raise CheckpointError("injected save failure")

                LazyCheckpointer.save = refusing
                with pytest.raises(CheckpointError, match="injected save failure"):
                    ck.save(_state(rank, 4), 4)
                LazyCheckpointer.save = real
            else:
                hs[4] = ck.save(_state(rank, 4), 4)
            hs[5] = ck.save(_state(rank, 5), 5)
            if rank == 0:
                with pytest.raises(CheckpointError, match=r"rank\(s\) \[1\]"):
                    hs[4].wait(JOIN_S)
            assert hs[5].wait(JOIN_S)["step"] == 5
            assert sorted(ck.steps()) == [1, 3, 5]
            assert _record_steps(ck) == {s: [s, s] for s in (1, 3, 5)}
            got = ck.load(5)
            assert torch.equal(got["w"], _state(rank, 5)["w"]) and got["meta"] == {"step": 5}
            # ranks that save different steps in one slot: every rank fails, naming both
            h = ck.save(_state(rank, 6 + rank), 6 + rank)
            with pytest.raises(CheckpointError, match="step 6.*step 7|out of step"):
                h.wait(JOIN_S)
            assert sorted(ck.steps()) == [1, 3, 5]
        finally:
            try:
                ck.close()
            except CheckpointError:
                pass
    finally:
        dist.destroy_process_group()


def test_a_save_failing_on_one_rank_never_pairs_different_steps(tmp_path):
    run_ranks(_misalign_rank, 2, lambda r: (r, 2, str(tmp_path / "store"), str(tmp_path / "init")), timeout=JOIN_S)


# ------------------------------------------------- a record's retirement fails after the commit point


def _retire_fail_rank(rank: int, world: int, root: str, init: str) -> None:
    import torch.distributed as dist

    from tiered.checkpoint import CheckpointError

    _init(rank, world, init)
    try:
        with _open(root, keep_last=2) as ck:
            real, calls = shutil.rmtree, []

            def flaky(path, *a, **kw):
                if ".global" in str(path) and not calls:
                    calls.append(path)
                    raise OSError("injected: rmtree failed")
                return real(path, *a, **kw)

            shutil.rmtree = flaky
            for s in (1, 2, 3):  # the commit of 3 retires record 1: that fails once, on rank 0
                assert ck.save(_state(rank, s), s).wait(JOIN_S)["step"] == s
            assert ck.latest() == 3 and sorted(ck.steps()) == [2, 3]
            assert ck.save(_state(rank, 4), 4).wait(JOIN_S)["step"] == 4  # save() does not raise it on rank 0
            if rank == 0:
                with pytest.raises(CheckpointError, match="injected: rmtree failed"):
                    ck.wait_all(JOIN_S)  # reported, once, on the rank it happened on
            ck.wait_all(JOIN_S)
            # keep_last=2: the records and the local copies of steps 1 and 2 are retired
            assert sorted(ck.steps()) == [3, 4] and sorted(ck.local_steps()) == [3, 4]
            if rank == 0:
                assert _records(ck) == ["step-000000000003", "step-000000000004"]
            for s in (3, 4):
                assert torch.equal(ck.load(s)["w"], _state(rank, s)["w"])
            dist.barrier()
            if rank == 1:  # a local copy gone from under a global record: a clear error
                (ck.directory / "step-000000000003.json").unlink()
                with pytest.raises(CheckpointError, match="step 3.*rank 1"):
                    ck.load(3)
    finally:
        dist.destroy_process_group()


def test_a_failed_retirement_of_an_old_record_leaves_the_new_step_committed(tmp_path):
    run_ranks(_retire_fail_rank, 2, lambda r: (r, 2, str(tmp_path / "store"), str(tmp_path / "init")), timeout=JOIN_S)


# ---------------------------------------------------------- the global directory is lost or unreadable


def _lost_global_rank(rank: int, world: int, root: str, init: str, phase: str) -> None:
    import torch.distributed as dist

    from tiered.checkpoint import CheckpointError

    _init(rank, world, init)
    try:
        if phase == "save":
            with _open(root) as ck:
                for s in (1, 2):
                    ck.save(_state(rank, s), s).wait(JOIN_S)
            return
        with pytest.raises(CheckpointError, match=r"no records.*local steps \[1, 2\]|local steps \[1, 2\].*no records"):
            _open(root)
        local = Path(root) / f"r{rank}" / "checkpoints" / "default"
        assert sorted(p.name for p in local.glob("step-*.json")) == ["step-000000000001.json",
                                                                     "step-000000000002.json"]
        gdir = Path(root) / "r0" / "checkpoints" / "default.global"
        if rank == 0:  # a record another program wrote: rank 0 cannot read the global steps
            (gdir / "step-000000000009").mkdir(parents=True)
            (gdir / "step-000000000009" / ".metadata.json").write_text("{}")
        dist.barrier()
        t0 = time.monotonic()
        with pytest.raises(CheckpointError, match="step-000000000009"):
            _open(root)
        assert time.monotonic() - t0 < COLL_S / 2  # told, not timed out
    finally:
        dist.destroy_process_group()


def test_a_lost_global_directory_deletes_no_local_step_and_fails_on_every_rank(tmp_path):
    root = str(tmp_path / "store")
    run_ranks(_lost_global_rank, 2, lambda r: (r, 2, root, str(tmp_path / "init1"), "save"), timeout=JOIN_S)
    shutil.rmtree(tmp_path / "store" / "r0" / "checkpoints" / "default.global")
    run_ranks(_lost_global_rank, 2, lambda r: (r, 2, root, str(tmp_path / "init2"), "open"), timeout=JOIN_S)


# -------------------------------------------------------------------------------- one rank's behaviour


def _single_rank(rank: int, world: int, root: str, init: str) -> None:
    import torch.distributed as dist

    _init(rank, world, init)
    try:
        with _open(root, keep_last=2) as ck:
            _resave_pending(ck)
            _no_wait_for_retire_lock(ck)
            _bounded_local_steps(ck)
            _waits_end_in_time(ck)
    finally:
        dist.destroy_process_group()


def _resave_pending(ck) -> None:
    """Saving a step again while its first save is still being committed globally is refused."""
    from tiered.checkpoint import CheckpointError

    gate, orig = threading.Event(), ck._agree
    ck._agree = lambda *a: (gate.wait(JOIN_S), orig(*a))[1]
    first = ck.save(_state(0, 5), 5)
    try:
        with pytest.raises(CheckpointError, match="step 5.*being committed"):
            ck.save(_state(0, 50), 5)
    finally:
        gate.set()
    assert first.wait(JOIN_S)["step"] == 5
    ck._agree = orig
    ck.wait_all(JOIN_S)
    assert ck.latest() == 5 and torch.equal(ck.load(5)["w"], _state(0, 5)["w"])


def _no_wait_for_retire_lock(ck) -> None:
    """save(), latest() and steps() do not wait for a retire (fsyncs) of the commit thread."""
    held, release = threading.Event(), threading.Event()

    def retire() -> None:
        with ck._retire_lock:
            held.set()
            release.wait(5.0)

    t = threading.Thread(target=retire)
    t.start()
    try:
        held.wait(JOIN_S)
        t0 = time.monotonic()
        assert ck.latest() == 5 and sorted(ck.steps()) == [5]
        h = ck.save(_state(0, 6), 6)
        assert time.monotonic() - t0 < 2.0
    finally:
        release.set()
        t.join(JOIN_S)
    assert h.wait(JOIN_S)["step"] == 6


def _bounded_local_steps(ck) -> None:
    """Global commits that keep failing do not pile up local steps."""
    from tiered.checkpoint import CheckpointError

    def broken(*a):
        raise OSError("injected: global record not written")

    ck._write_global = broken
    for s in range(7, 12):
        with pytest.raises(CheckpointError, match="global record not written"):
            ck.save(_state(0, s), s).wait(JOIN_S)
    assert sorted(ck.steps()) == [5, 6]
    assert sorted(ck.local_steps()) in ([5, 6], [5, 6, 11])
    del ck._write_global


def test_one_rank_refuses_pending_resaves_does_not_wait_for_retires_and_bounds_local_steps(tmp_path):
    run_ranks(_single_rank, 1, lambda r: (r, 1, str(tmp_path / "store"), str(tmp_path / "init")), timeout=JOIN_S)


def _waits_end_in_time(ck) -> None:
    """wait_all(timeout) waits at most timeout in all; close(timeout) raises past its timeout and
    can be called again."""
    from tiered.checkpoint import CheckpointError

    slow, gate, orig = threading.Event(), threading.Event(), ck._agree

    def agree(*a):
        (gate if slow.is_set() else threading.Event()).wait(0.6 if not slow.is_set() else JOIN_S)
        return orig(*a)

    ck._agree = agree
    for s in (20, 21, 22):  # each commit takes 0.6 s: 1.8 s for the three
        ck.save(_state(0, s), s)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        ck.wait_all(1.0)
    assert time.monotonic() - t0 < 1.5
    ck.wait_all(JOIN_S)
    slow.set()  # from here the commit waits for the gate
    ck.save(_state(0, 23), 23)
    with pytest.raises(CheckpointError, match="still busy"):
        ck.close(timeout=0.5)
    gate.set()
    ck.close(timeout=JOIN_S)
    assert ck.host is None  # resources released by the second close


# ------------------------------------------------------- rank 0 dies: the global directory's claim moves


def _renumbered(role: str, root: str, init1: str, init2: str) -> None:
    """"first0" dies after step 1; "first1" lives on as rank 0 of a new group; "restarted" joins
    it as rank 1, on the dead rank's storage shard."""
    import os

    import torch.distributed as dist

    from tiered.checkpoint import DistributedCheckpointer

    if role == "restarted":
        _init(1, 2, init2)
        cfg = _cfg(root)
        cfg["tiers"]["nvme"]["path"] = root + "/r0"  # the dead rank's shard
        ck = DistributedCheckpointer(cfg, host_buffer="8MiB", prefault=False, timeout=COLL_S).open()
    else:
        _init(int(role[-1]), 2, init1)
        ck = _open(root)
        ck.save(_state(ck.rank, 1), 1).wait(JOIN_S)
        if role == "first0":
            os._exit(0)
        dist.destroy_process_group()
        _init(0, 2, init2)
        ck.rejoin()
        lock = ck.global_directory / ".lock"
        assert lock.read_text().strip() == str(os.getpid())  # rank 0 now: it holds the global directory
    try:
        assert ck.latest() == 1
        assert ck.save(_state(ck.rank, 2), 2).wait(JOIN_S)["step"] == 2
        assert sorted(ck.steps()) == [1, 2]
        ck.close()
    finally:
        dist.destroy_process_group()


def test_the_global_directory_claim_moves_to_the_new_rank_0_on_rejoin(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    args = (str(tmp_path / "store"), str(tmp_path / "init1"), str(tmp_path / "init2"))
    procs = [ctx.Process(target=_renumbered, args=(role, *args)) for role in ("first0", "first1")]
    for p in procs:
        p.start()
    procs[0].join(JOIN_S)
    procs.append(ctx.Process(target=_renumbered, args=("restarted", *args)))
    procs[-1].start()
    for p in procs:
        p.join(JOIN_S)
        if p.is_alive():
            p.kill()
            p.join(10)
    assert [p.exitcode for p in procs] == [0, 0, 0]
