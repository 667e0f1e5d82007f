"""The kernel-queue backends (``native``: io_uring, else Linux AIO; ``aio``): registered beside
``threads`` and run by the engine conformance suite in test_engine.py; here what is theirs alone:
whole batches reach the kernel in one submission, faults are injected on the queue path, the
store works on them, and where the kernel refuses them they say why and ``auto`` falls back."""

from __future__ import annotations

import errno
import logging
import os

import numpy as np
import pytest
import torch

from helpers import store_config
from tiered.allocators import PAGE, aligned_empty
from tiered.io_engine import (
    BackendUnavailable, IOEngine, IOEngineError, Op, Priority, Request, available_backends, backend_names,
    create_backend,
)
from tiered.io_engine.backends import base as registry
from tiered.io_engine.backends import rings
from tiered.io_engine.backends.native import NativeBackend
from tiered.io_engine.testing import FaultyBackend
from tiered.store import ChecksumError, TieredStore

T = 10.0
NATIVE = ("native", "aio")


def _why_not(name: str) -> str | None:
    assert name in backend_names(), f"{name!r} is not registered"  # a missing backend fails, never skips
    return available_backends()[name]


def needs(name: str):
    why = _why_not(name)
    return pytest.mark.skipif(why is not None, reason=f"{name}: {why}")


@pytest.fixture(params=[pytest.param(n, marks=needs(n)) for n in NATIVE])
def native_name(request) -> str:
    return request.param


def random_file(path, n: int, seed: int = 0) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    return data


class _Recording:
    """A kernel queue that records how many transfers each submission carried."""

    def __init__(self, inner, sizes: list[int]) -> None:
        self.inner, self.sizes = inner, sizes

    def submit_and_wait(self, ops, timeout):
        if ops:
            self.sizes.append(len(ops))
        return self.inner.submit_and_wait(ops, timeout)

    def close(self) -> None:
        self.inner.close()


def recording_backend(name: str, sizes: list[int]):
    backend = create_backend(name)
    make = backend.queue
    backend.queue = lambda depth: _Recording(make(depth), sizes)
    return backend


def test_conformance_suite_runs_the_native_backends():
    import test_engine

    for name in NATIVE:
        if _why_not(name) is None:
            assert name in test_engine.BACKENDS


def test_submit_many_goes_to_the_kernel_in_one_submission(native_name, tmp_path):
    path = tmp_path / "rows.bin"
    data = random_file(path, 64 * PAGE)
    sizes: list[int] = []
    bufs = [aligned_empty(PAGE) for _ in range(32)]
    order = np.random.default_rng(1).permutation(64)[:32]
    with IOEngine(recording_backend(native_name, sizes), queue_depth=32, chunk=1 << 20) as e:
        reqs = [Request(Op.READ, str(path), int(i) * PAGE, PAGE, b, Priority.PREFETCH) for i, b in zip(order, bufs)]
        assert e.submit_many(reqs).result(T) == 32 * PAGE
        assert e.stats()["read"]["direct_bytes"] + e.stats()["read"]["buffered_bytes"] == 32 * PAGE
    assert sizes == [32], f"submissions carried {sizes} transfers"
    for i, b in zip(order, bufs):
        assert np.array_equal(b, data[i * PAGE:(i + 1) * PAGE])


def test_queue_depth_caps_transfers_in_flight(native_name, tmp_path):
    path = tmp_path / "rows.bin"
    data = random_file(path, 40 * PAGE, seed=2)
    sizes: list[int] = []
    bufs = [aligned_empty(PAGE) for _ in range(40)]
    with IOEngine(recording_backend(native_name, sizes), queue_depth=8, chunk=1 << 20) as e:
        reqs = [Request(Op.READ, str(path), i * PAGE, PAGE, b) for i, b in enumerate(bufs)]
        assert e.submit_many(reqs).result(T) == 40 * PAGE
    assert max(sizes) <= 8 and sum(sizes) == 40
    assert np.array_equal(np.concatenate(bufs), data)


