"""One config for every rank: ``{rank}``/``{local_rank}`` in tier paths, one store shard per rank,
and a shard refused to another rank or another world size (recorded in its manifest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiered
from tiered import ranks
from tiered.config import ConfigError, load_config
from tiered.store import MANIFEST, StoreError

RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@pytest.fixture
def no_rank_env(monkeypatch):
    for v in RANK_VARS:
        monkeypatch.delenv(v, raising=False)
    return monkeypatch


def rank_config(tmp_path: Path, path: str = "shard-{rank}") -> dict:
    return {"tiers": {"host": {"capacity": "4MiB"}, "nvme": {"path": str(tmp_path / path), "capacity": "8MiB"}},
            "engine": {"workers": 1, "chunk": "1MiB"}}


def test_paths_take_the_rank_from_the_environment(tmp_path, no_rank_env):
    assert load_config(rank_config(tmp_path, "r{rank}-l{local_rank}")).storage_tiers[0].path.name == "r0-l0"
    for k, v in {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}.items():
        no_rank_env.setenv(k, v)
    assert load_config(rank_config(tmp_path, "r{rank}-l{local_rank}")).storage_tiers[0].path.name == "r5-l1"


@pytest.mark.parametrize("path, env, match", [
    ("shard-{rnak}", {}, r"tiers\.nvme\.path.*unknown placeholder \{rnak\}.*\{rank\} or \{local_rank\}"),
    ("shard-{rank}", {"RANK": "x", "WORLD_SIZE": "2"}, r"tiers\.nvme\.path.*RANK='x'.*non-negative integer"),
    ("shard-{rank}", {"RANK": "2", "WORLD_SIZE": "2"}, r"RANK=2 and WORLD_SIZE=2"),
    ("shard-{rank}", {"RANK": "1"}, r"RANK=1 is set but WORLD_SIZE is not"),
])
def test_bad_placeholders_and_rank_variables_are_config_errors(tmp_path, no_rank_env, path, env, match):
    for k, v in env.items():
        no_rank_env.setenv(k, v)
    with pytest.raises(ConfigError, match=match):
        load_config(rank_config(tmp_path, path))


def set_ranks(env, rank: int, local_rank: int, world: int) -> None:
    env.setenv("RANK", str(rank))
    env.setenv("LOCAL_RANK", str(local_rank))
    env.setenv("WORLD_SIZE", str(world))


def test_a_shard_is_refused_to_another_rank(tmp_path, no_rank_env):
    """Node-local paths ({local_rank}): rank 1 wrote /shard-0 on a node where another job makes rank 0
    (or rank 2) local rank 0."""
    cfg = rank_config(tmp_path, "shard-{local_rank}")
    set_ranks(no_rank_env, 1, 0, 2)
    with tiered.TieredStore(cfg) as store:
        store.put("w", torch.ones(8)).result(timeout=30)
        manifest = store.root / MANIFEST
    assert json.loads(manifest.read_text())["layout"] == {"rank": 1, "local_rank": 0, "world_size": 2}
    for rank, world in ((0, 2), (2, 4)):
        set_ranks(no_rank_env, rank, 0, world)
        with pytest.raises(StoreError, match=rf"{manifest}: this store shard was written by rank 1 of world size "
                                             rf"2, and this process is rank {rank} of world size {world}"):
            tiered.TieredStore(cfg).open()
    set_ranks(no_rank_env, 1, 0, 2)
    with tiered.TieredStore(cfg) as store:  # its own rank opens it again
        assert torch.equal(store.get("w").result(timeout=30), torch.ones(8))


def test_a_shard_is_refused_to_another_world_size(tmp_path, no_rank_env):
    cfg = rank_config(tmp_path, "rank{rank}")
    set_ranks(no_rank_env, 0, 0, 2)
    with tiered.TieredStore(cfg) as store:
        store.put("w", torch.ones(8)).result(timeout=30)
        manifest = store.root / MANIFEST
    no_rank_env.delenv("RANK")
    no_rank_env.delenv("LOCAL_RANK")
    no_rank_env.delenv("WORLD_SIZE")  # a single process: rank 0 of 1, the same path
    with pytest.raises(StoreError, match=rf"{manifest}: this store shard was written by rank 0 of world size 2, "
                                         r"and this process is rank 0 of world size 1"):
        tiered.TieredStore(cfg).open()


def test_a_store_at_a_fixed_path_records_the_layout_but_any_process_may_open_it(tmp_path, no_rank_env):
    """Not a per-rank shard (no placeholder): e.g. a distributed checkpoint's store read by a job of
    another world size. Its manifest records who wrote it last."""
    cfg = rank_config(tmp_path, "fixed")
    set_ranks(no_rank_env, 1, 1, 2)
    with tiered.TieredStore(cfg) as store:
        store.put("w", torch.ones(8)).result(timeout=30)
        manifest = store.root / MANIFEST
    assert json.loads(manifest.read_text())["layout"] == {"rank": 1, "local_rank": 1, "world_size": 2}
    set_ranks(no_rank_env, 0, 0, 1)
    with tiered.TieredStore(cfg) as store:
        assert torch.equal(store.get("w").result(timeout=30), torch.ones(8))
        store.put("v", torch.zeros(2)).result(timeout=30)
    assert json.loads(manifest.read_text())["layout"] == {"rank": 0, "local_rank": 0, "world_size": 1}


def test_a_manifest_without_a_layout_is_adopted(tmp_path, no_rank_env):
    cfg = rank_config(tmp_path)
    with tiered.TieredStore(cfg) as store:
        store.put("w", torch.ones(8)).result(timeout=30)
        path = store.root / MANIFEST
    doc = json.loads(path.read_text())
    del doc["layout"]
    path.write_text(json.dumps(doc))
    with tiered.TieredStore(cfg) as store:
        store.put("w", torch.zeros(8)).result(timeout=30)
    assert json.loads(path.read_text())["layout"] == {"rank": 0, "local_rank": 0, "world_size": 1}


def test_torch_distributed_gives_the_rank_when_initialised(tmp_path, no_rank_env):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        no_rank_env.setenv("RANK", "3")  # ignored: the process group is the truth
        no_rank_env.setenv("WORLD_SIZE", "7")
        assert ranks.current() == ranks.Ranks(0, 0, 1)
    finally:
        dist.destroy_process_group()


CHILD = """
import json, sys, torch, torch.distributed as dist
import tiered
rank, cfg, init = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
try:
    with tiered.TieredStore(cfg) as store:  # one config; each rank opens its own shard
        store.put("w", torch.full((4,), float(rank))).result(timeout=30)
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t)
        print(json.dumps({"root": str(store.root), "sum": t.item()}))
