"""``[offload] activations = "host"``: the tensors autograd saves in an offloaded model's forward
go into the store (objects of kind "activation", charged to the model's owner) and come back in
backward.

- gradients, and training with ``OffloadedAdamW`` in each ``grads`` mode, are bitwise equal to
  the same model trained in memory, with and without activation checkpointing;
- between forward and backward the store holds the activations; after backward it holds none,
  nor, once the model's next forward or ``offload_stats`` ran, after a forward whose graph is
  dropped or a backward that raised;
- under a host tier too small for them the store spills them to storage and reads them back;
- a bad value is refused naming ``offload.activations``.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch

import tiered
from helpers import (TINY_MODEL_MARKS, finetune_batch as batch, finetune_config, finetune_llama, owner_figures,
                     failing_once, lm_loss, step_beside_in_memory, wait_until)
from tiered.config import ConfigError, load_config
from tiered.offload import activations as saved_activations
from tiered.optim import OffloadedAdamW

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(120), *TINY_MODEL_MARKS]

#: the fine-tuning model's saved tensors are a few KiB: offload those of 1 KiB and more
SMALL = 1024


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(saved_activations, "MIN_BYTES", SMALL)


def build(checkpointing: bool = False):
    model = finetune_llama()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def host_config(tmp_path, activations: str = "host", **tiers) -> dict:
    cfg = finetune_config(tmp_path)
    cfg["offload"]["activations"] = activations
    for name, capacity in tiers.items():
        cfg["tiers"][name]["capacity"] = capacity
    return cfg


def activation_keys(store) -> list[str]:
    return [k for k in store.keys() if store.meta(k)["kind"] == "activation"]


loss_of = lm_loss


def test_a_bad_value_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"offload\.activations.*'keep'.*'host'"):
        load_config(host_config(tmp_path, "disk"))
    assert load_config(host_config(tmp_path)).offload.activations == "host"
    assert load_config(finetune_config(tmp_path)).offload.activations == "keep"


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_gradients_are_bitwise_equal_to_in_memory(tmp_path, small_threshold, checkpointing):
    ref = build(checkpointing)
    model = tiered.offload(copy.deepcopy(ref), host_config(tmp_path))
    try:
        x = batch(0)
        loss_of(ref, x).backward()
        loss_of(model, x).backward()
        for (name, a), b in zip(ref.named_parameters(), model.parameters()):
            assert torch.equal(a.grad, b.grad), name
        st = tiered.offload_stats(model)["activations"]
        assert st["packed"] > 0 and st["unpacked"] >= st["packed"], st
        assert not activation_keys(model._tiered.store)
    finally:
        tiered.detach(model)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("grads", ["stream", "park", "keep"])
def test_training_with_offloaded_adamw_equals_in_memory(tmp_path, small_threshold, grads, checkpointing):
    ref = build(checkpointing)
    model = tiered.offload(copy.deepcopy(ref), host_config(tmp_path))
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    try:
        with OffloadedAdamW(list(model.parameters()), lr=1e-2, model=model, grads=grads) as opt:
            for step in range(2):
                step_beside_in_memory(ref, o_ref, model, opt, batch(step), step)
                opt.zero_grad()
                assert not activation_keys(model._tiered.store)
        assert tiered.offload_stats(model)["activations"]["packed"] > 0
        sd = model.state_dict()
        for name, a in ref.state_dict().items():
            assert torch.equal(a, sd[name]), name
    finally:
        tiered.detach(model)


def test_a_retained_graph_reads_its_activations_again(tmp_path, small_threshold):
    ref = build()
    model = tiered.offload(copy.deepcopy(ref), host_config(tmp_path))
    try:
        x = batch(0)
        for m in (ref, model):
            loss = loss_of(m, x)
            loss.backward(retain_graph=True)
            if m is model:
                assert activation_keys(model._tiered.store)  # kept for the second backward
            loss.backward()
            del loss
        for (name, a), b in zip(ref.named_parameters(), model.parameters()):
            assert torch.equal(a.grad, b.grad), name
        assert not activation_keys(model._tiered.store)
    finally:
        tiered.detach(model)


def test_through_the_device_cache_training_equals_in_memory(tmp_path, small_threshold):
    # the path CUDA takes, forced on a CPU device: weights saved for backward stay the cache's
    cfg = host_config(tmp_path)
    cfg["offload"]["device_cache"] = True
    cfg["tiers"]["gpu"] = {"kind": "device", "device": "cpu", "capacity": "1MiB"}
    ref = build()
    model = tiered.offload(copy.deepcopy(ref), cfg)
    assert model._tiered.dcache is not None
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    try:
        with OffloadedAdamW(list(model.parameters()), lr=1e-2, model=model) as opt:
            for step in range(2):
                step_beside_in_memory(ref, o_ref, model, opt, batch(step), step)
        st = tiered.offload_stats(model)["activations"]
        assert st["packed"] > 0 and not activation_keys(model._tiered.store)
        sd = model.state_dict()
        for name, a in ref.state_dict().items():
            assert torch.equal(a, sd[name]), name
    finally:
        tiered.detach(model)


def test_weights_are_never_stored_as_activations(tmp_path, small_threshold):
    # resident units stay bound: autograd saves views of their host copies (or device-cache copies)
    packed = {}
    for name, resident, device_cache in [("streamed", False, False), ("resident", True, False),
                                         ("resident, device cache", True, True)]:
        cfg = host_config(tmp_path / name.replace(", ", "-"))
        cfg["offload"]["resident"] = resident
        if device_cache:
            cfg["offload"]["device_cache"] = True
            cfg["tiers"]["gpu"] = {"kind": "device", "device": "cpu", "capacity": "1MiB"}
        model = tiered.offload(build(), cfg)
        try:
            assert any(u.resident or u.host_resident for u in model._tiered.units) == resident
            loss_of(model, batch(0)).backward()
            st = tiered.offload_stats(model)["activations"]
            packed[name] = (st["objects"], st["bytes"])
        finally:
            tiered.detach(model)
    assert len(set(packed.values())) == 1, packed


def test_the_store_holds_the_activations_between_forward_and_backward(tmp_path, small_threshold):
    model = tiered.offload(build(), host_config(tmp_path))
    rt = model._tiered
    store = rt.store
    try:
        loss = loss_of(model, batch(0))
        st = tiered.offload_stats(model)["activations"]
        assert st["bytes"] >= 20 * SMALL and st["live_bytes"] == st["bytes"]

        def metas():
            return [store.meta(k) for k in activation_keys(store)]

        # every object is in the store once its write (behind the forward) is done
        assert wait_until(lambda: sum(m["nbytes"] for m in metas()) == st["bytes"], timeout=30)
        assert all(m["owner"] == rt.owner and m["ephemeral"] for m in metas())
        held = st["bytes"]
        assert owner_figures(store, rt.owner)["peak"] >= held  # charged to the model's owner
        loss.backward()
        assert not activation_keys(store)
        assert tiered.offload_stats(model)["activations"]["live_bytes"] == 0
        assert loss.grad_fn is not None  # deleted while the graph object still exists
    finally:
        tiered.detach(model)


def test_keep_saves_nothing_in_the_store(tmp_path, small_threshold):
    model = tiered.offload(build(), host_config(tmp_path, "keep"))
    try:
        loss = loss_of(model, batch(0))
        assert not activation_keys(model._tiered.store)
        loss.backward()
        assert "activations" not in tiered.offload_stats(model)
    finally:
        tiered.detach(model)


def graph_tensors() -> int:
    """Tensors alive that some autograd node produced."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.grad_fn is not None)


