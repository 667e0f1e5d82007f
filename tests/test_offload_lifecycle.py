"""An offloaded model's objects are this process's scratch, and its store is shared.

- the weights ``offload`` writes are ephemeral: a process that exits without ``detach``,
  or is killed, leaves no objects and no allocated blocks in the store; ``detach(keep=True)``
  makes them durable;
- models offloaded with one config in one process share one store; a model dropped without
  ``detach`` gives back its pins, its objects and its store handle once collected.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import tiered
from helpers import TINY_MODEL_MARKS, allocated_bytes, offload_config, tiny_llama
from tiered import OffloadError
from tiered.store import TieredStore

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(90), *TINY_MODEL_MARKS, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

KiB = 1 << 10
ROOT = Path(__file__).resolve().parent.parent
IDS = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(1))


def _generate(model):
    with torch.no_grad():
        return model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=6, do_sample=False)


def _allocated_bytes(cfg: dict) -> int:
    return allocated_bytes(cfg["tiers"]["nvme"]["path"])


def _assert_store_empty(cfg: dict, blocks: bool = True) -> None:
    with TieredStore(cfg) as store:
        assert store.keys() == [], "objects left in the store"
        assert store.stats()["tiers"]["nvme"]["used"] == 0
    if blocks:  # (the store keeps the blocks of versions a put superseded, for reuse)
        assert _allocated_bytes(cfg) == 0, "blocks of deleted objects still allocated in the data file"


# --------------------------------------------------------------------------- ephemeral objects

CHILD = textwrap.dedent("""
    import json, sys, time
    import torch, transformers, tiered
    cfg = json.loads(sys.argv[1])
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).eval()
    tiered.offload(m, cfg)
    with torch.no_grad():
        m(torch.ones(1, 4, dtype=torch.long))
    print("offloaded", len(m._tiered.store.keys()), flush=True)
    if sys.argv[2] == "hang":
        time.sleep(80)
