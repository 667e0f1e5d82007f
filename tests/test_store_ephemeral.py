"""Ephemeral objects: a process's scratch objects never outlive it (close, or the next open after a crash)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from helpers import allocated_bytes, store_config
from killing import run_and_kill
from tiered.store import TieredStore

T = 10.0
MiB = 1 << 20
CHILD = Path(__file__).resolve().parent / "store_child.py"


def test_close_deletes_ephemeral_objects_and_gives_their_blocks_back(tmp_path):
    cfg = store_config(tmp_path)
    with TieredStore(cfg) as s:
        s.put("keep", torch.ones(MiB // 4)).result(T)
        s.put("scratch", torch.zeros(MiB // 4), ephemeral=True).result(T)
        assert s.meta("scratch")["ephemeral"] and not s.meta("keep")["ephemeral"]
        before = allocated_bytes(tmp_path / "nvme")
    assert allocated_bytes(tmp_path / "nvme") <= before - MiB
    with TieredStore(cfg) as s:
        assert s.keys() == ["keep"]
        assert torch.equal(s.get("keep").result(T), torch.ones(MiB // 4))


def test_a_put_decides_again_whether_a_key_is_ephemeral(tmp_path):
    cfg = store_config(tmp_path)
    with TieredStore(cfg) as s:
        s.put("a", torch.zeros(10), ephemeral=True).result(T)
        s.put("a", torch.ones(10)).result(T)  # durable replaces ephemeral
        s.put("b", torch.ones(10)).result(T)
        s.put("b", torch.zeros(10), ephemeral=True).result(T)  # and vice versa
        buf = s.alloc_host(40)
        buf.tensor(torch.float32).fill_(5)
        s.put_buffer("c", buf, torch.float32, (10,), give=True, ephemeral=True).result(T)
        assert s.meta("c")["ephemeral"] and not s.meta("a")["ephemeral"] and s.meta("b")["ephemeral"]
    with TieredStore(cfg) as s:
        assert s.keys() == ["a"]
        assert torch.equal(s.get("a").result(T), torch.ones(10))


def test_ephemeral_objects_of_a_killed_process_are_deleted_by_the_next_open(tmp_path):
    cfg = store_config(tmp_path)
    run_and_kill([sys.executable, str(CHILD), "ephemeral", json.dumps(cfg)], 0.05)
    manifest = json.loads((tmp_path / "nvme" / "manifest.json").read_text())
    assert manifest["objects"]["scratch"]["ephemeral"] is True  # recorded, so the next open finds it
    before = allocated_bytes(tmp_path / "nvme")
    with TieredStore(cfg) as s:
        assert s.keys() == ["keep"]
        assert torch.equal(s.get("keep").result(T), torch.full((MiB,), 1, dtype=torch.uint8))
        assert allocated_bytes(tmp_path / "nvme") <= before - MiB, "the ephemeral object's blocks were not given back"
        s.put("new", torch.full((MiB,), 7, dtype=torch.uint8)).result(T)  # its space is reusable
    assert "scratch" not in json.loads((tmp_path / "nvme" / "manifest.json").read_text())["objects"]
    with TieredStore(cfg) as s:
        assert sorted(s.keys()) == ["keep", "new"]
        assert torch.equal(s.get("new").result(T), torch.full((MiB,), 7, dtype=torch.uint8))
