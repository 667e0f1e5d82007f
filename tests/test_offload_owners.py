"""An offloaded model is the store owner ``offload/<prefix>``: its memory is charged to it,
its budget is a reservation (explicit ``share``, the config's ``[owners.offload]``, else
elastic), and two models (or a model and another owner) share one GPU tier."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tiered
from helpers import offload_config
from tiered import OffloadError
from tiered.offload import offload_units

pytestmark = pytest.mark.timeout(90)

KiB = 1 << 10
WIDTH = 128  # each block: 128x128 fp32 weight + bias, 64 KiB + 512 B


def _net(seed: int, blocks: int = 6) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(blocks)])


def _cfg(tmp_path, host="1MiB", *, gpu=None, resident=True, lookahead=1, owners=None) -> dict:
    cfg = offload_config(tmp_path, host, nvme="64MiB", lookahead=lookahead, resident=resident)
    if gpu is not None:  # the device-cache path on a CPU: a GPU tier on device "cpu"
        cfg["tiers"]["gpu"] = {"kind": "device", "device": "cpu", "capacity": gpu}
        cfg["offload"]["device_cache"] = True
    if owners is not None:
        cfg["owners"] = owners
    return cfg


def _units(n: int) -> list[str]:
    return [str(i) for i in range(n)]


X = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(3))


def _out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def _weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_models_memory_is_all_charged_to_its_owner(tmp_path):
    model = _net(0)
    want = _out(model)
    tiered.offload(model, _cfg(tmp_path, "512KiB"), units=_units(6))
    store, owner = model._tiered.store, offload_units(model).owner
    try:
        assert owner.startswith("offload/Sequential-")
        for _ in range(2):
            assert torch.equal(_out(model), want)
        owners = store.owners()
        mine = owners[owner]
        assert mine["host"]["held"] > 0 and mine["host"]["peak"] <= store.arena.capacity
        assert mine["nvme"]["held"] >= sum(p.numel() * 4 for p in _net(0).parameters())  # its objects
        # nothing of the model is charged to anyone else
        others = {o: f for o, f in owners.items() if o != owner}
        assert all(t["held"] == 0 for f in others.values() for t in f.values()), others
        st = tiered.offload_stats(model)
        assert st["peak_host_bytes"] == store.owners()[owner]["host"]["peak"]
    finally:
        tiered.detach(model)
    assert torch.equal(_out(model), want)


def test_explicit_share_is_reserved_and_bounds_the_plan(tmp_path):
    store = tiered.TieredStore(_cfg(tmp_path, "1MiB")).open()
    model = _net(0)
    want = _out(model)
    tiered.offload(model, store=store, units=_units(6), share="300KiB")
    rt = model._tiered
    try:
        assert store.owners()[rt.owner]["host"]["reserved"] == 300 * KiB
        st = tiered.offload_stats(model)
        assert 0 < st["resident_bytes"] <= 300 * KiB - max(u.nbytes for u in rt.units)  # residents within it
        for _ in range(3):
            assert torch.equal(_out(model), want)
        # another owner cannot take the share away
        with pytest.raises(tiered.StoreError, match="cannot reserve"):
            store.reserve("host", store.arena.capacity - 200 * KiB, owner="kv/1")
    finally:
        tiered.detach(model)
    try:
        assert store.owners()[rt.owner]["host"]["reserved"] == 0  # detach gives the share back
    finally:
        store.close()


def test_share_smaller_than_a_unit_is_a_clear_error(tmp_path):
    with pytest.raises(OffloadError, match=r"share of tier 'host' reserved for offload/.*smaller than unit '0'"):
        tiered.offload(_net(0), _cfg(tmp_path), units=_units(6), share="32KiB")


def test_config_share_is_the_default(tmp_path):
    cfg = _cfg(tmp_path, "1MiB", owners={"offload": {"host": "40%"}})
    model = _net(0)
    tiered.offload(model, cfg, units=_units(6))
    try:
        rt = model._tiered
        assert 0 <= rt.store.owners()[rt.owner]["host"]["reserved"] - int(0.4 * (1 << 20)) < 4096  # page-aligned
    finally:
        tiered.detach(model)


def test_two_models_share_one_gpu_tier_within_its_capacity(tmp_path):
    """The device-cache path of two models on one GPU tier (device "cpu"): each model's device
    copies are charged to it, together never above the tier, outputs unchanged."""
    gpu = 640 * KiB  # both models' working sets do not fit at once: they take turns
    cfg = _cfg(tmp_path, "2MiB", gpu=gpu)
    a, b = _net(0), _net(1)
    want_a, want_b = _out(a), _out(b)
    tiered.offload(a, cfg, units=_units(6))
    tiered.offload(b, cfg, units=_units(6))
    store = a._tiered.store
    try:
        assert a._tiered.dcache is not None and b._tiered.dcache is not None
        for _ in range(3):
            assert torch.equal(_out(a), want_a)
            assert torch.equal(_out(b), want_b)
            owners = store.owners()
            on_gpu = {o: f["gpu"] for o, f in owners.items() if "gpu" in f}
            assert set(on_gpu) == {a._tiered.owner, b._tiered.owner}
            assert sum(f["held"] for f in on_gpu.values()) <= gpu
        tier = store.stats()["tiers"]["gpu"]
        assert tier["capacity"] == gpu and tier["peak"] <= gpu  # one region, shared
        assert tiered.offload_stats(a)["peak_device_bytes"] <= gpu
        # the two working sets did not fit at once: the models took turns with the room
        assert tiered.offload_stats(a)["device_cache"]["evictions"] + tiered.offload_stats(b)["device_cache"][
            "evictions"] > 0
    finally:
        tiered.detach(a)
        tiered.detach(b)
    assert torch.equal(_out(a), want_a) and torch.equal(_out(b), want_b)


def test_device_cache_on_a_cpu_needs_a_device_tier(tmp_path):
    cfg = _cfg(tmp_path)
    cfg["offload"]["device_cache"] = True
    with pytest.raises(OffloadError, match="needs a device tier"):
        tiered.offload(_net(0), cfg, units=_units(6))


def test_an_idle_models_residents_go_to_another_owner_that_needs_the_room(tmp_path):
    """Another workload (a KV cache, an optimizer) finds no room: the idle model gives back its
    residents and streams them from then on, still computing the same."""
    model = _net(0)
    want = _out(model)
    tiered.offload(model, _cfg(tmp_path, "1MiB"), units=_units(6))
    rt = model._tiered
    store = rt.store
    try:
        resident = tiered.offload_stats(model)["resident_bytes"]
        assert resident > 0
        with store.reserve("host", owner="kv/0") as kv:
            buf = kv.alloc(store.arena.capacity - rt._floor - 64 * KiB, wait=5.0)
            assert tiered.offload_stats(model)["resident_bytes"] < resident
            assert torch.equal(_out(model), want)  # streams in what is left
            buf.release()
        assert torch.equal(_out(model), want)
    finally:
        tiered.detach(model)


def test_residents_stay_while_a_backward_may_read_them(tmp_path):
    """Between a grad-enabled forward and the end of its backward, autograd holds views of the
    resident units' copies: another owner's pressure (an optimizer allocating in a grad hook)
    must not take them back, or backward reads reused memory."""
    torch.manual_seed(0)
    ref = _net(0)
    x = X.clone().requires_grad_(True)
    ref(x).square().sum().backward()
    model = _net(0)
    for p in model.parameters():
        p.requires_grad_(False)
    tiered.offload(model, _cfg(tmp_path, "1MiB"), units=_units(6))
    rt = model._tiered
    try:
        resident = tiered.offload_stats(model)["resident_bytes"]
        assert resident > 0
        x2 = X.clone().requires_grad_(True)
        y = model(x2).square().sum()
        rt.compute_res.on_pressure(1 << 30)  # what the store calls for another owner, mid-step
        assert tiered.offload_stats(model)["resident_bytes"] == resident
        for _ in range(3):  # other owners reuse whatever was given back
            rt.store.put("other/blob", torch.full((64 * KiB,), float("nan"))).result(timeout=30)
        y.backward()
        assert torch.equal(x2.grad, x.grad)
        rt.finish_backward()  # between steps (an optimizer's step ends with it)
        assert rt.compute_res.on_pressure(1 << 30) > 0
        assert tiered.offload_stats(model)["resident_bytes"] < resident
    finally:
        tiered.detach(model)
