"""An offloaded backbone and an in-memory head trained by one ``OffloadedAdamW`` (``model=`` the
backbone, parameters of both): bitwise ``torch.optim.AdamW`` in memory. What looks like an
un-offloaded copy of the model is still refused, and so is ``clip="per_unit"`` for parameters
that are in no unit."""

from __future__ import annotations

import copy

import pytest
import torch

import tiered
from helpers import TINY_MODEL_MARKS, FT_VOCAB, finetune_llama as build, finetune_config as cfg
from tiered.optim import OffloadedAdamW

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(120), *TINY_MODEL_MARKS]

VOCAB = FT_VOCAB


def loss_of(model, head, step):
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(step))
    return head(model(input_ids=x).logits).square().mean()


@pytest.mark.parametrize("grads", ["stream", "keep"])
def test_offloaded_backbone_with_an_in_memory_head(tmp_path, grads):
    ref = build()
    torch.manual_seed(1)
    ref_head = torch.nn.Linear(VOCAB, 3)
    model, head = tiered.offload(copy.deepcopy(ref), cfg(tmp_path)), copy.deepcopy(ref_head)
    o_ref = torch.optim.AdamW(list(ref.parameters()) + list(ref_head.parameters()), lr=1e-2)
    try:
        with OffloadedAdamW(list(model.parameters()) + list(head.parameters()), lr=1e-2, model=model,
                            grads=grads) as opt:
            for step in range(2):
                loss_of(ref, ref_head, step).backward()
                o_ref.step()
                o_ref.zero_grad()
                loss_of(model, head, step).backward()
                opt.step()
                opt.zero_grad()
        sd = model.state_dict()
        for name, a in ref.state_dict().items():
            assert torch.equal(a, sd[name]), name
        for a, b in zip(ref_head.parameters(), head.parameters()):
            assert torch.equal(a, b)
    finally:
        tiered.detach(model)


def test_an_unoffloaded_copy_beside_the_model_is_refused(tmp_path):
    ref = build()
    model = tiered.offload(copy.deepcopy(ref), cfg(tmp_path))
    try:
        opt = OffloadedAdamW(list(model.parameters()) + list(ref.parameters()), lr=1e-2, model=model)
        with pytest.raises(ValueError, match=r"shaped like every parameter of the model"):
            opt.open()
        named = list(model.named_parameters())[1:] + list(ref.named_parameters())[:1]
        opt = OffloadedAdamW(named, lr=1e-2, model=model)
        with pytest.raises(ValueError, match=r"named 'model.embed_tokens.weight' like a parameter of the model"):
            opt.open()
    finally:
        tiered.detach(model)


def test_per_unit_clipping_refuses_a_parameter_in_no_unit(tmp_path):
    model = tiered.offload(build(), cfg(tmp_path))
    head = torch.nn.Linear(VOCAB, 3)
    try:
        opt = OffloadedAdamW(list(model.parameters()) + list(head.parameters()), lr=1e-2, model=model,
                             max_grad_norm=1.0, clip="per_unit")
        with pytest.raises(ValueError, match=r"clip='per_unit' .* parameter 21 \(shape \(3, 64\)\) is in no unit"):
            opt.open()
    finally:
        tiered.detach(model)
