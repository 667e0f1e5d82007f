"""Saved-tensor hooks of an offloaded model under the conditions autograd and Python impose:

- autograd drops a forward's handles wherever the last one goes (a garbage collection, another
  thread, inside a lock): nothing blocks there and the store is not called there; the objects
  are deleted at the end of the backward, at the next forward, by ``offload_stats`` or ``detach``;
- a tensor saved for backward and changed in place afterwards raises autograd's usual error, in
  "keep" and in "host" mode, as it does in memory;
- a ``detach`` whose delete of activations fails still detaches the model, then raises;
- CUDA copies queued while others are put are not lost.
"""

from __future__ import annotations

import concurrent.futures
import copy
import gc
import threading

import pytest
import torch

import tiered
from helpers import TINY_MODEL_MARKS, failing_once, finetune_batch as batch, finetune_config, finetune_llama
from tiered.offload import activations as saved_activations

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(120), *TINY_MODEL_MARKS]

INPLACE_ERROR = "one of the variables needed for gradient computation has been modified by an inplace operation"


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(saved_activations, "MIN_BYTES", 1024)


def config(tmp_path, activations: str = "host") -> dict:
    cfg = finetune_config(tmp_path)
    cfg["offload"]["activations"] = activations
    return cfg


def activation_keys(store) -> list[str]:
    return [k for k in store.keys() if store.meta(k)["kind"] == "activation"]


def loss_of(model, x):
    return model(input_ids=x, labels=x).loss


