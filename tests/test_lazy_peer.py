"""Peer snapshots: with ``DistributedCheckpointer(..., peer=True)`` rank r's committed snapshot
is also held in rank (r + 1) % world's host memory. A rank killed after a global commit and
restarted (the survivor and the new process form a new process group) gets its state back from
the survivor's memory, without a byte read from storage, bitwise equal to what it saved."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os

import pytest
import torch

pytestmark = pytest.mark.timeout(120)
JOIN_S = 40
COLL_S = 15.0


def _cfg(root: str) -> dict:
    return {"tiers": {"host": {"capacity": "32MiB"}, "nvme": {"path": root + "/r{rank}", "capacity": "64MiB"}},
            "engine": {"workers": 1}}


def _state(rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(100 * rank + step)
    return {"w": torch.randn(33, 7, generator=g), "b": torch.randint(0, 1000, (5,), generator=g),
            "h": torch.randn(4, generator=g).to(torch.bfloat16), "meta": {"step": step, "lr": 0.5}}


def _init(rank: int, init: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))


def _open(root: str):
    from tiered.checkpoint import DistributedCheckpointer

    return DistributedCheckpointer(_cfg(root), peer=True, host_buffer="8MiB", prefault=False, timeout=COLL_S).open()


def _check(got: dict, rank: int, step: int) -> None:
    want = _state(rank, step)
    assert got["meta"] == want["meta"]
    for k in ("w", "b", "h"):
        assert got[k].dtype == want[k].dtype and torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k


def _first_run(rank: int, root: str, init1: str, init2: str) -> None:
    """Both ranks save two steps; rank 1 then dies. Rank 0 lives on, joins a new group with the
    restarted rank 1, and serves it its snapshot."""
    import torch.distributed as dist

    _init(rank, init1)
    ck = _open(root)
    for step in (1, 2):
        ck.save(_state(rank, step), step).wait(JOIN_S)
    owner = ck.store.owners().get(ck.owner, {}).get("host", {})
    assert owner.get("held", 0) > 0  # the peer's snapshot, in this store's host tier, charged to the checkpointer
    if rank == 1:
        os._exit(0)  # killed after the global commit of step 2
    dist.destroy_process_group()
    _init(rank, init2)  # the survivor and the restarted process: a new group
    try:
        ck.rejoin()
        assert ck.latest() == 2
        before = ck.store.engine.stats()["read"]["bytes"]
        _check(ck.load(), rank, 2)  # its own peer is the new process: from its storage
        assert ck.store.engine.stats()["read"]["bytes"] > before  # the counter the restarted rank checks counts
        assert ck.restored_from_peer is None
        ck.save(_state(rank, 3), 3).wait(JOIN_S)  # peers hold each other's snapshots again
        assert ck.latest() == 3
        _rollback_from_peer(ck, rank)
        ck.close()
    finally:
        dist.destroy_process_group()


def _restarted(rank: int, root: str, init2: str, reads_out: str) -> None:
    import torch.distributed as dist

    _init(rank, init2)
    try:
        ck = _open(root)
        assert ck.latest() == 2
        before = ck.store.engine.stats()["read"]["bytes"]
        got = ck.load()
        reads = ck.store.engine.stats()["read"]["bytes"] - before
        assert ck.restored_from_peer == 0
        _check(got, rank, 2)
        with open(reads_out, "w") as f:
            f.write(str(reads))
        ck.save(_state(rank, 3), 3).wait(JOIN_S)
        _rollback_from_peer(ck, rank)
        ck.close()
    finally:
        dist.destroy_process_group()


def _rollback_from_peer(ck, rank: int) -> None:
    """Both ranks live: each takes its state from the other's memory at once (a roll back)."""
    before = ck.store.engine.stats()["read"]["bytes"]
    _check(ck.load(), rank, 3)
    assert ck.restored_from_peer == (rank + 1) % 2
    assert ck.store.engine.stats()["read"]["bytes"] == before


def _join(p, what: str) -> None:
    p.join(JOIN_S)
    if p.is_alive():
        p.kill()
        p.join(10)
    assert p.exitcode == 0, f"{what}: exit code {p.exitcode}"


def test_restarted_rank_restores_from_its_peers_memory_without_reading_storage(tmp_path):
    ctx = mp.get_context("fork")
    root, init1, init2 = str(tmp_path / "store"), str(tmp_path / "init1"), str(tmp_path / "init2")
    reads = tmp_path / "reads"
    survivor = ctx.Process(target=_first_run, args=(0, root, init1, init2))
    doomed = ctx.Process(target=_first_run, args=(1, root, init1, init2))
    survivor.start()
    doomed.start()
    try:
        _join(doomed, "rank 1, killed after the global commit")
        restarted = ctx.Process(target=_restarted, args=(1, root, init2, str(reads)))
        restarted.start()
        _join(restarted, "rank 1, restarted")
        _join(survivor, "rank 0")
    finally:
        for p in (survivor, doomed):
            if p.is_alive():
                p.kill()
    assert reads.read_text() == "0"
