"""A checkpoint saved with a per-rank store config (``path = ".../r{rank}"``) loads at another world
size with the same config: the reader uses its rank's store as scratch, whoever wrote the shard."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

import tiered
from tiered.checkpoint import TieredStorageReader, TieredStorageWriter
from tiered.store import MANIFEST

pytestmark = pytest.mark.timeout(120)


def test_a_per_rank_config_loads_at_another_world_size(tmp_path, monkeypatch):
    for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(v, raising=False)
    cfg = {"tiers": {"host": {"capacity": "16MiB"},
                     "nvme": {"path": str(tmp_path / "state" / "r{rank}"), "capacity": "64MiB"}},
           "engine": {"workers": 1, "chunk": "1MiB"}}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as rank 0 of a 2-rank job
    with tiered.TieredStore(cfg) as store:  # the shard holds this rank's other state too
        store.put("other", torch.ones(4)).result(timeout=30)
        manifest = store.root / MANIFEST
    dcp.save({"w": torch.arange(8.0)}, storage_writer=TieredStorageWriter(tmp_path / "ckpt", config=cfg),
             no_dist=True)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")  # a single process loads it
    sd = {"w": torch.zeros(8)}
    dcp.load(sd, storage_reader=TieredStorageReader(tmp_path / "ckpt", config=cfg), no_dist=True)
    assert torch.equal(sd["w"], torch.arange(8.0))
    assert json.loads(manifest.read_text())["layout"] == {"rank": 0, "local_rank": 0, "world_size": 2}
