"""Byte budgets and the aligned host arena: admission, waiting, alignment, zero-copy, coalescing."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
import torch

from tiered.allocators import (
    HUGE_PAGE,
    PAGE,
    Budget,
    DeviceBudget,
    HostArena,
    HostBuffer,
    OutOfBudget,
    align_up,
    aligned_empty,
)

KiB = 1 << 10
MiB = 1 << 20
T = 10.0


def run_later(delay: float, fn) -> threading.Thread:
    def body():
        time.sleep(delay)
        fn()

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t


# -- Budget ----------------------------------------------------------------------------
def test_budget_reserve_release_and_stats():
    b = Budget(1000, name="host tier")
    b.reserve(400)
    b.reserve(600)
    assert b.in_use == 1000 and b.free == 0
    assert not b.try_reserve(1)
    b.release(600)
    assert b.try_reserve(100)
    assert b.in_use == 500
    b.release(500)
    s = b.stats()
    assert (s.name, s.capacity, s.in_use, s.peak, s.reservations) == ("host tier", 1000, 0, 1000, 3)
    b.reserve(0)  # zero bytes always fits
    with pytest.raises(ValueError):
        b.reserve(-1)
    with pytest.raises(ValueError):
        Budget(-1)


def test_budget_full_fails_at_once_with_clear_message():
    b = Budget(1000, name="host tier")
    b.reserve(800)
    t0 = time.monotonic()
    with pytest.raises(OutOfBudget) as ei:
        b.reserve(300)  # timeout=0 is the default
    assert time.monotonic() - t0 < 1.0
    msg = str(ei.value)
    assert "host tier" in msg and "300 bytes requested" in msg and "200 of 1000 bytes free" in msg
    assert isinstance(ei.value, MemoryError)
    assert b.stats().failures == 1


def test_budget_waits_then_succeeds_when_released():
    b = Budget(1000)
    b.reserve(900)
    t = run_later(0.1, lambda: b.release(500))
    t0 = time.monotonic()
    b.reserve(500, timeout=3 * T)
    elapsed = time.monotonic() - t0
    assert 0.05 <= elapsed < T, "the release must wake the waiter, not its timeout"
    t.join(T)
    assert b.in_use == 900 and b.stats().waits == 1 and b.stats().failures == 0


def test_budget_wait_times_out():
    b = Budget(1000, name="gpu")
    b.reserve(1000)
    t0 = time.monotonic()
    with pytest.raises(OutOfBudget, match=r"gpu: 1 bytes requested, 0 of 1000 bytes free \(waited 0.1 s\)"):
        b.reserve(1, timeout=0.1)
    elapsed = time.monotonic() - t0
    assert 0.09 <= elapsed < 5
    s = b.stats()
    assert s.waits == 1 and s.failures == 1 and s.in_use == 1000


def test_budget_larger_than_capacity_fails_immediately_even_with_timeout():
    b = Budget(1000, name="tiny")
    t0 = time.monotonic()
    with pytest.raises(OutOfBudget, match="1001 bytes requested but the whole budget is 1000 bytes"):
        b.reserve(1001, timeout=30)
    assert time.monotonic() - t0 < 1.0
    assert not b.try_reserve(1001)


def test_budget_release_more_than_reserved_raises():
    b = Budget(100)
    b.reserve(10)
    with pytest.raises(RuntimeError, match="only 10 are reserved"):
        b.release(11)


def test_budget_peak_tracking():
    b = Budget(10_000)
    for n in (100, 2000, 300):
        b.reserve(n)
    b.release(2000)
    b.reserve(50)
    assert b.stats().peak == 2400
    b.release(b.in_use)
    assert b.stats().peak == 2400 and b.in_use == 0


def test_budget_threads_never_exceed_capacity():
    b = Budget(10 * KiB)
    over = []
    lock = threading.Lock()
    held = [0]

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(200):
            n = rng.randint(1, 4 * KiB)
            b.reserve(n, timeout=T)
            with lock:
                held[0] += n
                if held[0] > b.capacity:
                    over.append(held[0])
            with lock:
                held[0] -= n
            b.release(n)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert not over and b.in_use == 0 and b.stats().peak <= b.capacity


def test_device_budget_names_the_device():
    d = DeviceBudget(100, "cuda:1")
    with pytest.raises(OutOfBudget, match="device budget cuda:1"):
        d.reserve(200)


# -- HostArena -------------------------------------------------------------------------
@pytest.fixture
def arena():
    with HostArena(16 * MiB, hugepages=False, pin=False, name="test arena") as a:
        yield a


def test_alloc_is_aligned_and_exact(arena):
    bufs = [arena.alloc(n) for n in (1, 100, PAGE - 1, PAGE, PAGE + 1, 12345, 1 * MiB + 3, 0)]
    for b in bufs:
        assert isinstance(b, HostBuffer)
        assert b.address % PAGE == 0
        if b.nbytes:  # numpy does not promise a data pointer for an empty view
            assert b.array.ctypes.data == b.address
        assert b.array.dtype == np.uint8 and b.array.nbytes == b.nbytes
        assert b.reserved == align_up(max(b.nbytes, 1)) and b.reserved % PAGE == 0
        assert len(b.padded) == b.reserved and b.padded.ctypes.data == b.address
    # buffers do not overlap
    spans = sorted((b.offset, b.offset + b.reserved) for b in bufs)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert arena.stats().in_use == sum(b.reserved for b in bufs)
    for b in bufs:
        b.release()
    assert arena.stats().in_use == 0


def test_larger_alignment():
    with HostArena(4 * MiB, alignment=64 * KiB, hugepages=False, pin=False) as a:
        bufs = [a.alloc(n) for n in (1, 70 * KiB, 5000)]
        assert all(b.address % (64 * KiB) == 0 for b in bufs)
        assert [b.reserved for b in bufs] == [64 * KiB, 128 * KiB, 64 * KiB]
    with pytest.raises(ValueError):
        HostArena(MiB, alignment=3000)
    with pytest.raises(ValueError):
        HostArena(0)


def test_tensor_views_are_zero_copy(arena):
    b = arena.alloc(4 * 1000)
    t = b.tensor(torch.float32)
    assert t.dtype == torch.float32 and t.numel() == 1000 and t.data_ptr() == b.address
    t[:] = 1.5
    assert np.array_equal(b.array.view(np.float32), np.full(1000, 1.5, np.float32))
    b.array[:4] = np.frombuffer(np.float32(-2.0).tobytes(), np.uint8)
    assert t[0].item() == -2.0
    m = b.tensor(torch.bfloat16, (50, 40))
    assert m.shape == (50, 40) and m.data_ptr() == b.address
    assert b.tensor().dtype == torch.uint8 and b.tensor().numel() == 4000
    b.release()


def test_context_manager_releases_once(arena):
    with arena.alloc(PAGE) as b:
        assert arena.in_use == PAGE
    assert b.released and arena.in_use == 0
    with pytest.raises(RuntimeError, match="released twice"):
        b.release()


def test_double_release_raises(arena):
    b = arena.alloc(100)
    b.release()
    with pytest.raises(RuntimeError, match="released twice"):
        b.release()
    assert arena.stats().in_use == 0 and arena.stats().buffers == 0


def test_coalescing_after_random_frees(arena):
    rng = random.Random(1)
    bufs = []
    while True:
        b = arena.try_alloc(rng.randint(1, 300 * KiB))
        if b is None:
            break
        bufs.append(b)
    assert len(bufs) > 40
    rng.shuffle(bufs)
    for i, b in enumerate(bufs):
        b.release()
        if i == len(bufs) // 2:
            assert arena.stats().fragmentation > 0  # holes exist mid-way
    s = arena.stats()
    assert s.in_use == 0 and s.buffers == 0
    assert s.fragmentation == 0.0 and s.largest_free == s.capacity == s.free
    assert arena.alloc(arena.capacity).nbytes == arena.capacity  # the whole arena is one block again


def test_steady_state_mix_does_not_fragment_unboundedly():
    rng = random.Random(2)
    with HostArena(64 * MiB, hugepages=False, pin=False) as a:
        live: list[HostBuffer] = []
        frag_samples = []
        failures = 0
        for i in range(2000):
            if live and (rng.random() < 0.45 or a.in_use > 48 * MiB):
                live.pop(rng.randrange(len(live))).release()
            else:
                b = a.try_alloc(rng.choice([PAGE, 10 * KiB, 100 * KiB, 1 * MiB + 7, 3 * MiB]))
                if b is None:
                    failures += 1
                else:
                    live.append(b)
            if i % 100 == 99:
                frag_samples.append(a.stats().fragmentation)
        assert a.stats().peak <= a.capacity
        assert max(frag_samples) < 1.0 and failures < 200
        for b in live:
            b.release()
        s = a.stats()
        assert s.in_use == 0 and s.fragmentation == 0.0 and s.largest_free == a.capacity


def test_alloc_waits_for_release_in_another_thread():
    with HostArena(1 * MiB, hugepages=False, pin=False) as a:
        big = a.alloc(768 * KiB)
        t = run_later(0.1, big.release)
        t0 = time.monotonic()
        b = a.alloc(512 * KiB, timeout=3 * T)
        elapsed = time.monotonic() - t0
        assert 0.05 <= elapsed < T, "the release must wake the waiter, not its timeout"
        t.join(T)
        assert b.nbytes == 512 * KiB
        b.release()


def test_alloc_fails_at_once_or_after_timeout():
    with HostArena(1 * MiB, hugepages=False, pin=False, name="small") as a:
        held = a.alloc(768 * KiB)
        t0 = time.monotonic()
        with pytest.raises(OutOfBudget) as ei:
            a.alloc(512 * KiB, timeout=0)
        assert time.monotonic() - t0 < 1.0
        msg = str(ei.value)
        assert "small" in msg and str(512 * KiB) in msg and "largest free block" in msg
        with pytest.raises(OutOfBudget):
            a.alloc(512 * KiB, timeout=0.1)
        assert a.try_alloc(512 * KiB) is None
        with pytest.raises(OutOfBudget, match="arena holds"):
            a.alloc(2 * MiB, timeout=T)  # can never fit: fails at once
        with pytest.raises(ValueError):
            a.alloc(-1)
        held.release()


def test_stats_peak_and_in_use(arena):
    a = arena.alloc(100)
    b = arena.alloc(3 * PAGE)
    s = arena.stats()
    assert s.in_use == 4 * PAGE and s.peak == 4 * PAGE and s.buffers == 2
    assert s.free == s.capacity - 4 * PAGE and not s.pinned
    a.release()
    b.release()
    s = arena.stats()
    assert s.in_use == 0 and s.peak == 4 * PAGE and s.buffers == 0


def test_alloc_requires_open():
    a = HostArena(MiB, hugepages=False, pin=False)
    with pytest.raises(RuntimeError, match="not open"):
        a.alloc(10)
    a.open()
    assert a.open() is a
    a.close()
    a.close()  # twice is fine


@pytest.mark.parametrize("hugepages", [True, False])
def test_hugepages_on_and_off(hugepages):
    with HostArena(4 * MiB, hugepages=hugepages, pin=False) as a:
        assert a.capacity == 4 * MiB
        if a.hugepages:
            assert a.address % HUGE_PAGE == 0  # THP advised: base aligned to 2 MiB
        b = a.alloc(3 * MiB)
        b.array[:] = 7
        assert int(b.array.sum()) == 7 * 3 * MiB
        assert a.hugepage_bytes() >= 0  # don't assume THP is available
        assert a.stats().hugepages == a.hugepages
        b.release()


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinning works on a CUDA machine")
def test_pin_true_without_cuda_raises():
    a = HostArena(MiB, hugepages=False, pin=True, name="pinned arena")
    with pytest.raises(RuntimeError, match="pinned arena: pin=True but no CUDA device"):
        a.open()
    a.close()
    with HostArena(MiB, hugepages=False, pin="auto") as auto:
        assert not auto.pinned  # auto does not pin without CUDA


def test_concurrent_alloc_release_no_corruption():
    errors: list[BaseException] = []
    with HostArena(8 * MiB, hugepages=False, pin=False) as a:

        def worker(tid: int) -> None:
            rng = random.Random(tid)
            try:
                for i in range(150):
                    n = rng.randint(1, 200 * KiB)
                    b = a.alloc(n, timeout=T)
                    pattern = (tid * 31 + i) % 251 + 1
                    b.array[:] = pattern
                    time.sleep(0) if i % 5 else time.sleep(0.0005)
                    assert (b.array == pattern).all(), f"thread {tid}: buffer overwritten by another thread"
                    assert b.address % PAGE == 0
                    b.release()
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        if errors:
            raise errors[0]
        s = a.stats()
        assert s.in_use == 0 and s.buffers == 0 and s.fragmentation == 0.0 and s.largest_free == a.capacity
        assert s.peak <= a.capacity


def test_aligned_empty():
    for n in (0, 1, 4095, 4096, 10_000):
        x = aligned_empty(n)
        assert x.dtype == np.uint8 and len(x) == n and x.ctypes.data % PAGE == 0
        x[:] = 1
