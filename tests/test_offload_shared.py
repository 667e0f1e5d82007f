"""Several offloaded models of one process on one shared store.

- a failed ``from_pretrained`` leaves the other models' store handle alone;
- two models read in place from one checkpoint are apart (their own keys);
- models of different sizes leave each other room to stream, and take back idle room;
- a model dropped without ``detach`` is cleaned up without deadlock and without failing
  unrelated calls; ``detach(keep=True)`` and re-offloading keep what was kept durable.
"""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tiered
from helpers import TINY_MODEL_MARKS, offload_config, tiny_llama
from tiered import OffloadError, offload_life

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(90), *TINY_MODEL_MARKS, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ROOT = Path(__file__).resolve().parent.parent
IDS = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(1))


def make_cfg(tmp_path, host="4MiB", *, lookahead=1, resident=False) -> dict:
    return offload_config(tmp_path, host, lookahead=lookahead, resident=resident)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _wide_and_deep(tmp_path):
    """A 4 MiB host tier with resident units for two models: A of 4 wide layers (256), B of 16
    narrow ones (64); their config, the models and their in-memory logits."""
    cfg = make_cfg(tmp_path, "4MiB", resident=True)
    a, b = tiny_llama(0, hidden=256, layers=4), tiny_llama(1, hidden=64, layers=16)
    return cfg, a, b, _logits(a), _logits(b)


def _fail_fast(model, seconds=3.0):
    model._tiered.store.host_wait = seconds  # a unit that finds no room fails fast


# --------------------------------------------------------------------------- from_pretrained


def test_failed_from_pretrained_leaves_the_other_models_store_open(tmp_path):
    cfg = make_cfg(tmp_path, "1MiB")
    tiny_llama(1, hidden=256).save_pretrained(tmp_path / "big")  # a block larger than the host tier
    a = tiny_llama(0)
    want = _logits(a)
    tiered.offload(a, cfg)
    store = a._tiered.store
    keys = set(store.keys())
    try:
        with pytest.raises(OffloadError, match="smaller than unit"):
            tiered.from_pretrained(tmp_path / "big", cfg)
        assert store._opened and store._shared_users == 1
        assert set(store.keys()) == keys, "the failed model left objects in the store"
        assert torch.equal(_logits(a), want)
    finally:
        tiered.detach(a)
    assert not store._opened


def test_two_models_of_one_checkpoint_are_apart(tmp_path):
    m = tiny_llama(0)
    want = _logits(m)
    m.save_pretrained(tmp_path / "ck")
    cfg = make_cfg(tmp_path)
    a = tiered.from_pretrained(tmp_path / "ck", cfg)
    b = tiered.from_pretrained(tmp_path / "ck", cfg)
    try:
        ra, rb = a._tiered, b._tiered
        assert ra.store is rb.store
        assert not {k for u in ra.units for k in u.keys} & {k for u in rb.units for k in u.keys}
        # a weight of A changed in the store (as an optimizer step does) leaves B's alone
        u = next(u for u in ra.units if u.packed_key is None)
        edit = ra.open_unit_params(u)
        for views in edit.views.values():
            for v in views:
                v.zero_()
        ra.write_unit_params(edit)
        ra.wait_writes()
        assert not torch.equal(_logits(a), want)
        assert torch.equal(_logits(b), want)
        tiered.detach(a)
        assert torch.equal(_logits(b), want)
    finally:
        if getattr(a, "_tiered", None) is not None:
            tiered.detach(a)
        tiered.detach(b)


def test_detach_keep_makes_trained_checkpoint_weights_durable(tmp_path):
    tiny_llama(0).save_pretrained(tmp_path / "ck")
    cfg = make_cfg(tmp_path)
    a = tiered.from_pretrained(tmp_path / "ck", cfg)
    b = tiered.offload(tiny_llama(1), cfg)  # keeps the shared store open after A's detach
    try:
        ra = a._tiered
        u = next(u for u in ra.units if u.packed_key is None)
        edit = ra.open_unit_params(u)
        ra.write_unit_params(edit)
        ra.wait_writes()
        written = [k for k in u.keys if ra.store.meta(k)["tier"] != "external"]
        assert written and all(ra.store.meta(k)["ephemeral"] for k in written)
        tiered.detach(a, keep=True)
        assert all(not ra.store.meta(k)["ephemeral"] for k in written)
    finally:
        tiered.detach(b)


