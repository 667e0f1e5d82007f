"""Store maintenance: a missing manifest, check/repair of orphaned blocks and corrupt objects,
and the `tiered store` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import allocated_bytes, store_config
from killing import run_and_kill
from tiered.cli import main
from tiered.store import StoreError, TieredStore

T = 10.0
MiB = 1 << 20
CHILD = Path(__file__).resolve().parent / "store_child.py"


def test_missing_manifest_with_a_data_file_is_an_error_naming_both_and_the_repair(tmp_path):
    cfg = store_config(tmp_path)
    with TieredStore(cfg) as s:
        s.put("a", torch.ones(MiB // 4)).result(T)
    (tmp_path / "nvme" / "manifest.json").unlink()
    with pytest.raises(StoreError) as ei:
        TieredStore(cfg).open()
    msg = str(ei.value)
    assert str(tmp_path / "nvme" / "manifest.json") in msg and str(tmp_path / "nvme" / "objects.dat") in msg
    assert "tiered store check" in msg and "--repair" in msg, msg


def test_a_new_store_is_not_mistaken_for_one_that_lost_its_manifest(tmp_path):
    cfg = store_config(tmp_path)
    with TieredStore(cfg) as s:  # the first open writes an empty manifest
        assert (tmp_path / "nvme" / "manifest.json").exists()
    with TieredStore(cfg) as s:
        assert s.keys() == []


def test_check_repair_starts_a_store_without_manifest_empty_and_reclaims_its_data(tmp_path, capsys):
    cfg = store_config(tmp_path)
    with TieredStore(cfg) as s:
        s.put("a", torch.ones(MiB // 4)).result(T)
    (tmp_path / "nvme" / "manifest.json").unlink()
    before = allocated_bytes(tmp_path / "nvme")
    assert main(["store", "check", str(tmp_path / "nvme")]) == 2  # without --repair: the error
    assert "--repair" in capsys.readouterr().err
    assert main(["store", "check", str(tmp_path / "nvme"), "--repair"]) == 0
    out = capsys.readouterr().out
    assert "manifest was missing" in out and "bytes reclaimed" in out, out
    assert allocated_bytes(tmp_path / "nvme") <= before - MiB
    with TieredStore(cfg) as s:
        assert s.keys() == []


def test_check_repair_reclaims_the_blocks_of_a_put_killed_before_its_commit(tmp_path, capsys):
    cfg = store_config(tmp_path)
    run_and_kill([sys.executable, str(CHILD), "orphan", json.dumps(cfg)], 0.05)
    before = allocated_bytes(tmp_path / "nvme")
    with TieredStore(cfg) as s:
        assert s.keys() == ["keep"]
        report = s.check()
        assert report["reclaimable_bytes"]["nvme"] >= MiB and report["reclaimed_bytes"] == 0
        assert report["objects"] == 1 and report["corrupt"] == {}
    assert allocated_bytes(tmp_path / "nvme") == before, "check without repair changed the data file"
    assert main(["store", "check", str(tmp_path / "nvme"), "--repair", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reclaimed_bytes"] >= MiB and report["removed"] == []
    assert allocated_bytes(tmp_path / "nvme") <= before - MiB, "the orphaned put's blocks are still allocated"
    with TieredStore(cfg) as s:
        assert torch.equal(s.get("keep").result(T), torch.full((MiB,), 1, dtype=torch.uint8))
        assert s.check()["reclaimable_bytes"]["nvme"] == 0


def test_check_finds_corrupt_objects_and_repair_removes_them(tmp_path, capsys):
    cfg = store_config(tmp_path)
    with TieredStore(cfg) as s:
        s.put("good", torch.ones(1000)).result(T)
        s.put("bad", torch.ones(1000)).result(T)
        offset = s.meta("bad")["offset"]
    with open(tmp_path / "nvme" / "objects.dat", "r+b") as f:
        f.seek(offset + 100)
        f.write(b"\xff" * 8)
    assert main(["store", "check", str(tmp_path / "nvme")]) == 1
    out = capsys.readouterr().out
    assert "1 corrupt" in out and "corrupt bad:" in out and "crc32" in out, out
    with TieredStore(cfg) as s:
        report = s.check(repair=True)
        assert list(report["corrupt"]) == ["bad"] and report["removed"] == ["bad"]
        assert s.keys() == ["good"]


def test_ls_and_rm(tmp_path, capsys):
    cfg = store_config(tmp_path)
    with TieredStore(cfg) as s:
        s.put("layers/0/w", torch.ones(2, 3)).result(T)
        s.put("layers/1/w", torch.ones(4, dtype=torch.float16), kind="weight").result(T)
        s.put("other", torch.zeros(5, dtype=torch.int64)).result(T)
    d = str(tmp_path / "nvme")
    assert main(["store", "ls", d]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t") == ["layers/0/w", "24", "float32", "2x3", "blob", "v1", "durable", "nvme"]
    assert len(lines) == 3
    assert main(["store", "rm", d, "--prefix", "layers/"]) == 0
    assert "removed 2 objects" in capsys.readouterr().out
    assert main(["store", "rm", d, "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'nope'" in err and "Traceback" not in err
    assert main(["store", "rm", d, "other"]) == 0
    with TieredStore(cfg) as s:
        assert s.keys() == []


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["store", "ls", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err
    cfg = store_config(tmp_path)
    with TieredStore(cfg):
        assert main(["store", "ls", str(tmp_path / "nvme")]) == 2  # held: says by whom
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "lock" in err and "this process" in err, err


def test_delete_prefix(tmp_path):
    with TieredStore(store_config(tmp_path)) as s:
        for k in ("a/1", "a/2", "b"):
            s.put(k, torch.ones(3)).result(T)
        assert sorted(s.delete_prefix("a/")) == ["a/1", "a/2"]
        assert s.keys() == ["b"]


def test_cli_opens_a_store_from_a_config_file(tmp_path, capsys):
    cfg = store_config(tmp_path)
    with TieredStore(cfg) as s:
        s.put("k", torch.ones(3)).result(T)
        s.put("j", torch.ones(3)).result(T)
    f = tmp_path / "store.toml"
    f.write_text(f'[tiers.host]\ncapacity = "16MiB"\n[tiers.nvme]\npath = "{tmp_path / "nvme"}"\ncapacity = "64MiB"\n')
    assert main(["store", "ls", "--config", str(f)]) == 0
    assert [ln.split("\t")[0] for ln in capsys.readouterr().out.splitlines()] == ["j", "k"]
    assert main(["store", "rm", "--config", str(f), "k"]) == 0
    assert main(["store", "ls", str(tmp_path / "nvme"), "--config", str(f)]) == 2  # one of them
    assert "one of them" in capsys.readouterr().err
    with TieredStore(cfg) as s:
        assert s.keys() == ["j"]
