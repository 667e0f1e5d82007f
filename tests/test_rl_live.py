"""The rl agents governing a live store: they need no outcomes, so the governor runs them; they
promote what is read again, follow deletions, and the store refuses nothing they ask."""

from __future__ import annotations

import pytest
import torch

from helpers import wait_until
from tiered import policies
from tiered.store import TieredStore

KiB = 1 << 10
T = 30.0


def config(tmp_path, migration):
    return {"tiers": {"host": {"capacity": "8MiB"},
                      "fast": {"path": str(tmp_path / "fast"), "capacity": "256KiB"},
                      "slow": {"path": str(tmp_path / "slow"), "capacity": "16MiB"}},
            "engine": {"workers": 2},
            "policy": {"migration": migration, "migration_bandwidth": "1GB/s", "migration_batch": 4}}


def filled(v, n=64 * KiB // 4):
    return torch.full((n,), float(v), dtype=torch.float32)


def read(store, key):
    store.evict(key)
    return store.get(key).result(T)


@pytest.fixture
def rl_live(monkeypatch):
    from tiered.policies.rl import make_policy

    # registered under another name: the config refuses the name "rl" for live stores (NOT_LIVE)
    monkeypatch.setitem(policies._POLICIES, "rl-live-test", lambda: make_policy(batch=4, seed=0))
    return "rl-live-test"


def test_rl_governs_a_live_store(tmp_path, rl_live):
    with TieredStore(config(tmp_path, rl_live), cache_on_put=False) as s:
        for i in range(8):
            s.put(f"k{i}", filled(i), tier="slow", placed=False).result(T)
        s.delete("k7")
        for _ in range(6):  # k1 and k2 read again and again
            for k in ("k1", "k2", "k1", "k2"):
                assert torch.equal(read(s, k), filled(int(k[1])))
        assert wait_until(lambda: {s.meta(k)["tier"] for k in ("k1", "k2")} == {"fast"}), s.stats()["governor"]
        g = s.stats()["governor"]
        assert g["policy"] == "rl" and g["failed"] == 0 and g["last_error"] is None and g.get("stopped") is None
        assert g["refused_gone"] == g["refused_overfull"] == 0, g
        for i in range(7):
            assert torch.equal(read(s, f"k{i}"), filled(i))