# --------------------------------------------------------------------------- budgets of two models


def test_two_models_of_different_sizes_leave_each_other_room_to_stream(tmp_path):
    cfg, a, b, want_a, want_b = _wide_and_deep(tmp_path)
    tiered.offload(a, cfg)
    tiered.offload(b, cfg)
    _fail_fast(a)
    try:
        resident_b = tiered.offload_stats(b)["resident_bytes"]
        assert resident_b > 0
        for _ in range(2):
            assert torch.equal(_logits(b), want_b)
            assert torch.equal(_logits(a), want_a)
        # B planned its residents around A's streaming room: A never had to take them back
        assert tiered.offload_stats(b)["resident_bytes"] == resident_b
    finally:
        tiered.detach(a)
        tiered.detach(b)


def test_a_larger_model_takes_back_an_idle_models_resident_room(tmp_path):
    cfg, a, b, want_a, want_b = _wide_and_deep(tmp_path)
    tiered.offload(b, cfg)  # the small one first: its residents fill what it does not stream with
    assert tiered.offload_stats(b)["resident_bytes"] > 0
    tiered.offload(a, cfg)
    _fail_fast(a)
    try:
        for _ in range(2):
            assert torch.equal(_logits(a), want_a)
            assert torch.equal(_logits(b), want_b)
    finally:
        tiered.detach(a)
        tiered.detach(b)


def test_another_model_leaves_a_detaching_models_units_alone(tmp_path):
    cfg = make_cfg(tmp_path, "4MiB", lookahead=2)
    a, b = tiny_llama(0), tiny_llama(1)
    want_a = _logits(a)
    tiered.offload(a, cfg)
    tiered.offload(b, cfg)
    ra = a._tiered
    collect = ra._collect

    given = []

    def collect_then_other_model_wants_room(u):  # B's forward, in another thread, at the worst time
        collect(u)
        given.append(ra.compute_res.on_pressure(1 << 30))  # what the store calls for B's allocation

    ra._collect = collect_then_other_model_wants_room
    try:
        tiered.detach(a)
        assert given and not any(given)
        assert torch.equal(_logits(a), want_a)
    finally:
        if getattr(a, "_tiered", None) is not None:
            ra._collect = collect
            tiered.detach(a)
        tiered.detach(b)


# --------------------------------------------------------------------------- models dropped without detach


