"""read_ranges verifies ranges in groups, each as soon as its reads are done: every block
delivered is still checked, a corrupt one anywhere fails the call with the block named, and the
call's future completes only once every read has ended."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import tiered.store.ranges as ranges
from tiered.allocators import aligned_empty
from tiered.store import ChecksumError, TieredStore

KiB, MiB = 1 << 10, 1 << 20
T = 30.0


def cfg(tmp_path):
    return {"tiers": {"host": {"capacity": "8MiB"}, "nvme": {"path": str(tmp_path / "nvme"), "capacity": "64MiB"}},
            "engine": {"workers": 2, "chunk": "256KiB"}}


def data(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def flip(tmp_path, file_offset: int) -> None:
    with open(tmp_path / "nvme" / "objects.dat", "r+b") as f:
        f.seek(file_offset)
        b = f.read(1)
        f.seek(file_offset)
        f.write(bytes([b[0] ^ 0xFF]))


def spans_of(n: int, length: int, gap: int = 0) -> list[tuple[int, int]]:
    return [(i * (length + gap), length) for i in range(n)]


def start(store, spans, key="x"):
    outs = [aligned_empty(n) for _o, n in spans]
    return store.read_ranges([(key, o, n, out) for (o, n), out in zip(spans, outs)]), outs


@pytest.mark.parametrize("group_bytes", [4 * KiB, ranges.GROUP_BYTES])
def test_a_corrupt_block_inside_one_of_many_multi_block_ranges_is_named(tmp_path, monkeypatch, group_bytes):
    monkeypatch.setattr(ranges, "GROUP_BYTES", group_bytes)  # one range per group, or few groups
    x = data(4 * MiB)
    spans = spans_of(40, 64 * KiB, gap=4 * KiB)  # 40 ranges of 16 blocks
    with TieredStore(cfg(tmp_path)) as s:
        s.put("x", torch.from_numpy(x), block=4096).result(T)
        off = s.meta("x")["offset"]
    bad = spans[33][0] + 9 * 4096  # block 9 of range 33 (in the last groups)
    flip(tmp_path, off + bad + 100)
    with TieredStore(cfg(tmp_path)) as s:
        fut, _outs = start(s, spans)
        with pytest.raises(ChecksumError, match=rf"'x' \(version \d+\): block {bad // 4096} \(bytes {bad}.."
                                                rf"{bad + 4096}, file offset {off + bad}\) has crc32"):
            fut.result(T)
        fut, outs = start(s, spans[:33] + spans[34:])  # the other ranges read back right
        assert fut.result(T) == 39 * 64 * KiB
        for (o, n), out in zip(spans[:33] + spans[34:], outs):
            assert np.array_equal(out, x[o:o + n])


def test_a_corrupt_block_shared_by_several_requested_rows_fails_the_gather(tmp_path):
    pytest.importorskip("torch_geometric")
    from tiered.gnn.feature_store import TieredFeatureStore

    x = torch.randn(2048, 128)  # 512-byte rows: 8 rows per 4 KiB block, 128 per 64 KiB chunk
    with TieredStore(cfg(tmp_path)) as s, TieredFeatureStore(s, cache_bytes=0, chunk_bytes=64 * KiB, merge_gap=0, max_read=64 * KiB,
                                                             scratch_bytes=256 * KiB, checksum_block=4096) as fs:
        fs.put_tensor(x, group_name=None, attr_name="x", index=None)
        key = fs.attributes()[0]["keys"][3]  # rows 384..511
        lease = s.locate(key)
        at = lease.path, lease.offset + 1 * 4096 + 1 * 512 + 3  # block 1 of the chunk (rows 392..399), in row 393
        lease.release()
        with open(at[0], "r+b") as f:
            f.seek(at[1])
            b = f.read(1)
            f.seek(at[1])
            f.write(bytes([b[0] ^ 0x55]))
        # one read of blocks 0..2 of the chunk; three of its rows share the corrupt block
        rows = torch.tensor([5, 384, 392, 395, 399, 400, 1500])
        with pytest.raises(ChecksumError, match=rf"{key}.*block 1 \(bytes 4096..8192"):
            fs.get_tensor(group_name=None, attr_name="x", index=rows)
        ok = torch.tensor([5, 384, 391, 400, 1500])  # the blocks around it are intact (read apart)
        assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=ok), x[ok])


def _slow_reads(store, tmp_path) -> None:
    store.engine.set_bandwidth_limit(tmp_path / "nvme", read=4 * MiB)  # the first 1 MiB is a burst


def test_a_failed_group_completes_the_future_only_after_every_read_ended(tmp_path, monkeypatch):
    monkeypatch.setattr(ranges, "GROUP_BYTES", 4 * KiB)
    x = data(4 * MiB)
    spans = spans_of(48, 64 * KiB)  # 3 MiB: about half a second at 4 MiB/s
    with TieredStore(cfg(tmp_path)) as s:
        s.put("x", torch.from_numpy(x), block=4096).result(T)
        off = s.meta("x")["offset"]
    flip(tmp_path, off + 4096 + 1)  # block 1: in the first range, verified first
    with TieredStore(cfg(tmp_path)) as s:
        s.read_ranges([("x", 0, 4096, aligned_empty(4096))]).result(T)  # checksum table loaded
        _slow_reads(s, tmp_path)
        fut, outs = start(s, spans)
        with pytest.raises(ChecksumError, match=r"block 1 \(bytes 4096..8192"):
            fut.result(T)
        # the caller may free the buffers now: every read into them has ended
        for (o, n), out in zip(spans[1:], outs[1:]):
            assert np.array_equal(out, x[o:o + n])


def test_groups_are_verified_while_later_ranges_are_still_read(tmp_path, monkeypatch):
    calls = []
    verify = ranges._Ranges._verify_ranges

    def timed(reads, metas, nbytes):
        calls.append(time.monotonic())
        return verify(reads, metas, nbytes)

    monkeypatch.setattr(ranges._Ranges, "_verify_ranges", staticmethod(timed))
    x = data(4 * MiB)
    spans = spans_of(48, 64 * KiB)
    with TieredStore(cfg(tmp_path)) as s:
        s.put("x", torch.from_numpy(x), block=4096).result(T)
        s.evict("x")
        s.read_ranges([("x", 0, 4096, aligned_empty(4096))]).result(T)  # checksum table loaded
        _slow_reads(s, tmp_path)
        calls.clear()
        fut, outs = start(s, spans)
        assert fut.result(T) == 3 * MiB
        done = time.monotonic()
        for (o, n), out in zip(spans, outs):
            assert np.array_equal(out, x[o:o + n])
    assert len(calls) > 1
    assert done - calls[0] > 0.2  # the first group was checked while about 2 MiB were still to read


def test_block_crcs_match_zlib_per_block_with_a_short_last_block():
    import zlib

    from tiered.checksums import block_crcs

    x = data(3 * 4096 + 100, seed=7)
    assert block_crcs(x, 4096) == [zlib.crc32(x[i:i + 4096]) for i in range(0, len(x), 4096)]
    assert block_crcs(x[:100], 4096) == [zlib.crc32(x[:100])]
    assert block_crcs(x[:8192].view(np.uint32), 4096) == [zlib.crc32(x[:4096]), zlib.crc32(x[4096:8192])]