@pytest.mark.parametrize("activations", ["keep", "host"])
def test_the_graph_of_a_forward_without_backward_is_freed(tmp_path, small_threshold, activations):
    # a saved output given back to autograd as itself would hold its own node: a cycle
    model = tiered.offload(build(), host_config(tmp_path, activations))
    try:
        before = graph_tensors()
        loss = loss_of(model, batch(0))
        assert graph_tensors() > before
        del loss
        assert graph_tensors() == before
    finally:
        tiered.detach(model)


def test_a_forward_without_backward_leaves_nothing(tmp_path, small_threshold):
    model = tiered.offload(build(), host_config(tmp_path))
    store = model._tiered.store
    try:
        loss = loss_of(model, batch(0))
        assert activation_keys(store)
        del loss
        gc.collect()
        tiered.offload_stats(model)  # deletes what autograd dropped
        assert not activation_keys(store)
        with torch.no_grad():  # nothing saved: nothing stored
            loss_of(model, batch(1))
        assert not activation_keys(store)
    finally:
        tiered.detach(model)


def test_a_backward_that_raises_leaves_nothing(tmp_path, small_threshold):
    model = tiered.offload(build(), host_config(tmp_path))
    store = model._tiered.store

    def fail(_grad):
        raise RuntimeError("boom")

    def watch(_m, _args, out):  # raises in backward after the head's backward unpacked its inputs
        out.register_hook(fail)

    h = model.model.norm.register_forward_hook(watch)
    try:
        loss = loss_of(model, batch(0))
        with pytest.raises(RuntimeError, match="boom"):
            loss.backward()
        assert activation_keys(store)  # the layers' saved tensors are still the graph's
        del loss
        gc.collect()
        tiered.offload_stats(model)  # deletes what autograd dropped
        assert not activation_keys(store)
        h.remove()
        loss_of(model, batch(1)).backward()  # the next step works
        assert not activation_keys(store)
    finally:
        h.remove()
        tiered.detach(model)