finally:
    dist.destroy_process_group()
"""


def test_two_ranks_one_config_open_their_own_shards(tmp_path):
    cfg = rank_config(tmp_path, "job/rank{rank}")
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    env["PYTHONPATH"] = str(Path(tiered.__file__).parent.parent)
    init = f"file://{tmp_path / 'pg'}"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(r), json.dumps(cfg), init], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert [o["root"] for o in outs] == [str(tmp_path / "job" / f"rank{r}") for r in range(2)]
    assert all(o["sum"] == 3.0 for o in outs)
    for r in range(2):
        doc = json.loads((tmp_path / "job" / f"rank{r}" / MANIFEST).read_text())
        assert doc["layout"] == {"rank": r, "local_rank": r, "world_size": 2}
    # rank 1's shard, opened by a process that says it is rank 1 of 2, holds rank 1's tensor
    env.update(RANK="1", WORLD_SIZE="2")
    check = ("import json, sys, tiered; s = tiered.TieredStore(json.loads(sys.argv[1])).open(); "
             "print(s.root, s.get('w').result(timeout=30).tolist()); s.close()")
    r = subprocess.run([sys.executable, "-c", check, json.dumps(cfg)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == [str(tmp_path / "job" / "rank1"), "[1.0,", "1.0,", "1.0,", "1.0]"]


def test_ranks_sharing_a_path_are_told_to_put_rank_in_it(tmp_path):
    """Rank 1 finds the directory held by rank 0's process: the error says why and what to do."""
    cfg = rank_config(tmp_path, "no-template")
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    env["PYTHONPATH"] = str(Path(tiered.__file__).parent.parent)
    holder = ("import json, sys, tiered; s = tiered.TieredStore(json.loads(sys.argv[1])).open(); "
              "print('open', flush=True); sys.stdin.read(); s.close()")
    p = subprocess.Popen([sys.executable, "-c", holder, json.dumps(cfg)], env={**env, "RANK": "0", "WORLD_SIZE": "2"},
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "open"
        probe = ("import json, sys, tiered\ntry:\n    tiered.TieredStore(json.loads(sys.argv[1])).open()\n"
                 "except tiered.StoreError as e:\n    print(e)")
        r = subprocess.run([sys.executable, "-c", probe, json.dumps(cfg)], env={**env, "RANK": "1", "WORLD_SIZE": "2"},
                           capture_output=True, text=True, timeout=120)
    finally:
        p.communicate(input="", timeout=60)
    assert f"open in another process (pid {p.pid}" in r.stdout
    assert "this process is rank 1 (local rank 1) of world size 2" in r.stdout and "put {rank}" in r.stdout


@pytest.mark.parametrize("env", [{"LOCAL_RANK": "-1"}, {"RANK": "1"}, {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "x"}])
def test_a_fixed_path_store_opens_despite_stray_rank_variables(tmp_path, no_rank_env, env):
    """Nothing is checked at a fixed path, so bad rank variables meant for something else do not matter:
    the layout is recorded as unknown."""
    for k, v in env.items():
        no_rank_env.setenv(k, v)
    with tiered.TieredStore(rank_config(tmp_path, "fixed")) as store:
        store.put("w", torch.ones(2)).result(timeout=30)
        manifest = store.root / MANIFEST
    assert json.loads(manifest.read_text())["layout"] is None


def test_an_empty_shard_is_adopted_by_another_layout(tmp_path, no_rank_env):
    """A shard whose objects were all deleted holds nothing of its rank: another layout takes it over."""
    cfg = rank_config(tmp_path, "r{rank}")
    set_ranks(no_rank_env, 0, 0, 2)
    with tiered.TieredStore(cfg) as store:
        store.put("w", torch.ones(2)).result(timeout=30)
        store.delete("w")
        manifest = store.root / MANIFEST
    set_ranks(no_rank_env, 0, 0, 4)
    with tiered.TieredStore(cfg) as store:
        store.put("v", torch.zeros(2)).result(timeout=30)
    assert json.loads(manifest.read_text())["layout"] == {"rank": 0, "local_rank": 0, "world_size": 4}
