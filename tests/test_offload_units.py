"""The public unit API (``tiered.offload.offload_units``): list units, load one outside a
forward, change it in place, write it back, edit parameters without binding, hear backward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tiered
from helpers import offload_config
from tiered import OffloadError
from tiered.offload import Unit, offload_units

pytestmark = pytest.mark.timeout(60)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return torch.relu(self.fc(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(4))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def cfg(tmp_path, resident=False) -> dict:
    return offload_config(tmp_path, "256KiB", nvme="64MiB", resident=resident)


def test_units_list_names_keys_bytes_and_params(tmp_path):
    torch.manual_seed(0)
    model = Net()
    params = {id(p) for p in model.parameters()}
    tiered.offload(model, cfg(tmp_path))
    try:
        units = offload_units(model)
        assert offload_units(model) is units
        assert [u.name for u in units] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
        assert units["head"] is units[4] and units.unit(units[4]) is units[4]
        for u in units:
            assert u.keys and all(k in units.store for k in u.keys)
            assert u.nbytes > 0 and u.leaf and not u.loaded
            assert all(id(p) in params for p in u.params())
        assert sum(len(u.params()) for u in units) == len(params)
        assert units.owns_param(units["head"].params()[0]) and not units.owns_param(torch.zeros(1))
        assert units.owner.startswith("offload/")
        assert units.budget == units.store.arena.capacity  # alone on the store, elastic: the whole tier
        with pytest.raises(OffloadError, match="no unit 'nope'"):
            units.unit("nope")
    finally:
        tiered.detach(model)
    with pytest.raises(OffloadError, match="not wrapped"):
        offload_units(model)


def test_load_change_write_back_is_what_the_next_forward_computes(tmp_path):
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.blocks[1].fc.weight.mul_(0.5)
    x = torch.randn(3, 16)
    tiered.offload(model, cfg(tmp_path))
    try:
        units = offload_units(model)
        u = units["blocks.1"]
        with units.load_unit(u) as lease:
            assert u.loaded
            views = dict((id(p), v) for p, v in lease.views)
            w = views[id(model.blocks[1].fc.weight)]
            assert torch.equal(model.blocks[1].fc.weight, w)  # bound: the parameter is the view
            w.mul_(0.5)
            units.write_back_unit(u)
        assert not u.loaded
        units.wait_writes()
        with pytest.raises(OffloadError, match="not loaded"):
            units.write_back_unit(u)
        with torch.no_grad():
            assert torch.equal(model(x), ref(x))
    finally:
        tiered.detach(model)
    assert torch.equal(model.blocks[1].fc.weight, ref.blocks[1].fc.weight)


def test_load_of_a_resident_unit_keeps_it_loaded(tmp_path):
    torch.manual_seed(0)
    model = Net()
    tiered.offload(model, cfg(tmp_path, resident=True))
    try:
        units = offload_units(model)
        res = [u for u in units if u.resident]
        assert res, "the test needs a resident unit"
        with units.load_unit(res[0]) as lease:
            assert lease.views
        assert res[0].loaded  # resident: stays bound after the lease
    finally:
        tiered.detach(model)


def test_open_unit_params_edits_without_binding(tmp_path):
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.head.bias.add_(1.0)
    x = torch.randn(2, 16)
    tiered.offload(model, cfg(tmp_path))
    try:
        units = offload_units(model)
        edit = units.open_unit_params("head")
        assert not units["head"].loaded
        for v in edit.views[id(model.head.bias)]:
            v.add_(1.0)
        units.write_unit_params(edit)
        units.wait_writes()
        with torch.no_grad():
            assert torch.equal(model(x), ref(x))
    finally:
        tiered.detach(model)


def test_on_backward_load_names_each_streamed_unit(tmp_path):
    torch.manual_seed(0)
    model = Net()
    tiered.offload(model, cfg(tmp_path))
    try:
        units = offload_units(model)
        seen = []
        handle = units.on_backward_load(seen.append)
        model(torch.randn(2, 16)).sum().backward()
        assert seen and all(isinstance(u, Unit) for u in seen)
        assert {u.name for u in seen} <= {u.name for u in units}
        assert all(units.unit(u.name) is u for u in seen)
        handle.remove()
        seen.clear()
        model(torch.randn(2, 16)).sum().backward()
        assert seen == []
        units.wait_writes()
    finally:
        tiered.detach(model)


def test_an_open_edit_keeps_its_resident_unit_from_other_owners(tmp_path):
    """While an optimizer edits a resident unit's copy in place, another owner's pressure must
    not take the unit back (its buffer could be reused before the edit is written)."""
    torch.manual_seed(0)
    model = Net()
    tiered.offload(model, cfg(tmp_path, resident=True))
    rt = model._tiered
    try:
        units = offload_units(model)
        res = next(u for u in units if u.resident)
        edit = units.open_unit_params(res)
        assert rt.compute_res.on_pressure(1 << 30) == 0  # what the store calls for another owner
        assert res.resident
        units.write_unit_params(edit)
        units.wait_writes()
        assert rt.compute_res.on_pressure(1 << 30) > 0  # idle again: residents go back
        assert not res.resident
        edit = units.open_unit_params("head")
        edit.abandon()
        assert not rt._busy  # abandoning ends the edit too
    finally:
        tiered.detach(model)
