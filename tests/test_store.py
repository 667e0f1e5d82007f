"""The tiered store: round trips, persistence, versions, budgets, pins, checksums,
injected I/O faults, key validation, concurrency, crash safety, locking, events.

Several tests reproduce store bugs found in review (prefetch/put races, retire
generation, manifest-failure rollback, version order, migrate vs put) and now
guard their fixes.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path

import pytest
import torch

import tiered.store.extents as store_extents
import tiered.store.manifest as store_manifest
from helpers import store_config
from tiered.allocators import OutOfBudget
from tiered.io_engine import IOEngine
from tiered.store import ChecksumError, Lease, StoreError, TieredStore, check_key

try:
    from tiered.io_engine.testing import FaultyBackend
except ImportError:  # written in parallel; the fault tests skip without it
    FaultyBackend = None

needs_faulty = pytest.mark.skipif(FaultyBackend is None, reason="io_engine.testing.FaultyBackend not available")

T = 10.0  # timeout for every future
KiB, MiB = 1 << 10, 1 << 20
HERE = Path(__file__).resolve().parent
WRITER = HERE / "crash_writer.py"


# --------------------------------------------------------------------------- helpers


def open_store(tmp_path: Path, **kw) -> TieredStore:
    store_kw = {k: kw.pop(k) for k in ("host_wait", "cache_on_put") if k in kw}
    return TieredStore(store_config(tmp_path, **kw), **store_kw).open()


def use_faulty(store: TieredStore, workers: int = 2) -> "FaultyBackend":
    """Swap the store's engine for one over a FaultyBackend (the store has no engine= argument)."""
    fb = FaultyBackend()
    store.engine.close()
    store.engine = IOEngine(fb, workers=workers, chunk=1 << 20).open()
    return fb


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert tuple(got.shape) == tuple(want.shape), (got.shape, want.shape)
    assert raw_bytes(got) == raw_bytes(want)


def filled(value: int, n: int = 64 * KiB, dtype=torch.uint8) -> torch.Tensor:
    return torch.full((n,), value, dtype=dtype)


def encoded(key_id: int, version: int, n: int) -> torch.Tensor:
    t = torch.full((n,), version, dtype=torch.int64)
    t[0] = key_id
    return t


def decode(t: torch.Tensor, key_id: int) -> int:
    """The version a complete, well-formed object of ``key_id`` encodes (asserts it is one)."""
    assert t.dtype == torch.int64 and t.dim() == 1 and t.numel() >= 2
    assert int(t[0]) == key_id, f"element 0 is {int(t[0])}, expected key id {key_id}"
    v = int(t[1])
    assert bool((t[1:] == v).all()), f"key {key_id}: mixed versions in one object"
    return v


def align(n: int) -> int:
    """Bytes an object of ``n`` bytes reserves (host buffer and storage extent)."""
    return (max(n, 1) + 4095) // 4096 * 4096


def host_used(store: TieredStore) -> int:
    return store.stats()["tiers"]["host"]["used"]


def tier_used(store: TieredStore, tier: str = "nvme") -> int:
    return store.stats()["tiers"][tier]["used"]


def files_under(root: Path, exclude=()) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in exclude]
        for name in filenames + dirnames:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


def wait_for(cond, timeout: float = T, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path)
    yield s
    s.close()


# --------------------------------------------------------------------------- 1. round trips

SHAPES = [(), (0,), (0, 3), (1,), (5, 7), (1023,), (4097,), (3, 1000, 2)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.uint8, torch.complex64]


