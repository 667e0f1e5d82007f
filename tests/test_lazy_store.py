"""LazyCheckpointer as a client of the TieredStore: its bytes are store objects kept by a
retention (counted in the storage tier's capacity, freed when retired), its host memory
is the store's host tier within ``host_buffer``, it opens no arena or engine of its own,
and it cleans up the store after an interrupted save.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import store_config
from tiered import allocators
from tiered import io_engine
from tiered.allocators import align_up
from tiered.checkpoint import CheckpointError, LazyCheckpointer
from tiered.store import TieredStore

T = 30.0
MiB = 1 << 20
pytestmark = pytest.mark.timeout(120)


def cfg(tmp_path: Path, *, host: str = "32MiB", nvme: str = "256MiB") -> dict:
    return store_config(tmp_path, host, nvme)


def used(store: TieredStore) -> int:
    return store.stats()["tiers"]["nvme"]["used"]


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"big": torch.randn((9 * MiB + 100) // 4, generator=g), "small": torch.arange(10, dtype=torch.int16),
            "meta": {"seed": seed}}


def footprint(sd: dict) -> int:
    """Bytes a checkpoint of ``sd`` takes on the tier: 8 MiB pieces, each 4 KiB aligned."""
    total = 0
    for t in (v for v in sd.values() if isinstance(v, torch.Tensor)):
        n = t.numel() * t.element_size()
        total += sum(align_up(min(8 * MiB, n - lo)) for lo in range(0, n, 8 * MiB))
    return total


def test_checkpoint_bytes_count_in_the_storage_tier_and_are_freed_when_retired(tmp_path):
    c = cfg(tmp_path)
    with TieredStore(c) as store:
        store.put("user/w", torch.ones(1000)).result(T)
        base = used(store)
        with LazyCheckpointer(store=store, keep_last=1) as ck:
            size = footprint(state(1))
            ck.save(state(1), 1).wait(T)
            assert used(store) == base + size
            assert store.keys() == ["user/w"]  # the pieces' keys are gone; the retention keeps their bytes
            ck.save(state(2), 2).wait(T)  # retires step 1
            assert used(store) == base + size
            assert ck.steps() == {2: "storage"}
            for k, v in ck.load(2).items():
                assert torch.equal(v, state(2)[k]) if isinstance(v, torch.Tensor) else v == state(2)[k]
            ck.delete(2)
            assert used(store) == base and store.retained() == {}
        assert store.keys() == ["user/w"]


def test_a_checkpoint_that_does_not_fit_the_tier_fails_and_leaves_the_previous_one(tmp_path):
    c = cfg(tmp_path, nvme="16MiB")
    with TieredStore(c) as store, LazyCheckpointer(store=store, keep_last=2, host_buffer="8MiB") as ck:
        ck.save(state(1), 1).wait(T)
        after_one = used(store)
        with pytest.raises(CheckpointError, match=r"step 2: writing bytes 0\.\. of tensor 'big' to the store "
                                                  r"failed: put\('ckpt/default/.*no free extent"):
            ck.save(state(2), 2).wait(T)
        assert ck.steps() == {1: "storage"} and used(store) == after_one
        assert store.keys() == [] and len(store.retained()) == 1
        assert torch.equal(ck.load(1)["big"], state(1)["big"])


def test_snapshots_use_the_store_host_tier_within_host_buffer_and_no_own_engine(tmp_path, monkeypatch):
    c = cfg(tmp_path, host="64MiB")
    with TieredStore(c) as store:
        opened = []
        for cls in (allocators.HostArena, io_engine.IOEngine):
            orig = cls.open
            monkeypatch.setattr(cls, "open", lambda self, orig=orig: opened.append(type(self).__name__) or orig(self))
        sd = {f"t{i}": torch.full((2 * MiB,), float(i)) for i in range(5)}  # 40 MiB through an 8 MiB budget
        # prefault=False: it touches (and so holds for a moment) all the free host memory
        with LazyCheckpointer(store=store, host_buffer="8MiB", prefault=False) as ck:
            ck.save(sd, 1).wait(T)
            got = ck.load(1)
        assert opened == []
        host = store.stats()["tiers"]["host"]
        assert 0 < host["peak"] <= 8 * MiB and host["used"] == 0
        assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_a_store_given_stays_open_and_one_opened_is_closed(tmp_path):
    c = cfg(tmp_path)
    with LazyCheckpointer(c) as ck:
        own = ck.store
        assert isinstance(own, TieredStore)
        ck.save({"x": torch.ones(3)}, 1).wait(T)
    with TieredStore(c) as store:  # the checkpointer's store was closed: its lock is free
        assert len(store.retained()) == 1
        with LazyCheckpointer(store=store) as ck:
            assert torch.equal(ck.load(1)["x"], torch.ones(3))
        store.put("k", torch.ones(2)).result(T)  # still open
        with pytest.raises(CheckpointError, match="backend= applies to a store the checkpointer opens"):
            LazyCheckpointer(store=store, backend="threads")
        with pytest.raises(CheckpointError, match="name='a b'"):
            LazyCheckpointer(store=store, name="a b")


def test_open_releases_retentions_and_objects_an_interrupted_save_left(tmp_path):
    c = cfg(tmp_path)
    with TieredStore(c) as store:
        with LazyCheckpointer(store=store) as ck:
            ck.save({"x": torch.ones(3)}, 1).wait(T)
            committed = set(store.retained())
        ck = LazyCheckpointer(store=store)
        base = used(store)
        key = ck._key_prefix + "2-0badf00d/0"  # a save killed after its puts and its retain
        store.put(key, torch.ones(MiB)).result(T)
        store.retain(ck._tag_prefix + "2:0badf00d", [key])
        store.put("user/w", torch.ones(10)).result(T)
        with ck:
            assert set(store.retained()) == committed and store.keys() == ["user/w"]
            assert used(store) == base + 4096  # the leftover's 4 MiB were freed
            assert torch.equal(ck.load()["x"], torch.ones(3))


def test_without_store_it_shares_the_process_store_and_leaves_it_to_the_other_users(tmp_path):
    c = cfg(tmp_path)
    other = TieredStore.shared(c)  # e.g. the offload wrapper's
    try:
        with LazyCheckpointer(c) as ck:
            assert ck.store is other
            ck.save({"x": torch.ones(3)}, 1).wait(T)
        other.put("k", torch.ones(2)).result(T)  # still open for its other user
        assert len(other.retained()) == 1
    finally:
        other.close()


def test_a_save_of_many_tensors_costs_a_few_store_commits(tmp_path):
    """One retain makes every piece durable and one delete_prefix forgets the keys: the store's
    manifest is not rewritten once per tensor."""
    with TieredStore(cfg(tmp_path)) as store, LazyCheckpointer(store=store) as ck:
        before = store.stats()["commits"]
        ck.save({f"t{i}": torch.full((100,), float(i)) for i in range(50)}, 1).wait(T)
        assert store.stats()["commits"] - before <= 3
        assert store.keys() == []


def test_prefault_faults_the_host_tier_in_without_taking_or_changing_memory(tmp_path):
    import psutil

    me = psutil.Process()
    with TieredStore(cfg(tmp_path, host="64MiB")) as store:
        store.put("user/w", torch.ones(MiB)).result(T)  # cached in the host tier
        rss = me.memory_info().rss
        with LazyCheckpointer(store=store, host_buffer="8MiB") as ck:
            assert store.meta("user/w")["in_host"] and torch.equal(store.get("user/w").result(T), torch.ones(MiB))
            host = store.stats()["tiers"]["host"]
            assert host["peak"] == 4 * MiB  # nothing was allocated for it: no other owner lost memory
            assert me.memory_info().rss - rss >= 32 * MiB, "the host tier's pages were not faulted in"
            ck.save({"x": torch.ones(10)}, 1).wait(T)
        assert store.stats()["tiers"]["host"]["used"] == 4 * MiB


def test_a_format_1_checkpoint_with_its_own_data_file_is_loaded_and_retired(tmp_path):
    """Written by the earlier checkpointer (its own data file next to the manifest, reproduced
    here byte for byte): loaded, checksums checked, and retired with its data file."""
    import json
    import zlib

    c = cfg(tmp_path)
    d = tmp_path / "nvme" / "checkpoints" / "default"
    d.mkdir(parents=True)
    x = torch.arange(3000, dtype=torch.float32)
    raw = x.numpy().tobytes()
    (d / "step-000000000005-0a0b0c0d.data").write_bytes(raw + b"\0" * (align_up(len(raw)) - len(raw)))
    doc = {"format": "tiered-checkpoint", "format_version": 1, "step": 5, "segment": 8 * MiB, "created": 1.0,
           "data_file": "step-000000000005-0a0b0c0d.data", "retain_tag": None,
           "tensors": [{"name": "x", "dtype": "float32", "shape": [3000], "nbytes": len(raw),
                        "file": "step-000000000005-0a0b0c0d.data", "offset": 0, "crc32": [zlib.crc32(raw)]}],
           "tree": {"t": "dict", "items": [["x", {"t": "tensor", "i": 0}], ["epoch", {"t": "v", "v": 2}]]}}
    (d / "step-000000000005.json").write_text(json.dumps(doc))
    with LazyCheckpointer(c, keep_last=1) as ck:
        assert ck.steps() == {5: "storage"}
        got = ck.load()
        assert torch.equal(got["x"], x) and got["epoch"] == 2
        ck.save({"x": torch.zeros(3)}, 6).wait(T)  # retires step 5
        assert ck.steps() == {6: "storage"}
        assert not list(d.glob("*.data"))


def test_host_buffers_and_extents_are_charged_to_the_checkpointer(tmp_path):
    with TieredStore(cfg(tmp_path, host="64MiB")) as store:
        with LazyCheckpointer(store=store, name="run1", host_buffer="8MiB", prefault=False) as ck:
            sd = state(1)
            ck.save(sd, 1).wait(T)
            owners = store.owners()["checkpoint/run1"]
            assert 0 < owners["host"]["peak"] <= 8 * MiB and owners["host"]["reserved"] == 0  # elastic
            assert owners["nvme"]["held"] == footprint(sd)  # the retained extents
            assert torch.equal(ck.load(1)["big"], sd["big"])
        assert store.owners()["checkpoint/run1"]["host"]["held"] == 0


def test_a_host_share_is_reserved_and_bounds_the_snapshot_buffers(tmp_path):
    with TieredStore(cfg(tmp_path, host="64MiB")) as store:
        with LazyCheckpointer(store=store, host_share="16MiB", prefault=False) as ck:
            assert ck.host.capacity == 16 * MiB
            assert store.owners()["checkpoint/default"]["host"]["reserved"] == 16 * MiB
            other = store.reserve("host", "48MiB", owner="kv")  # the rest of the tier
            with pytest.raises(Exception, match="cannot reserve"):
                store.reserve("host", "1MiB", owner="gnn/x")
            sd = {f"t{i}": torch.full((2 * MiB,), float(i)) for i in range(5)}  # 40 MiB through 16 MiB
            ck.save(sd, 1).wait(T)
            assert store.owners()["checkpoint/default"]["host"]["peak"] <= 16 * MiB
            assert all(torch.equal(ck.load(1)[k], v) for k, v in sd.items())
            other.close()
        assert store.owners()["checkpoint/default"]["host"]["reserved"] == 0  # given back on close


def test_a_checkpointer_and_another_owner_share_a_small_host_tier(tmp_path):
    """Another workload holds most of the host tier and reserves a share: the checkpointer saves
    and loads in what is left, and never takes the other's share."""
    with TieredStore(cfg(tmp_path, host="32MiB")) as store:
        kv = store.reserve("host", "16MiB", owner="kv")
        bufs = [kv.alloc(4 * MiB, wait=0) for _ in range(4)]  # its whole share in use
        with LazyCheckpointer(store=store, host_buffer="16MiB", prefault=True) as ck:
            sd = state(3)
            ck.save(sd, 3).wait(T)
            got = ck.load(3)
            assert torch.equal(got["big"], sd["big"]) and torch.equal(got["small"], sd["small"])
            assert store.owners()["checkpoint/default"]["host"]["peak"] <= 16 * MiB
        assert store.owners()["kv"]["host"]["held"] == 16 * MiB
        for b in bufs:
            b.release()
        kv.close()


def test_two_checkpointers_of_one_name_on_one_store_are_refused_clearly(tmp_path):
    c = cfg(tmp_path)
    c["tiers"]["flash"] = {"path": str(tmp_path / "flash"), "capacity": "64MiB"}
    with TieredStore(c) as store, LazyCheckpointer(store=store, prefault=False):
        with pytest.raises(CheckpointError, match="checkpoint/default.*already holds a reservation"):
            LazyCheckpointer(store=store, tier="flash", prefault=False).open()
        LazyCheckpointer(store=store, tier="flash", name="b", prefault=False).open().close()
