"""``add_param_group`` before ``open()`` adds parameters the optimizer then updates (bitwise
``torch.optim.AdamW`` with the same groups); after ``open()`` it is refused."""

from __future__ import annotations

import pytest
import torch

from helpers import offload_config
from tiered.optim import OffloadedAdamW, OptimStateError

pytestmark = pytest.mark.timeout(60)


def test_a_group_added_before_open_is_updated(tmp_path):
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(40)), torch.nn.Parameter(torch.randn(7, 3).bfloat16())
    ra, rb = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().float())
    ref = torch.optim.AdamW([ra], lr=0.1, foreach=False)
    ref.add_param_group({"params": [rb], "lr": 0.01})
    opt = OffloadedAdamW([a], lr=0.1, config=offload_config(tmp_path, "4MiB", nvme="64MiB"))
    opt.add_param_group({"params": [b], "lr": 0.01})
    with opt:
        for step in range(2):
            for p, r in ((a, ra), (b, rb)):
                r.grad = torch.full_like(r, 1.0 + step)
                p.grad = r.grad.to(p.dtype)
            opt.step()
            ref.step()
        assert torch.equal(a, ra) and torch.equal(b, rb.detach().bfloat16())
        with pytest.raises(OptimStateError, match="add_param_group after open"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
