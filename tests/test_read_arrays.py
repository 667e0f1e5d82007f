"""Reads given as arrays: ``submit_read_arrays`` (one kernel-queue batch, no object per read),
``TieredStore.read_range_arrays`` (read_ranges' checks, verification and accounting in numpy)
and feature-store gathers through them, on the kernel-queue backends and on threads (which
takes the ordinary path): same bytes, same errors."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch

from helpers import store_config
from tiered.allocators import PAGE, aligned_empty
from tiered.gnn import TieredFeatureStore
from tiered.io_engine import IOEngine, IOEngineError, available_backends, create_backend
from tiered.io_engine.batch import submit_read_arrays
from tiered.io_engine.testing import FaultyBackend
from tiered.store import ChecksumError, StoreError, TieredStore

T = 10.0
BACKENDS = [pytest.param(n, marks=pytest.mark.skipif(available_backends()[n] is not None,
                                                     reason=f"{n}: {available_backends()[n]}"))
            for n in ("native", "aio")]


@pytest.fixture(params=BACKENDS)
def native_name(request) -> str:
    return request.param


def random_file(path, n: int, seed: int = 0) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    return data


def _arrays(n: int, seed: int):
    """n one- or two-page reads at random page offsets of a 64-page file, laid out in a buffer."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 3, n) * PAGE
    offsets = rng.integers(0, 62, n) * PAGE
    buf_offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return offsets, lengths, buf_offsets, aligned_empty(int(lengths.sum()))


def test_array_reads_land_where_asked_in_few_submissions(native_name, tmp_path):
    data = random_file(tmp_path / "f.bin", 64 * PAGE)
    offsets, lengths, boffs, buf = _arrays(200, seed=1)
    sizes: list[int] = []
    backend = create_backend(native_name)
    make = backend.queue

    class Recording:
        def __init__(self, q):
            self.q = q

        def submit_and_wait(self, ops, timeout):
            if ops:
                sizes.append(len(ops))
            return self.q.submit_and_wait(ops, timeout)

        def close(self):
            self.q.close()

    backend.queue = lambda depth: Recording(make(depth))
    with IOEngine(backend, queue_depth=16, chunk=1 << 20) as e:
        f = submit_read_arrays(e, [str(tmp_path / "f.bin")], np.zeros(200, np.int64), offsets, lengths, buf, boffs)
        assert f is not None and f.result(T) == int(lengths.sum())
        s = e.stats()["read"]
    for o, n, b in zip(offsets, lengths, boffs):
        assert np.array_equal(buf[b: b + n], data[o: o + n])
    assert s["requests"] == 200 and s["bytes"] == int(lengths.sum()) and s["errors"] == 0
    assert max(sizes) == 16 and len(sizes) < 100  # whole free-slot batches, not one read per submission


def test_array_reads_that_cannot_batch_are_refused_untouched(native_name, tmp_path):
    random_file(tmp_path / "f.bin", 8 * PAGE)
    path = [str(tmp_path / "f.bin")]
    buf = aligned_empty(4 * PAGE)
    one = np.zeros(1, np.int64)
    with IOEngine(native_name, queue_depth=4, chunk=1 << 20) as e:
        assert submit_read_arrays(e, path, one, np.array([100]), np.array([PAGE]), buf, one) is None
        assert submit_read_arrays(e, path, one, one, np.array([100]), buf, one) is None
        assert submit_read_arrays(e, path, one, one, np.array([PAGE]), buf, np.array([8])) is None
        with pytest.raises(ValueError, match="outside"):
            submit_read_arrays(e, path, one, one, np.array([PAGE]), buf, np.array([4 * PAGE]))
        with pytest.raises(ValueError, match="path_idx"):
            submit_read_arrays(e, path, one + 1, one, np.array([PAGE]), buf, one)
        e.set_bandwidth_limit(tmp_path, read=1 << 30)
        assert submit_read_arrays(e, path, one, one, np.array([PAGE]), buf, one) is None
    with IOEngine("threads", workers=2) as e:
        assert submit_read_arrays(e, path, one, one, np.array([PAGE]), buf, one) is None


