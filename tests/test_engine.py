"""The I/O engine: round trips on every backend usable here, alignment, faults, priorities, cancellation, limits."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import threading
import time

import numpy as np
import pytest
import torch

from tiered.allocators import PAGE, aligned_empty
from tiered.io_engine import (
    BackendUnavailable,
    EngineClosed,
    IOEngine,
    IOEngineError,
    Op,
    Priority,
    Request,
    ShortTransferError,
    available_backends,
    backend_names,
    chain,
    completed,
    create_backend,
)
from tiered.io_engine.testing import FaultyBackend, Rule

KiB = 1 << 10
MiB = 1 << 20
CHUNK = 64 * KiB
T = 10.0  # every wait on a future is bounded by this

#: every registered backend usable on this machine runs the same conformance tests (kvikio needs CUDA)
BACKENDS = [name for name, why in available_backends().items() if why is None]


# -- helpers ---------------------------------------------------------------------------
def direct_io_works(directory) -> bool:
    """Whether ``directory``'s filesystem accepts O_DIRECT (ext4/xfs yes; old tmpfs no)."""
    path = os.path.join(directory, ".odirect-probe")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        os.pwritev(fd, [aligned_empty(PAGE)], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(path)


def buffer(n: int, misalign: int = 0) -> np.ndarray:
    """A uint8 array of ``n`` bytes whose address is ``misalign`` bytes past a page boundary."""
    buf = aligned_empty(n + misalign)[misalign:]
    assert buf.ctypes.data % PAGE == misalign % PAGE
    return buf


def random_bytes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def make_file(path, data: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(data.tobytes())


def file_bytes(path) -> np.ndarray:
    with open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8)


def engine_for(backend, **kw) -> IOEngine:
    kw.setdefault("chunk", CHUNK)
    return IOEngine(backend, **kw)


@pytest.fixture(params=BACKENDS)
def backend_name(request) -> str:
    return request.param


@pytest.fixture
def engine(backend_name):
    with engine_for(backend_name, workers=4, queue_depth=8) as e:
        yield e


def faulty(backend_name: str, *rules: Rule) -> FaultyBackend:
    return FaultyBackend(create_backend(backend_name), rules=list(rules))


# -- round trips -----------------------------------------------------------------------
# (file offset, length, buffer misalignment)
CASES = [
    pytest.param(0, 4 * CHUNK, 0, id="aligned-4chunks"),
    pytest.param(3 * PAGE, 5 * CHUNK + 3 * PAGE, 0, id="aligned-offset-odd-chunks"),
    pytest.param(0, 300_001, 0, id="unaligned-length"),
    pytest.param(1234, 250_000, 0, id="unaligned-offset"),
    pytest.param(2 * PAGE, 3 * CHUNK, 3, id="unaligned-address"),
    pytest.param(777, 200_003, 5, id="all-unaligned"),
    pytest.param(10, 100, 1, id="tiny"),
    pytest.param(PAGE - 1, 2, 0, id="straddles-page"),
]


@pytest.mark.parametrize("offset,length,misalign", CASES)
def test_round_trip(engine, tmp_path, offset, length, misalign):
    path = tmp_path / "data.bin"
    size = offset + length + 3 * PAGE + 17
    base = random_bytes(size, seed=1)
    make_file(path, base)
    direct = direct_io_works(tmp_path)

    payload = buffer(length, misalign)
    payload[:] = random_bytes(length, seed=2)
    engine.reset_stats()
    assert engine.write(path, offset, payload).result(T) == length
    aligned_write = offset % PAGE == 0 and length % PAGE == 0 and misalign == 0
    w = engine.stats()["write"]
    assert w["bytes"] == length and w["errors"] == 0
    if direct and aligned_write:
        assert w["buffered_bytes"] == 0 and w["direct_bytes"] == length

    expected = base.copy()
    expected[offset : offset + length] = payload
    assert np.array_equal(file_bytes(path), expected)

    out = buffer(length, (misalign * 7) % 11)
    out[:] = 0
    engine.reset_stats()
    assert engine.read(path, offset, out).result(T) == length
    assert np.array_equal(out, payload)
    r = engine.stats()["read"]
    assert r["bytes"] == length and r["requests"] == 1
    if direct:
        # aligned or not, reads never touch the page cache: head/tail go through the bounce buffer
        assert r["buffered_bytes"] == 0
        assert r["direct_bytes"] == length
        if offset % PAGE == 0 and length % PAGE == 0 and out.ctypes.data % PAGE == 0:
            assert r["bounced_bytes"] == 0


def test_read_whole_file_several_chunks_into_subrange(engine, tmp_path):
    data = random_bytes(7 * CHUNK + 123, seed=3)
    make_file(tmp_path / "f", data)
    out = buffer(len(data) + 50)
    out[:] = 0xEE
    assert engine.read(tmp_path / "f", 0, out, length=len(data)).result(T) == len(data)
    assert np.array_equal(out[: len(data)], data)
    assert (out[len(data):] == 0xEE).all()  # nothing past the requested length is touched


def test_zero_length_request(engine, tmp_path):
    make_file(tmp_path / "f", random_bytes(100))
    assert engine.read(tmp_path / "f", 0, buffer(0)).result(T) == 0
    assert engine.write(tmp_path / "f", 0, buffer(0)).result(T) == 0


def test_bytearray_and_memoryview_buffers(engine, tmp_path):
    data = random_bytes(10_000, seed=4)
    assert engine.write(tmp_path / "f", 0, data.tobytes()).result(T) == 10_000  # bytes: write only
    out = bytearray(10_000)
    assert engine.read(tmp_path / "f", 0, out).result(T) == 10_000
    assert bytes(out) == data.tobytes()
    with pytest.raises(ValueError, match="read-only"):
        engine.read(tmp_path / "f", 0, bytes(10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_torch_tensor_buffers(engine, tmp_path, dtype):
    src = torch.randn(300, 257).to(dtype)  # 2-D, size not a multiple of a page
    nbytes = src.numel() * src.element_size()
    assert engine.write(tmp_path / "t", 0, src).result(T) == nbytes
    dst = torch.zeros_like(src)
    assert engine.read(tmp_path / "t", 0, dst).result(T) == nbytes
    assert torch.equal(dst, src)
    # a slice of a bigger tensor, at an element (not page) offset of the file
    part = torch.zeros(1000, dtype=dtype)
    assert engine.read(tmp_path / "t", 6 * src.element_size(), part).result(T) == part.numel() * src.element_size()
    assert torch.equal(part, src.reshape(-1)[6:1006])


def test_non_contiguous_tensor_rejected(engine, tmp_path):
    with pytest.raises(ValueError, match="contiguous"):
        engine.write(tmp_path / "t", 0, torch.zeros(8, 8).t())


def test_buffer_too_small_and_negative_offset(engine, tmp_path):
    with pytest.raises(ValueError, match="buffer holds only 10 bytes"):
        engine.read(tmp_path / "f", 0, buffer(10), length=20)
    with pytest.raises(ValueError, match="must be >= 0"):
        engine.read(tmp_path / "f", -1, buffer(10))


def test_engine_fsync_and_sync_write(engine, tmp_path):
    data = random_bytes(3 * PAGE, seed=5)
    assert engine.write(tmp_path / "s", 0, data, sync=True).result(T) == len(data)
    engine.fsync(tmp_path / "s")
    assert np.array_equal(file_bytes(tmp_path / "s"), data)


# -- end of file and bad paths ---------------------------------------------------------
@pytest.mark.parametrize("offset,length", [(8192, 4096), (9000, 2000), (20_000, 100), (0, 10_001)])
def test_read_past_eof(engine, tmp_path, offset, length):
    path = tmp_path / "short.bin"
    make_file(path, random_bytes(10_000))
    with pytest.raises(ShortTransferError) as ei:
        engine.read(path, offset, buffer(length)).result(T)
    e = ei.value
    assert str(path) in str(e) and e.path == str(path)
    assert f"offset {e.offset}" in str(e)
    assert offset <= e.offset <= max(offset, 10_000)
    assert "end of file" in str(e)
    assert engine.stats()["read"]["errors"] == 1


def test_read_missing_file(engine, tmp_path):
    path = tmp_path / "missing.bin"
    with pytest.raises(IOEngineError) as ei:
        engine.read(path, 0, buffer(100)).result(T)
    assert ei.value.errno == errno.ENOENT
    assert str(path) in str(ei.value)


def test_write_into_missing_directory(engine, tmp_path):
    path = tmp_path / "no" / "such" / "dir" / "file.bin"
    with pytest.raises(IOEngineError) as ei:
        engine.write(path, 0, buffer(PAGE)).result(T)
    assert ei.value.errno == errno.ENOENT
    assert str(path) in str(ei.value)
    assert ei.value.filename == str(path)


# -- fault injection -------------------------------------------------------------------
def test_faulty_backend_mirrors_inner_capabilities():
    for name in BACKENDS:
        inner = create_backend(name)
        fb = FaultyBackend(inner)
        assert (fb.is_async, fb.supports_host_buffers, fb.supports_device_buffers) == (
            inner.is_async, inner.supports_host_buffers, inner.supports_device_buffers)
        assert name in fb.name
    assert FaultyBackend().inner.name == "threads"


def test_rule_builders_on_class_and_instance():
    r = FaultyBackend.fail("write", errno.ENOSPC, path="x", times=1)
    assert isinstance(r, Rule) and (r.op, r.action, r.err, r.path, r.times) == ("write", "fail", errno.ENOSPC, "x", 1)
    fb = FaultyBackend(rules=[r])
    s = fb.short("read", max_bytes=1000)
    d = fb.delay("read", seconds=0.05)
    assert fb.rules == [r, s, d]
    fb.remove(s)
    assert fb.rules == [r, d]
    fb.clear()
    assert fb.rules == []
    with pytest.raises(ValueError):
        Rule("seek", "fail")
    with pytest.raises(ValueError):
        FaultyBackend.short("read", max_bytes=0)


def test_eio_on_read(backend_name, tmp_path):
    path = tmp_path / "data.bin"
    make_file(path, random_bytes(4 * CHUNK))
    fb = faulty(backend_name)
    rule = fb.fail("read", errno.EIO, path="/data.bin", times=1)
    with engine_for(fb, workers=2) as e:
        with pytest.raises(IOEngineError) as ei:
            e.read(path, 8192, buffer(16384)).result(T)
        err = ei.value
        assert err.errno == errno.EIO
        msg = str(err)
        assert str(path) in msg and "8192" in msg and "16384" in msg and msg.startswith("read")
        assert rule.hits == 1
        # the rule is used up and the worker survived: the same read now works
        out = buffer(16384)
        assert e.read(path, 8192, out).result(T) == 16384
        assert np.array_equal(out, file_bytes(path)[8192 : 8192 + 16384])
        assert e.stats()["read"]["errors"] == 1


def test_error_in_one_piece_fails_the_whole_request_once(backend_name, tmp_path):
    path = tmp_path / "data.bin"
    make_file(path, random_bytes(6 * CHUNK))
    fb = faulty(backend_name)
    fb.fail("read", errno.EIO, offset=(2 * CHUNK, 3 * CHUNK))  # every read touching the 3rd chunk
    with engine_for(fb, workers=3) as e:
        fut = e.read(path, 0, buffer(6 * CHUNK))
        with pytest.raises(IOEngineError) as ei:
            fut.result(T)
        assert ei.value.offset == 2 * CHUNK and ei.value.errno == errno.EIO
        assert e.read(path, 3 * CHUNK, buffer(CHUNK)).result(T) == CHUNK  # other ranges fine
    assert e.stats()["read"]["errors"] == 1


def test_enospc_on_write(backend_name, tmp_path):
    path = tmp_path / "out.bin"
    fb = faulty(backend_name, FaultyBackend.fail("write", errno.ENOSPC, path="/out.bin"))
    with engine_for(fb) as e:
        with pytest.raises(IOEngineError) as ei:
            e.write(path, 0, buffer(2 * CHUNK)).result(T)
        assert ei.value.errno == errno.ENOSPC
        assert str(path) in str(ei.value) and ei.value.strerror.startswith("write")
        # another path is not affected
        assert e.write(tmp_path / "other.bin", 0, buffer(PAGE)).result(T) == PAGE


@pytest.mark.parametrize("offset,length,misalign", CASES)
def test_short_transfers_complete_correctly(backend_name, tmp_path, offset, length, misalign):
    path = tmp_path / "data.bin"
    size = offset + length + PAGE
    make_file(path, random_bytes(size, seed=6))
    fb = faulty(backend_name)
    rr = fb.short("read", max_bytes=5000)
    wr = fb.short("write", max_bytes=3000)
    payload = buffer(length, misalign)
    payload[:] = random_bytes(length, seed=7)
    with engine_for(fb, workers=2) as e:
        assert e.write(path, offset, payload).result(T) == length
        out = buffer(length, misalign)
        assert e.read(path, offset, out).result(T) == length
    assert np.array_equal(out, payload)
    assert np.array_equal(file_bytes(path)[offset : offset + length], payload)
    if length > 5000:
        assert rr.hits > 0 and wr.hits > 0


def test_short_transfers_buffered(backend_name, tmp_path):
    """Without O_DIRECT the engine loops over arbitrary (non page) short counts."""
    path = tmp_path / "data.bin"
    fb = faulty(backend_name, FaultyBackend.no_direct())
    fb.short("read", max_bytes=1000)
    fb.short("write", max_bytes=777)
    payload = random_bytes(3 * CHUNK + 5, seed=8)
    with engine_for(fb, workers=2) as e:
        assert e.write(path, 100, payload).result(T) == len(payload)
        out = buffer(len(payload), 1)
        assert e.read(path, 100, out).result(T) == len(payload)
    assert np.array_equal(out, payload)
    assert sum(1 for x in fb.events if x[1] == "short") > 10


def test_no_direct_filesystem_falls_back_to_buffered(backend_name, tmp_path):
    path = tmp_path / "data.bin"
    fb = faulty(backend_name, FaultyBackend.no_direct())
    payload = buffer(4 * CHUNK)  # page-aligned: the engine first tries O_DIRECT, then falls back
    payload[:] = random_bytes(4 * CHUNK, seed=9)
    with engine_for(fb) as e:
        assert e.write(path, 0, payload, sync=True).result(T) == len(payload)
        e.fsync(path)
        out = buffer(len(payload))
        assert e.read(path, 0, out).result(T) == len(payload)
        s = e.stats()
    assert np.array_equal(out, payload)
    assert s["read"]["buffered_bytes"] == len(payload) and s["read"]["direct_bytes"] == 0
    assert s["write"]["buffered_bytes"] == len(payload)
    assert fb.rules[0].hits >= 1  # O_DIRECT was tried, refused, and then remembered for the path


def test_unaligned_sync_write_on_no_direct_filesystem(backend_name, tmp_path):
    """An unaligned (buffered) sync write must fsync even where O_DIRECT opens fail."""
    path = tmp_path / "data.bin"
    fb = faulty(backend_name, FaultyBackend.no_direct())
    payload = random_bytes(10_000, seed=10)
    with engine_for(fb, workers=1) as e:
        assert e.write(path, 100, payload, sync=True).result(T) == len(payload)
    assert fb.calls["fsync"] == 1
    assert np.array_equal(file_bytes(path)[100:], payload)


@pytest.mark.parametrize("op", ["read", "write"])
def test_zero_byte_transfer_raises_short_transfer(backend_name, tmp_path, op):
    path = tmp_path / "data.bin"
    make_file(path, random_bytes(2 * CHUNK))
    fb = faulty(backend_name)
    fb.no_progress(op, times=1)
    with engine_for(fb) as e:
        fut = e.read(path, 0, buffer(CHUNK)) if op == "read" else e.write(path, 0, buffer(CHUNK))
        with pytest.raises(ShortTransferError) as ei:
            fut.result(T)
        assert str(path) in str(ei.value) and ei.value.op == op
        # and a zero-byte read through the bounce path too
        if op == "read":
            fb.no_progress("read", times=1)
            with pytest.raises(ShortTransferError):
                e.read(path, 10, buffer(100, 3)).result(T)


def test_fsync_failure_on_sync_write(backend_name, tmp_path):
    path = tmp_path / "data.bin"
    fb = faulty(backend_name)
    fb.fail("fsync", errno.EIO, times=2)
    with engine_for(fb) as e:
        fut = e.write(path, 0, buffer(2 * CHUNK), sync=True)
        with pytest.raises(IOEngineError) as ei:
            fut.result(T)
        assert ei.value.op == "fsync" and ei.value.errno == errno.EIO and str(path) in str(ei.value)
        with pytest.raises(OSError):
            e.fsync(path)
        # without sync the same write succeeds; after the rule is used up a sync write succeeds too
        assert e.write(path, 0, buffer(PAGE)).result(T) == PAGE
        assert e.write(path, 0, buffer(PAGE), sync=True).result(T) == PAGE
    assert e.stats()["write"]["errors"] == 1


def test_no_future_hangs_under_random_faults(backend_name, tmp_path):
    """A mix of failures, stalls and short transfers: every future finishes, and close() returns."""
    path = tmp_path / "data.bin"
    make_file(path, random_bytes(16 * CHUNK, seed=11))
    fb = faulty(backend_name)
    fb.fail("read", errno.EIO, skip=3, times=5)
    fb.no_progress("read", skip=10, times=3)
    fb.fail("write", errno.ENOSPC, skip=2, times=4)
    fb.short("read", max_bytes=9000)
    fb.short("write", max_bytes=5000)
    rng = np.random.default_rng(12)
    futs = []
    with engine_for(fb, workers=3) as e:
        for i in range(60):
            off = int(rng.integers(0, 12 * CHUNK))
            n = int(rng.integers(1, 3 * CHUNK))
            buf = buffer(n, int(rng.integers(0, 8)))
            futs.append(e.write(path, off, buf) if i % 3 == 0 else e.read(path, off, buf, length=min(n, 16 * CHUNK - off)))
        done, not_done = concurrent.futures.wait(futs, timeout=T)
        assert not not_done
    outcomes = {type(f.exception(0)).__name__ if f.exception(0) else "ok" for f in futs}
    assert "ok" in outcomes and "IOEngineError" in outcomes


# -- priorities and cancellation -------------------------------------------------------
def test_demand_overtakes_queued_prefetch_and_writeback(backend_name, tmp_path):
    data_path, slow_path = tmp_path / "data.bin", tmp_path / "blocker.bin"
    make_file(data_path, random_bytes(8 * CHUNK))
    make_file(slow_path, random_bytes(CHUNK))
    fb = faulty(backend_name)
    gate = fb.gate("read", path="/blocker.bin", times=1)
    fb.delay("read", seconds=0.01, path="/data.bin")
    order: list[str] = []
    lock = threading.Lock()

    def record(name):
        def cb(_f):
            with lock:
                order.append(name)
        return cb

    with engine_for(fb, workers=1, queue_depth=1) as e:
        blocker = e.read(slow_path, 0, buffer(CHUNK))
        blocker.add_done_callback(record("blocker"))
        assert gate.entered.wait(T), "the single worker never reached the blocking read"
        futs = [blocker]
        wb = e.write(tmp_path / "wb.bin", 0, buffer(CHUNK), priority=Priority.WRITEBACK)
        wb.add_done_callback(record("writeback"))
        futs.append(wb)
        for i in range(4):
            f = e.read(data_path, i * CHUNK, buffer(CHUNK), priority=Priority.PREFETCH)
            f.add_done_callback(record(f"prefetch{i}"))
            futs.append(f)
        demand = e.read(data_path, 7 * CHUNK, buffer(CHUNK), priority=Priority.DEMAND)
        demand.add_done_callback(record("demand"))
        futs.append(demand)
        gate.release()
        done, not_done = concurrent.futures.wait(futs, timeout=T)
        assert not not_done
    assert order == ["blocker", "demand", "prefetch0", "prefetch1", "prefetch2", "prefetch3", "writeback"]


def test_cancel_queued_but_not_running(backend_name, tmp_path):
    path, slow = tmp_path / "data.bin", tmp_path / "slow.bin"
    make_file(path, random_bytes(4 * CHUNK))
    make_file(slow, random_bytes(CHUNK))
    fb = faulty(backend_name)
    gate = fb.gate("read", path="/slow.bin", times=1)
    with engine_for(fb, workers=1, queue_depth=1) as e:
        running = e.read(slow, 0, buffer(CHUNK))
        assert gate.entered.wait(T)
        assert running.running()
        queued = buffer(3 * CHUNK)  # three pieces, all skipped
        queued[:] = 0xAB
        fut = e.read(path, 0, queued, priority=Priority.PREFETCH)
        assert fut.cancel() is True
        assert fut.cancelled() and fut.done()
        assert running.cancel() is False
        gate.release()
        assert running.result(T) == CHUNK
        assert e.read(path, 0, buffer(CHUNK)).result(T) == CHUNK  # drains the cancelled pieces first
        with pytest.raises(concurrent.futures.CancelledError):
            fut.result(T)
    assert (queued == 0xAB).all(), "a cancelled read must not touch its buffer"
    s = e.stats()["read"]
    assert s["cancelled"] == 1 and s["requests"] == 2 and s["errors"] == 0
    assert fb.calls["read"] == 2  # the cancelled request never reached the backend


def test_close_drains_queued_work(backend_name, tmp_path):
    fb = faulty(backend_name)
    fb.delay("write", seconds=0.005)
    e = engine_for(fb, workers=2).open()
    futs = [e.write(tmp_path / "f", i * CHUNK, buffer(CHUNK)) for i in range(10)]
    e.close(timeout=T)
    assert all(f.done() for f in futs)
    assert sum(f.result(0) for f in futs) == 10 * CHUNK
    assert os.path.getsize(tmp_path / "f") == 10 * CHUNK


# -- asyncio ---------------------------------------------------------------------------
def test_await_inside_asyncio_run(engine, tmp_path):
    data = random_bytes(3 * CHUNK + 11, seed=13)
    path = tmp_path / "a.bin"

    async def main():
        n = await asyncio.wait_for(engine.write(path, 0, data), T)
        outs = [buffer(CHUNK + 7, i) for i in range(4)]
        got = await asyncio.wait_for(
            asyncio.gather(*(engine.read(path, i * 1000, o) for i, o in enumerate(outs))), T)
        return n, got, outs

    n, got, outs = asyncio.run(main())
    assert n == len(data) and got == [CHUNK + 7] * 4
    for i, o in enumerate(outs):
        assert np.array_equal(o, data[i * 1000 : i * 1000 + CHUNK + 7])


def test_await_failure_raises(engine, tmp_path):
    async def main():
        await asyncio.wait_for(engine.read(tmp_path / "missing", 0, buffer(10)), T)

    with pytest.raises(IOEngineError):
        asyncio.run(main())


# -- bandwidth limit -------------------------------------------------------------------
def test_bandwidth_limit(backend_name, tmp_path):
    n, rate = 8 * MiB, 16_000_000  # burst is rate/10: expect ~0.42 s
    make_file(tmp_path / "big.bin", random_bytes(n, seed=14))
    with engine_for(backend_name, workers=4, chunk=256 * KiB) as e:
        e.set_bandwidth_limit(tmp_path, read=rate)
        out = buffer(n)
        t0 = time.monotonic()
        assert e.read(tmp_path / "big.bin", 0, out).result(30) == n
        elapsed = time.monotonic() - t0
    assert elapsed >= 0.3, f"{n} bytes at {rate} B/s took only {elapsed:.3f} s"
    assert np.array_equal(out, file_bytes(tmp_path / "big.bin"))


# -- concurrency -----------------------------------------------------------------------
def test_many_threads_interleaved_reads_and_writes(backend_name, tmp_path):
    path = tmp_path / "shared.bin"
    region, nthreads, iters = 128 * KiB, 8, 25
    make_file(path, np.zeros(region * nthreads, dtype=np.uint8))
    models = [np.zeros(region, dtype=np.uint8) for _ in range(nthreads)]
    errors: list[BaseException] = []
    e = engine_for(backend_name, workers=4, queue_depth=8, chunk=16 * KiB).open()

    def work(t: int) -> None:
        rng = np.random.default_rng(100 + t)
        base = t * region
        model = models[t]
        try:
            for i in range(iters):
                aligned = i % 2 == 0
                if aligned:
                    lo = int(rng.integers(0, region // PAGE)) * PAGE
                    n = int(rng.integers(1, (region - lo) // PAGE + 1)) * PAGE
                else:
                    lo = int(rng.integers(0, region - 1))
                    n = int(rng.integers(1, region - lo + 1))
                buf = buffer(n, 0 if aligned else int(rng.integers(1, 64)))
                buf[:] = rng.integers(0, 256, n, dtype=np.uint8)
                pending = [e.write(path, base + lo, buf)]
                # a read of another part of this region, in flight together with the write
                rlo = int(rng.integers(0, region - 1))
                rn = int(rng.integers(1, region - rlo + 1))
                snapshot_lo, snapshot_hi = max(rlo, lo), min(rlo + rn, lo + n)
                out = buffer(rn, int(rng.integers(0, 8)))
                pending.append(e.read(path, base + rlo, out))
                for f in pending:
                    f.result(T)
                # bytes outside the concurrent write's range must match the model as it was
                mask = np.ones(rn, dtype=bool)
                if snapshot_lo < snapshot_hi:
                    mask[snapshot_lo - rlo : snapshot_hi - rlo] = False
                assert np.array_equal(out[mask], model[rlo : rlo + rn][mask]), f"thread {t} iter {i}"
                model[lo : lo + n] = buf
                check = buffer(region)
                assert e.read(path, base, check).result(T) == region
                assert np.array_equal(check, model), f"thread {t} iter {i}: region differs after write"
        except BaseException as ex:  # noqa: BLE001 - reported by the main thread
            errors.append(ex)

    threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads), "worker threads hung"
    closer = threading.Thread(target=e.close, kwargs={"timeout": T}, daemon=True)
    closer.start()
    closer.join(2 * T)
    assert not closer.is_alive(), "engine.close() deadlocked"
    assert not e.is_open
    if errors:
        raise errors[0]
    assert np.array_equal(file_bytes(path), np.concatenate(models))


# -- lifecycle -------------------------------------------------------------------------
def test_lifecycle(backend_name, tmp_path):
    e = engine_for(backend_name)
    assert not e.is_open
    with pytest.raises(EngineClosed, match="not open"):
        e.read(tmp_path / "f", 0, buffer(10))
    with pytest.raises(EngineClosed):
        e.submit(Request(Op.WRITE, str(tmp_path / "f"), 0, 10, buffer(10)))
    e.open()
    assert e.open() is e and e.is_open  # idempotent
    assert e.write(tmp_path / "f", 0, buffer(10)).result(T) == 10
    e.close()
    assert not e.is_open
    e.close()  # twice is fine
    with pytest.raises(EngineClosed):
        e.write(tmp_path / "f", 0, buffer(10))
    assert e.stats()["backend"] == backend_name


def test_invalid_engine_arguments():
    with pytest.raises(ValueError):
        IOEngine(workers=0)
    with pytest.raises(ValueError):
        IOEngine(chunk=1000)


def test_completed_and_chain():
    assert completed(5).result(0) == 5
    assert completed(5).get(0) == 5
    c = chain(completed(2), lambda x: x * 3, "triple")
    assert c.result(T) == 6 and c.description == "triple"

    src = concurrent.futures.Future()
    out = chain(src, lambda x: x + 1)
    src.set_exception(IOEngineError("read", "/p", 0, 10, "boom"))
    with pytest.raises(IOEngineError, match="boom"):
        out.result(T)

    def bad(_x):
        raise KeyError("from fn")

    with pytest.raises(KeyError, match="from fn"):
        chain(completed(1), bad).result(T)

    # cancelling the chained future cancels a source that has not started
    src2 = concurrent.futures.Future()
    out2 = chain(src2, lambda x: x)
    assert out2.cancel() is True
    assert src2.cancelled() and out2.cancelled()
    # ... but not one that is running
    src3 = concurrent.futures.Future()
    assert src3.set_running_or_notify_cancel()
    out3 = chain(src3, lambda x: x)
    assert out3.cancel() is False
    src3.set_result(7)
    assert out3.result(T) == 7


def test_chain_on_engine_future(engine, tmp_path):
    data = random_bytes(5000, seed=15)
    make_file(tmp_path / "f", data)
    out = buffer(5000)
    f = chain(engine.read(tmp_path / "f", 0, out), lambda n: bytes(out[:n]))
    assert f.result(T) == data.tobytes()
    g = chain(engine.read(tmp_path / "missing", 0, out), lambda n: n)
    with pytest.raises(IOEngineError):
        g.result(T)


# -- backend registry ------------------------------------------------------------------
def test_unknown_backend_lists_known_names():
    with pytest.raises(BackendUnavailable) as ei:
        create_backend("nope")
    for name in ("threads", "aiofiles", "kvikio"):
        assert name in backend_names() and name in str(ei.value)
    with pytest.raises(BackendUnavailable):
        IOEngine("nope").open()


@pytest.mark.skipif(torch.cuda.is_available(), reason="kvikio can run on a CUDA machine")
def test_kvikio_unavailable_without_cuda():
    with pytest.raises(BackendUnavailable) as ei:
        create_backend("kvikio")
    msg = str(ei.value)
    assert "CUDA" in msg and "pip install" in msg and "tiered[gds]" in msg
    avail = available_backends()
    assert avail["threads"] is None and avail["kvikio"] is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks kvikio on a CUDA machine")
def test_auto_backend_is_native_or_threads_without_cuda(tmp_path):
    """Without GPUDirect Storage ``auto`` is the kernel-queue backend where the kernel allows it."""
    want = "native" if available_backends()["native"] is None else "threads"
    assert create_backend("auto").name == want
    with IOEngine("auto", chunk=CHUNK) as e:
        assert e.backend.name == want
        assert e.write(tmp_path / "f", 0, buffer(10)).result(T) == 10


# -- submit_many: one future for a batch of requests -----------------------------------------


def test_submit_many_reads_every_request_into_its_buffer(engine, tmp_path):
    path = tmp_path / "rows.bin"
    data = random_bytes(64 * PAGE + 123, seed=4)
    make_file(path, data)
    rng = np.random.default_rng(5)
    offs = rng.integers(0, 60 * PAGE, 300)
    lens = rng.integers(1, 3 * PAGE, 300)
    bufs = [buffer(int(n)) for n in lens]
    reqs = [Request(Op.READ, str(path), int(o), int(n), b, Priority.PREFETCH) for o, n, b in zip(offs, lens, bufs)]
    engine.reset_stats()
    assert engine.submit_many(reqs).result(T) == int(lens.sum())
    for o, n, b in zip(offs, lens, bufs):
        assert np.array_equal(b[:n], data[o:o + n])
    assert engine.stats()["read"]["requests"] == 300
    assert engine.submit_many([]).result(T) == 0


def test_submit_many_fails_once_with_the_first_error_after_all_ended(backend_name, tmp_path):
    path = tmp_path / "data.bin"
    make_file(path, random_bytes(16 * PAGE))
    fb = faulty(backend_name)
    fb.fail("read", errno.EIO, offset=(4 * PAGE, 5 * PAGE))
    with engine_for(fb, workers=3) as e:
        bufs = [buffer(PAGE) for _ in range(16)]
        fut = e.submit_many([Request(Op.READ, str(path), i * PAGE, PAGE, b) for i, b in enumerate(bufs)])
        with pytest.raises(IOEngineError) as ei:
            fut.result(T)
        assert ei.value.errno == errno.EIO and ei.value.offset == 4 * PAGE
        assert e.stats()["read"]["requests"] == 16  # every request ended before the future did
        good = file_bytes(path)
        assert all(np.array_equal(bufs[i], good[i * PAGE:(i + 1) * PAGE]) for i in range(16) if i != 4)


def test_submit_many_checks_every_buffer_before_queueing(engine, tmp_path):
    path = tmp_path / "data.bin"
    make_file(path, random_bytes(4 * PAGE))
    engine.reset_stats()
    with pytest.raises(ValueError, match="buffer holds only"):
        engine.submit_many([Request(Op.READ, str(path), 0, PAGE, buffer(PAGE)),
                            Request(Op.READ, str(path), PAGE, PAGE, buffer(10))])
    time.sleep(0.05)
    assert engine.stats()["read"]["requests"] == 0  # nothing was queued
    engine.close()
    with pytest.raises(EngineClosed):
        engine.submit_many([Request(Op.READ, str(path), 0, PAGE, buffer(PAGE))])
