"""The feature store as a client of the store: verified row reads, memory charged to its owner,
and a host tier shared with another owner."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torch_geometric")

from helpers import store_config  # noqa: E402
from tiered.gnn.feature_store import TieredFeatureStore  # noqa: E402
from tiered.store import ChecksumError, TieredStore  # noqa: E402

T = 30.0
OWNER = "gnn/features"


def config(tmp_path: Path, host: str = "32MiB") -> dict:
    return store_config(tmp_path, host)


def fstore(store, **kw) -> TieredFeatureStore:
    kw.setdefault("chunk_bytes", 64 << 10)
    kw.setdefault("scratch_bytes", 128 << 10)
    kw.setdefault("max_read", 64 << 10)
    return TieredFeatureStore(store, **kw).open()


def _chunk_keys(fs) -> list[str]:
    return fs.attributes()[0]["keys"]


def _flip_byte(store, key: str, at: int) -> None:
    lease = store.locate(key)
    try:
        with open(lease.path, "r+b") as f:
            f.seek(lease.offset + at)
            b = f.read(1)
            f.seek(lease.offset + at)
            f.write(bytes([b[0] ^ 0xFF]))
    finally:
        lease.release()


@pytest.mark.parametrize("block", [4096, 16384])
def test_a_corrupt_byte_in_a_chunk_fails_the_gather_naming_the_object(tmp_path, block):
    x = torch.randn(4000, 32)  # 128-byte rows: 512 rows per 64 KiB chunk
    with TieredStore(config(tmp_path)) as s, fstore(s, cache_bytes=0, checksum_block=block) as fs:
        fs.put_tensor(x, group_name=None, attr_name="x", index=None)
        key = _chunk_keys(fs)[1]  # rows 512..1023
        _flip_byte(s, key, 100 * 128 + 5)  # row 612
        with pytest.raises(ChecksumError, match=key):
            fs.get_tensor(group_name=None, attr_name="x", index=torch.tensor([3, 612, 3000]))
        # the other blocks of the chunk, and the other chunks, still read (and are right)
        ok = torch.tensor([0, 511, 400 if block > 4096 else 700, 1023, 3999])
        assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=ok), x[ok])


@pytest.mark.parametrize("block", [4096, 16384])
def test_a_worker_copy_verifies_blocks_too(tmp_path, block):
    x = torch.randn(4000, 32)
    with TieredStore(config(tmp_path)) as s, fstore(s, cache_bytes=0, checksum_block=block) as fs:
        fs.put_tensor(x, group_name=None, attr_name="x", index=None)
        copy = pickle.loads(pickle.dumps(fs))  # what a spawned DataLoader worker gets
        try:
            idx = torch.arange(0, 4000, 7)
            assert torch.equal(copy.get_tensor(group_name=None, attr_name="x", index=idx), x[idx])
            key = _chunk_keys(fs)[2]  # rows 1024..1535
            _flip_byte(s, key, 10 * 128)  # row 1034
            with pytest.raises(ChecksumError, match=key):
                copy.get_tensor(group_name=None, attr_name="x", index=torch.tensor([1034]))
            assert torch.equal(copy.get_tensor(group_name=None, attr_name="x", index=torch.tensor([1]) ), x[[1]])
        finally:
            copy.close()


def test_the_feature_store_memory_is_charged_to_its_owner(tmp_path):
    x = torch.randn(8000, 32)  # 1 MiB of rows
    with TieredStore(config(tmp_path)) as s:
        with fstore(s, cache_bytes=256 << 10) as fs:
            fs.put_tensor(x, group_name=None, attr_name="x", index=None)
            idx = torch.arange(0, 8000, 3)
            assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=idx), x[idx])
            host = s.owners()[OWNER]["host"]
            assert host["reserved"] == 256 << 10
            assert host["held"] >= fs.stats()["attrs"]["'x'"]["cache_bytes"] > 0  # the row cache
            assert host["peak"] > host["held"]  # scratch of the gather came from the same owner
            assert s.owners()[OWNER]["nvme"]["held"] >= x.numel() * 4  # the chunks' extents
            assert all(o in (OWNER,) for o in s.owners() if s.owners()[o].get("host", {}).get("held"))
        assert s.owners().get(OWNER, {}).get("host", {"held": 0})["held"] == 0  # all given back on close
        with fstore(s, host_share="1MiB") as fs:  # a share without a cache size: the cache fits in it
            assert s.owners()[OWNER]["host"]["reserved"] == 1 << 20
            fs.get_tensor(group_name=None, attr_name="x", index=torch.tensor([1]))
            assert 0 < fs.stats()["attrs"]["'x'"]["cache_bytes"] <= 1 << 20


def test_a_feature_store_and_another_owner_share_a_small_host_tier(tmp_path):
    """An elastic feature store caches rows in what is free; when another owner needs the room,
    the store asks the feature store to give memory back, and both stay within the tier."""
    cap = 4 << 20
    x = torch.randn(16000, 64)  # 4 MiB of rows: more than the host tier
    with TieredStore(config(tmp_path, host="4MiB")) as s, fstore(s) as fs:
        fs.put_tensor(x, group_name=None, attr_name="x", index=None)
        rng = np.random.default_rng(0)
        for _ in range(3):
            idx = torch.from_numpy(rng.integers(0, 16000, 2000))
            assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=idx), x[idx])
        cached = fs.stats()["attrs"]["'x'"]["cache_bytes"]
        assert cached > 0 and s.owners()[OWNER]["host"]["reserved"] == 0  # elastic
        with s.reserve("host", owner="kv/0") as kv:
            bufs = [kv.alloc(1 << 20, wait=T) for _ in range(3)]  # needs room the row cache held
            assert s.stats()["tiers"]["host"]["used"] <= cap
            for _ in range(3):  # the feature store goes on, in what is left
                idx = torch.from_numpy(rng.integers(0, 16000, 2000))
                assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=idx), x[idx])
            assert fs.stats()["attrs"]["'x'"]["cache_bytes"] < cached
            assert s.owners()["kv/0"]["host"]["held"] == 3 << 20
            for b in bufs:
                b.release()
        assert s.stats()["tiers"]["host"]["peak"] <= cap


def test_chunks_stored_without_block_checksums_get_them_on_open(tmp_path):
    """A feature table stored before chunks had block checksums (its catalog names no block) is
    put again with them when it is opened, so its rows can be read (and verified)."""
    import json

    x = torch.randn(3000, 16)
    with TieredStore(config(tmp_path)) as s:
        with fstore(s) as fs:
            fs.put_tensor(x, group_name=None, attr_name="x", index=None)
            keys = _chunk_keys(fs)
        for key in keys:  # as an older version wrote them: no block table
            s.put(key, s.get(key).result(T), kind="gnn").result(T)
        doc = json.loads(s.get("gnn/features/catalog").result(T).numpy().tobytes())
        for d in doc["attrs"]:
            d.pop("block", None)
        raw = np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8).copy()
        s.put("gnn/features/catalog", torch.from_numpy(raw), kind="gnn").result(T)
        with fstore(s, cache_bytes=0) as fs:
            idx = torch.arange(0, 3000, 11)
            assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=idx), x[idx])
            assert fs.attributes()[0]["block"] == 4096
            _flip_byte(s, keys[0], 64 * 5)  # row 5: verified now
            with pytest.raises(ChecksumError, match=keys[0]):
                fs.get_tensor(group_name=None, attr_name="x", index=torch.tensor([5]))


def test_the_config_gives_the_feature_store_its_share(tmp_path):
    cfg = config(tmp_path, host="8MiB")
    cfg["owners"] = {"gnn": {"host": "25%"}}
    x = torch.randn(8000, 32)
    with TieredStore(cfg) as s, fstore(s) as fs:
        assert s.owners()[OWNER]["host"]["reserved"] == 2 << 20
        fs.put_tensor(x, group_name=None, attr_name="x", index=None)
        idx = torch.arange(0, 8000, 5)
        assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=idx), x[idx])
        # the caches take the share less one gather's scratch
        assert fs.stats()["attrs"]["'x'"]["cache_bytes"] <= (2 << 20) - fs.scratch_bytes


@pytest.mark.timeout(60)
def test_first_gathers_after_reopen_do_not_block_the_engine_on_checksum_tables(tmp_path):
    """Each round after the first is submitted from the engine worker that finished the one
    before; loading a chunk's checksum table there must not wait for another worker."""
    from torch_geometric.data import TensorAttr

    cfg = {"tiers": {"host": {"capacity": "32MiB"}, "nvme": {"path": str(tmp_path / "nvme"), "capacity": "64MiB"}},
           "engine": {"workers": 2, "chunk": "1MiB"}}
    xs = [torch.randn(4000, 32) for _ in range(3)]
    kw = dict(chunk_bytes=64 << 10, scratch_bytes=64 << 10, max_read=64 << 10, cache_bytes=0, namespace="f")
    with TieredStore(cfg) as s, TieredFeatureStore(s, **kw).open() as fs:
        for i, x in enumerate(xs):
            fs.put_tensor(x, group_name=None, attr_name=f"x{i}", index=None)
    with TieredStore(cfg) as s, TieredFeatureStore(s, **kw).open() as fs:
        idx = torch.arange(0, 4000, 3)
        got = fs.multi_get_tensor([TensorAttr(None, f"x{i}", idx) for i in range(3)])
        assert all(torch.equal(g, x[idx]) for g, x in zip(got, xs))
