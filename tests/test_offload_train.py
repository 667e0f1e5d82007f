"""Training a model wrapped by ``tiered.offload`` (CPU, fp32, weights and state on storage).

What is proved here:

- backward alone: with every unit streamed, gradients are bitwise equal to the
  in-memory model's, and the weights really are fetched again in backward
  (saved tensors that view a unit's weights are not kept in memory);
- with ``OffloadedAdamW(model=...)`` the loss curve and the final weights are
  bitwise equal to in-memory ``torch.optim.AdamW`` training, on tiny Llama
  (GQA) and GPT-2 (tied embeddings, so one parameter lives in two units), with
  lookahead 0/1/2 and resident units on/off; gradients are released during
  backward, the host budget holds, the optimizer state is read from storage;
- a model that cannot be trained this way says why (bundled layout).
"""

from __future__ import annotations

import copy

import pytest
import torch

import tiered
from helpers import TINY_MODEL_MARKS, offload_config, tiny_llama
from tiered import OffloadError
from tiered.offload import offload_units
from tiered.optim import OffloadedAdamW

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(60), *TINY_MODEL_MARKS]

VOCAB = 128


def build(arch: str):
    if arch == "llama":  # in training mode, as built
        return tiny_llama(vocab=VOCAB, layers=6, positions=64, pad_token_id=None).train()
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=6, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def cfg(tmp_path, host="2MiB", lookahead=1, resident=False) -> dict:
    return offload_config(tmp_path, host, nvme="256MiB", lookahead=lookahead, resident=resident)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(step))


def host_capacity(store) -> int:
    return store.stats()["tiers"]["host"]["capacity"]


def nvme_read(store) -> int:
    return store.stats()["tiers"]["nvme"]["bytes_read"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_backward_gradients_are_bitwise_equal(tmp_path, arch):
    ref = build(arch)
    model = tiered.offload(copy.deepcopy(ref), cfg(tmp_path, lookahead=1))
    rt = model._tiered
    try:
        x = batch(0)
        ref(input_ids=x, labels=x).loss.backward()
        loss = model(input_ids=x, labels=x).loss
        loads_after_forward = rt.stats.unit_loads
        assert rt._saved and sum(rt._saved.values()) > 0  # weights were packed as handles, not kept
        loss.backward()
        assert rt.stats.unit_loads >= loads_after_forward + 3  # each block fetched again in backward
        for (name, a), b in zip(ref.named_parameters(), model.parameters()):
            assert torch.equal(a.grad, b.grad), name
        rt.finish_backward()
        assert rt.store.stats()["tiers"]["host"]["used"] <= host_capacity(rt.store)
    finally:
        tiered.detach(model)


@pytest.mark.parametrize("arch,lookahead,resident", [
    ("llama", 1, False), ("gpt2", 1, False), ("llama", 0, False), ("llama", 2, True), ("gpt2", 2, True)])
def test_training_loss_curve_is_bitwise_equal_to_in_memory(tmp_path, arch, lookahead, resident):
    ref = build(arch)
    host = {"llama": 2, "gpt2": 3}[arch] + resident  # MiB: a GPT-2 block's state chunk is 0.6 MiB
    model = tiered.offload(copy.deepcopy(ref), cfg(tmp_path, host=f"{host}MiB", lookahead=lookahead,
                                                   resident=resident))
    store = offload_units(model).store
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05)
    params = list(model.parameters())
    state_bytes = 12 * sum(p.numel() for p in params)
    try:
        with OffloadedAdamW(params, lr=1e-2, weight_decay=0.05, model=model, lookahead=1) as opt:
            assert [c.unit for c in opt._chunks if c.unit is not None]  # one state chunk per unit
            read0 = nvme_read(store)
            for step in range(4):
                x = batch(step)
                l_ref = ref(input_ids=x, labels=x).loss
                l_ref.backward()
                o_ref.step()
                o_ref.zero_grad()
                loss = model(input_ids=x, labels=x).loss
                loss.backward()
                # handed to the optimizer during backward and released there
                assert all(p.grad is None for p in params)
                opt.step()
                assert torch.equal(l_ref, loss), f"step {step}: {l_ref.item()} != {loss.item()}"
            # streamed: whatever the host tier cannot hold of the weights and state is read again
            # in every step after the first (state chunks are updated and written from the buffer
            # they were read into, so the cache holds more of them than a copying put allowed)
            excess = state_bytes + sum(p.numel() * p.element_size() for p in params) - host_capacity(store)
            if not resident and excess > 0:
                assert nvme_read(store) - read0 >= 3 * excess
            assert store.stats()["tiers"]["host"]["peak"] <= host_capacity(store)
            # the state's buffers and objects are the optimizer's, not the model's
            mine = store.owners()[opt.owner]
            assert mine["host"]["peak"] > 0 and mine["nvme"]["held"] >= 2 * state_bytes
    finally:
        tiered.detach(model)
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name


def test_resume_puts_the_masters_into_the_offloaded_units(tmp_path):
    ref = build("llama")
    model = tiered.offload(copy.deepcopy(ref), cfg(tmp_path))
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    try:
        with OffloadedAdamW(list(model.parameters()), lr=1e-2, model=model, name="run", lookahead=1) as opt:
            for step in range(2):
                x = batch(step)
                ref(input_ids=x, labels=x).loss.backward()
                o_ref.step()
                o_ref.zero_grad()
                model(input_ids=x, labels=x).loss.backward()
                opt.step()
        # a resumed optimizer continues the same run on the same store
        with OffloadedAdamW(list(model.parameters()), lr=1e-2, model=model, name="run", lookahead=1, resume=True) as opt:
            assert opt._step == 2
            x = batch(2)
            l_ref = ref(input_ids=x, labels=x).loss
            l_ref.backward()
            o_ref.step()
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            assert torch.equal(l_ref, loss)
    finally:
        tiered.detach(model)
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_bundled_layout_cannot_be_trained(tmp_path):
    model = tiered.offload(build("llama"), cfg(tmp_path), layout="bundled")
    try:
        with pytest.raises(OffloadError, match="bundled layout cannot be trained"):
            OffloadedAdamW(list(model.parameters()), model=model).open()
    finally:
        tiered.detach(model)