def test_faults_are_injected_on_the_kernel_queue_path(native_name, tmp_path):
    """The rules apply to transfers submitted through the queue; the blocking calls stay unused."""
    path = tmp_path / "data.bin"
    data = random_file(path, 32 * PAGE, seed=3)
    inner = create_backend(native_name)
    inner.pread = inner.pwrite = None  # the driver must not fall back to per-request syscalls
    fb = FaultyBackend(inner)
    fail = fb.fail("read", errno.EIO, offset=(8 * PAGE, 9 * PAGE), times=1)
    short = fb.short("read", max_bytes=5000)
    with IOEngine(fb, queue_depth=4, chunk=1 << 20) as e:
        with pytest.raises(IOEngineError) as ei:
            e.read(path, 8 * PAGE, aligned_empty(PAGE)).result(T)
        assert ei.value.errno == errno.EIO and str(path) in str(ei.value) and str(8 * PAGE) in str(ei.value)
        out = aligned_empty(32 * PAGE)
        assert e.read(path, 0, out).result(T) == 32 * PAGE  # short (page-rounded) reads, looped to the end
        wrote = aligned_empty(3 * PAGE)
        wrote[:] = 7
        fb.fail("write", errno.ENOSPC, times=1)
        with pytest.raises(IOEngineError) as ei:
            e.write(path, 0, wrote).result(T)
        assert ei.value.errno == errno.ENOSPC
    assert fail.hits == 1 and short.hits >= 8
    assert np.array_equal(out, data)


@pytest.mark.parametrize("native_only", NATIVE)
def test_store_round_trip_with_checksums(native_only, tmp_path):
    why = _why_not(native_only)
    if why is not None:
        pytest.skip(f"{native_only}: {why}")
    cfg = store_config(tmp_path)
    cfg["engine"]["backend"] = native_only
    tensors = {f"t{i}": torch.randn(1000 + 4099 * i, generator=torch.Generator().manual_seed(i)) for i in range(5)}
    with TieredStore(cfg) as s:
        assert s.engine.backend.name == native_only
        for k, t in tensors.items():
            s.put(k, t).result(T)
        for k in tensors:
            assert s.evict(k)
        for k, t in tensors.items():
            assert torch.equal(s.get(k).result(T), t)  # read back from the file, checksum verified
        off = s.meta("t3")["offset"]
        assert s.evict("t3")
    data_file = tmp_path / "nvme" / "objects.dat"
    fd = os.open(data_file, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(b ^ 0xFF for b in os.pread(fd, 8, off + 64)), off + 64)
    finally:
        os.close(fd)
    with TieredStore(cfg) as s:
        with pytest.raises(ChecksumError, match="t3"):
            s.get("t3").result(T)
        for k in ("t0", "t4"):
            assert torch.equal(s.get(k).result(T), tensors[k])


def test_refused_kernel_is_a_clear_error_and_auto_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(rings, "_REASONS", {"io_uring": "the kernel refused io_uring (test)",
                                            "aio": "the kernel refused aio (test)"})
    with pytest.raises(BackendUnavailable) as ei:
        create_backend("native")
    assert "io_uring (test)" in str(ei.value) and "aio (test)" in str(ei.value) and "threads" in str(ei.value)
    with caplog.at_level(logging.INFO, logger="tiered.io_engine"):
        backend = create_backend("auto")
    if backend.name != "kvikio":
        assert backend.name == "threads"
        lines = [r.getMessage() for r in caplog.records if "native" in r.getMessage()]
        assert len(lines) == 1 and "io_uring (test)" in lines[0] and "\n" not in lines[0]


