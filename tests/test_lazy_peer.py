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


# ------------------------------------------- large non-contiguous tensors, a corrupt held copy, memory


def _host_held(store, owner: str) -> int:
    return store.owners().get(owner, {}).get("host", {}).get("held", 0)


def _noncontig_rank(rank: int, root: str, init: str) -> None:
    """A non-contiguous tensor larger than a segment (one piece, one crc32 per segment) comes back
    from the peer's memory; a held copy that fails its crc32 falls back to storage; the held
    copy's memory is given back when a newer step replaces it and at close; a host share that
    cannot hold the peer copies is refused at save."""
    import torch.distributed as dist

    from tiered.allocators import align_up
    from tiered.checkpoint import CheckpointError, DistributedCheckpointer
    from tiered.store import TieredStore

    _init(rank, init)
    cfg = {"tiers": {"host": {"capacity": "96MiB"}, "nvme": {"path": root + "/r{rank}", "capacity": "128MiB"}},
           "engine": {"workers": 1}}
    store = TieredStore.shared(cfg)
    try:
        ck = DistributedCheckpointer(store=store, peer=True, host_buffer="16MiB", prefault=False, timeout=COLL_S)
        assert _host_held(store, ck.owner) == 0
        ck.open()
        w = torch.randn(1100, 2048, generator=torch.Generator().manual_seed(rank)).t()  # 9 MiB, not contiguous
        ck.save({"w": w}, 1).wait(JOIN_S)
        one = align_up(w.numel() * 4)
        assert _host_held(store, ck.owner) == one  # the peer's copy held here; nothing else
        got = ck.load()
        assert ck.restored_from_peer == (rank + 1) % 2 and torch.equal(got["w"], w)
        if rank == 0:  # the copy of rank 1's state held here is damaged
            ck._peer.held.bufs[0].array[12345] ^= 0xFF
        got = ck.load()
        assert torch.equal(got["w"], w)
        assert ck.restored_from_peer == (None if rank == 1 else 1)  # rank 1 read its storage instead
        w2 = w * 2
        ck.save({"w": w2}, 2).wait(JOIN_S)
        assert _host_held(store, ck.owner) == one  # step 1's held copy was freed when step 2's replaced it
        assert torch.equal(ck.load()["w"], w2) and ck.restored_from_peer == (rank + 1) % 2
        ck.close()
        assert _host_held(store, ck.owner) == 0
        # a host share too small for the peer copies: save says so at once (on every rank)
        small = DistributedCheckpointer(store=store, name="small", peer=True, host_share="24MiB", prefault=False,
                                        timeout=COLL_S, host_wait=5.0).open()
        with pytest.raises(CheckpointError, match="three copies.*host_share"):
            small.save({"w": w}, 1)
        small.close()
    finally:
        store.close()
        dist.destroy_process_group()


def test_large_non_contiguous_tensor_and_a_corrupt_held_copy_and_peer_memory(tmp_path):
    from helpers import run_ranks

    run_ranks(_noncontig_rank, 2, lambda r: (r, str(tmp_path / "store"), str(tmp_path / "init")), timeout=JOIN_S)


# ------------------------------------------------------------- a held copy is not freed while it is sent


class _Buf:
    def __init__(self, n: int) -> None:
        import numpy as np

        self.array = np.zeros(n, dtype=np.uint8)
        self.released = False

    def release(self) -> None:
        self.released = True


class _Work:
    def __init__(self) -> None:
        self.waited = False

    def wait(self) -> None:
        self.waited = True


class _FailedWork:
    def wait(self) -> None:
        raise RuntimeError("peer gone")


def test_held_copy_being_sent_is_freed_only_after_the_send(monkeypatch):
    """load() sends the held copy while the global thread may replace it (hold) or the
    checkpointer close: its buffers must outlive the sends that read them."""
    import types

    import torch.distributed as dist

    from tiered.checkpoint._wire import wait_all
    from tiered.checkpoint.peer import Held, PeerCopies

    monkeypatch.setattr(dist, "isend", lambda *a, **kw: _Work())
    peers = PeerCopies(types.SimpleNamespace(store=None, owner="checkpoint/x", res=None), 1.0)
    header = {"step": 1, "rank": 0, "world": 2, "tree": None,
              "tensors": [{"name": "w", "dtype": "uint8", "shape": [8], "nbytes": 8, "pieces": [[8, [0]]]}]}
    old = Held(header, [_Buf(8)])
    bufs = list(old.bufs)
    peers.hold(old)
    works = peers.send_held(1, None)
    peers.hold(Held(dict(header, step=2), [_Buf(8)]))  # step 2 committed meanwhile
    assert not bufs[0].released
    wait_all(works)
    assert bufs[0].released
    works = peers.send_held(1, None)
    new = peers.held.bufs[0]
    peers.close()
    assert not new.released
    wait_all(works)
    assert new.released
    # a send that fails still gives the copy back (once every send has ended)
    monkeypatch.setattr(dist, "isend", lambda *a, **kw: _FailedWork())
    peers.hold(Held(dict(header, step=3), [_Buf(8)]))
    third = peers.held.bufs[0]
    works = peers.send_held(1, None)
    peers.close()
    with pytest.raises(RuntimeError, match="peer gone"):
        wait_all(works)
    assert third.released
