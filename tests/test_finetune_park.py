"""Gradient accumulation into parked gradients (``grads="park"``) waits only for the parameter's
own earlier write, and the read of what was parked starts when the unit's backward begins."""

from __future__ import annotations

import copy

import pytest
import torch

import tiered
from helpers import TINY_MODEL_MARKS, offload_config, FT_VOCAB, finetune_llama as build
from tiered.optim import OffloadedAdamW

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(120), *TINY_MODEL_MARKS]

VOCAB = FT_VOCAB


def test_accumulation_waits_for_its_own_write_and_reads_ahead(tmp_path):
    ref = build()
    model = tiered.offload(copy.deepcopy(ref), offload_config(tmp_path, "1MiB", nvme="128MiB", lookahead=1,
                                                              resident=False))
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    try:
        with OffloadedAdamW(model.parameters(), lr=1e-2, model=model, grads="park") as opt:
            waits_all, ahead = [], []
            wait, park = opt._wait_parked, opt._park

            def spy_wait(i=None):
                waits_all.append(i is None)
                return wait(i)

            def spy_park(i):
                ahead.append((i, i in opt._grad_reads))
                return park(i)

            opt._wait_parked, opt._park = spy_wait, spy_park
            for micro in range(2):
                x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(micro))
                (ref(input_ids=x, labels=x).loss / 2).backward()
                waits_all.clear()
                ahead.clear()
                (model(input_ids=x, labels=x).loss / 2).backward()
            assert not any(waits_all)  # the second backward never waited for every parked write
            # every read started when its unit's backward began, but the embedding's (whose backward
            # reads no weights: no unit load to start it at)
            assert [i for i, a in ahead if not a] == [0]
            o_ref.step()
            opt.step()
        sd = model.state_dict()
        for name, a in ref.state_dict().items():
            assert torch.equal(a, sd[name]), name
    finally:
        tiered.detach(model)
