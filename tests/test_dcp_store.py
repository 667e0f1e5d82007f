"""TieredStorageWriter / TieredStorageReader through a TieredStore: the bytes are retained store
objects of owner "dcp" (counted in the storage tier's capacity), staged through the store's host
tier, read through its engine; a later save releases the earlier one; no arena or engine of their own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import store_config
from tiered import allocators
from tiered import io_engine
from tiered.checkpoint import TieredStorageReader, TieredStorageWriter
from tiered.store import TieredStore

T = 30.0
MiB = 1 << 20
pytestmark = pytest.mark.timeout(120)


def cfg(tmp_path: Path, host: str = "32MiB", nvme: str = "256MiB") -> dict:
    return store_config(tmp_path, host, nvme)


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"big": torch.randn((9 * MiB + 100) // 4, generator=g), "n": torch.arange(7) * seed, "note": {"seed": seed}}


def zeros() -> dict:
    return {"big": torch.zeros((9 * MiB + 100) // 4), "n": torch.zeros(7, dtype=torch.int64), "note": {"seed": 0}}


def same(a: dict, b: dict) -> bool:
    return torch.equal(a["big"], b["big"]) and torch.equal(a["n"], b["n"]) and a["note"] == b["note"]


def test_a_store_given_holds_the_bytes_charged_to_dcp_and_a_later_save_releases_the_earlier(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    with TieredStore(cfg(tmp_path)) as store:
        opened = []
        for cls in (allocators.HostArena, io_engine.IOEngine):
            orig = cls.open
            monkeypatch.setattr(cls, "open", lambda self, orig=orig: opened.append(type(self).__name__) or orig(self))
        used0 = store.stats()["tiers"]["nvme"]["used"]
        dcp.save(state(1), storage_writer=TieredStorageWriter("run/a", store=store, host_buffer="8MiB"))
        held1 = store.owners()["dcp"]["nvme"]["held"]
        assert held1 >= 9 * MiB and store.stats()["tiers"]["nvme"]["used"] - used0 == held1
        assert store.keys() == [] and len(store.retained("dcp:")) == 1
        assert 0 < store.owners()["dcp"]["host"]["peak"] <= 8 * MiB
        dcp.save(state(2), storage_writer=TieredStorageWriter("run/a", store=store, host_buffer="8MiB"))
        assert len(store.retained("dcp:")) == 1 and store.owners()["dcp"]["nvme"]["held"] == held1
        dest = zeros()
        dcp.load(dest, storage_reader=TieredStorageReader("run/a", store=store, host_buffer="8MiB"))
        assert same(dest, state(2))
        assert opened == []
        assert (tmp_path / "nvme" / "dcp" / "run" / "a" / ".metadata.json").exists()
        assert store.owners()["dcp"]["host"]["held"] == 0


def test_a_config_opens_the_shared_store_for_the_call_only(tmp_path):
    import torch.distributed.checkpoint as dcp

    c = cfg(tmp_path)
    dcp.save(state(3), storage_writer=TieredStorageWriter("run/b", config=c))
    with TieredStore(c) as store:  # closed again: it opens here
        assert len(store.retained("dcp:")) == 1 and store.owners()["dcp"]["nvme"]["held"] > 0
    dest = zeros()
    dcp.load(dest, storage_reader=TieredStorageReader("run/b", config=c))
    assert same(dest, state(3))


def test_dcp_and_another_owner_share_a_small_host_tier(tmp_path):
    import torch.distributed.checkpoint as dcp

    with TieredStore(cfg(tmp_path)) as store:
        kv = store.reserve("host", "16MiB", owner="kv")
        bufs = [kv.alloc(4 * MiB, wait=0) for _ in range(4)]  # its whole share in use
        sd = {f"t{i}": torch.full((2 * MiB,), float(i)) for i in range(5)}  # 40 MiB through what is left
        dcp.save(sd, storage_writer=TieredStorageWriter(tmp_path / "ck", store=store, host_buffer="16MiB"))
        dest = {k: torch.zeros_like(v) for k, v in sd.items()}
        dcp.load(dest, storage_reader=TieredStorageReader(tmp_path / "ck", store=store, host_buffer="16MiB"))
        assert all(torch.equal(dest[k], v) for k, v in sd.items())
        assert store.owners()["kv"]["host"]["held"] == 16 * MiB
        for b in bufs:
            b.release()
        kv.close()


def test_a_save_that_does_not_fit_the_tier_fails_and_leaves_the_previous_one(tmp_path):
    import torch.distributed.checkpoint as dcp

    with TieredStore(cfg(tmp_path, nvme="24MiB")) as store:
        dcp.save(state(1), storage_writer=TieredStorageWriter("r", store=store))
        with pytest.raises(BaseException, match="no storage tier has room"):
            dcp.save(state(2) | {"more": torch.ones(3 * MiB)}, storage_writer=TieredStorageWriter("r", store=store))
        assert store.keys() == [] and len(store.retained("dcp:")) == 1
        dest = zeros()
        dcp.load(dest, storage_reader=TieredStorageReader("r", store=store))
        assert same(dest, state(1))


def test_a_format_1_checkpoint_with_a_data_file_per_rank_still_loads(tmp_path):
    """Written by the earlier writer (each rank's own data file in the directory, reproduced here
    from a format-2 save): loaded with its checksums, and its data file removed by the next save."""
    import json
    import zlib

    import torch.distributed.checkpoint as dcp

    from tiered.allocators import align_up

    path = tmp_path / "ck"
    with TieredStore(cfg(tmp_path)) as store:
        dcp.save(state(4), storage_writer=TieredStorageWriter(path, store=store))
        doc = json.loads((path / ".metadata.json").read_text())
        blob, name = bytearray(), "0123456789abcdef0123456789abcdef-r0.data"
        for entry in doc["storage_data"]:
            info = entry[3]
            raw = b""
            for part in info.pop("parts"):
                with open(part["path"], "rb") as f:
                    f.seek(part["offset"])
                    raw += f.read(part["nbytes"])
            info.pop("retain_tag")
            info.update(file=name, offset=len(blob), crc32=[zlib.crc32(raw[i:i + 8 * MiB])
                                                            for i in range(0, max(len(raw), 1), 8 * MiB)])
            blob += raw + b"\0" * (align_up(max(len(raw), 1)) - len(raw))
        (path / name).write_bytes(bytes(blob))
        doc["format_version"] = 1
        (path / ".metadata.json").write_text(json.dumps(doc))
        dest = zeros()
        dcp.load(dest, storage_reader=TieredStorageReader(path, store=store))
        assert same(dest, state(4))
        dcp.save(state(5), storage_writer=TieredStorageWriter(path, store=store))
        assert not (path / name).exists()
