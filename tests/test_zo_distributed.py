"""Distributed zeroth-order steps: two gloo ranks, each with its own store shard ({rank} in the
tier path) and its own half of every batch, the same seeds; only the two losses are all-reduced.
Every rank makes the same update, and the run equals one process stepping on whole batches up to
float rounding."""

from __future__ import annotations

import datetime

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import TINY_MODEL_MARKS, run_ranks, tiny_llama
from tiered.optim.zo import mezo_step

pytestmark = [pytest.mark.timeout(180), *TINY_MODEL_MARKS]
STEPS, LR, EPS = 3, 1e-3, 1e-3


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 256, (4, 16), generator=g) for _ in range(STEPS)]


def _rank(rank: int, world: int, root: str, init: str, out: str) -> None:
    import torch.distributed as dist

    import tiered
    from tiered.optim import ZOSGD

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        cfg = {"tiers": {"host": {"capacity": "4MiB"}, "nvme": {"path": root + "/r{rank}", "capacity": "256MiB"}},
               "offload": {"lookahead": 1, "resident": False}}
        model = tiered.offload(tiny_llama(), cfg)
        losses = []
        with ZOSGD(model, lr=LR, eps=EPS, seed=0) as zo:
            for ids in batches():
                shard = ids[rank::world]
                r = zo.step({"input_ids": shard})
                losses.append([r.loss_plus, r.loss_minus, r.projected_grad])
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        state["losses"] = torch.tensor(losses, dtype=torch.float64)
        save_file(state, out)
        tiered.detach(model)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_make_the_same_update_as_one_process_on_whole_batches(tmp_path):
    world = 2
    outs = [str(tmp_path / f"rank{r}.safetensors") for r in range(world)]
    run_ranks(_rank, world, lambda r: (r, world, str(tmp_path / "store"), str(tmp_path / "init"), outs[r]))
    assert (tmp_path / "store" / "r0").is_dir() and (tmp_path / "store" / "r1").is_dir()  # a shard each
    r0, r1 = load_file(outs[0]), load_file(outs[1])
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # the same losses, gradients and weights on every rank
    ref = tiny_llama()
    expected = [mezo_step(ref, {"input_ids": ids}, seed=i, lr=LR, eps=EPS) for i, ids in enumerate(batches())]
    got = r0.pop("losses")
    for i, e in enumerate(expected):
        # the losses agree to fp32 rounding (~1e-6); g = (L+ - L-) / 2 eps divides that by 2e-3
        assert got[i, :2].tolist() == pytest.approx([e.loss_plus, e.loss_minus], rel=1e-5)
        assert got[i, 2].item() == pytest.approx(e.projected_grad, abs=2e-3)
    ref_state = ref.state_dict()
    for k, v in r0.items():
        torch.testing.assert_close(v, ref_state[k], rtol=1e-5, atol=1e-5)  # lr x that g difference x |z|
