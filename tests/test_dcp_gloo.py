"""The torch.distributed.checkpoint backend with DCP itself: dcp.save / dcp.async_save / dcp.load
with gloo (world size 1 and 2), a checkpoint invisible until its metadata commits, checksums,
and where relative checkpoint ids live.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from test_checkpoint import T, assert_tree_same, cfg
from tiered.checkpoint import CheckpointError
from tiered.checkpoint.format import SEGMENT
from tiered.store import TieredStore

pytestmark = pytest.mark.timeout(120)


def _dcp_worker(rank: int, world: int, init_file: str, root: str, out: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from tiered.checkpoint import TieredStorageReader, TieredStorageWriter

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=60))
    try:
        g = torch.Generator().manual_seed(100 + rank)
        sd = {"shared": torch.arange(1000.0), f"rank{rank}": {"w": torch.randn(64, 33, generator=g),
                                                               "n": torch.arange(7, dtype=torch.int64) * rank},
              "big": torch.ones(SEGMENT // 4 + 5), "note": {"epoch": 3}}
        dcp.save(sd, storage_writer=TieredStorageWriter(os.path.join(root, "sync")))
        fut = dcp.async_save(sd, storage_writer=TieredStorageWriter(os.path.join(root, "async")))
        fut.result(60)
        for name in ("sync", "async"):
            dest = {"shared": torch.zeros(1000), f"rank{rank}": {"w": torch.zeros(64, 33),
                                                                 "n": torch.zeros(7, dtype=torch.int64)},
                    "big": torch.zeros(SEGMENT // 4 + 5), "note": {"epoch": 0}}
            dcp.load(dest, storage_reader=TieredStorageReader(os.path.join(root, name)))
            assert_tree_same(dest, sd, name)
        dist.barrier()
        Path(out).write_text("ok")
    finally:
        dist.destroy_process_group()


def test_dcp_save_and_async_save_round_trip_with_gloo_world_1(tmp_path):
    """In this process: a gloo group of one."""
    _dcp_worker(0, 1, str(tmp_path / "init"), str(tmp_path / "ck"), str(tmp_path / "ok0"))
    assert (tmp_path / "ok0").read_text() == "ok"
    files = sorted(p.name for p in (tmp_path / "ck" / "async").iterdir())
    assert files[0] == ".metadata.json" and len(files) == 2


def test_dcp_save_and_async_save_round_trip_with_gloo_world_2(tmp_path):
    """Two spawned ranks, each with its own keys and shared ones; each loads what all wrote."""
    import multiprocessing as mp

    world = 2
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_dcp_worker, args=(r, world, str(tmp_path / "init"), str(tmp_path / "ck"),
                                                      str(tmp_path / f"ok{r}"))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(T)
    assert [p.exitcode for p in procs] == [0] * world
    assert all((tmp_path / f"ok{r}").read_text() == "ok" for r in range(world))
    files = sorted(p.name for p in (tmp_path / "ck" / "sync").iterdir())
    assert files[0] == ".metadata.json" and len(files) == 1 + world  # one data file per rank, no pickle
    json.loads((tmp_path / "ck" / "sync" / ".metadata.json").read_text())


def test_dcp_checkpoint_is_invisible_until_committed_and_checksummed(tmp_path):
    import torch.distributed.checkpoint as dcp

    from tiered.checkpoint import TieredStorageReader, TieredStorageWriter

    sd = {"a": torch.arange(100.0), "b": torch.ones(3)}
    path = tmp_path / "ck"
    w = TieredStorageWriter(path)
    orig_finish = w.finish

    def crash_before_commit(metadata, results):
        raise RuntimeError("simulated crash before the metadata commit")

    w.finish = crash_before_commit
    with pytest.raises(BaseException, match="simulated crash"):  # DCP wraps it in a BaseException
        dcp.save(sd, storage_writer=w)
    with pytest.raises(BaseException, match="no committed checkpoint"):
        dcp.load({"a": torch.zeros(100), "b": torch.zeros(3)}, storage_reader=TieredStorageReader(path))
    w.finish = orig_finish
    w.reset(path)
    dcp.save(sd, storage_writer=w)
    c = w._own_config()  # the store of this rank inside the checkpoint directory
    with TieredStore.shared(c) as store:
        assert len(store.retained("dcp:")) == 1  # the failed save's retention was released by the commit
    dest = {"a": torch.zeros(100), "b": torch.zeros(3)}
    dcp.load(dest, storage_reader=TieredStorageReader(path))
    assert_tree_same(dest, sd)
    doc = json.loads((path / ".metadata.json").read_text())
    part = next(info for fqn, _o, _i, info in doc["storage_data"] if fqn == "a")["parts"][0]
    assert not os.path.isabs(part["path"])  # in the checkpoint directory's own store
    with open(path / part["path"], "r+b") as f:
        f.seek(part["offset"] + 8)
        f.write(b"\xff")
    with pytest.raises(BaseException, match="crc32"):
        dcp.load({"a": torch.zeros(100), "b": torch.zeros(3)}, storage_reader=TieredStorageReader(path))




def test_dcp_relative_ids_live_on_the_storage_tier(tmp_path):
    from tiered.checkpoint import TieredStorageReader, TieredStorageWriter

    c = cfg(tmp_path)
    assert TieredStorageWriter("run1/step5", config=c).path == tmp_path / "nvme" / "dcp" / "run1" / "step5"
    assert TieredStorageReader("run1/step5", config=c, tier="flash").path == tmp_path / "flash" / "dcp" / "run1" / "step5"
    with pytest.raises(CheckpointError, match="tier='tape'.*known: nvme, flash"):
        TieredStorageWriter("x", config=c, tier="tape")
    with pytest.raises(CheckpointError, match="host_buffer"):
        TieredStorageWriter(tmp_path / "x", host_buffer="1MiB")
