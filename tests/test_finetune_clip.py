"""Gradient clipping and gradient accumulation with ``OffloadedAdamW`` over an offloaded model.

- deferred clipping (``max_grad_norm``, gradients parked in the store until the global norm
  is known) is bitwise ``clip_grad_norm_`` + ``torch.optim.AdamW`` in memory;
- ``grads="keep"`` leaves ``.grad`` to the caller's own ``clip_grad_norm_``: bitwise too;
- ``clip="per_unit"`` equals clipping each unit's gradients by their own norm;
- gradient accumulation over several backward passes works when gradients are deferred, and
  is refused with the parameter's name when each backward updates at once;
- bad input (another model's parameters, a parameter on the wrong device, bad arguments)
  gets a clear error.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tiered
from helpers import (TINY_MODEL_MARKS, offload_config, FT_VOCAB, finetune_config as cfg,
                     finetune_batch as batch)
from tiered.offload import offload_units
from tiered.optim import OffloadedAdamW, OptimStateError

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(120), *TINY_MODEL_MARKS]

VOCAB = FT_VOCAB
MAX_NORM = 0.5  # well below the tiny model's gradient norm: clipping is active


def build(arch: str = "llama"):
    torch.manual_seed(0)
    if arch == "gpt2":  # its head is tied to the token embedding: one parameter in two units
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0)).train()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).train()


def loss_of(model, x):
    return model(input_ids=x, labels=x).loss


def assert_same_weights(ref, model):
    sd = model.state_dict()
    for name, a in ref.state_dict().items():
        assert torch.equal(a, sd[name]), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_deferred_clipping_is_bitwise_clip_grad_norm(tmp_path, arch):
    ref = build(arch)
    model = tiered.offload(copy.deepcopy(ref), cfg(tmp_path))
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05)
    try:
        with OffloadedAdamW(model.parameters(), lr=1e-2, weight_decay=0.05, model=model,
                            max_grad_norm=MAX_NORM) as opt:
            assert opt.grads == "park"
            for step in range(3):
                x = batch(step)
                l_ref = loss_of(ref, x)
                l_ref.backward()
                norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
                assert norm_ref > MAX_NORM
                o_ref.step()
                o_ref.zero_grad()
                loss = loss_of(model, x)
                loss.backward()
                assert all(p.grad is None for p in model.parameters())  # parked, not in memory
                opt._wait_parked()  # the parking writes finish while backward goes on
                assert sum(k.startswith("adamw/g") for k in opt.store.keys()) == len(list(model.parameters()))
                opt.step()
                assert torch.equal(l_ref, loss), f"step {step}"
                assert torch.equal(opt.last_grad_norm, norm_ref), f"step {step}"
                assert not any(k.startswith("adamw/g") for k in opt.store.keys())  # used and deleted
        assert_same_weights(ref, model)
    finally:
        tiered.detach(model)


def test_keep_grads_lets_the_caller_clip(tmp_path):
    ref = build()
    model = tiered.offload(copy.deepcopy(ref), cfg(tmp_path))
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    try:
        with OffloadedAdamW(model.parameters(), lr=1e-2, model=model, grads="keep") as opt:
            for step in range(3):
                x = batch(step)
                loss_of(ref, x).backward()
                n_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
                o_ref.step()
                o_ref.zero_grad()
                loss_of(model, x).backward()
                n = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
                assert torch.equal(n, n_ref)
                opt.step()
                opt.zero_grad()
        assert_same_weights(ref, model)
    finally:
        tiered.detach(model)


def test_per_unit_clipping_scales_each_unit_by_its_own_norm(tmp_path):
    ref = build()
    model = tiered.offload(copy.deepcopy(ref), cfg(tmp_path))
    ref_params = dict(ref.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[ref_params[names[id(p)]] for p in u.params()] for u in offload_units(model)]
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    try:
        with OffloadedAdamW(model.parameters(), lr=1e-2, model=model, max_grad_norm=MAX_NORM,
                            clip="per_unit") as opt:
            assert opt.grads == "stream"
            for step in range(2):
                x = batch(step)
                loss_of(ref, x).backward()
                for g in groups:
                    torch.nn.utils.clip_grad_norm_(g, MAX_NORM)
                o_ref.step()
                o_ref.zero_grad()
                loss_of(model, x).backward()
                opt.step()
        assert_same_weights(ref, model)
    finally:
        tiered.detach(model)


@pytest.mark.parametrize("max_norm", [None, MAX_NORM])
def test_gradient_accumulation_with_parked_gradients(tmp_path, max_norm):
    ref = build()
    model = tiered.offload(copy.deepcopy(ref), cfg(tmp_path))
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    try:
        with OffloadedAdamW(model.parameters(), lr=1e-2, model=model, max_grad_norm=max_norm,
                            grads="park") as opt:
            for step in range(2):
                for micro in range(3):
                    x = batch(10 * step + micro)
                    (loss_of(ref, x) / 3).backward()
                    (loss_of(model, x) / 3).backward()
                if max_norm is not None:
                    n_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
                o_ref.step()
                o_ref.zero_grad()
                opt.step()
                if max_norm is not None:
                    assert torch.equal(opt.last_grad_norm, n_ref)
        assert_same_weights(ref, model)
    finally:
        tiered.detach(model)


def test_accumulation_while_streaming_names_the_parameter(tmp_path):
    model = tiered.offload(build(), cfg(tmp_path))
    try:
        with OffloadedAdamW(model.parameters(), lr=1e-2, model=model) as opt:
            assert opt.grads == "stream"
            loss_of(model, batch(0)).backward()
            with pytest.raises(OptimStateError, match=r"second gradient before step\(\).*grads='park'") as e:
                loss_of(model, batch(1)).backward()
            assert "model." in str(e.value) or "lm_head" in str(e.value)
    finally:
        tiered.detach(model)


def test_clipping_without_model_equals_clip_grad_norm(tmp_path):
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    mine = copy.deepcopy(ref)
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    with OffloadedAdamW(mine.parameters(), lr=1e-2, config=offload_config(tmp_path, "4MiB", nvme="64MiB"),
                        max_grad_norm=0.1) as opt:
        for step in range(3):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
            ref(x).square().sum().backward()
            n = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
            o_ref.step()
            o_ref.zero_grad()
            mine(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
            assert torch.equal(opt.last_grad_norm, n)
    for a, b in zip(ref.parameters(), mine.parameters()):
        assert torch.equal(a, b)


def test_parameters_of_another_model_are_refused(tmp_path):
    ref = build()
    model = tiered.offload(copy.deepcopy(ref), cfg(tmp_path))
    try:
        opt = OffloadedAdamW(ref.parameters(), lr=1e-2, model=model)
        with pytest.raises(ValueError, match=r"parameter 0 \(shape \(64, 32\)\) is not a parameter of the model"):
            opt.open()
    finally:
        tiered.detach(model)


def test_offloaded_parameters_without_model_are_refused(tmp_path):
    model = tiered.offload(build(), cfg(tmp_path))
    try:
        opt = OffloadedAdamW(model.parameters(), lr=1e-2, config=offload_config(tmp_path / "o", "4MiB", nvme="64MiB"))
        with pytest.raises(ValueError, match=r"parameter 0 .*sharing one memory location.*pass that model as model="):
            opt.open()
    finally:
        tiered.detach(model)


def test_parameter_on_the_wrong_device_is_named(tmp_path):
    ps = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3, device="meta"))]
    opt = OffloadedAdamW(ps, config=offload_config(tmp_path, "4MiB", nvme="64MiB"))
    with pytest.raises(ValueError, match=r"parameter 1 \(shape \(3,\)\) is on meta"):
        opt.open()


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_grad_norm=0.0), "max_grad_norm must be a finite number > 0"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm must be a finite number > 0"),
    (dict(clip="global"), "clip must be one of"),
    (dict(grads="host"), "grads must be one of"),
    (dict(grads="park"), "needs model="),
    (dict(max_grad_norm=1.0, clip="per_unit"), "without model= the chunks are not units"),
])
def test_bad_clipping_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OffloadedAdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_deferred_clipping_cannot_stream(tmp_path):
    model = tiered.offload(build(), cfg(tmp_path))
    try:
        with pytest.raises(ValueError, match="needs the global norm before any update"):
            OffloadedAdamW(model.parameters(), model=model, max_grad_norm=1.0, grads="stream")
    finally:
        tiered.detach(model)