def sample(dtype: torch.dtype, shape, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype in (torch.int64, torch.uint8):
        hi = 255 if dtype == torch.uint8 else 1 << 40
        return torch.randint(0, hi, shape, generator=gen, dtype=dtype)
    return torch.randn(shape, generator=gen, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_round_trip_dtypes_and_shapes(store, dtype):
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t/{dtype}/{i}".replace("torch.", ""): sample(dtype, s, gen) for i, s in enumerate(SHAPES)}
    futs = {k: store.put(k, t) for k, t in tensors.items()}
    for k, f in futs.items():
        d = f.result(T)
        t = tensors[k]
        assert d["key"] == k and d["version"] == 1
        assert d["dtype"] == str(dtype).removeprefix("torch.") and d["shape"] == list(t.shape)
        assert d["nbytes"] == t.numel() * t.element_size()
    for k, t in tensors.items():
        assert_same(store.get(k).result(T), t)  # from the host copy
        assert store.evict(k)
        assert not store.meta(k)["in_host"]
        assert_same(store.get(k).result(T), t)  # read back from objects.dat
    store.close()
    with TieredStore(store.config) as again:  # and from a fresh process-like open
        for k, t in tensors.items():
            assert_same(again.get(k).result(T), t)


def test_round_trip_non_contiguous_inputs(store):
    base = torch.arange(3 * 1001, dtype=torch.float32).reshape(3, 1001)
    cases = {
        "transposed": base.t(),
        "sliced": base[1:, 3:900:7],
        "expanded": torch.tensor([1.5, -2.0]).expand(4096, 2),
        "offset-view": base.reshape(-1)[17:4000],
    }
    for k, t in cases.items():
        assert not t.is_contiguous() or t.storage_offset() > 0
        store.put(k, t).result(T)
        store.evict(k)
        got = store.get(k).result(T)
        assert got.is_contiguous()
        assert torch.equal(got, t) and got.shape == t.shape


def test_put_copies_input_and_get_returns_a_copy(store):
    t = torch.arange(10_000, dtype=torch.int64)
    want = t.clone()
    f = store.put("k", t)
    t.fill_(-1)  # the caller may reuse its tensor as soon as put() returns
    f.result(T)
    got = store.get("k").result(T)
    assert torch.equal(got, want)
    got.fill_(7)  # the copy the caller owns is independent of the cache
    assert torch.equal(store.get("k").result(T), want)
    store.evict("k")
    assert torch.equal(store.get("k").result(T), want)


def test_get_into_out(store):
    t = torch.randn(33, 65)
    store.put("k", t).result(T)
    out = torch.empty(33, 65)
    assert store.get("k", out=out).result(T) is out
    assert torch.equal(out, t)
    out_t = torch.empty(65, 33).t()  # a non-contiguous destination of the right shape
    assert store.get("k", out=out_t).result(T) is out_t
    assert torch.equal(out_t, t)
    store.evict("k")
    out2 = torch.zeros(33, 65)
    store.get("k", out=out2).result(T)  # out= on a miss too
    assert torch.equal(out2, t)


@pytest.mark.parametrize("bad", [torch.empty(65, 33), torch.empty(33 * 65), torch.empty(33, 65, dtype=torch.float64),
                                 torch.empty(33, 65, dtype=torch.int32)], ids=["shape", "flat", "f64", "i32"])
def test_get_out_mismatch_is_a_clear_error(store, bad):
    t = torch.randn(33, 65)
    store.put("k", t).result(T)
    with pytest.raises(StoreError) as ei:
        store.get("k", out=bad).result(T)
    msg = str(ei.value)
    assert "'k'" in msg and "33, 65" in msg
    assert store.evict("k"), "a failed get(out=) must not leave the copy pinned"
    with pytest.raises(StoreError):
        store.get("k", out=bad).result(T)  # same error on the miss path
    assert host_used(store) == align(t.numel() * 4), "only the (now cached) copy is held"
    assert store.evict("k") and host_used(store) == 0
    assert torch.equal(store.get("k").result(T), t)


def test_put_conjugate_view(store):
    c = torch.randn(16, dtype=torch.complex64)
    store.put("c", c.conj()).result(T)
    store.evict("c")
    assert torch.equal(store.get("c").result(T), c.conj().resolve_conj())


def test_get_to_gpu(store):
    t = torch.randn(1000)
    store.put("k", t).result(T)
    if not torch.cuda.is_available():
        with pytest.raises(StoreError, match="CUDA"):
            store.get("k", tier="gpu")
        return
    got = store.get("k", tier="gpu").result(T)
    assert got.device.type == "cuda" and torch.equal(got.cpu(), t)


# --------------------------------------------------------------------------- 2. persistence


def test_persistence_across_reopen(tmp_path):
    cfg = store_config(tmp_path, flash="64MiB")
    data = {
        "layer.0/weight": (torch.randn(128, 64), "weight", None),
        "layer.0/bias": (torch.randn(64).to(torch.bfloat16), "weight", "flash"),
        "opt/step": (torch.tensor(12345, dtype=torch.int64), "optim", None),
        "empty": (torch.empty(0, 4, dtype=torch.float16), "blob", "flash"),
        "gone": (torch.ones(10), "blob", None),
    }
    with TieredStore(cfg) as s:
        for k, (t, kind, tier) in data.items():
            s.put(k, t, kind=kind, tier=tier).result(T)
        s.put("layer.0/weight", data["layer.0/weight"][0] * 2, kind="weight").result(T)  # version 2
        s.delete("gone")
        metas = {k: s.meta(k) for k in s.keys()}
    with TieredStore(cfg) as s:
        assert sorted(s.keys()) == sorted(set(data) - {"gone"})
        assert "gone" not in s
        for k in s.keys():
            m = s.meta(k)
            assert not m["in_host"]
            assert {**m, "in_host": None} == {**metas[k], "in_host": None}
            want = data[k][0] * 2 if k == "layer.0/weight" else data[k][0]
            assert_same(s.get(k).result(T), want)
        assert s.meta("layer.0/weight")["version"] == 2
        assert s.meta("layer.0/bias")["tier"] == "flash"
        assert s.meta("opt/step")["kind"] == "optim"
        with pytest.raises(KeyError):
            s.get("gone")
        s.delete("opt/step")
    with TieredStore(cfg) as s:
        assert "opt/step" not in s.keys() and len(s.keys()) == 3


def test_close_waits_for_pending_puts(tmp_path):
    cfg = store_config(tmp_path)
    s = TieredStore(cfg).open()
    tensors = {f"p{i}": torch.full((50_000 + i,), i, dtype=torch.int32) for i in range(12)}
    futs = [s.put(k, t) for k, t in tensors.items()]  # not waited on
    s.close()
    assert all(f.done() and f.exception() is None for f in futs)
    with TieredStore(cfg) as s:
        for k, t in tensors.items():
            assert torch.equal(s.get(k).result(T), t)


def test_use_after_close_is_a_store_error(tmp_path):
    s = open_store(tmp_path)
    s.put("k", torch.ones(3)).result(T)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError, match="not open"):
        s.put("k", torch.ones(3))
    with pytest.raises(StoreError, match="not open"):
        s.get("k")


def test_reopen_same_instance(tmp_path):
    s = open_store(tmp_path)
    s.put("k", torch.ones(3)).result(T)
    s.close()
    s.open()
    try:
        assert torch.equal(s.get("k").result(T), torch.ones(3))
    finally:
        s.close()


# --------------------------------------------------------------------------- 3. versions


def test_put_twice_returns_latest(store):
    assert store.put("k", filled(1)).result(T)["version"] == 1
    assert store.put("k", filled(2, 5000)).result(T)["version"] == 2
    assert torch.equal(store.get("k").result(T), filled(2, 5000))
    store.evict("k")
    assert torch.equal(store.get("k").result(T), filled(2, 5000))
    assert store.meta("k")["version"] == 2
    assert store.stats()["tiers"]["nvme"]["objects"] == 1


def test_lease_keeps_its_version_and_old_space_is_freed_after_release(store):
    n = 64 * KiB
    store.put("k", filled(1, n)).result(T)
    one_extent = tier_used(store)
    assert one_extent == n
    lease = store.acquire("k").result(T)
    assert isinstance(lease, Lease) and lease.key == "k"
    assert torch.equal(lease.tensor, filled(1, n))
    store.put("k", filled(2, n)).result(T)
    # v2 went to a new extent and a new host buffer: the lease's bytes are untouched
    assert torch.equal(lease.tensor, filled(1, n))
    assert torch.equal(store.get("k").result(T), filled(2, n))
    assert store.meta("k")["version"] == 2
    assert host_used(store) == 2 * n, "the leased v1 copy and the v2 copy are both held"
    assert tier_used(store) == one_extent, "v1's extent is freed once the manifest no longer names it"
    store.put("other", filled(3, n)).result(T)
    assert torch.equal(lease.tensor, filled(1, n))
    lease.release()
    lease.release()  # idempotent
    assert lease.tensor is None
    assert host_used(store) == 2 * n, "v1's host copy is returned when the lease is released"
    store.put("k", filled(4, n)).result(T)  # reuses freed space; nothing grows
    assert tier_used(store) == 2 * one_extent
    assert torch.equal(store.get("k").result(T), filled(4, n))
    assert torch.equal(store.get("other").result(T), filled(3, n))


def test_lease_context_manager_and_evict_while_leased(store):
    store.put("k", filled(5)).result(T)
    with store.acquire("k").result(T) as lease:
        assert store.evict("k") is False, "a leased copy must not be evicted"
        assert torch.equal(lease.tensor, filled(5))
    assert store.evict("k") is True
    assert store.evict("k") is False  # nothing cached any more
    with store.acquire("k").result(T) as lease:  # a miss loads and pins
        assert torch.equal(lease.tensor, filled(5))
        assert store.evict("k") is False


def test_trim_drops_every_unpinned_cached_copy_and_keeps_pinned_ones(store):
    for i in range(4):
        store.put(f"k{i}", filled(i, 3 * 4096)).result(T)
    wait_for(lambda: all(store.meta(f"k{i}")["in_host"] for i in range(4)), what="puts cached")
    lease = store.acquire("k1").result(T)
    evictions = store.stats()["evictions"]
    assert store.trim() == 3
    assert [store.meta(f"k{i}")["in_host"] for i in range(4)] == [False, True, False, False]
    assert store.stats()["evictions"] == evictions + 3
    assert host_used(store) == align(3 * 4096) and torch.equal(lease.tensor, filled(1, 3 * 4096))
    lease.release()
    assert store.trim() == 1 and host_used(store) == 0
    assert torch.equal(store.get("k2").result(T), filled(2, 3 * 4096))  # read back from storage


def test_delete_while_leased_keeps_lease_bytes(store):
    store.put("k", filled(9)).result(T)
    lease = store.acquire("k").result(T)
    store.delete("k")
    assert "k" not in store
    with pytest.raises(KeyError):
        store.get("k")
    assert torch.equal(lease.tensor, filled(9))
    lease.release()
    assert host_used(store) == 0 and tier_used(store) == 0


@needs_faulty
def test_pipelined_puts_of_one_key_keep_submission_order(store):
    fb = use_faulty(store, workers=2)
    fb.delay("write", seconds=0.3, path="objects.dat", times=1)  # the first write is slow
    f1 = store.put("k", filled(1))
    f2 = store.put("k", filled(2))
    f1.result(T), f2.result(T)
    assert torch.equal(store.get("k").result(T), filled(2)), "the put issued last must win"


@needs_faulty
def test_retired_extent_not_reused_before_manifest_commit(tmp_path, monkeypatch):
    s = open_store(tmp_path)
    fb = use_faulty(s, workers=3)
    n = 64 * KiB
    s.put("a", filled(1, n)).result(T)  # a v1 @ 0
    s.put("b", filled(2, n)).result(T)  # b    @ n
    assert s.evict("b")
    gate = fb.gate("read", path="objects.dat")
    pf = s.prefetch("b")  # a load in flight; its completion runs _free_retired()
    assert gate.entered.wait(T)

    slow_entered, slow_go = threading.Event(), threading.Event()
    real_write = store_manifest.write_json_atomic

    def slow_manifest_write(path, obj):  # a slow manifest fsync
        slow_entered.set()
        assert slow_go.wait(120), "the test did not release the manifest write"
        real_write(path, obj)

    monkeypatch.setattr(store_manifest, "write_json_atomic", slow_manifest_write)
    try:
        fa2 = s.put("a", filled(3, n))  # a v2 @ 2n; install retires a v1, then commits (slowly)
        assert slow_entered.wait(T)
        gate.release()
        pf.result(T)
        fc = s.put("c", filled(4, n))  # best fit: any freed extent of size n
        wait_for(lambda: "c" in s, what="c's data write")
        on_disk = json.loads((tmp_path / "nvme" / "manifest.json").read_text())["objects"]
        crash = tmp_path / "crash"
        shutil.copytree(tmp_path / "nvme", crash / "nvme")  # what a crash right now would leave
        slow_go.set()
        fa2.result(T), fc.result(T)
    finally:
        slow_go.set()
        gate.release()
        s.close()
    c_offset = s._objects["c"].extent.offset
    assert c_offset != on_disk["a"]["offset"], (
        f"c was written at offset {c_offset}, the extent the committed manifest still names for 'a'")
    os.remove(crash / "nvme" / ".lock")
    with TieredStore(store_config(crash)) as after_crash:
        assert torch.equal(after_crash.get("a").result(T), filled(1, n))


# --------------------------------------------------------------------------- 4. capacity


def test_lru_eviction_under_host_budget(tmp_path):
    s = open_store(tmp_path, host="1MiB")
    try:
        tensors = {f"o{i}": filled(i, 256 * KiB) for i in range(10)}  # 2.5 MiB through a 1 MiB arena
        for k, t in tensors.items():
            s.put(k, t).result(T)
        st = s.stats()
        assert st["evictions"] > 0
        assert st["tiers"]["host"]["used"] <= st["tiers"]["host"]["capacity"]
        assert s.meta("o9")["in_host"] and not s.meta("o0")["in_host"], "the least recently used went first"
        for _round in range(2):
            for k, t in tensors.items():
                assert torch.equal(s.get(k).result(T), t)
        assert s.stats()["misses"] > 0 and s.stats()["tiers"]["host"]["peak"] <= MiB
    finally:
        s.close()


def test_lru_keeps_recently_read_objects(tmp_path):
    s = open_store(tmp_path, host="1MiB")
    try:
        for i in range(4):
            s.put(f"o{i}", filled(i, 256 * KiB)).result(T)
        s.get("o0").result(T)  # o0 becomes the most recently used
        s.put("o4", filled(4, 256 * KiB)).result(T)
        assert s.meta("o0")["in_host"] and not s.meta("o1")["in_host"]
    finally:
        s.close()


def test_object_bigger_than_host_arena_cannot_be_leased(tmp_path):
    s = open_store(tmp_path, host="1MiB", host_wait=0.3)
    try:
        s.put("small", filled(1, 4096)).result(T)
        s.put("huge", filled(2, 2 * MiB)).result(T)  # streamed through the host tier
        s.evict("small")
        s.get("small").result(T)
        with pytest.raises(OutOfBudget) as ei:
            s.acquire("huge")
        assert isinstance(ei.value, StoreError) and "host" in str(ei.value) and "'huge'" in str(ei.value)
        s.put("after", filled(3, 4096)).result(T)
        assert torch.equal(s.get("small").result(T), filled(1, 4096))
        assert torch.equal(s.get("huge").result(T), filled(2, 2 * MiB))
    finally:
        s.close()


def test_object_bigger_than_host_arena_fails_fast_without_evicting(tmp_path):
    s = open_store(tmp_path, host="1MiB", host_wait=1.5)
    try:
        s.put("huge", filled(2, 2 * MiB)).result(T)
        s.put("small", filled(1, 4096)).result(T)
        evictions = s.stats()["evictions"]
        t0 = time.monotonic()
        with pytest.raises((OutOfBudget, StoreError)):
            s.acquire("huge")
        assert time.monotonic() - t0 < 0.75, "a request that can never fit should fail at once"
        assert s.meta("small")["in_host"] and s.stats()["evictions"] == evictions
    finally:
        s.close()


def test_storage_tier_full(tmp_path):
    s = open_store(tmp_path, nvme="1MiB")
    try:
        for i in range(4):
            s.put(f"o{i}", filled(i, 256 * KiB)).result(T)
        assert tier_used(s) == MiB
        with pytest.raises(StoreError) as ei:
            s.put("o4", filled(4, 256 * KiB))
        assert "nvme" in str(ei.value) and "'o4'" in str(ei.value)
        with pytest.raises(StoreError, match="nvme"):
            s.put("o0", filled(9, 256 * KiB), tier="nvme")  # explicit tier: same, names the tier
        assert host_used(s) <= MiB  # the refused puts' host buffers were returned
        for i in range(4):
            assert torch.equal(s.get(f"o{i}").result(T), filled(i, 256 * KiB))
        s.delete("o1")
        s.put("o4", filled(4, 256 * KiB)).result(T)  # room again after a delete
        assert torch.equal(s.get("o4").result(T), filled(4, 256 * KiB))
    finally:
        s.close()


def test_explicit_tier_with_fragmented_space(tmp_path):
    s = open_store(tmp_path, nvme="12KiB")
    try:
        for k in "abc":
            s.put(k, filled(1, 4096)).result(T)
        s.delete("a")
        s.delete("c")  # 8 KiB free, in two 4 KiB pieces
        with pytest.raises(StoreError, match="nvme"):
            s.put("d", filled(2, 8192), tier="nvme")
        assert tier_used(s) == 4096
    finally:
        s.close()


def test_storage_capacity_is_a_hard_budget(tmp_path):
    s = open_store(tmp_path, nvme=10_000)
    try:
        assert s.stats()["tiers"]["nvme"]["capacity"] <= 10_000
        with pytest.raises(StoreError):
            s.put("k", filled(1, 12_288))
    finally:
        s.close()


def test_two_storage_tiers_placement_and_migration(tmp_path):
    cfg = store_config(tmp_path, nvme="1MiB", flash="4MiB")
    a, b, c = filled(1, 256 * KiB), filled(2, 100_000), filled(3, 512 * KiB)
    with TieredStore(cfg) as s:
        assert s.put("a", a).result(T)["tier"] == "nvme"  # first fit: the fastest tier
        assert s.put("b", b, tier="flash").result(T)["tier"] == "flash"
        assert s.meta("b")["tier"] == "flash"
        st = s.stats()["tiers"]
        assert st["flash"]["objects"] == 1 and st["nvme"]["objects"] == 1
        d = s.migrate("a", "flash").result(T)
        assert d["tier"] == "flash" and s.meta("a")["tier"] == "flash"
        assert tier_used(s, "nvme") == 0 and tier_used(s, "flash") > 0
        assert torch.equal(s.get("a").result(T), a)
        s.evict("a")
        assert torch.equal(s.get("a").result(T), a)  # really read from flash
        assert s.stats()["tiers"]["flash"]["bytes_read"] > 0
        assert s.migrate("a", "flash").result(T)["tier"] == "flash"  # already there: no-op
        s.evict("b")
        assert s.migrate("b", "nvme").result(T)["tier"] == "nvme"  # migrate also works from a miss
        s.put("c1", c).result(T)
        s.put("c2", c).result(T)  # nvme (1 MiB) is now full: first fit spills to flash
        assert s.meta("c2")["tier"] == "flash"
    with TieredStore(cfg) as s:
        assert s.meta("a")["tier"] == "flash" and s.meta("b")["tier"] == "nvme"
        for k, t in {"a": a, "b": b, "c1": c, "c2": c}.items():
            assert torch.equal(s.get(k).result(T), t)
        assert s.migrate("a", "host").result(T) is None  # "host" means prefetch
        assert s.meta("a")["in_host"]


def test_unknown_tier_names_known_ones(tmp_path):
    with TieredStore(store_config(tmp_path, flash="8MiB")) as s:
        s.put("k", filled(1)).result(T)
        with pytest.raises(StoreError) as ei:
            s.put("x", filled(1), tier="tape")
        assert "tape" in str(ei.value) and "nvme" in str(ei.value) and "flash" in str(ei.value)
        with pytest.raises(StoreError) as ei:
            s.migrate("k", "tape")
        assert "tape" in str(ei.value) and "nvme" in str(ei.value) and "flash" in str(ei.value)
        with pytest.raises(StoreError, match="tape"):
            s.get("k", tier="tape")
        with pytest.raises(StoreError, match="migrate"):
            s.evict("k", tier="nvme")
        assert host_used(s) == 64 * KiB and "x" not in s


@needs_faulty
def test_migrate_does_not_undo_a_concurrent_put(tmp_path):
    with TieredStore(store_config(tmp_path, flash="8MiB")) as s:
        fb = use_faulty(s, workers=2)
        s.put("k", filled(1)).result(T)
        s.evict("k")
        gate = fb.gate("read", path="objects.dat", times=1)
        mf = s.migrate("k", "flash")  # reads v1 (parked)
        assert gate.entered.wait(T)
        s.put("k", filled(2)).result(T)  # v2 committed meanwhile
        gate.release()
        mf.result(T)
        assert torch.equal(s.get("k").result(T), filled(2)), "migrate resurrected the old version"


# --------------------------------------------------------------------------- 5. pins


def test_leased_copy_is_never_evicted(tmp_path):
    s = open_store(tmp_path, host="1MiB")
    try:
        s.put("pinned", filled(7, 256 * KiB)).result(T)
        lease = s.acquire("pinned").result(T)
        for i in range(8):
            s.put(f"o{i}", filled(i, 256 * KiB)).result(T)
            s.get(f"o{max(i - 1, 0)}").result(T)
        assert s.stats()["evictions"] > 0
        assert s.meta("pinned")["in_host"]
        assert torch.equal(lease.tensor, filled(7, 256 * KiB))
        assert s.evict("pinned") is False
        lease.release()
        assert s.evict("pinned") is True
        assert torch.equal(s.get("pinned").result(T), filled(7, 256 * KiB))
    finally:
        s.close()


def test_everything_pinned_out_of_budget_after_host_wait(tmp_path):
    s = open_store(tmp_path, host="1MiB", host_wait=0.3)
    try:
        for i in range(4):
            s.put(f"o{i}", filled(i, 256 * KiB)).result(T)
        leases = [s.acquire(f"o{i}").result(T) for i in range(4)]
        t0 = time.monotonic()
        with pytest.raises(OutOfBudget) as ei:
            s.put("more", filled(9, 256 * KiB))
        waited = time.monotonic() - t0
        assert 0.25 <= waited < 5, waited
        assert "host" in str(ei.value)
        assert "more" not in s
        assert s.evict("o0") is False
        for i, lease in enumerate(leases):
            assert torch.equal(lease.tensor, filled(i, 256 * KiB))
        # a pin released while a put waits lets the put through
        threading.Timer(0.1, leases[0].release).start()
        s.host_wait = 5.0
        s.put("more", filled(9, 256 * KiB)).result(T)
        for lease in leases[1:]:
            lease.release()
        assert torch.equal(s.get("more").result(T), filled(9, 256 * KiB))
        assert torch.equal(s.get("o0").result(T), filled(0, 256 * KiB))
    finally:
        s.close()


def test_miss_with_everything_pinned_out_of_budget(tmp_path):
    s = open_store(tmp_path, host="512KiB", host_wait=0.2)
    try:
        s.put("cold", filled(1, 256 * KiB)).result(T)
        s.evict("cold")
        s.put("x", filled(2, 256 * KiB)).result(T)
        s.put("y", filled(3, 256 * KiB)).result(T)
        with s.acquire("x").result(T), s.acquire("y").result(T):
            with pytest.raises(OutOfBudget):
                s.get("cold").result(T)
        assert torch.equal(s.get("cold").result(T), filled(1, 256 * KiB))
    finally:
        s.close()


# --------------------------------------------------------------------------- 6. checksums


def corrupt(path: Path, offset: int, nbytes: int = 16) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, nbytes, offset)
        os.pwrite(fd, bytes(b ^ 0xFF for b in old), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_corruption_is_detected(tmp_path):
    cfg = store_config(tmp_path)
    data_file = tmp_path / "nvme" / "objects.dat"
    with TieredStore(cfg) as s:
        s.put("good", filled(1, 10_000)).result(T)
        s.put("bad", torch.randn(5000)).result(T)
        off = s.meta("bad")["offset"]
        assert s.evict("bad")
        corrupt(data_file, off + 100)
        with pytest.raises(ChecksumError) as ei:
            s.get("bad").result(T)
        msg = str(ei.value)
        assert "'bad'" in msg and str(data_file) in msg
        with pytest.raises(ChecksumError):  # again: nothing bad was cached
            s.acquire("bad").result(T)
        assert host_used(s) == align(10_000), "failed loads must not keep host buffers"
        assert torch.equal(s.get("good").result(T), filled(1, 10_000))
    with TieredStore(cfg) as s:  # after a reopen (no cached copy at all)
        with pytest.raises(ChecksumError, match="bad"):
            s.get("bad").result(T)
        with pytest.raises(ChecksumError, match="bad"):
            s.prefetch("bad").result(T)
        assert torch.equal(s.get("good").result(T), filled(1, 10_000))
        s.put("bad", filled(5, 100)).result(T)  # a new version repairs it
        s.evict("bad")
        assert torch.equal(s.get("bad").result(T), filled(5, 100))


def test_corrupted_padding_is_harmless_but_data_is_checked(tmp_path):
    with TieredStore(store_config(tmp_path)) as s:
        s.put("k", filled(1, 5000)).result(T)
        off = s.meta("k")["offset"]
        s.evict("k")
        corrupt(tmp_path / "nvme" / "objects.dat", off + 5000, 100)  # only the 4 KiB padding
        assert torch.equal(s.get("k").result(T), filled(1, 5000))
        s.evict("k")
        corrupt(tmp_path / "nvme" / "objects.dat", off + 4999, 1)  # the last data byte
        with pytest.raises(ChecksumError):
            s.get("k").result(T)


def test_truncated_data_file_is_a_clear_error(tmp_path):
    cfg = store_config(tmp_path)
    with TieredStore(cfg) as s:
        s.put("first", filled(1, 8192)).result(T)
        s.put("second", filled(2, 300_000)).result(T)
        off = s.meta("second")["offset"]
    data_file = tmp_path / "nvme" / "objects.dat"
    os.truncate(data_file, off + 100_000)  # mid-object
    with TieredStore(cfg) as s:
        with pytest.raises((StoreError, OSError)) as ei:
            s.get("second").result(T)
        assert str(data_file) in str(ei.value)
        assert torch.equal(s.get("first").result(T), filled(1, 8192))
    os.truncate(data_file, 4096)  # "second" entirely past the end, "first" half gone
    with TieredStore(cfg) as s:
        for k in ("first", "second"):
            with pytest.raises((StoreError, OSError)) as ei:
                s.get(k).result(T)
            assert str(data_file) in str(ei.value)
        assert host_used(s) == 0


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    cfg = store_config(tmp_path)
    with TieredStore(cfg) as s:
        s.put("k", filled(1)).result(T)
    manifest = tmp_path / "nvme" / "manifest.json"
    manifest.write_text(manifest.read_text()[:-10])
    for _ in range(2):  # the second time proves the failed open released the lock
        with pytest.raises(StoreError, match="manifest"):
            TieredStore(cfg).open()
    manifest.unlink()  # the data file still holds bytes: refused, not an empty store
    with pytest.raises(StoreError, match="missing"):
        TieredStore(cfg).open()
    with TieredStore(cfg).open(start_empty=True) as s:
        assert s.keys() == []


# --------------------------------------------------------------------------- 7. injected faults


@needs_faulty
def test_enospc_on_write_keeps_previous_version(tmp_path):
    cfg = store_config(tmp_path)
    s = TieredStore(cfg).open()
    fb = use_faulty(s)
    v1 = filled(1, 300_000)
    s.put("k", v1).result(T)
    used_before, host_before = tier_used(s), host_used(s)
    fb.fail("write", errno.ENOSPC, path="objects.dat", times=1)
    f = s.put("k", filled(2, 300_000))
    with pytest.raises(OSError) as ei:
        f.result(T)
    assert ei.value.errno == errno.ENOSPC
    assert str(tmp_path / "nvme" / "objects.dat") in str(ei.value)
    assert s.meta("k")["version"] == 1
    assert tier_used(s) == used_before and host_used(s) == host_before, "the failed put's space was returned"
    assert torch.equal(s.get("k").result(T), v1)
    s.evict("k")
    assert torch.equal(s.get("k").result(T), v1)
    s.put("k", filled(3, 300_000)).result(T)  # the store keeps working
    s.put("other", filled(4, 1000)).result(T)
    s.close()
    with TieredStore(cfg) as s:
        assert torch.equal(s.get("k").result(T), filled(3, 300_000))
        assert s.meta("k")["version"] >= 2  # versions only grow; the failed put may have used one


def test_manifest_write_failure_fails_the_put_and_keeps_the_old_version(tmp_path, monkeypatch):
    cfg = store_config(tmp_path)
    s = TieredStore(cfg).open()
    try:
        s.put("k", filled(1)).result(T)
        real_write = store_manifest.write_json_atomic
        calls = []

        def failing_once(path, obj):
            calls.append(path)
            if len(calls) == 1:
                raise OSError(errno.ENOSPC, "No space left on device (injected)", str(path))
            real_write(path, obj)

        monkeypatch.setattr(store_manifest, "write_json_atomic", failing_once)
        with pytest.raises(OSError) as ei:
            s.put("k", filled(2)).result(T)
        assert ei.value.errno == errno.ENOSPC and "manifest.json" in str(ei.value)
        assert torch.equal(s.get("k").result(T), filled(1)), "a failed put is visible"
        s.put("z", filled(3)).result(T)  # a later, successful commit
    finally:
        s.close()
    with TieredStore(cfg) as s:
        assert torch.equal(s.get("k").result(T), filled(1)), "a failed put became durable"
        assert s.meta("k")["version"] == 1


@needs_faulty
def test_fsync_failure_fails_the_put(store):
    fb = use_faulty(store)
    store.put("k", filled(1)).result(T)
    fb.fail("fsync", errno.EIO, times=1)
    with pytest.raises(OSError) as ei:
        store.put("k", filled(2)).result(T)
    assert ei.value.errno == errno.EIO and "objects.dat" in str(ei.value)
    assert store.meta("k")["version"] == 1
    store.evict("k")
    assert torch.equal(store.get("k").result(T), filled(1))
    store.put("k", filled(3)).result(T)
    assert torch.equal(store.get("k").result(T), filled(3))


@needs_faulty
def test_eio_on_read_then_recovers(store):
    fb = use_faulty(store)
    store.put("k", filled(1, 200_000)).result(T)
    store.evict("k")
    rule = fb.fail("read", errno.EIO, path="objects.dat", times=1)
    with pytest.raises(OSError) as ei:
        store.get("k").result(T)
    assert ei.value.errno == errno.EIO and "objects.dat" in str(ei.value)
    assert rule.hits == 1
    assert not store.meta("k")["in_host"] and host_used(store) == 0
    assert torch.equal(store.get("k").result(T), filled(1, 200_000))  # fault gone
    assert store.meta("k")["in_host"]


@needs_faulty
def test_short_transfers_still_store_correct_data(store):
    fb = use_faulty(store)
    wr = fb.short("write", max_bytes=5000)
    rd = fb.short("read", max_bytes=5000)
    t = torch.randint(0, 1 << 30, (3 * MiB // 4 + 123,), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    store.put("k", t).result(T)
    store.evict("k")
    assert torch.equal(store.get("k").result(T), t)
    assert wr.hits > 3 and rd.hits > 3


@needs_faulty
def test_no_progress_write_fails_cleanly(store):
    fb = use_faulty(store)
    store.put("k", filled(1)).result(T)
    fb.no_progress("write", times=1)
    with pytest.raises(OSError, match="objects.dat"):
        store.put("k", filled(2)).result(T)
    store.evict("k")
    assert torch.equal(store.get("k").result(T), filled(1))


@needs_faulty
def test_no_o_direct_falls_back_to_buffered(store):
    fb = use_faulty(store)
    fb.no_direct()
    t = torch.randn(70_001)
    store.put("k", t).result(T)
    store.evict("k")
    assert torch.equal(store.get("k").result(T), t)


@needs_faulty
@pytest.mark.parametrize("change", ["delete", "replace"])
def test_put_or_delete_during_prefetch_does_not_corrupt_other_objects(store, change):
    fb = use_faulty(store, workers=2)
    n = 64 * KiB
    store.put("k", filled(1, n)).result(T)
    store.evict("k")
    read_gate = fb.gate("read", path="objects.dat", times=1)
    pf = store.prefetch("k")  # load in flight, buffer allocated, nothing pinned
    assert read_gate.entered.wait(T)
    if change == "delete":
        store.delete("k")
    else:
        store.put("k", filled(2, n)).result(T)
    write_gate = fb.gate("write", path="objects.dat", times=1)
    fx = store.put("x", filled(3, n))  # copied into the arena, crc taken; its write is parked
    assert write_gate.entered.wait(T)
    read_gate.release()  # k's stale read completes
    try:
        pf.result(T)
    except Exception:  # noqa: BLE001 - only what it did to other objects matters here
        pass
    write_gate.release()
    fx.result(T)
    assert torch.equal(store.get("x").result(T), filled(3, n)), "x's cached copy was overwritten"
    store.evict("x")
    assert torch.equal(store.get("x").result(T), filled(3, n)), "x's stored bytes were overwritten"


@needs_faulty
def test_prefetch_and_cancel_before_start(store):
    fb = use_faulty(store, workers=1)
    a, b = filled(1, 100_000), filled(2, 100_000)
    store.put("a", a).result(T)
    store.put("b", b).result(T)
    store.evict("a"), store.evict("b")
    gate = fb.gate("read", path="objects.dat", times=1)
    pa = store.prefetch("a")
    assert gate.entered.wait(T)  # the only worker is busy with a's read
    pb = store.prefetch("b")
    assert pb.cancel() is True
    assert pb.cancelled()
    gate.release()
    assert pa.result(T) is None
    assert store.meta("a")["in_host"] and not store.meta("b")["in_host"]
    assert host_used(store) == align(100_000), "the cancelled prefetch returned its buffer"
    hits = store.stats()["hits"]
    assert torch.equal(store.get("a").result(T), a)
    assert store.stats()["hits"] == hits + 1
    assert torch.equal(store.get("b").result(T), b)
    assert store.prefetch("b").result(T) is None  # already cached
    assert pa.cancel() is False  # too late


@needs_faulty
def test_cancelling_a_prefetch_does_not_cancel_a_joined_get(store):
    fb = use_faulty(store, workers=1)
    store.put("a", filled(1)).result(T)
    store.put("b", filled(2)).result(T)
    store.evict("a"), store.evict("b")
    gate = fb.gate("read", path="objects.dat", times=1)
    store.prefetch("a")
    assert gate.entered.wait(T)
    pb = store.prefetch("b")  # queued behind a
    gb = store.get("b")  # a demand read of the same object joins the prefetch's load
    pb.cancel()
    gate.release()
    try:
        got = gb.result(T)
    except CancelledError:
        pytest.fail("get('b') was cancelled by cancelling someone else's prefetch")
    assert torch.equal(got, filled(2))


# --------------------------------------------------------------------------- 8. keys

BAD_KEYS = ["../x", "/abs", "a/../b", "", "a//b", "x\x00", ".", "..", "a/./b", "a/", "-/..", "sp ace",
            "x" * 1025, "back\\slash", "new\nline/x", "ünï"]


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
def test_bad_keys_rejected(store, tmp_path, key):
    before = files_under(tmp_path)
    with pytest.raises(StoreError, match="invalid object key"):
        check_key(key)
    with pytest.raises(StoreError):
        store.put(key, torch.ones(3))
    with pytest.raises((StoreError, KeyError)):
        store.get(key)
    assert files_under(tmp_path) == before
    assert store.keys() == [] and host_used(store) == 0


def test_non_string_key_rejected(store):
    with pytest.raises(StoreError):
        store.put(1, torch.ones(3))
    with pytest.raises(TypeError):
        store.put("k", [1, 2, 3])


def test_key_with_trailing_newline_rejected():
    with pytest.raises(StoreError):
        check_key("x\n")


GOOD_KEYS = ["layer.0/weight", "a", "model/layers.1/attn:q@v2", "x" * 1024, "a-b_c=d+e", "..a", "a..b/c"]


def test_good_keys_accepted_and_no_file_outside_tier_dirs(tmp_path):
    cfg = store_config(tmp_path, flash="16MiB")
    tier_dirs = {tmp_path / "nvme", tmp_path / "flash"}
    outside_before = files_under(tmp_path, exclude=tier_dirs)
    with TieredStore(cfg) as s:
        for i, k in enumerate(GOOD_KEYS):
            assert check_key(k) == k
            s.put(k, filled(i, 100), tier="flash" if i % 2 else None).result(T)
        for i, k in enumerate(GOOD_KEYS):
            s.evict(k)
            assert torch.equal(s.get(k).result(T), filled(i, 100))
        s.migrate(GOOD_KEYS[0], "flash").result(T)
        s.delete(GOOD_KEYS[1])
    assert files_under(tmp_path, exclude=tier_dirs) == outside_before
    assert files_under(tmp_path / "nvme") == {"objects.dat", "manifest.json", ".lock", "tier.json"}
    assert files_under(tmp_path / "flash") <= {"objects.dat", ".lock", "tier.json"}


# --------------------------------------------------------------------------- 9. concurrency


def run_concurrent_random_operations(tmp_path, full: bool) -> None:
    cfg = store_config(tmp_path, host="4MiB", nvme="128MiB")
    s = TieredStore(cfg).open()
    nthreads, nkeys, duration = 8, 16, 3.0 if full else 2.5
    sizes = {i: 24_000 + i * 2_000 for i in range(nkeys)}  # 192..432 KB int64 objects
    owned = {i: i % nthreads for i in range(nkeys)}  # each key is written/deleted by one thread only
    state: dict[int, int | None] = {i: None for i in range(nkeys)}  # owner's view: committed version or None
    errors: list[str] = []
    ops = {"put": 0, "get": 0, "own": 0, "acquire": 0, "evict": 0, "prefetch": 0, "cancel": 0, "delete": 0, "keyerror": 0}
    ops_lock = threading.Lock()
    stop = time.monotonic() + duration

    def check_other(i: int, t: torch.Tensor) -> None:
        assert t.shape == (sizes[i],)
        assert decode(t, i) >= 1

    def worker(w: int) -> None:
        rng = random.Random(w)
        mine = [i for i in range(nkeys) if owned[i] == w]
        version = 0
        try:
            while time.monotonic() < stop:
                op = rng.choice(["put", "put", "get", "get", "acquire", "evict", "own"]
                                + ["delete", "prefetch", "prefetch"] * full)
                i = rng.choice(mine) if op in ("put", "delete", "own") else rng.randrange(nkeys)
                key = f"k{i}"
                try:
                    if op == "put":
                        version += 1
                        d = s.put(key, encoded(i, version, sizes[i]), kind="kv").result(T)
                        assert d["key"] == key and d["nbytes"] == sizes[i] * 8
                        state[i] = version
                    elif op == "delete":
                        if state[i] is None:
                            with pytest.raises(KeyError):
                                s.delete(key)
                        else:
                            s.delete(key)
                            state[i] = None
                    elif op == "own":  # the owner knows exactly what is committed
                        if state[i] is None:
                            with pytest.raises(KeyError):
                                s.get(key)
                        else:
                            assert decode(s.get(key).result(T), i) == state[i]
                    elif op == "get":
                        check_other(i, s.get(key).result(T))
                    elif op == "acquire":
                        with s.acquire(key).result(T) as lease:
                            check_other(i, lease.tensor)
                            time.sleep(0.001)
                            check_other(i, lease.tensor)  # pinned bytes do not change under us
                    elif op == "evict":
                        s.evict(key)
                    elif op == "prefetch":
                        f = s.prefetch(key)
                        if rng.random() < 0.3 and f.cancel():
                            op = "cancel"
                        else:
                            assert f.result(T) is None
                except KeyError:
                    assert op in ("get", "acquire", "evict", "prefetch"), f"KeyError from {op} of an owned key"
                    op = "keyerror"
                with ops_lock:
                    ops[op] += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            import traceback

            errors.append(f"thread {w}: {type(e).__name__}: {e}\n{traceback.format_exc()}")

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 30)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    assert not errors, "\n".join(errors[:3])
    assert ops["put"] >= 8 and ops["get"] + ops["own"] >= 8 and (ops["delete"] > 0 or not full), ops
    st = s.stats()
    assert st["evictions"] > 0 and st["tiers"]["host"]["used"] <= st["tiers"]["host"]["capacity"]
    live = {i for i, v in state.items() if v is not None}
    assert sorted(s.keys()) == sorted(f"k{i}" for i in live)
    assert tier_used(s) == sum(align(sizes[i] * 8) for i in live), "storage space leaked or double-freed"

    closer = threading.Thread(target=s.close, daemon=True)
    closer.start()
    closer.join(30)
    assert not closer.is_alive(), "close() hung"

    with TieredStore(cfg) as s2:
        assert sorted(s2.keys()) == sorted(f"k{i}" for i in live)
        for i in live:
            assert decode(s2.get(f"k{i}").result(T), i) == state[i]
        assert host_used(s2) <= 4 * MiB


def test_concurrent_random_operations(tmp_path):
    """8 threads: put/get/acquire/evict on 16 keys; every read is a complete version.

    Without delete and prefetch, which hit the known races below (see the full variant)."""
    run_concurrent_random_operations(tmp_path, full=False)


def test_concurrent_random_operations_full(tmp_path):
    """The same with delete and prefetch (some cancelled) in the mix."""
    run_concurrent_random_operations(tmp_path, full=True)


@pytest.mark.parametrize("race", ["replace", "delete"])
def test_acquire_racing_with_put_or_delete(store, monkeypatch, race):
    store.put("k", torch.ones(1024, dtype=torch.float32)).result(T)
    real_pin = store._pin_host_copy

    def pin_then_race(key, priority, wait=None, owner="default", emit=True, evict=True):
        out = real_pin(key, priority, wait, owner, emit, evict)
        # another thread changes the key right after the pin, before acquire() builds the Lease
        if race == "replace":
            other = threading.Thread(target=lambda: store.put(key, torch.full((1024,), 7, dtype=torch.int32)).result(T))
        else:
            other = threading.Thread(target=lambda: store.delete(key))
        other.start()
        other.join(T)
        return out

    monkeypatch.setattr(store, "_pin_host_copy", pin_then_race)
    lease = store.acquire("k").result(T)
    # the lease pinned version 1, so it must show version 1 as version 1 was written
    assert lease.tensor.dtype == torch.float32 and torch.equal(lease.tensor, torch.ones(1024))
    lease.release()
    expected_host = align(4096) if race == "replace" else 0
    assert host_used(store) == expected_host, "the pinned copy was not returned"


def test_raising_listener_does_not_leak_pins(store):
    def bad_listener(ev):
        if ev.op == "read":
            raise RuntimeError("listener failed")

    store.put("k", filled(1)).result(T)
    store.add_listener(bad_listener)
    try:
        store.get("k").result(T)
    except RuntimeError:
        pass
    store._listeners.clear()
    assert store.evict("k"), "nobody holds a lease on 'k', yet it is pinned"


# --------------------------------------------------------------------------- 10. crash safety


def _read_lines(stream, sink: list, ready: threading.Event) -> None:
    for line in stream:
        line = line.strip()
        if line == "READY":
            ready.set()
        elif line:
            sink.append(line)


def test_crash_safety_sigkill(tmp_path):
    cfg = store_config(tmp_path, host="16MiB", nvme="64MiB", workers=4)
    nkeys = 4
    last: dict[int, int] = {}
    rng = random.Random(20240601)
    commits = 0
    for it in range(3):  # three kills at random moments
        base = (it + 1) * 1_000_000
        with open(tmp_path / f"writer{it}.err", "w") as err:
            p = subprocess.Popen(
                [sys.executable, str(WRITER), "writer", json.dumps(cfg), str(base), str(nkeys)],
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
            )
            lines: list[str] = []
            ready = threading.Event()
            reader = threading.Thread(target=_read_lines, args=(p.stdout, lines, ready), daemon=True)
            reader.start()
            try:
                assert ready.wait(60), f"writer did not start: {(tmp_path / f'writer{it}.err').read_text()}"
                time.sleep(rng.uniform(0.2, 1.0))
                assert p.poll() is None, f"writer died: {(tmp_path / f'writer{it}.err').read_text()}"
            finally:
                p.send_signal(signal.SIGKILL)
                p.wait(10)
                reader.join(10)
        for line in lines:
            key, version = line.split()
            i = int(key[1:])
            assert int(version) >= base
            last[i] = max(last.get(i, 0), int(version))
            commits += 1
        with TieredStore(cfg) as s:
            present = set(s.keys())
            assert {f"k{i}" for i in last} <= present, "a committed object disappeared"
            assert present <= {f"k{i}" for i in range(nkeys)}
            for key in present:
                i = int(key[1:])
                v = decode(s.get(key).result(T), i)  # checksum verified, complete version
                assert v >= last.get(i, 0), f"{key}: found version {v}, but {last[i]} was committed"
                assert v < base + 1_000_000
                assert s.meta(key)["nbytes"] == 8 * (700 + (i * 7919 + v * 104729) % 40000)
            assert not list((tmp_path / "nvme").glob(".tmp-*")), "stale manifest temp files were not removed"
    assert commits > 0


# --------------------------------------------------------------------------- 11. locking


def test_second_open_in_process_is_refused(tmp_path):
    cfg = store_config(tmp_path)
    with TieredStore(cfg) as s:
        s.put("k", filled(1)).result(T)
        with pytest.raises(StoreError) as ei:
            TieredStore(cfg).open()
        assert "lock" in str(ei.value) and str(tmp_path / "nvme") in str(ei.value)
        assert torch.equal(s.get("k").result(T), filled(1))  # the first store is unaffected
    with TieredStore(cfg) as s:  # released on close
        assert s.keys() == ["k"]


def test_second_open_from_another_process_is_refused(tmp_path):
    cfg = store_config(tmp_path)
    holder = subprocess.Popen([sys.executable, str(WRITER), "hold", json.dumps(cfg)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline().strip()
        assert line == "OPEN", holder.stderr.read()
        with pytest.raises(StoreError, match="lock"):
            TieredStore(cfg).open()
        holder.kill()  # the kernel drops the lock with the process: no stale lock
        holder.wait(10)
        with TieredStore(cfg) as s:
            assert s.keys() == []
            probe = subprocess.run([sys.executable, str(WRITER), "probe", json.dumps(cfg)],
                                   capture_output=True, text=True, timeout=60)
            assert probe.stdout.startswith("ERROR") and "lock" in probe.stdout, probe.stdout + probe.stderr
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


# --------------------------------------------------------------------------- 12. listeners


def test_listener_events(tmp_path):
    with TieredStore(store_config(tmp_path, flash="8MiB")) as s:
        events = []
        s.add_listener(events.append)
        s.put("w", filled(1, 5000), kind="weight").result(T)
        s.put("f", filled(2, 100), kind="kv", tier="flash").result(T)
        s.get("w").result(T)  # hit
        assert s.evict("w")
        s.get("w").result(T)  # miss, served by nvme
        s.evict("f")
        s.prefetch("f").result(T)  # miss, served by flash
        s.delete("w")
        got = [(e.op, e.key, e.tier, e.kind, e.nbytes) for e in events]
        assert got == [
            ("write", "w", "nvme", "weight", 5000),
            ("write", "f", "flash", "kv", 100),
            ("read", "w", "host", "weight", 5000),
            ("evict", "w", "host", "weight", 5000),
            ("read", "w", "nvme", "weight", 5000),
            ("evict", "f", "host", "kv", 100),
            ("prefetch", "f", "flash", "kv", 100),  # a load ahead of use, not an access
            ("delete", "w", None, "weight", 5000),
        ]
        times = [e.time for e in events]
        assert times == sorted(times)


def test_raising_listener_does_not_fail_a_committed_put(store):
    def bad_listener(ev):
        raise RuntimeError("listener failed")

    store.add_listener(bad_listener)
    store.put("k", filled(1)).result(T)


# --------------------------------------------------------------------------- 13. permissions


def test_storage_dirs_and_files_are_private(tmp_path):
    cfg = store_config(tmp_path / "deep" / "er", flash="8MiB")
    with TieredStore(cfg) as s:
        s.put("k", filled(1)).result(T)
        s.put("f", filled(1), tier="flash").result(T)
    for d in (tmp_path / "deep" / "er" / "nvme", tmp_path / "deep" / "er" / "flash", tmp_path / "deep"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for f in ("objects.dat", "manifest.json", ".lock"):
        assert stat.S_IMODE((tmp_path / "deep" / "er" / "nvme" / f).stat().st_mode) == 0o600, f
    assert stat.S_IMODE((tmp_path / "deep" / "er" / "flash" / "objects.dat").stat().st_mode) == 0o600


@needs_faulty
def test_retain_refuses_a_key_whose_put_is_still_in_flight(tmp_path):
    """A checkpoint by reference must name what the caller last wrote, not the version before it."""
    s = open_store(tmp_path)
    fb = use_faulty(s, workers=2)
    try:
        s.put("m", filled(0, 64 * KiB)).result(T)
        gate = fb.gate("write", path="objects.dat")
        f = s.put("m", filled(1, 64 * KiB))
        assert gate.entered.wait(T)
        with pytest.raises(StoreError, match="still in flight"):
            s.retain("ck1", ["m"])
        gate.release()
        f.result(T)
        (rec,) = s.retain("ck1", ["m"])
        assert rec["version"] == s.meta("m")["version"] == 2
        fb.fail("write", path="objects.dat", times=1)  # a failed put must not block retain forever
        with pytest.raises(OSError):
            s.put("m", filled(2, 64 * KiB)).result(T)
        s.retain("ck2", ["m"])
    finally:
        s.close()


# --------------------------------------------------------------------------- zero-copy puts, deferred commit


def test_put_buffer_writes_an_arena_buffer_without_copying(tmp_path):
    with open_store(tmp_path) as store:
        buf = store.alloc_host(4 * 1000)
        t = buf.tensor(torch.float32)
        t.copy_(torch.arange(1000, dtype=torch.float32))
        # give=False: the caller keeps the buffer, the store never caches or frees it
        store.put_buffer("kept", buf, torch.float32, (10, 100)).result(timeout=T)
        assert not buf.released and not store.meta("kept")["in_host"]
        assert torch.equal(store.get("kept").result(timeout=T), torch.arange(1000, dtype=torch.float32).view(10, 100))
        t.add_(1)  # the caller may change it once the put is done; the stored version does not
        assert store.get("kept").result(timeout=T)[0, 0] == 0
        # give=True: the buffer becomes the object's cached copy
        store.put_buffer("given", buf, torch.float32, (1000,), give=True).result(timeout=T)
        assert store.meta("given")["in_host"]
        with store.acquire("given").result(timeout=T) as lease:
            assert lease.tensor.data_ptr() == buf.address and lease.tensor[0] == 1
    with open_store(tmp_path) as store:  # both durable
        assert store.get("kept").result(timeout=T).sum() == sum(range(1000))
        assert store.get("given").result(timeout=T).sum() == sum(range(1, 1001))


def test_put_buffer_errors(tmp_path):
    with open_store(tmp_path) as store:
        buf = store.alloc_host(64)
        with pytest.raises(StoreError, match=r"holds 64 bytes, float32\(32,\) needs 128"):
            store.put_buffer("x", buf, torch.float32, (32,))
        assert not buf.released  # not given: still the caller's
        with pytest.raises(StoreError, match="holds 64 bytes"):
            store.put_buffer("x", buf, torch.float32, (32,), give=True)
        assert buf.released  # given: released also when the put is refused
        from tiered.allocators import HostArena
        with HostArena(1 << 20, hugepages=False) as other:
            with pytest.raises(StoreError, match="this store's host arena"):
                store.put_buffer("x", other.alloc(64), torch.uint8, (64,))
        assert "x" not in store


def test_lease_detach_takes_the_buffer_or_copies_a_shared_one(tmp_path):
    with open_store(tmp_path) as store:
        store.put("a", torch.arange(4096, dtype=torch.float32)).result(timeout=T)
        store.evict("a")
        lease = store.acquire("a").result(timeout=T)
        ptr = lease.tensor.data_ptr()
        buf = lease.detach()  # the only pin: the cached buffer itself, out of the cache
        assert buf.address == ptr and not store.meta("a")["in_host"] and lease.tensor is None
        buf.tensor(torch.float32).mul_(2)  # changing it leaves the stored object as it was
        assert torch.equal(store.get("a").result(timeout=T), torch.arange(4096, dtype=torch.float32))
        store.put_buffer("a", buf, torch.float32, (4096,), give=True).result(timeout=T)
        assert torch.equal(store.get("a").result(timeout=T), 2 * torch.arange(4096, dtype=torch.float32))
        l1, l2 = store.acquire("a").result(timeout=T), store.acquire("a").result(timeout=T)
        copy = l1.detach()  # pinned twice: a copy, the cached one stays for l2
        assert copy.address != l2.tensor.data_ptr() and torch.equal(copy.tensor(torch.float32), l2.tensor)
        l2.release()
        copy.release()
        with pytest.raises(StoreError, match="released"):
            l1.detach()


def test_uncommitted_puts_are_current_but_durable_only_after_commit(tmp_path, monkeypatch):
    syncs = []
    real = IOEngine.fsync
    monkeypatch.setattr(IOEngine, "fsync", lambda self, path: (syncs.append(path), real(self, path))[1])
    with open_store(tmp_path) as store:
        store.put("k", torch.zeros(1024)).result(timeout=T)
        commits = store.stats()["commits"]
        for i in range(3):
            buf = store.alloc_host(4096)
            buf.tensor(torch.float32).fill_(i + 1)
            store.put_buffer("k", buf, torch.float32, (1024,), give=True, sync=False, commit=False).result(timeout=T)
        assert store.get("k").result(timeout=T)[0] == 3  # current in memory at once
        assert store.stats()["commits"] == commits and syncs == []  # no manifest write, no fdatasync
        doc = json.loads((tmp_path / "nvme" / "manifest.json").read_text())
        assert doc["objects"]["k"]["version"] == 1  # the committed manifest still names version 1
        store.commit()  # one fdatasync of the data file, then one manifest commit for all three
        assert len(syncs) == 1 and store.stats()["commits"] == commits + 1
        store.commit()  # nothing changed: no-op
        assert len(syncs) == 1 and store.stats()["commits"] == commits + 1
    with open_store(tmp_path) as store:
        assert store.get("k").result(timeout=T)[0] == 3


def test_uncommitted_put_is_lost_by_a_crash_and_leaves_the_previous_version(tmp_path):
    code = f"""
import sys, os, torch
sys.path.insert(0, {str(HERE.parent)!r})
from tiered.store import TieredStore
cfg = {store_config(tmp_path)!r}
s = TieredStore(cfg).open()
s.put("k", torch.zeros(1024)).result(timeout=10)
buf = s.alloc_host(4096)
buf.tensor(torch.float32).fill_(7)
s.put_buffer("k", buf, torch.float32, (1024,), give=True, sync=False, commit=False).result(timeout=10)
os._exit(0)  # no commit, no close
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with open_store(tmp_path) as store:
        assert torch.equal(store.get("k").result(timeout=T), torch.zeros(1024))


def test_superseded_versions_keep_their_blocks_deleted_objects_give_them_back(tmp_path, monkeypatch):
    punched = []
    monkeypatch.setattr(store_extents, "punch_hole", lambda path, off, n: punched.append((off, n)) or True)
    with open_store(tmp_path) as store:
        store.put("a", torch.zeros(1024)).result(timeout=T)
        store.put("a", torch.ones(1024)).result(timeout=T)  # version 1's extent freed, not punched
        assert punched == []
        off = store.meta("a")["offset"]
        store.delete("a")
        assert punched == [(off, 4096)]


def test_an_allocation_waiting_for_room_wakes_when_a_put_makes_its_copy_evictable(tmp_path):
    """The host tier is full of a put's buffer; the allocation must not poll for 50 ms steps
    but wake when the put's write lands and its cached copy becomes evictable."""
    with open_store(tmp_path, host="1MiB") as store:
        arena = store.arena
        seen = arena.changes
        assert not arena.wait_change(seen, 0.01)  # nothing happened: times out
        arena.notify()
        assert arena.wait_change(seen, 0.0)  # a change since `seen`: returns at once
        big = store.alloc_host(1 << 20)
        f = store.put_buffer("x", big, torch.uint8, (1 << 20,), give=True)
        buf = store.alloc_host(1 << 20, wait=T)  # evicts x's copy once the put's write landed
        f.result(timeout=T)
        assert not store.meta("x")["in_host"]
        buf.release()