def test_aio_stands_in_when_io_uring_is_refused(monkeypatch, tmp_path):
    if _why_not("aio") is not None:
        pytest.skip(f"aio: {available_backends()['aio']}")
    monkeypatch.setattr(rings, "_REASONS", {"io_uring": "refused (test)"})
    assert NativeBackend.mechanism() == "aio"
    path = tmp_path / "f.bin"
    data = random_file(path, 3 * PAGE + 5, seed=4)
    out = np.empty(len(data), dtype=np.uint8)
    with IOEngine("native", queue_depth=4) as e:
        assert e.read(path, 0, out).result(T) == len(data)
    assert np.array_equal(out, data)


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks kvikio where GPUDirect Storage works")
def test_auto_prefers_the_native_backend_where_it_runs():
    want = "native" if available_backends()["native"] is None else "threads"
    assert create_backend("auto").name == want
    assert registry.create_backend("auto").name == want


# -- submit_many's aligned reads go to the kernel as one batch entry ----------------------------------
def test_batched_reads_short_failed_and_past_eof(native_name, tmp_path):
    """A batch read that comes back short continues as an ordinary piece; a failed one and one past
    the end of the file fail the batch's future (after every read ended), naming file and offset."""
    path = tmp_path / "rows.bin"
    data = random_file(path, 24 * PAGE, seed=5)
    fb = FaultyBackend(create_backend(native_name))
    short = fb.short("read", max_bytes=PAGE, offset=(0, 8 * PAGE))
    bufs = [aligned_empty(2 * PAGE) for _ in range(12)]
    with IOEngine(fb, queue_depth=4, chunk=1 << 20) as e:
        reqs = [Request(Op.READ, str(path), 2 * i * PAGE, 2 * PAGE, b) for i, b in enumerate(bufs)]
        assert e.submit_many(reqs).result(T) == 24 * PAGE
        assert short.hits >= 4
        assert np.array_equal(np.concatenate(bufs), data)
        fb.remove(short)
        fb.fail("read", errno.EIO, offset=(6 * PAGE, 7 * PAGE), times=1)
        past = aligned_empty(PAGE)
        reqs = [Request(Op.READ, str(path), 2 * i * PAGE, 2 * PAGE, b) for i, b in enumerate(bufs)]
        with pytest.raises(IOEngineError) as ei:
            e.submit_many(reqs + [Request(Op.READ, str(path), 30 * PAGE, PAGE, past)]).result(T)
        assert ei.value.errno == errno.EIO and ei.value.offset == 6 * PAGE and str(path) in str(ei.value)
        assert e.stats()["read"]["errors"] == 2  # the EIO read and the one past the end
        with pytest.raises(IOEngineError, match="end of file"):
            e.submit_many([Request(Op.READ, str(path), 30 * PAGE, PAGE, past)]).result(T)


def test_demand_read_overtakes_the_rest_of_a_prefetch_batch(native_name, tmp_path):
    rows, other = tmp_path / "rows.bin", tmp_path / "demand.bin"
    random_file(rows, 16 * PAGE, seed=6)
    random_file(other, PAGE, seed=7)
    fb = FaultyBackend(create_backend(native_name))
    gate = fb.gate("read", path="/rows.bin", times=1)
    with IOEngine(fb, queue_depth=2, chunk=1 << 20) as e:
        bufs = [aligned_empty(PAGE) for _ in range(16)]
        batch = e.submit_many([Request(Op.READ, str(rows), i * PAGE, PAGE, b, Priority.PREFETCH)
                               for i, b in enumerate(bufs)])
        assert gate.entered.wait(T), "the first batch read never reached the queue"
        demand = e.read(other, 0, aligned_empty(PAGE))
        gate.release()
        assert demand.result(T) == PAGE and batch.result(T) == 16 * PAGE
    reads = [ev[2] for ev in fb.events if ev[0] == "read"]
    assert reads.index(str(other)) == 2, reads  # right after the two reads in flight when it came


