"""DistributedCheckpointer: lazy per-rank snapshots of an FSDP2 model and its optimizer (gloo on
CPU, each rank in its own store shard) committed as global steps; loaded back at the same world
size in place, and at other world sizes through DCP's resharding; a rank that dies between its
local commit and the global one leaves every rank at the previous global step."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_ranks

pytestmark = pytest.mark.timeout(120)
JOIN_S = 60
COLL_S = 15.0  # the checkpointer's collective timeout


def _cfg(root: str) -> dict:
    return {"tiers": {"host": {"capacity": "32MiB"}, "nvme": {"path": root + "/r{rank}", "capacity": "64MiB"}},
            "engine": {"workers": 1}}


def _init(rank: int, world: int, init: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))


def _fsdp_model(world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))  # at 3: an empty shard
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _train(model, opt, step: int) -> None:
    model(torch.randn(2, 8, generator=torch.Generator().manual_seed(step))).square().sum().backward()
    opt.step()
    opt.zero_grad()


def _full(state, prefix: str = "") -> dict:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_full(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
    return out


def _local(state) -> dict:
    return {k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in _full_refs(state).items()}


def _full_refs(state, prefix: str = "") -> dict:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_full_refs(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def _fsdp_rank(rank: int, world: int, root: str, init: str, out: str) -> None:
    """Save two steps lazily (the optimizer attached), move on, load the last one back in place."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from tiered.checkpoint import DistributedCheckpointer

    _init(rank, world, init)
    try:
        model = _fsdp_model(world)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        with DistributedCheckpointer(_cfg(root), host_buffer="8MiB", prefault=False, timeout=COLL_S) as ck:
            ck.attach(opt)
            for step in (1, 2):
                _train(model, opt, step)
                msd, osd = get_state_dict(model, opt)
                h = ck.save({"model": msd, "optim": osd}, step)
                _train(model, opt, 100 + step)  # mutates after the save returned: the guard waits
                h.wait(JOIN_S)
                if step == 1:
                    with pytest.raises(Exception, match="globally committed already"):
                        ck.save({"model": msd}, 1)
            # what step 2 saved: the state before the training step that followed it
            assert ck.latest() == 2 and sorted(ck.steps()) == [1, 2]
            msd, osd = get_state_dict(model, opt)
            sd = {"model": msd, "optim": osd}
            ck.load(into=sd)
            set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
            msd, osd = get_state_dict(model, opt)
            restored_local = _local({"model": msd, "optim": osd})
            full = _full({"model": msd, "optim": osd})
            # the reference: a fresh run to step 2 without checkpoints
            ref_model = _fsdp_model(world)
            ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=0.1)
            _train(ref_model, ref_opt, 1)
            _train(ref_model, ref_opt, 101)
            _train(ref_model, ref_opt, 2)
            rm, ro = get_state_dict(ref_model, ref_opt)
            ref_local = _local({"model": rm, "optim": ro})
            assert sorted(restored_local) == sorted(ref_local)
            for k in ref_local:
                assert torch.equal(restored_local[k], ref_local[k]), f"rank {rank}: {k}"
            if rank == 0:
                save_file({k: v.contiguous() for k, v in full.items()}, out)
                assert (ck.global_directory / "step-000000000002" / ".metadata.json").is_file()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _reshard_rank(rank: int, world: int, global_dir: str, init: str, out: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from tiered.checkpoint import load_resharded

    _init(rank, world, init)
    try:
        model = _fsdp_model(world)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        _train(model, opt, 7)  # optimizer state exists, with other values than saved
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        assert load_resharded(sd, global_dir) == 2
        assert sd["optim"]["state"]
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        msd, osd = get_state_dict(model, opt)
        full = _full({"model": msd, "optim": osd})
        if rank == 0:
            save_file({k: v.contiguous() for k, v in full.items()}, out)
        if world == 1:  # rank 0's checkpoints, opened at world 1 (a store of its own): load() refuses
            from tiered.checkpoint import CheckpointError, DistributedCheckpointer

            rank0_dir = Path(global_dir).parent / "default"
            cfg = _cfg(str(Path(global_dir).parents[3] / "world1"))
            with DistributedCheckpointer(cfg, directory=rank0_dir, global_directory=global_dir, host_buffer="8MiB",
                                         prefault=False, timeout=COLL_S) as ck:
                assert ck.latest() == 2
                with pytest.raises(CheckpointError, match="saved by a world of 2 ranks.*load_resharded"):
                    ck.load(into=sd)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _save_run(tmp: Path, world: int) -> tuple[Path, Path]:
    root, saved = tmp / "store", tmp / "saved.st"
    run_ranks(_fsdp_rank, world, lambda r: (r, world, str(root), str(tmp / "init"), str(saved)), timeout=JOIN_S)
    assert sorted(d.name for d in root.iterdir()) == [f"r{r}" for r in range(world)]
    return root, saved


@pytest.fixture(scope="module")
def saved_at_2(tmp_path_factory) -> tuple[Path, Path]:
    """Step 2 saved by a world of 2 ranks (checked in the ranks), and its full tensors."""
    return _save_run(tmp_path_factory.mktemp("at2"), 2)


def test_fsdp2_steps_commit_globally_and_load_back_in_place_at_2(saved_at_2):
    root, _saved = saved_at_2
    assert (root / "r0" / "checkpoints" / "default.global" / "step-000000000002" / ".metadata.json").is_file()


def _reshard_runs(root: Path, saved: Path, tmp_path: Path, worlds) -> None:
    gdir = root / "r0" / "checkpoints" / "default.global"
    for world in worlds:
        out = tmp_path / f"loaded{world}.st"
        run_ranks(_reshard_rank, world, lambda r: (r, world, str(gdir), str(tmp_path / f"init{world}"), str(out)),
                  timeout=JOIN_S)
        ref, got = load_file(saved), load_file(out)
        assert sorted(ref) == sorted(got) and any(k.startswith("optim.") for k in ref)
        for k in ref:
            assert torch.equal(ref[k], got[k]), (world, k)


def test_fsdp2_steps_commit_globally_and_load_back_in_place_at_3_and_reshard_to_2(tmp_path):
    root, saved = _save_run(tmp_path, 3)  # the last layer's shards: 1, 1 and 0 rows
    _reshard_runs(root, saved, tmp_path, (2,))


def test_saved_at_2_loads_at_1_and_3_through_dcp(saved_at_2, tmp_path):
    _reshard_runs(*saved_at_2, tmp_path, (1, 3))


# -------------------------------------------------------------------- a rank dies before the global commit


def _state(rank: int, step: int) -> dict:
    """Plain tensors of one key are one replicated tensor to DCP: same shape on every rank (the
    values may differ: each rank loads its own at the same world size)."""
    return {"w": torch.arange(10, dtype=torch.float32) * (step + 1) + rank, "meta": {"step": step}}


def _crash_rank(rank: int, world: int, root: str, init: str, phase: str) -> None:
    import torch.distributed as dist

    from tiered.checkpoint import CheckpointError, DistributedCheckpointer

    _init(rank, world, init)
    try:
        ck = DistributedCheckpointer(_cfg(root), host_buffer="8MiB", prefault=False, timeout=COLL_S).open()
        try:
            if phase == "crash":
                ck.save(_state(rank, 1), 1).wait(JOIN_S)
                if rank == 1:  # dies once its step 2 is durable here, before the ranks agree
                    ck._agree = lambda step, ok: os._exit(0)
                h = ck.save(_state(rank, 2), 2)
                with pytest.raises(CheckpointError):
                    h.wait(JOIN_S)
                assert ck.latest() == 1 and sorted(ck.local_steps()) == [1, 2]
                with pytest.raises(CheckpointError):
                    ck.wait_all(JOIN_S)
                with pytest.raises(CheckpointError, match="rejoin"):  # its group is gone: fails at once
                    ck.save(_state(rank, 3), 3).wait(JOIN_S)
            else:
                assert ck.latest() == 1 and sorted(ck.steps()) == [1]
                assert sorted(ck.local_steps()) == [1]  # the step 2 this rank committed alone is gone
                got = ck.load()
                assert got["meta"] == {"step": 1} and torch.equal(got["w"], _state(rank, 1)["w"])
                ck.save(_state(rank, 2), 2).wait(JOIN_S)  # the step is saved again, and commits now
                assert ck.latest() == 2
        finally:
            ck.close()
    finally:
        dist.destroy_process_group()


def test_rank_killed_between_local_and_global_commit_resumes_every_rank_at_previous_step(tmp_path):
    root = str(tmp_path / "store")
    run_ranks(_crash_rank, 2, lambda r: (r, 2, root, str(tmp_path / "init1"), "crash"), timeout=JOIN_S)
    gdir = tmp_path / "store" / "r0" / "checkpoints" / "default.global"
    assert sorted(p.name for p in gdir.iterdir() if p.name.startswith("step-")) == ["step-000000000001"]
    run_ranks(_crash_rank, 2, lambda r: (r, 2, root, str(tmp_path / "init2"), "resume"), timeout=JOIN_S)


def _disagree_rank(rank: int, world: int, root: str, init: str) -> None:
    import torch.distributed as dist

    from tiered.checkpoint import CheckpointError, DistributedCheckpointer

    _init(rank, world, init)
    try:
        with DistributedCheckpointer(_cfg(root), host_buffer="8MiB", prefault=False, timeout=COLL_S) as ck:
            bad = {"w": torch.zeros(3 + rank)}  # one key, two shapes: no DCP view of it
            with pytest.raises(CheckpointError, match="'w' is float32\\[4\\] on rank 1.*replicated"):
                ck.save(bad, 1).wait(JOIN_S)
            assert ck.latest() is None
            ck.save(_state(rank, 2), 2).wait(JOIN_S)  # every rank failed step 1 knowingly: the group goes on
            assert ck.latest() == 2 and sorted(ck.local_steps()) == [2]
    finally:
        dist.destroy_process_group()


def test_a_step_every_rank_fails_knowingly_leaves_the_group_usable(tmp_path):
    run_ranks(_disagree_rank, 2, lambda r: (r, 2, str(tmp_path / "store"), str(tmp_path / "init")), timeout=JOIN_S)
