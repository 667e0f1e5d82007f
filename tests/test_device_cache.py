"""The GPU tier's pre-reserved arena and object cache.

Everything runs with device="cpu" here (a ``[tiers.gpu] kind = "device", device = "cpu"``
tier: the arena and cache behave the same); the same tests run on CUDA when a GPU is
present (marked ``cuda``). The cache allocates from the store's GPU tier, charged to its owner.
"""

from __future__ import annotations

import threading

import pytest
import torch

from helpers import store_config
from tiered.allocators import DeviceArena, OutOfBudget
from tiered import ChecksumError, StoreError, TieredStore
from tiered.device_cache import DeviceCache

T = 10.0
KiB, MiB = 1 << 10, 1 << 20

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def make_store(tmp_path, gpu: int | None = None, device: str = "cpu") -> TieredStore:
    """A store whose GPU tier holds ``gpu`` bytes on ``device`` (none when ``gpu`` is None)."""
    cfg = store_config(tmp_path)
    if gpu is not None:
        cfg["tiers"]["gpu"] = {"kind": "device", "device": "cuda:0" if device == "cuda" else device, "capacity": gpu}
    return TieredStore(cfg).open()


# ---------------------------------------------------------------- arena


@pytest.mark.parametrize("device", DEVICES)
def test_arena_views_share_one_region_and_are_aligned(device):
    with DeviceArena(1 * MiB, device) as arena:
        a = arena.alloc(1000)
        b = arena.alloc(3 * KiB)
        assert a.offset % 512 == 0 and b.offset % 512 == 0
        ta, tb = a.tensor(torch.float32, (250,)), b.tensor(torch.float64)
        ta.fill_(1.0)
        tb.fill_(2.0)
        assert ta.untyped_storage().data_ptr() == tb.untyped_storage().data_ptr()  # one allocation
        assert ta.sum().item() == 250.0 and tb.numel() == 3 * KiB // 8
        assert arena.stats().in_use == 1024 + 3 * KiB
        a.release()
        b.release()
        b.release()  # idempotent
        assert arena.stats().in_use == 0 and arena.stats().peak == 1024 + 3 * KiB


def test_arena_full_fails_or_waits_for_a_release():
    with DeviceArena(64 * KiB, "cpu") as arena:
        held = arena.alloc(48 * KiB)
        with pytest.raises(OutOfBudget, match="no free block"):
            arena.alloc(32 * KiB, timeout=0)
        with pytest.raises(OutOfBudget, match="arena holds"):
            arena.alloc(65 * KiB, timeout=None)  # can never fit: fails at once, no wait
        threading.Timer(0.1, held.release).start()
        got = arena.alloc(32 * KiB, timeout=T)
        assert got.nbytes == 32 * KiB


def test_arena_must_be_open():
    arena = DeviceArena(64 * KiB, "cpu")
    with pytest.raises(RuntimeError, match="not open"):
        arena.alloc(1)
    with pytest.raises(ValueError, match="capacity"):
        DeviceArena(0, "cpu")


# ---------------------------------------------------------------- cache


@pytest.mark.parametrize("device", DEVICES)
def test_cache_returns_store_contents_on_device(tmp_path, device):
    with make_store(tmp_path, 4 * MiB, device) as store, DeviceCache(store) as cache:
        x = torch.randn(300, 77)
        store.put("w", x).result(T)
        with cache.acquire("w").result(T) as lease:
            assert lease.tensor.device.type == device
            assert torch.equal(lease.tensor.cpu(), x)
        with cache.acquire("w").result(T) as lease:  # second time: a hit, no load
            assert torch.equal(lease.tensor.cpu(), x)
        assert (cache.stats.hits, cache.stats.misses) == (1, 1)
        assert torch.equal(cache.get("w").result(T).cpu(), x)


def test_cache_evicts_unheld_entries_and_stays_within_capacity(tmp_path):
    with make_store(tmp_path, 1 * MiB) as store, DeviceCache(store) as cache:
        tensors = {f"t{i}": torch.full((64 * KiB,), float(i)) for i in range(8)}  # 256 KiB each
        for k, t in tensors.items():
            store.put(k, t).result(T)
        for k, t in tensors.items():
            with cache.acquire(k).result(T) as lease:
                assert torch.equal(lease.tensor, t)
            assert cache.held <= 1 * MiB
            assert store.owners()["device_cache"]["gpu"]["held"] == cache.held
        assert cache.stats.evictions >= 4
        assert "t7" in cache and "t0" not in cache  # LRU kept the most recent


def test_cache_never_evicts_a_held_entry_and_times_out_clearly(tmp_path):
    with make_store(tmp_path, 400 * KiB) as store, DeviceCache(store, wait=0.2) as cache:
        a, b = torch.ones(64 * KiB), torch.zeros(64 * KiB)
        store.put("a", a).result(T)
        store.put("b", b).result(T)
        held = cache.acquire("a").result(T)
        with pytest.raises(OutOfBudget, match="no room for 'b'"):
            cache.acquire("b").result(T)
        assert torch.equal(held.tensor, a)  # untouched
        threading.Timer(0.05, held.release).start()
        cache.wait = T
        with cache.acquire("b").result(T) as lease:  # waits for the release, evicts a
            assert torch.equal(lease.tensor, b)
        assert "a" not in cache