def test_array_reads_short_failed_and_past_eof(native_name, tmp_path):
    """A read that comes back short continues as an ordinary piece; a failed one and one past the
    end of the file fail the future after every read ended, naming the file and the offset."""
    path = tmp_path / "rows.bin"
    data = random_file(path, 24 * PAGE, seed=5)
    fb = FaultyBackend(create_backend(native_name))
    short = fb.short("read", max_bytes=PAGE, offset=(0, 8 * PAGE))
    offsets = np.arange(12, dtype=np.int64) * 2 * PAGE
    lengths = np.full(12, 2 * PAGE, np.int64)
    idx = np.zeros(12, np.int64)
    buf = aligned_empty(24 * PAGE)
    with IOEngine(fb, queue_depth=4, chunk=1 << 20) as e:
        assert submit_read_arrays(e, [str(path)], idx, offsets, lengths, buf, offsets).result(T) == 24 * PAGE
        assert short.hits >= 4
        assert np.array_equal(buf, data)
        fb.remove(short)
        fb.fail("read", errno.EIO, offset=(6 * PAGE, 7 * PAGE), times=1)
        with pytest.raises(IOEngineError) as ei:
            submit_read_arrays(e, [str(path)], idx, offsets, lengths, buf, offsets).result(T)
        assert ei.value.errno == errno.EIO and ei.value.offset == 6 * PAGE and str(path) in str(ei.value)
        with pytest.raises(IOEngineError, match="end of file"):
            submit_read_arrays(e, [str(path)], idx[:1], np.array([30 * PAGE]), lengths[:1], buf, idx[:1]).result(T)
        assert e.stats()["read"]["errors"] == 2


def test_cancelled_array_batch_touches_no_buffer(native_name, tmp_path):
    rows, slow = tmp_path / "rows.bin", tmp_path / "slow.bin"
    random_file(rows, 8 * PAGE, seed=8)
    random_file(slow, PAGE, seed=9)
    fb = FaultyBackend(create_backend(native_name))
    gate = fb.gate("read", path="/slow.bin", times=1)
    with IOEngine(fb, queue_depth=1, chunk=1 << 20) as e:
        running = e.read(slow, 0, aligned_empty(PAGE))
        assert gate.entered.wait(T)
        buf = aligned_empty(8 * PAGE)
        buf[:] = 0xAB
        offs = np.arange(8, dtype=np.int64) * PAGE
        f = submit_read_arrays(e, [str(rows)], np.zeros(8, np.int64), offs, np.full(8, PAGE), buf, offs)
        assert f.cancel() is True
        gate.release()
        assert running.result(T) == PAGE
        assert e.read(rows, 0, aligned_empty(PAGE)).result(T) == PAGE  # queued after the cancelled batch
        s = e.stats()["read"]
    assert (buf == 0xAB).all()
    assert s["cancelled"] == 8 and s["requests"] == 2 and fb.calls["read"] == 2


# -- the store's array form of read_ranges -----------------------------------------------------
@pytest.fixture(params=["threads", *BACKENDS])
def backend_name(request) -> str:
    return request.param


@pytest.fixture
def batches(monkeypatch) -> list:
    """Counts the groups the store handed to the engine as array batches."""
    import tiered.store.ranges as ranges

    taken: list = []
    real = ranges.submit_read_arrays

    def counted(*a, **k):
        f = real(*a, **k)
        if f is not None:
            taken.append(len(a[3]))
        return f

    monkeypatch.setattr(ranges, "submit_read_arrays", counted)
    return taken


def _config(tmp_path, backend: str) -> dict:
    cfg = store_config(tmp_path, host="16MiB", nvme="64MiB")
    cfg["engine"]["backend"] = backend
    return cfg