def test_collected_model_does_not_deadlock_a_thread_holding_the_registry_lock(tmp_path):
    code = textwrap.dedent("""
        import gc
        from tiered import offload_life

        class Runtime:  # what OffloadedModule.__del__ does, in a cycle with its model
            store = None
            _finished = _orphaned = False
            def abandon(self): pass
            def __del__(self): offload_life.orphaned(self)

        class Model: pass

        r, m = Runtime(), Model()
        r.model, m.rt = m, r
        del r, m
        with offload_life._lock:  # the garbage collector runs inside watch(), forget(), ...
            gc.collect()
        assert len(offload_life._orphans) == 1
        print("ok")
    """)
    proc = _run_with_timeout(code, tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def _run_with_timeout(code: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                              env=env, cwd=cwd)
    except subprocess.TimeoutExpired:
        pytest.fail("the process deadlocked: orphaned() waited for a lock its own thread holds")


def test_forward_that_finds_no_room_cleans_up_dropped_models(tmp_path):
    cfg = make_cfg(tmp_path, "2MiB", lookahead=32)
    b = tiny_llama(1, hidden=128)
    want_b = _logits(b)
    tiered.offload(b, cfg)
    a = tiered.offload(tiny_llama(0, hidden=64, layers=16), cfg)
    store, owner_a = a._tiered.store, a._tiered.owner
    _logits(a)
    _logits(a)  # its prefetches of the next forward fill what B's reserved floor leaves of the host tier
    b_floor = store.owners()[b._tiered.owner]["host"]["reserved"]
    assert b_floor >= max(u.nbytes for u in b._tiered.units)
    assert store.arena.stats().in_use >= store.arena.capacity - b_floor - max(u.nbytes for u in a._tiered.units)
    del a
    gc.collect()
    _fail_fast(b)
    try:
        assert torch.equal(_logits(b), want_b)
        assert torch.equal(_logits(b), want_b)
        offload_life.collect()  # what the next offload or detach does first
        assert store.owners()[owner_a]["host"]["held"] == 0
        assert store.owners()[owner_a]["host"]["reserved"] == 0
    finally:
        tiered.detach(b)


def _drop_model_whose_cleanup_fails(cfg):
    ra = tiered.offload(tiny_llama(0), cfg)._tiered

    def abandon_then_fail(abandon=ra.abandon):  # gives everything back, then reports a failure
        abandon()
        raise RuntimeError("cleanup failed")

    ra.abandon = abandon_then_fail
    return ra.prefix, ra.store


def test_a_failing_orphan_cleanup_is_logged_not_raised_by_an_unrelated_offload(tmp_path, caplog):
    cfg = make_cfg(tmp_path)
    prefix, store = _drop_model_whose_cleanup_fails(cfg)
    gc.collect()
    b = tiny_llama(1)
    want = _logits(b)
    with caplog.at_level(logging.ERROR, logger="tiered.offload_life"):
        tiered.offload(b, cfg)
    try:
        assert torch.equal(_logits(b), want)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors and prefix in errors[0].getMessage() and "LlamaForCausalLM" in errors[0].getMessage()
        assert "cleanup failed" in caplog.text
        assert not store._opened  # the orphan gave its handle back before the failure
    finally:
        tiered.detach(b)


def test_offloading_again_over_kept_objects_keeps_them_durable(tmp_path):
    cfg = make_cfg(tmp_path)
    m = tiny_llama(0)
    want = _logits(m)
    keeper = tiered.offload(tiny_llama(1), cfg)  # keeps the shared store open between the two offloads
    try:
        tiered.offload(m, cfg)
        keys = [u.packed_key for u in m._tiered.units]
        tiered.detach(m, keep=True)
        tiered.offload(m, cfg)
        store = m._tiered.store
        assert all(not store.meta(k)["ephemeral"] for k in keys), "kept objects became scratch again"
        assert torch.equal(_logits(m), want)
        tiered.detach(m)
        assert not any(k in store for k in keys)
    finally:
        tiered.detach(keeper)


def test_a_forward_that_finds_no_room_takes_back_an_idle_models_residents(tmp_path):
    cfg, a, b, want_a, want_b = _wide_and_deep(tmp_path)
    tiered.offload(a, cfg)
    ra = a._tiered
    store = ra.store
    _fail_fast(a)
    # another client of the store holds host memory next to A's residents, unknown to the plans
    room = store.arena.capacity - ra.host_pinned_bytes() - max(u.nbytes for u in ra.units)
    store.put("other/blob", torch.zeros(room // 2, dtype=torch.uint8)).result(timeout=30)
    store.evict("other/blob")
    store.trim()
    store.arena.rewind()
    lease = store.acquire("other/blob", wait=0.0).result(timeout=30)
    try:
        tiered.offload(b, cfg)  # its residents leave A's largest unit no room
        assert tiered.offload_stats(b)["resident_bytes"] > 0
        assert store.arena.stats().largest_free < max(u.nbytes for u in ra.units)
        assert torch.equal(_logits(a), want_a)
        lease.release()
        lease = None
        assert torch.equal(_logits(b), want_b)
        assert torch.equal(_logits(a), want_a)
    finally:
        if lease is not None:
            lease.release()
        store.delete("other/blob")
        tiered.detach(a)
        if getattr(b, "_tiered", None) is not None:
            tiered.detach(b)