def test_cache_reloads_after_a_newer_put(tmp_path):
    with make_store(tmp_path, 1 * MiB) as store, DeviceCache(store) as cache:
        store.put("w", torch.zeros(1000)).result(T)
        old = cache.acquire("w").result(T)
        store.put("w", torch.ones(1000)).result(T)
        with cache.acquire("w").result(T) as lease:
            assert torch.equal(lease.tensor, torch.ones(1000))
        assert torch.equal(old.tensor, torch.zeros(1000))  # the holder's view is not overwritten
        old.release()
        assert cache.stats.reloads == 1
        assert cache.held == 4096  # the stale copy went back on release


def test_cache_concurrent_acquires_share_one_load(tmp_path):
    with make_store(tmp_path, 2 * MiB) as store, DeviceCache(store) as cache:
        x = torch.randn(100_000)
        store.put("w", x).result(T)
        store.evict("w")
        results, errors = [], []

        def worker():
            try:
                with cache.acquire("w").result(T) as lease:
                    results.append(torch.equal(lease.tensor, x))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(T)
        assert not errors and results == [True] * 6
        assert cache.stats.misses == 1 and cache.stats.bytes_loaded == x.numel() * 4


def test_cache_unknown_key_and_failed_load_leave_no_residue(tmp_path):
    with make_store(tmp_path, 1 * MiB) as store, DeviceCache(store) as cache:
        with pytest.raises(KeyError, match="nope"):
            cache.acquire("nope")
        store.put("w", torch.ones(1000)).result(T)
        store.evict("w")
        data = store.config.storage_tiers[0].path / "objects.dat"
        with open(data, "r+b") as f:  # corrupt the stored bytes: the checksum must catch it
            f.seek(store.meta("w")["offset"])
            f.write(b"\xff" * 64)
        with pytest.raises(ChecksumError, match="crc32"):
            cache.acquire("w").result(T)
        assert "w" not in cache and cache.held == 0


def test_caches_of_two_owners_share_the_store_gpu_tier(tmp_path):
    """Two owners' caches on one GPU tier: each charged to its owner, together within the tier;
    one that finds no room takes back what the other holds but nobody leases."""
    with make_store(tmp_path, 1 * MiB) as store, DeviceCache(store, owner="offload/a") as a, \
            DeviceCache(store, owner="kv/b") as b:
        tensors = {f"t{i}": torch.full((64 * KiB,), float(i)) for i in range(6)}  # 256 KiB each
        for k, t in tensors.items():
            store.put(k, t).result(T)
        for k in ("t0", "t1", "t2"):
            a.acquire(k).result(T).release()
        held_by_a = a.acquire("t3").result(T)  # a fills the tier: 3 unheld entries and 1 held
        assert store.owners()["offload/a"]["gpu"]["held"] == a.held == 4 * 256 * KiB
        for k in ("t4", "t5"):
            with b.acquire(k).result(T) as lease:
                assert torch.equal(lease.tensor, tensors[k])
        owners = store.owners()
        assert owners["kv/b"]["gpu"]["held"] == b.held > 0
        assert a.held + b.held <= 1 * MiB
        assert "t3" in a and torch.equal(held_by_a.tensor, tensors["t3"])  # a held entry is never taken
        held_by_a.release()


def test_cache_with_a_share_keeps_it_and_needs_a_device_tier(tmp_path):
    with make_store(tmp_path, 1 * MiB) as store:
        with DeviceCache(store, owner="tools", share="50%") as cache:
            assert cache.reservation.reserved == 512 * KiB and cache.limit == 512 * KiB
            assert store.owners()["tools"]["gpu"]["reserved"] == 512 * KiB
        assert store.owners()["tools"]["gpu"]["reserved"] == 0  # closed: the share goes back
    with make_store(tmp_path / "b") as store, pytest.raises(StoreError, match="device tier"):
        DeviceCache(store)


def test_two_loads_racing_for_the_last_room_never_pass_the_limit(tmp_path):
    """The room a load takes is claimed under the cache's lock before the tier allocates it, so
    a second load that checks the limit meanwhile sees it taken (no check-then-act overshoot)."""
    with make_store(tmp_path, 4 * MiB) as store, DeviceCache(store, limit=256 * KiB, wait=0.3) as cache:
        res = cache.reservation
        real, entered, go = res.alloc, threading.Event(), threading.Event()

        def slow_alloc(nbytes, wait=None):  # the first allocation pauses between check and act
            if not entered.is_set():
                entered.set()
                assert go.wait(10)
            return real(nbytes, wait=wait)

        res.alloc = slow_alloc
        got, errors = [], []

        def scratch() -> None:
            try:
                got.append(cache.alloc_scratch(192 * KiB))
            except OutOfBudget as e:
                errors.append(e)

        first = threading.Thread(target=scratch)
        first.start()
        assert entered.wait(10)
        scratch()  # the second load, while the first is between its check and its allocation
        go.set()
        first.join(10)
        assert len(got) == 1 and len(errors) == 1, (got, errors)
        assert cache.peak <= cache.limit
        cache.release_after_use(got[0])
