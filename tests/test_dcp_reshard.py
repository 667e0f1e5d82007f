"""Checkpoints that reshard: FSDP2 (``fully_shard``) model and optimizer state saved through
``TieredStorageWriter`` at one world size loads through ``TieredStorageReader`` at another (DCP's
planner reshards from the checkpoint's chunk metadata), equal to what was saved. gloo on CPU."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_ranks

pytestmark = pytest.mark.timeout(240)
JOIN_S = 150


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))


def _full(state) -> dict:
    """Every tensor of a (nested) state dict as a whole tensor, keyed by its dotted path."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _full(v).items()})
        elif isinstance(v, torch.Tensor):
            out[k] = v.full_tensor() if hasattr(v, "full_tensor") else v
    return out


def _worker(rank: int, world: int, mode: str, root: str, init: str, out: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from safetensors.torch import save_file

    from tiered.checkpoint import TieredStorageReader, TieredStorageWriter

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        mesh = init_device_mesh("cpu", (world,))
        model = _model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        if mode == "save":
            model(torch.ones(2, 8)).sum().backward()
            opt.step()
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, storage_writer=TieredStorageWriter(root))
            full = _full({"model": msd, "optim": osd})
            if rank == 0:
                save_file({k: v.contiguous() for k, v in full.items()}, out)  # the test's reference
        else:
            msd, osd = get_state_dict(model, opt)
            sd = {"model": msd, "optim": osd}
            dcp.load(sd, storage_reader=TieredStorageReader(root))
            set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
            msd, osd = get_state_dict(model, opt)
            full = _full({"model": msd, "optim": osd})
            if rank == 0:
                save_file({k: v.contiguous() for k, v in full.items()}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(world: int, mode: str, root: Path, tag: str, out: Path) -> None:
    init = str(root.parent / f"init-{tag}")  # fork: the parent holds no process group or engine threads
    run_ranks(_worker, world, lambda r: (r, world, mode, str(root), init, str(out)), timeout=JOIN_S)


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("save_world, load_worlds", [(2, (3, 1)), (1, (2,))])
def test_fsdp2_state_saved_at_one_world_size_loads_at_another(tmp_path, save_world, load_worlds):
    root = tmp_path / "ck"
    saved = tmp_path / "saved.safetensors"
    _run(save_world, "save", root, "save", saved)
    assert (root / ".metadata.json").is_file() and not list(root.glob("*.pkl"))
    for world in load_worlds:
        loaded = tmp_path / f"loaded{world}.safetensors"
        _run(world, "load", root, f"load{world}", loaded)
        ref, got = load_file(saved), load_file(loaded)
        assert any(k.startswith("optim.") for k in ref)  # moments and step, not only weights
        _same(got, ref)
    os.remove(saved)
