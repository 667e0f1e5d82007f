"""The GPU tier's pre-reserved arena and object cache.

Everything runs with device="cpu" here (the arena and cache behave the
same); the same tests run on CUDA when a GPU is present (marked ``cuda``).
"""

from __future__ import annotations

import threading

import pytest
import torch

from allocators import DeviceArena, OutOfBudget
from tiered import ChecksumError, TieredStore
from tiered.device_cache import DeviceCache

T = 10.0
KiB, MiB = 1 << 10, 1 << 20

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def make_store(tmp_path) -> TieredStore:
    cfg = {"tiers": {"host": {"capacity": "16MiB"}, "nvme": {"path": str(tmp_path / "nvme"), "capacity": "64MiB"}},
           "engine": {"workers": 2, "chunk": "1MiB"}}
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
    with make_store(tmp_path) as store, DeviceCache(store, 4 * MiB, device) as cache:
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
    with make_store(tmp_path) as store, DeviceCache(store, 1 * MiB, "cpu") as cache:
        tensors = {f"t{i}": torch.full((64 * KiB,), float(i)) for i in range(8)}  # 256 KiB each
        for k, t in tensors.items():
            store.put(k, t).result(T)
        for k, t in tensors.items():
            with cache.acquire(k).result(T) as lease:
                assert torch.equal(lease.tensor, t)
            assert cache.arena.stats().in_use <= 1 * MiB
        assert cache.stats.evictions >= 4
        assert "t7" in cache and "t0" not in cache  # LRU kept the most recent


def test_cache_never_evicts_a_held_entry_and_times_out_clearly(tmp_path):
    with make_store(tmp_path) as store, DeviceCache(store, 400 * KiB, "cpu", wait=0.2) as cache:
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
    with make_store(tmp_path) as store, DeviceCache(store, 1 * MiB, "cpu") as cache:
        store.put("w", torch.zeros(1000)).result(T)
        old = cache.acquire("w").result(T)
        store.put("w", torch.ones(1000)).result(T)
        with cache.acquire("w").result(T) as lease:
            assert torch.equal(lease.tensor, torch.ones(1000))
        assert torch.equal(old.tensor, torch.zeros(1000))  # the holder's view is not overwritten
        old.release()
        assert cache.stats.reloads == 1
        assert cache.arena.stats().in_use == 4096  # the stale copy went back on release


def test_cache_concurrent_acquires_share_one_load(tmp_path):
    with make_store(tmp_path) as store, DeviceCache(store, 2 * MiB, "cpu") as cache:
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
    with make_store(tmp_path) as store, DeviceCache(store, 1 * MiB, "cpu") as cache:
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
        assert "w" not in cache and cache.arena.stats().in_use == 0