def test_detach_deletes_the_activations_of_a_live_graph(tmp_path, small_threshold):
    model = tiered.offload(build(), host_config(tmp_path))
    store = tiered.TieredStore.shared(model._tiered.config)  # outlives the model's handle
    try:
        loss = loss_of(model, batch(0))
        assert activation_keys(store)
        tiered.detach(model)
        assert not activation_keys(store)
        del loss  # the handles' finalizers find nothing left to do
        gc.collect()
    finally:
        store.close()


def test_a_failed_delete_is_raised_by_the_next_forward(tmp_path, small_threshold, monkeypatch):
    model = tiered.offload(build(), host_config(tmp_path))
    store = tiered.TieredStore.shared(model._tiered.config)  # outlives the model's handle
    calls = failing_once(store, monkeypatch)
    try:
        loss_of(model, batch(0)).backward()  # the delete runs, and fails, as autograd drops the handles
        assert calls and activation_keys(store)
        with pytest.raises(tiered.OffloadError, match="injected I/O error"):
            loss_of(model, batch(1))
        loss_of(model, batch(1)).backward()  # raised once; the model still trains
        tiered.detach(model)  # and deletes what the failed delete left
        assert not activation_keys(store)
    finally:
        if getattr(model, "_tiered", None) is not None:
            tiered.detach(model)
        store.close()


def test_activations_spill_to_storage_under_a_small_host_tier(tmp_path):
    # 8 sequences of 64 tokens: hidden states 64 KiB, MLP 128 KiB, attention probabilities
    # 512 KiB per layer, beyond what a 1 MiB host tier can cache beside the streamed weights
    x = torch.randint(0, 64, (8, 64), generator=torch.Generator().manual_seed(3))
    ref = build()
    model = tiered.offload(copy.deepcopy(ref), host_config(tmp_path))
    try:
        loss_of(ref, x).backward()
        loss = loss_of(model, x)
        st = tiered.offload_stats(model)["activations"]
        assert st["bytes"] > 2 * (1 << 20), st  # more than the host tier holds
        loss.backward()
        st = tiered.offload_stats(model)["activations"]
        assert st["bytes_from_storage"] > 0, st  # some were evicted from the host tier and read back
        assert st["read_ahead"] > 0, st  # backward read objects before it unpacked them
        for (name, a), b in zip(ref.named_parameters(), model.parameters()):
            assert torch.equal(a.grad, b.grad), name
        assert not activation_keys(model._tiered.store)
        host = model._tiered.store.stats()["tiers"]["host"]
        assert host["peak"] <= host["capacity"]
    finally:
        tiered.detach(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("device_cache", [True, False])
def test_on_cuda_activations_go_through_pinned_host_memory(tmp_path, small_threshold, device_cache):
    ref = build().cuda()
    cfg = {"tiers": {"gpu": {"capacity": "4MiB"}, "host": {"capacity": "64MiB"},
                     "nvme": {"path": str(tmp_path / "nvme"), "capacity": "1GiB"}},
           "engine": {"workers": 4, "chunk": "1MiB"},
           "offload": {"device_cache": device_cache, "activations": "host"}}
    model = tiered.offload(copy.deepcopy(ref), cfg)
    try:
        x = batch(0).cuda()
        grads = []
        for _ in range(2):  # some CUDA backward kernels add atomically: bitwise only where the reference is
            ref.zero_grad()
            loss_of(ref, x).backward()
            grads.append([p.grad.clone() for p in ref.parameters()])
        loss_of(model, x).backward()
        torch.cuda.synchronize()
        for (name, p), a, a2 in zip(model.named_parameters(), *grads):
            if torch.equal(a, a2):
                assert torch.equal(a, p.grad), name
            else:
                torch.testing.assert_close(p.grad, a, msg=name)
        st = tiered.offload_stats(model)["activations"]
        assert st["packed"] > 0 and st["unpacked"] >= st["packed"], st
        assert not activation_keys(model._tiered.store)
    finally:
        tiered.detach(model)
