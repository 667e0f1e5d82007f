"""Byte-range reads (store.read_ranges): parts of objects into caller buffers, verified against
per-block crc32s recorded at put, one batch of engine requests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiered.allocators import aligned_empty
from tiered.store import ChecksumError, StoreError, TieredStore

KiB, MiB = 1 << 10, 1 << 20
T = 30.0


def cfg(tmp_path, host="8MiB", flash=False):
    tiers = {"host": {"capacity": host}, "nvme": {"path": str(tmp_path / "nvme"), "capacity": "64MiB"}}
    if flash:
        tiers["flash"] = {"path": str(tmp_path / "flash"), "capacity": "64MiB"}
    return {"tiers": tiers, "engine": {"workers": 2}}


def data(n, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8))


def read(store, spans, key="x", **kw):
    outs = [aligned_empty(n) for _o, n in spans]
    n = store.read_ranges([(key, o, n, out) for (o, n), out in zip(spans, outs)], **kw).result(T)
    assert n == sum(n for _o, n in spans)
    return outs


def test_ranges_read_back_exactly_and_count_and_emit(tmp_path):
    x = data(1 * MiB + 1000)
    with TieredStore(cfg(tmp_path)) as s:
        events = []
        s.add_listener(events.append)
        s.put("x", x, block=4096).result(T)
        s.evict("x")
        before = s.stats()["tiers"]["nvme"]["bytes_read"]
        spans = [(0, 4096), (8192, 3 * 4096), (1 * MiB, 4096)]  # the last ends at the padded end
        for (o, n), out in zip(spans, read(s, spans, owner="gnn")):
            want = np.zeros(n, np.uint8)
            have = x.numpy()[o:o + n]
            want[: len(have)] = have
            assert np.array_equal(out, want)
        assert s.stats()["tiers"]["nvme"]["bytes_read"] - before == 5 * 4096
        assert [e.op for e in events if e.key == "x"][-1] == "read"
        assert not s.meta("x")["in_host"]  # nothing was cached


def test_refusals_name_the_problem(tmp_path):
    with TieredStore(cfg(tmp_path)) as s:
        s.put("x", data(64 * KiB), block=4096).result(T)
        s.put("plain", data(64 * KiB)).result(T)
        out = aligned_empty(8192)
        with pytest.raises(StoreError, match="not whole blocks"):
            s.read_ranges([("x", 100, 4096, out)])
        with pytest.raises(StoreError, match="outside the object"):
            s.read_ranges([("x", 64 * KiB, 4096, out)])
        with pytest.raises(StoreError, match="no block checksums"):
            s.read_ranges([("plain", 0, 4096, out)])
        with pytest.raises(KeyError, match="nope"):
            s.read_ranges([("nope", 0, 4096, out)])
        with pytest.raises(StoreError, match="multiple of 4096"):
            s.put("bad", data(8192), block=1000)


def test_a_corrupt_block_is_named(tmp_path):
    with TieredStore(cfg(tmp_path)) as s:
        s.put("x", data(256 * KiB), block=4096).result(T)
        off = s.meta("x")["offset"]
    with open(tmp_path / "nvme" / "objects.dat", "r+b") as f:
        f.seek(off + 5 * 4096 + 7)
        f.write(b"\x00\x01")
    with TieredStore(cfg(tmp_path)) as s:  # block table and its crc come back from the manifest
        read(s, [(0, 4 * 4096)])  # blocks 0..3 are intact
        with pytest.raises(ChecksumError, match=r"block 5 \(bytes 20480..24576, file offset"):
            read(s, [(4 * 4096, 4 * 4096)])


def test_a_corrupt_block_table_is_named(tmp_path):
    with TieredStore(cfg(tmp_path)) as s:
        s.put("x", data(64 * KiB), block=4096).result(T)
        off = s.meta("x")["offset"]
    with open(tmp_path / "nvme" / "objects.dat", "r+b") as f:
        f.seek(off + 64 * KiB)  # the table follows the data
        f.write(b"\xff\xff\xff\xff")
    with TieredStore(cfg(tmp_path)) as s:
        with pytest.raises(ChecksumError, match="block checksum table"):
            read(s, [(0, 4096)])
        assert torch.equal(s.get("x").result(T), data(64 * KiB))  # whole reads use segment crcs


def test_larger_blocks_and_objects_streamed_through_a_small_host_tier(tmp_path):
    x = data(12 * MiB + 12345, seed=3)
    with TieredStore(cfg(tmp_path, host="4MiB")) as s:
        s.put("x", x, block=64 * KiB).result(T)  # larger than the host tier: streamed
        spans = [(0, 64 * KiB), (5 * MiB, 128 * KiB), (12 * MiB, 16 * KiB)]
        for (o, n), out in zip(spans, read(s, spans)):
            want = np.zeros(n, np.uint8)
            have = x.numpy()[o:o + n]
            want[: len(have)] = have
            assert np.array_equal(out, want)


def test_a_read_keeps_its_version_while_the_key_is_rewritten(tmp_path):
    with TieredStore(cfg(tmp_path, flash=True)) as s:
        s.put("x", data(64 * KiB, 1), block=4096).result(T)
        out = aligned_empty(64 * KiB)
        f = s.read_ranges([("x", 0, 64 * KiB, out)])
        s.put("x", data(64 * KiB, 2), block=4096).result(T)
        s.migrate("x", "flash").result(T)
        f.result(T)
        assert np.array_equal(out, data(64 * KiB, 1).numpy())
        assert s.meta("x")["tier"] == "flash"
        assert np.array_equal(read(s, [(4096, 4096)])[0], data(64 * KiB, 2).numpy()[4096:8192])  # block kept
        assert s.stats()["tiers"]["nvme"]["used"] == 0  # the old versions' extents were given back


def test_external_objects_are_read_in_place(tmp_path):
    raw = data(20000, seed=5).numpy()
    path = tmp_path / "feat.bin"
    path.write_bytes(b"\x00" * 100 + raw.tobytes())
    with TieredStore(cfg(tmp_path)) as s:
        s.register_external("ext", path, 100, len(raw), torch.uint8, (len(raw),))
        (out,) = read(s, [(1000, 5000)], key="ext")
        assert np.array_equal(out, raw[1000:6000])