def test_cancelled_batch_touches_no_buffer(native_name, tmp_path):
    rows, slow = tmp_path / "rows.bin", tmp_path / "slow.bin"
    random_file(rows, 8 * PAGE, seed=8)
    random_file(slow, PAGE, seed=9)
    fb = FaultyBackend(create_backend(native_name))
    gate = fb.gate("read", path="/slow.bin", times=1)
    with IOEngine(fb, queue_depth=1, chunk=1 << 20) as e:
        running = e.read(slow, 0, aligned_empty(PAGE))
        assert gate.entered.wait(T)
        bufs = [aligned_empty(PAGE) for _ in range(8)]
        for b in bufs:
            b[:] = 0xAB
        batch = e.submit_many([Request(Op.READ, str(rows), i * PAGE, PAGE, b) for i, b in enumerate(bufs)])
        assert batch.cancel() is True
        gate.release()
        assert running.result(T) == PAGE
        assert e.read(rows, 0, aligned_empty(PAGE)).result(T) == PAGE  # queued after the cancelled batch
        s = e.stats()["read"]
    assert all((b == 0xAB).all() for b in bufs)
    assert s["cancelled"] == 8 and s["requests"] == 2 and fb.calls["read"] == 2


def test_only_small_aligned_reads_of_one_priority_form_a_batch(native_name, tmp_path):
    from tiered.io_engine.batch import ReadBatch

    path = str(tmp_path / "f.bin")
    random_file(tmp_path / "f.bin", 8 * PAGE)
    with IOEngine(native_name, queue_depth=4, chunk=1 << 20) as e:
        def batch(*reqs):
            return ReadBatch.build(e, list(reqs), [e._buffer_of(r) for r in reqs], None)

        a, b = aligned_empty(PAGE), aligned_empty(PAGE)
        assert batch(Request(Op.READ, path, 0, PAGE, a), Request(Op.READ, path, PAGE, PAGE, b)) is not None
        assert batch(Request(Op.READ, path, 0, PAGE, a), Request(Op.READ, path, 100, PAGE, b)) is None
        assert batch(Request(Op.READ, path, 0, PAGE, a), Request(Op.READ, path, PAGE, PAGE, b,
                                                                  Priority.PREFETCH)) is None
        assert batch(Request(Op.WRITE, path, 0, PAGE, a)) is None
        assert batch(Request(Op.READ, path, 0, PAGE, aligned_empty(PAGE + 1)[1:])) is None
        e.set_bandwidth_limit(tmp_path, read=1 << 30)
        assert batch(Request(Op.READ, path, 0, PAGE, a)) is None


def test_requests_queued_behind_a_batch_wait_for_free_slots(native_name, tmp_path):
    """A batch that takes every free slot sends the entries taken with it back to the heap."""
    rows, slow = tmp_path / "rows.bin", tmp_path / "slow.bin"
    data = random_file(rows, 12 * PAGE, seed=10)
    random_file(slow, PAGE, seed=11)
    fb = FaultyBackend(create_backend(native_name))
    gate = fb.gate("read", path="/slow.bin", times=1)
    with IOEngine(fb, queue_depth=4, chunk=1 << 20) as e:
        blocker = e.read(slow, 0, aligned_empty(PAGE))
        assert gate.entered.wait(T)
        bufs = [aligned_empty(PAGE) for _ in range(10)]
        batch = e.submit_many([Request(Op.READ, str(rows), i * PAGE, PAGE, b, Priority.PREFETCH)
                               for i, b in enumerate(bufs)])
        tails = [aligned_empty(PAGE) for _ in range(2)]
        after = [e.read(rows, (10 + i) * PAGE, t, priority=Priority.PREFETCH) for i, t in enumerate(tails)]
        gate.release()
        assert blocker.result(T) == PAGE and batch.result(T) == 10 * PAGE
        assert [f.result(T) for f in after] == [PAGE, PAGE]
    assert np.array_equal(np.concatenate(bufs + tails), data)