""")


def _child(cfg: dict, mode: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_line(proc: subprocess.Popen, timeout: float) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            return proc.stdout.readline()
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"child printed nothing; stderr: {proc.stderr.read()[-2000:]}")


def test_process_exiting_without_detach_leaves_nothing(tmp_path):
    cfg = offload_config(tmp_path, "1MiB")
    proc = _child(cfg, "exit")
    line = _wait_line(proc, 60)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()[-2000:]
    assert line.split()[0] == "offloaded" and int(line.split()[1]) > 0
    assert _allocated_bytes(cfg) == 0, "the exiting process left the weights' blocks allocated"
    _assert_store_empty(cfg)


def test_killed_process_leaves_nothing_after_the_next_open(tmp_path):
    cfg = offload_config(tmp_path, "1MiB")
    proc = _child(cfg, "hang")
    try:
        assert _wait_line(proc, 60).startswith("offloaded")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _allocated_bytes(cfg) > 0  # the killed process cleaned up nothing itself
    _assert_store_empty(cfg)


def test_detach_keep_makes_the_objects_durable(tmp_path):
    cfg = offload_config(tmp_path, "1MiB")
    model = tiny_llama()
    tiered.offload(model, cfg)
    keys = list(model._tiered.store.keys())
    tiered.detach(model, keep=True)
    with TieredStore(cfg) as store:  # after the wrapper's store closed
        assert sorted(store.keys()) == sorted(keys)
        assert not any(store.meta(k)["ephemeral"] for k in keys)
    tiered.offload(model, cfg)  # again, over the kept objects; a plain detach deletes them
    tiered.detach(model)
    _assert_store_empty(cfg, blocks=False)


def test_demo_round_trip_interrupted_leaves_nothing(tmp_path, monkeypatch):
    from tiered import demo, probe

    cfg = offload_config(tmp_path, "4MiB")
    monkeypatch.setattr(demo, "DEMO_OBJECTS", 8)
    monkeypatch.setattr(demo, "DEMO_OBJECT_BYTES", 256 * KiB)
    monkeypatch.setattr(demo, "DEMO_HOST_BUDGET", 1 << 20)
    monkeypatch.setattr(probe, "probe", lambda *a, **k: None)
    monkeypatch.setattr(probe, "print_probe", lambda *a, **k: None)

    def interrupt(msg):
        if msg.startswith("get"):
            raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_progress", interrupt)
    with pytest.raises(KeyboardInterrupt):
        demo.run_store_demo(cfg)
    _assert_store_empty(cfg)


def test_demo_generation_interrupted_detaches(tmp_path):
    from tiered import demo
    from tiered.config import load_config

    cfg = load_config(offload_config(tmp_path, "2MiB"))
    seen = []

    def small_config(**_kw):
        return transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

    def offload_then_interrupt(model, config):
        tiered.offload(model, config)
        seen.append(model)

        def interrupted(*_a, **_k):
            raise KeyboardInterrupt
        model.generate = interrupted
        return model

    with pytest.raises(KeyboardInterrupt):
        demo._generate(cfg, cfg, offload_then_interrupt, tiered.detach, tiered.offload_stats, small_config,
                       transformers.LlamaForCausalLM)
    assert seen and seen[0]._tiered is None, "the interrupted demo left its model offloaded"
    _assert_store_empty(offload_config(tmp_path, "2MiB"))


# --------------------------------------------------------------------------- one store per process


def test_two_models_with_one_config_in_one_process(tmp_path):
    cfg = offload_config(tmp_path, "1MiB")
    a, b = tiny_llama(0), tiny_llama(1)
    want_a, want_b = _generate(a), _generate(b)
    tiered.offload(a, cfg)
    tiered.offload(b, cfg)
    try:
        assert a._tiered.store is b._tiered.store
        assert torch.equal(_generate(a), want_a)
        assert torch.equal(_generate(b), want_b)
        assert torch.equal(_generate(a), want_a)
    finally:
        tiered.detach(a)
        tiered.detach(b)
    _assert_store_empty(cfg)


def test_model_dropped_without_detach_gives_everything_back(tmp_path):
    cfg = offload_config(tmp_path, "1MiB")
    m = tiny_llama(0)
    want = _generate(m)
    tiered.offload(m, cfg)
    first = {k for k in m._tiered.store.keys()}
    store = m._tiered.store
    _generate(m)
    del m
    gc.collect()
    m = tiny_llama(0)  # a notebook cell run again
    tiered.offload(m, cfg)
    try:
        assert torch.equal(_generate(m), want)
        assert not first & set(m._tiered.store.keys()), "the dropped model's objects are still in the store"
        assert m._tiered.store is not store or store._shared_users == 1
    finally:
        tiered.detach(m)
    assert not store._opened, "a handle of the dropped model kept the store open"
    _assert_store_empty(cfg)


def test_offloading_an_offloaded_model_again_is_a_clear_error(tmp_path):
    cfg = offload_config(tmp_path, "1MiB")
    m = tiny_llama(0)
    tiered.offload(m, cfg)
    try:
        with pytest.raises(OffloadError, match="already offloaded.*detach"):
            tiered.offload(m, cfg)
        assert torch.equal(_generate(m), _generate(m))
    finally:
        tiered.detach(m)


def test_two_models_streaming_through_one_small_budget(tmp_path):
    """Each model's prefetches for its next forward stay pinned between forwards; the other model
    takes that room back when it needs it (else it would wait for the host tier until it gives up)."""
    cfg = offload_config(tmp_path, 320 * KiB, lookahead=2, resident=False)
    a, b = tiny_llama(0), tiny_llama(1)
    want_a, want_b = _generate(a), _generate(b)
    tiered.offload(a, cfg)
    tiered.offload(b, cfg)
    a._tiered.store.host_wait = 3.0  # a leaked pin fails fast
    try:
        for _ in range(2):
            assert torch.equal(_generate(a), want_a)
            assert torch.equal(_generate(b), want_b)
    finally:
        tiered.detach(a)
        tiered.detach(b)
