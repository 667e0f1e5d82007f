"""Activation checkpointing of offloaded units: transformers' gradient checkpointing recomputes
each decoder layer in backward, outside the model's forward; the weights that recompute saves
stay bound until backward is done with them, so gradients and the trained weights are bitwise
equal to the same checkpointed model in memory."""

from __future__ import annotations

import copy

import pytest
import torch

import tiered
from helpers import TINY_MODEL_MARKS, step_beside_in_memory
from test_offload_train import batch, build, cfg
from tiered.optim import OffloadedAdamW

pytestmark = [pytest.mark.timeout(90), *TINY_MODEL_MARKS]


def checkpointed(arch: str):
    model = build(arch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradients_of_a_checkpointed_offloaded_model_are_bitwise_equal(tmp_path, arch):
    ref = checkpointed(arch)
    model = tiered.offload(copy.deepcopy(ref), cfg(tmp_path, lookahead=1))
    rt = model._tiered
    try:
        x = batch(0)
        ref(input_ids=x, labels=x).loss.backward()
        loads = rt.stats.unit_loads
        model(input_ids=x, labels=x).loss.backward()
        assert rt.stats.unit_loads > loads  # each layer was read again to recompute it
        for (name, a), b in zip(ref.named_parameters(), model.parameters()):
            assert torch.equal(a.grad, b.grad), name
        rt.finish_backward()
        assert not rt._recomputed and not any(u.leases for u in rt.units if not u.resident)
        st = rt.store.stats()["tiers"]["host"]
        assert st["peak"] <= st["capacity"]
    finally:
        tiered.detach(model)


def test_training_a_checkpointed_offloaded_model_equals_in_memory(tmp_path):
    ref = checkpointed("llama")
    model = tiered.offload(copy.deepcopy(ref), cfg(tmp_path, host="3MiB", lookahead=1))
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    try:
        with OffloadedAdamW(list(model.parameters()), lr=1e-2, model=model, lookahead=1) as opt:
            for step in range(3):
                step_beside_in_memory(ref, o_ref, model, opt, batch(step), step)
    finally:
        tiered.detach(model)
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name


class _Blocks(torch.nn.Module):
    """A loop that checkpoints each block itself: the recompute calls the block (its hooks run)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)) for _ in range(4))

    def forward(self, x):
        for b in self.blocks:
            x = torch.utils.checkpoint.checkpoint(b, x, use_reentrant=False)
        return x


def test_blocks_checkpointed_by_the_callers_loop_give_bitwise_equal_gradients(tmp_path):
    ref = _Blocks()
    model = tiered.offload(copy.deepcopy(ref), cfg(tmp_path, host="1MiB", lookahead=0))
    rt = model._tiered
    try:
        assert sum(not u.resident for u in rt.units) >= 2, [u.name for u in rt.units]
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
        ref(x).square().sum().backward()
        model(x).square().sum().backward()
        for (name, a), b in zip(ref.named_parameters(), model.parameters()):
            assert torch.equal(a.grad, b.grad), name
        # the last block recomputed is still held (its memory is not given back under backward)
        held = [u for u in rt.units if u.name == "blocks.0"]
        assert rt._recomputed == held and held[0].leases
        rt.finish_backward()
        assert not rt._recomputed
    finally:
        tiered.detach(model)


class _Segments(_Blocks):
    """checkpoint_sequential: each recomputed segment runs two units."""

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint_sequential(self.blocks, 2, x, use_reentrant=False)


def test_a_segment_of_several_units_keeps_them_all_until_its_backward_is_done(tmp_path):
    ref = _Segments()
    # room for the two units of a segment
    model = tiered.offload(copy.deepcopy(ref), cfg(tmp_path, host="128KiB", lookahead=0))
    try:
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
        ref(x).square().sum().backward()
        model(x).square().sum().backward()
        for (name, a), b in zip(ref.named_parameters(), model.parameters()):
            assert torch.equal(a.grad, b.grad), name
        # the first segment, recomputed last, is still held whole
        assert sorted(u.name for u in model._tiered._recomputed) == ["blocks.0", "blocks.1"]
    finally:
        tiered.detach(model)


class _Block(torch.nn.Module):
    def __init__(self, shared: torch.nn.Module) -> None:
        super().__init__()
        self.own = torch.nn.Linear(64, 64)
        self.shared = shared

    def forward(self, x):
        return self.shared(self.own(x))


class _Shared(torch.nn.Module):
    """A module shared by every block (as Zamba2's shared transformer)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        shared = torch.nn.Linear(64, 64)
        self.blocks = torch.nn.ModuleList(_Block(shared) for _ in range(6))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_a_shared_module_loads_no_other_unit_in_a_forward(tmp_path):
    ref = _Shared().eval()
    model = tiered.offload(copy.deepcopy(ref), cfg(tmp_path, host="2MiB", lookahead=0))
    rt = model._tiered
    try:
        x = torch.randn(2, 64)
        with torch.no_grad():
            model(x)
            loads = rt.stats.unit_loads
            y = model(x)
        assert torch.equal(y, ref(x))
        assert rt.stats.unit_loads - loads == len(rt.units)  # each unit once, none bound by another's part
        assert not rt._recomputed and not any(u.bound for u in rt.units if not u.resident)
    finally:
        tiered.detach(model)


def test_a_budget_too_small_for_a_recomputed_segment_is_an_error_not_wrong_gradients(tmp_path):
    from helpers import tiny_llama
    from tiered.store.errors import HostBudgetError

    ref = tiny_llama(layers=4, hidden=64, vocab=256).train()
    ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    units = [f"model.layers.{i}.{p}" for i in range(4) for p in ("self_attn", "mlp")]
    # a layer is recomputed whole: its attention and MLP units must be held together
    model = tiered.offload(copy.deepcopy(ref), cfg(tmp_path, host="160KiB", lookahead=0), units=units)
    model._tiered.store.host_wait = 1.0  # nothing else frees memory here: do not wait the default 30 s
    try:
        x = batch(0)
        loss = model(input_ids=x, labels=x).loss
        with pytest.raises(HostBudgetError, match="no room"):
            loss.backward()
    finally:
        tiered.detach(model)
