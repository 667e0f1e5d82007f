"""FSDP2 (``fully_shard``) models trained with OffloadedAdamW: each rank updates its local shards
with the state in its own store shard ({rank} in the tier path), bitwise equal to FSDP2 with
torch.optim.AdamW; gloo on CPU, world sizes 2 and 3 (uneven shards, an empty one included)."""

from __future__ import annotations

import datetime

import pytest
import torch

from helpers import run_ranks

pytestmark = pytest.mark.timeout(180)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))


def _rank(rank: int, world: int, root: str, init: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tiered.optim import OffloadedAdamW

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        mesh = init_device_mesh("cpu", (world,))
        models = []
        for _ in range(2):
            m = _model()
            for layer in m:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            models.append(fully_shard(m, mesh=mesh))
        ref, ours = models
        cfg = {"tiers": {"host": {"capacity": "16MiB"}, "nvme": {"path": root + "/r{rank}", "capacity": "64MiB"}}}
        o_ref = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.1)
        with OffloadedAdamW(ours.parameters(), lr=0.05, weight_decay=0.1, config=cfg) as opt:
            assert opt.state_elements == sum(p.to_local().numel() for p in ours.parameters())
            for step in range(3):
                x = torch.randn(4, 8, generator=torch.Generator().manual_seed(10 * step + rank))
                for m, o in ((ref, o_ref), (ours, opt)):
                    m(x).square().sum().backward()
                    o.step()
                    o.zero_grad()
            for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
                assert torch.equal(a.to_local(), b.to_local()), f"rank {rank}: {name}"
            with pytest.raises(ValueError, match="DTensor.*max_grad_norm"):
                OffloadedAdamW(ours.parameters(), config=cfg, max_grad_norm=1.0)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_with_offloaded_adamw_is_bitwise_fsdp2_with_adamw(tmp_path, world):
    run_ranks(_rank, world, lambda r: (r, world, str(tmp_path / "store"), str(tmp_path / "init")))
    assert sorted(d.name for d in (tmp_path / "store").iterdir()) == [f"r{r}" for r in range(world)]