def test_a_graph_dropped_under_the_lock_does_not_block(tmp_path, small_threshold):
    # a garbage collection can drop a graph anywhere, also while this thread holds the lock
    model = tiered.offload(finetune_llama(), config(tmp_path))
    act = model._tiered.activations
    graph = [loss_of(model, batch(0))]

    def drop_under_the_lock():
        with act._lock:
            graph.clear()
            gc.collect()

    t = threading.Thread(target=drop_under_the_lock, daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():  # the model is left as it is: its lock is held for good
        pytest.fail("dropping a graph while the lock was held blocked the thread")
    try:
        assert activation_keys(model._tiered.store)  # deleted at a safe point, not there
        tiered.offload_stats(model)
        assert not activation_keys(model._tiered.store)
    finally:
        tiered.detach(model)


def test_dropping_the_last_handle_does_not_call_the_store(tmp_path, small_threshold, monkeypatch):
    model = tiered.offload(finetune_llama(), config(tmp_path))
    store = model._tiered.store
    delete_prefix = store.delete_prefix
    calls = []

    def recording(prefix):
        calls.append(prefix)
        return delete_prefix(prefix)

    monkeypatch.setattr(store, "delete_prefix", recording)
    try:
        loss = loss_of(model, batch(0))
        del loss
        gc.collect()
        assert not calls  # the store may be mid-operation on this thread
        assert tiered.offload_stats(model)["activations"]["live_bytes"] == 0
        assert calls and not activation_keys(store)
        loss = loss_of(model, batch(1))
        del loss
        loss_of(model, batch(2)).backward()  # the next forward deletes the dropped graph's objects
        assert not activation_keys(store)  # the backward's own at its end
        params = list(model.parameters())  # every node runs (and drops its handles)
        assert len(torch.autograd.grad(loss_of(model, batch(3)), params)) == len(params)
        assert not activation_keys(store)
    finally:
        tiered.detach(model)


def add_op(model, fn, stash):
    def hook(_m, _args, out):
        stash["y"] = fn(out)
        return stash["y"]
    return model.model.norm.register_forward_hook(hook)


OPS = {"exp": torch.exp, "sigmoid": torch.sigmoid}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("mode", ["keep", "host", "host-small"])
def test_an_inplace_change_to_a_saved_tensor_raises_as_in_memory(tmp_path, monkeypatch, mode, op):
    if mode != "host-small":  # "host-small": too small for the store, kept as it is
        monkeypatch.setattr(saved_activations, "MIN_BYTES", 1024)
    ref = finetune_llama()
    model = tiered.offload(copy.deepcopy(ref), config(tmp_path, mode.split("-")[0]))
    try:
        for m in (ref, model):
            stash = {}
            h = add_op(m, OPS[op], stash)
            loss = loss_of(m, batch(0))
            h.remove()
            with torch.no_grad():
                stash["y"].mul_(2)  # the backward of exp/sigmoid needs their output
            with pytest.raises(RuntimeError, match=INPLACE_ERROR):
                loss.backward()
            del loss, stash
        gc.collect()
        tiered.offload_stats(model)
        assert not activation_keys(model._tiered.store)
    finally:
        tiered.detach(model)


@pytest.mark.parametrize("mode", ["keep", "host"])
def test_inplace_ops_inside_the_forward_train_as_in_memory(tmp_path, small_threshold, mode):
    # relu_ saves its output after bumping its version: that version is the one backward expects
    ref = finetune_llama()
    model = tiered.offload(copy.deepcopy(ref), config(tmp_path, mode))
    try:
        for m in (ref, model):
            h = add_op(m, lambda t: torch.exp(t).mul(0.5).relu_(), {})
            loss_of(m, batch(0)).backward()
            h.remove()
        for (name, a), b in zip(ref.named_parameters(), model.parameters()):
            assert torch.equal(a.grad, b.grad), name
    finally:
        tiered.detach(model)


def test_a_failed_delete_raised_by_detach_leaves_the_model_detached(tmp_path, small_threshold, monkeypatch):
    ref = finetune_llama()
    model = tiered.offload(copy.deepcopy(ref), config(tmp_path))
    store = tiered.TieredStore.shared(model._tiered.config)  # outlives the model's handle
    calls = failing_once(store, monkeypatch)
    try:
        loss_of(model, batch(0)).backward()  # the delete at the end of backward fails: kept
        assert calls and activation_keys(store)
        with pytest.raises(tiered.OffloadError, match="injected I/O error"):
            tiered.detach(model)
        assert getattr(model, "_tiered", None) is None  # detached all the same
        assert not activation_keys(store)
        model.zero_grad()
        loss_of(model, batch(1)).backward()  # an ordinary in-memory model
        loss_of(ref, batch(1)).backward()
        for (name, a), b in zip(ref.named_parameters(), model.parameters()):
            assert torch.equal(a.grad, b.grad), name
    finally:
        if getattr(model, "_tiered", None) is not None:
            tiered.detach(model)
        store.close()


def test_a_closed_activation_offload_refuses_to_pack(tmp_path, small_threshold):
    model = tiered.offload(finetune_llama(), config(tmp_path))
    try:
        model._tiered.activations.close()
        with pytest.raises(tiered.OffloadError, match="detach"):
            loss_of(model, batch(0))
        assert not activation_keys(model._tiered.store)
    finally:
        tiered.detach(model)


class _Event:
    """A CUDA event's stand-in; the first ``query`` runs ``during`` (another thread's work)."""

    def __init__(self, during=None) -> None:
        self.during = during

    def query(self) -> bool:
        during, self.during = self.during, None
        if during is not None:
            during()
        return True

    def synchronize(self) -> None:
        pass


def test_a_copy_queued_while_others_are_put_is_not_lost(tmp_path, monkeypatch):
    model = tiered.offload(finetune_llama(), config(tmp_path))
    act = model._tiered.activations
    done = concurrent.futures.Future()
    done.set_result(None)
    monkeypatch.setattr(act, "_put", lambda obj, buf: done)
    late = saved_activations._Stored("late", 1, torch.zeros(4))
    late.copied = _Event()
    racer = threading.Thread(target=act._queue_copy, args=(late,), daemon=True)

    def another_thread_queues():  # the copy of the next saved tensor, on the forward's thread
        racer.start()
        racer.join(0.2)

    first = saved_activations._Stored("first", 0, torch.zeros(4))
    first.copied = _Event(during=another_thread_queues)
    act._queue_copy(first)
    try:
        act._put_copied(block=False)
        racer.join(10)
        assert not racer.is_alive()
        assert first.put is done
        assert act._copying == [late]  # its put is issued later, not lost
        act._put_copied(block=True)
        assert late.put is done and not act._copying
    finally:
        tiered.detach(model)
