"""Deferred clipping's global norm is bitwise ``clip_grad_norm_``'s whatever the param groups
and dtypes: with ``model=`` the per-tensor norms are stacked in ``model.parameters()`` order,
and grouped by device and dtype as torch groups them."""

from __future__ import annotations

import copy

import pytest
import torch

import tiered
from helpers import TINY_MODEL_MARKS, offload_config, FT_VOCAB, finetune_batch as batch
from tiered.optim import OffloadedAdamW
from tiered.optim.clipping import grad_norms, total_norm

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(120), *TINY_MODEL_MARKS]

VOCAB = FT_VOCAB


def build():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)).train()


def groups(model):
    """No-decay parameters first: the optimizer's order is not the model's."""
    nodecay = [p for p in model.parameters() if p.dim() < 2]
    decay = [p for p in model.parameters() if p.dim() >= 2]
    return [{"params": nodecay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.05}]


def test_param_groups_in_another_order_than_the_model(tmp_path):
    ref = build()
    model = tiered.offload(copy.deepcopy(ref), offload_config(tmp_path, "1MiB", nvme="128MiB", lookahead=1,
                                                              resident=False))
    o_ref = torch.optim.AdamW(groups(ref), lr=1e-2)
    try:
        with OffloadedAdamW(groups(model), lr=1e-2, model=model, max_grad_norm=0.5) as opt:
            for step in range(3):
                x = batch(step)
                ref(input_ids=x, labels=x).loss.backward()
                n_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
                o_ref.step()
                o_ref.zero_grad()
                model(input_ids=x, labels=x).loss.backward()
                opt.step()
                assert torch.equal(opt.last_grad_norm, n_ref), step
        sd = model.state_dict()
        for name, a in ref.state_dict().items():
            assert torch.equal(a, sd[name]), name
    finally:
        tiered.detach(model)


def test_total_norm_groups_dtypes_as_torch():
    torch.manual_seed(0)
    for _trial in range(50):
        dts = [torch.float32, torch.bfloat16, torch.float16]
        gs = [(torch.randn(int(torch.randint(1, 300, ()))) * 10 ** torch.randn(())).to(dts[int(torch.randint(0, 3, ()))])
              for _ in range(12)]
        ref = torch.nn.utils.get_total_norm(gs, 2.0)
        assert torch.equal(total_norm([((g.device, g.dtype), n) for g, n in zip(gs, grad_norms(gs))]), ref)


def test_mixed_dtypes_in_memory(tmp_path):
    for seed in range(6):
        torch.manual_seed(seed)
        ps = [torch.nn.Parameter(torch.randn(n).to(dt)) for n, dt in
              ((300, torch.float32), (200, torch.bfloat16), (100, torch.float32), (50, torch.bfloat16))]
        ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        for p, r in zip(ps, ref):
            p.grad = torch.randn(p.shape).to(p.dtype) * 3
            r.grad = p.grad.clone()
        n_ref = torch.nn.utils.clip_grad_norm_(ref, 0.5)
        with OffloadedAdamW(ps, lr=1e-2, config=offload_config(tmp_path / str(seed), "4MiB", nvme="64MiB"),
                            max_grad_norm=0.5) as opt:
            opt.step()
            assert torch.equal(opt.last_grad_norm, n_ref), seed
