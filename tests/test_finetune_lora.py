"""LoRA (peft) over a base wrapped by ``tiered.offload``, trained with ``OffloadedAdamW``.

- offload the base, then ``peft.get_peft_model``: the adapters stay in memory, the frozen base
  is streamed from storage, only the adapters get optimizer state, and training (with
  clipping) is bitwise the same PEFT training in memory; the adapters save with peft;
- ``get_peft_model`` first, then offload: the adapters are streamed inside the units; also
  bitwise equal;
- a parameter frozen when the optimizer opened that later gets a gradient is an error.
"""

from __future__ import annotations

import pytest
import torch

import tiered
from helpers import TINY_MODEL_MARKS, finetune_llama as build, finetune_config as cfg, finetune_batch as batch
from tiered.offload import offload_units
from tiered.optim import OffloadedAdamW, OptimStateError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.timeout(120), *TINY_MODEL_MARKS]


def lora_config():
    # random B as well as A, so that the adapters change the loss from the first step
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                           init_lora_weights=False)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def train_both(ref, model, opt, steps=3, max_norm=None):
    o_ref = torch.optim.AdamW(trainable(ref).values(), lr=1e-2)
    for step in range(steps):
        x = batch(step)
        l_ref = ref(input_ids=x, labels=x).loss
        l_ref.backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        o_ref.step()
        o_ref.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.equal(l_ref, loss), f"step {step}: {l_ref.item()} != {loss.item()}"


def test_lora_over_an_offloaded_base_is_bitwise_in_memory_peft(tmp_path):
    ref = peft.get_peft_model(build(), lora_config())
    base = tiered.offload(build(), cfg(tmp_path))
    torch.manual_seed(0)
    model = peft.get_peft_model(base, lora_config())
    store = offload_units(model).store
    with torch.no_grad():  # the same adapters as the reference's
        mine = trainable(model)
        for n, p in trainable(ref).items():
            mine[n].copy_(p)
    adapters = sum(p.numel() for p in trainable(model).values())
    frozen_before = {n: p.clone() for n, p in ref.named_parameters() if not p.requires_grad}
    try:
        # every parameter passed, as users do: the frozen base gets no state
        with OffloadedAdamW(model.parameters(), lr=1e-2, model=model, max_grad_norm=0.05) as opt:
            assert opt.state_elements == adapters
            read0 = store.stats()["tiers"]["nvme"]["bytes_read"]
            train_both(ref, model, opt, max_norm=0.05)
            assert store.stats()["tiers"]["nvme"]["bytes_read"] > read0  # the base is streamed
        sd = model.state_dict()
        for n, p in ref.named_parameters():
            assert torch.equal(p, sd[n]), n
        for n, p in frozen_before.items():
            assert torch.equal(p, sd[n]), n  # the base did not change
        model.save_pretrained(tmp_path / "adapter")
        saved = peft.utils.load_peft_weights(str(tmp_path / "adapter"))
        ref_saved = peft.get_peft_model_state_dict(ref)
        assert saved.keys() == ref_saved.keys()
        for k, v in ref_saved.items():
            assert torch.equal(v, saved[k]), k
    finally:
        tiered.detach(base)


def test_peft_then_offload_streams_the_adapters_with_their_units(tmp_path):
    ref = peft.get_peft_model(build(), lora_config())
    torch.manual_seed(0)
    model = peft.get_peft_model(build(), lora_config())  # the same adapters (same seed)
    tiered.offload(model, cfg(tmp_path))
    try:
        with OffloadedAdamW(model.parameters(), lr=1e-2, model=model) as opt:
            assert all(c.unit is not None for c in opt._chunks)
            assert sum(c.numel for c in opt._chunks) == sum(p.numel() for p in trainable(model).values())
            train_both(ref, model, opt)
        sd = model.state_dict()
        for n, p in ref.named_parameters():
            assert torch.equal(p, sd[n]), n
    finally:
        tiered.detach(model)


def test_a_parameter_unfrozen_after_open_is_an_error(tmp_path):
    base = tiered.offload(build(), cfg(tmp_path))
    model = peft.get_peft_model(base, lora_config())
    try:
        with OffloadedAdamW(model.parameters(), lr=1e-2, model=model) as opt:
            head = model.base_model.model.lm_head.weight
            head.requires_grad_(True)
            x = batch(0)
            model(input_ids=x, labels=x).loss.backward()
            with pytest.raises(OptimStateError, match=r"lm_head.weight.*frozen \(requires_grad=False\)"):
                opt.step()
            opt.zero_grad()
    finally:
        tiered.detach(base)
