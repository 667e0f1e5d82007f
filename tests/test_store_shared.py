"""One store per directory per process: TieredStore.shared() and clear lock errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import store_config
from tiered.store import StoreError, TieredStore

T = 10.0
HERE = Path(__file__).resolve().parent


def test_shared_returns_the_open_store_and_closes_with_its_last_user(tmp_path):
    cfg = store_config(tmp_path)
    a = TieredStore.shared(cfg)
    b = TieredStore.shared(dict(cfg))  # an equal config, another object
    assert a is b
    a.put("k", torch.ones(4)).result(T)
    a.close()
    assert torch.equal(b.get("k").result(T), torch.ones(4)), "closed while a user still had it"
    b.close()
    with pytest.raises(StoreError, match="not open"):
        b.get("k")
    c = TieredStore.shared(cfg)  # the last close released the directory: a fresh store
    assert c is not a and c.keys() == ["k"]
    c.close()
    with TieredStore(cfg) as s:  # and plain open() works again
        assert s.keys() == ["k"]


def test_shared_with_another_config_names_the_differing_settings(tmp_path):
    s = TieredStore.shared(store_config(tmp_path))
    try:
        with pytest.raises(StoreError) as ei:
            TieredStore.shared(store_config(tmp_path, host="32MiB"))
        assert "tiers.host.capacity" in str(ei.value) and str(tmp_path / "nvme") in str(ei.value)
        with pytest.raises(StoreError, match="host_wait"):
            TieredStore.shared(store_config(tmp_path), host_wait=1.0)
    finally:
        s.close()


def test_plain_open_next_to_a_shared_store_says_it_is_this_process(tmp_path):
    cfg = store_config(tmp_path)
    with TieredStore(cfg) as plain:
        with pytest.raises(StoreError) as ei:
            TieredStore.shared(cfg)
        msg = str(ei.value)
        assert "this process" in msg and "close" in msg and "lock" in msg, msg
        with pytest.raises(StoreError, match="this process"):
            TieredStore(cfg).open()
        assert plain.keys() == []
    s = TieredStore.shared(cfg)
    try:
        with pytest.raises(StoreError, match=r"this process.*TieredStore\.shared"):
            TieredStore(cfg).open()
    finally:
        s.close()


def test_lock_error_names_the_holding_process(tmp_path):
    cfg = store_config(tmp_path)
    holder = subprocess.Popen([sys.executable, str(HERE / "crash_writer.py"), "hold", json.dumps(cfg)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "OPEN", holder.stderr.read()
        with pytest.raises(StoreError) as ei:
            TieredStore.shared(cfg)
        assert f"pid {holder.pid}" in str(ei.value) and "another process" in str(ei.value)
    finally:
        holder.kill()
        holder.wait(T)


def test_a_fork_child_does_not_inherit_the_parents_shared_store(tmp_path):
    cfg = store_config(tmp_path)
    out = subprocess.run([sys.executable, str(HERE / "store_child.py"), "shared", json.dumps(cfg)],
                         capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert lines[-1:] == ["READY"], out.stdout + out.stderr
    assert lines[0].startswith("CHILD ERROR") and "another process" in lines[0], lines