def test_range_arrays_equal_read_ranges_and_count_bytes(backend_name, tmp_path, batches):
    """Stored objects (verified per block) and an external file read in place, mixed in one call,
    unaligned ranges included: the bytes equal read_ranges', and so do the per-tier counts."""
    a = np.random.default_rng(1).integers(0, 256, 40 * PAGE, dtype=np.uint8)
    b = np.random.default_rng(2).integers(0, 256, 10 * PAGE + 100, dtype=np.uint8)
    ext = tmp_path / "ext.bin"
    e = random_file(ext, 20 * PAGE + 300, seed=3)
    with TieredStore(_config(tmp_path, backend_name)) as s:
        s.put("a", torch.from_numpy(a), block=PAGE, tier="nvme").result(T)
        s.put("b", torch.from_numpy(b), block=PAGE, tier="nvme").result(T)
        s.register_external("e", str(ext), 300, 20 * PAGE, torch.uint8, (20 * PAGE,))
        keys = ["a", "b", "e"]
        which = np.array([0, 1, 0, 2, 2, 1, 0, 2])
        offs = np.array([0, 4 * PAGE, 7 * PAGE, 0, 5 * PAGE + 17, 10 * PAGE, 39 * PAGE, 19 * PAGE])
        lens = np.array([PAGE, 2 * PAGE, 3 * PAGE, 3 * PAGE, 100, 4096, PAGE, PAGE])
        boffs = np.concatenate([[0], np.cumsum(-(-lens // PAGE) * PAGE)[:-1]])
        buf = aligned_empty(int(boffs[-1] + PAGE))
        before = dict(s.counters.bytes_read)
        assert s.read_range_arrays(keys, which, offs, lens, buf, boffs).result(T) == int(lens.sum())
        ref = [aligned_empty(int(n)) for n in lens]
        s.read_ranges([(keys[w], int(o), int(n), r) for w, o, n, r in zip(which, offs, lens, ref)]).result(T)
        src = {"a": a, "b": np.concatenate([b, np.zeros(PAGE, np.uint8)]), "e": e[300:]}
        for w, o, n, at, r in zip(which, offs, lens, boffs, ref):
            assert np.array_equal(buf[at: at + n], src[keys[w]][o: o + n])
            assert np.array_equal(buf[at: at + n], r)
        got = {t: s.counters.bytes_read.get(t, 0) - before.get(t, 0) for t in s.counters.bytes_read}
        assert sum(got.values()) == 2 * int(lens.sum())
    assert bool(batches) == (backend_name != "threads")  # the aligned ranges went as one batch


def test_range_arrays_find_a_corrupt_block_and_name_bad_ranges(backend_name, tmp_path):
    a = np.random.default_rng(4).integers(0, 256, 16 * PAGE, dtype=np.uint8)
    with TieredStore(_config(tmp_path, backend_name)) as s:
        s.put("a", torch.from_numpy(a), block=PAGE, tier="nvme").result(T)
        meta = s._objects["a"]
        path = s._tiers["nvme"].data_file
        with open(path, "r+b") as f:  # flip a byte of block 9 on disk
            f.seek(meta.extent.offset + 9 * PAGE + 5)
            byte = f.read(1)
            f.seek(meta.extent.offset + 9 * PAGE + 5)
            f.write(bytes([byte[0] ^ 0xFF]))
        offs = np.arange(16, dtype=np.int64) * PAGE
        buf = aligned_empty(16 * PAGE)
        with pytest.raises(ChecksumError, match=r"'a'.*block 9"):
            s.read_range_arrays(["a"], np.zeros(16, np.int64), offs, np.full(16, PAGE), buf, offs).result(T)
        with pytest.raises(StoreError, match=r"read_ranges\('a'\).*not whole blocks"):
            s.read_range_arrays(["a"], [0], [100], [PAGE], buf, [0])
        with pytest.raises(StoreError, match=r"read_ranges\('a'\).*outside the object"):
            s.read_range_arrays(["a"], [0], [15 * PAGE], [2 * PAGE], buf, [0])
        with pytest.raises(StoreError, match="outside the .*-byte buffer"):
            s.read_range_arrays(["a"], [0], [0], [PAGE], buf, [16 * PAGE])
        with pytest.raises(KeyError, match="nope"):
            s.read_range_arrays(["nope"], [0], [0], [PAGE], buf, [0])
        assert s.read_range_arrays(["a"], [0], [0], [PAGE], buf, [0]).result(T) == PAGE  # nothing left held


def test_range_arrays_surface_engine_faults(native_name, tmp_path):
    fb = FaultyBackend(create_backend(native_name))
    a = np.random.default_rng(5).integers(0, 256, 16 * PAGE, dtype=np.uint8)
    with TieredStore(_config(tmp_path, native_name), backend=fb) as s:
        s.put("a", torch.from_numpy(a), block=PAGE, tier="nvme").result(T)
        fb.fail("read", errno.EIO, times=1)
        offs = np.arange(16, dtype=np.int64) * PAGE
        buf = aligned_empty(16 * PAGE)
        with pytest.raises(IOEngineError) as ei:
            s.read_range_arrays(["a"], np.zeros(16, np.int64), offs, np.full(16, PAGE), buf, offs).result(T)
        assert ei.value.errno == errno.EIO
        assert s.read_range_arrays(["a"], np.zeros(16, np.int64), offs, np.full(16, PAGE), buf, offs).result(T)
        assert np.array_equal(buf, a)


# -- feature-store gathers on the kernel-queue engine ------------------------------------------------
@pytest.mark.parametrize("in_place", [True, False])
def test_gathers_on_a_kernel_queue_engine_equal_indexing(native_name, tmp_path, in_place, batches):
    """Sparse rows (most reads inside a chunk, page aligned: array batches) and dense rows (reads
    that end on chunk edges of an in-place file, unaligned: ordinary requests), cache on."""
    x = torch.randn(20000, 64)
    np.save(tmp_path / "x.npy", x.numpy())
    cfg = _config(tmp_path, native_name)
    with TieredStore(cfg) as s, TieredFeatureStore(s, cache_bytes=200 * 256, policy="lru", merge_gap=4096,
                                                   chunk_bytes=1 << 20) as fs:
        fs.import_array(tmp_path / "x.npy", None, "x", in_place=in_place)
        rng = np.random.default_rng(0)
        for n in (300, 300, 300, 15000):
            ids = rng.integers(0, 20000, n)
            assert torch.equal(fs.gather_rows(None, "x", ids), x[torch.from_numpy(ids)])
            if n == 300:
                assert sum(batches) > 0.8 * fs.stats()["reads"]["requests"]  # (almost) all in array batches


def test_gather_fault_on_a_kernel_queue_engine_fails_the_gather(native_name, tmp_path):
    x = torch.randn(3000, 32)
    np.save(tmp_path / "x.npy", x.numpy())
    fb = FaultyBackend(create_backend(native_name))
    with TieredStore(_config(tmp_path, native_name), backend=fb) as s, \
            TieredFeatureStore(s, cache_bytes=0, chunk_bytes=64 << 10) as fs:
        fs.import_array(tmp_path / "x.npy", None, "x", in_place=True)
        fb.fail("read", errno.EIO, path="x.npy", times=1)
        with pytest.raises(IOEngineError, match="x.npy") as ei:
            fs.gather_rows(None, "x", np.arange(0, 3000, 7))
        assert "feature attribute" in "".join(getattr(ei.value, "__notes__", []))
        ids = np.arange(0, 3000, 7)
        assert torch.equal(fs.gather_rows(None, "x", ids), x[torch.from_numpy(ids)])


def test_garbage_cycles_do_not_keep_gathered_rows(tmp_path):
    """Once a gather returned, nothing it read is held by reference cycles among the engine's
    futures (they wait for the garbage collector, which numpy-heavy loops seldom trigger: each
    kept a minibatch's rows and read plan alive, hundreds of MB under a memory limit)."""
    import gc

    x = torch.randn(8000, 64)
    np.save(tmp_path / "x.npy", x.numpy())
    with TieredStore(_config(tmp_path, "threads")) as s, \
            TieredFeatureStore(s, cache_bytes=0, chunk_bytes=64 << 10, scratch_bytes=64 << 10,
                               max_read=16 << 10) as fs:
        fs.import_array(tmp_path / "x.npy", None, "x", in_place=True)
        ids = np.arange(0, 8000, 2)
        fs.gather_rows(None, "x", ids)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(3):
                assert torch.equal(fs.gather_rows(None, "x", ids), x[torch.from_numpy(ids)])
            gc.collect()
            held = sum(o.nbytes for g in gc.garbage for o in gc.get_referents(g) if isinstance(o, np.ndarray))
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert held < 64 << 10, f"{held} bytes of arrays held by garbage cycles (a gather's rows are {len(ids) * 256})"
