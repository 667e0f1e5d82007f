"""Real-mode replay runs a trace through a live store and its governor: the simulator's decisions
from the store's own figures, every read checked against the last write, nothing left behind."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tiered.config import load_config
from tiered.policies import HEURISTICS, TierModel, create_policy
from tiered.policies.sim import prepare, simulate
from tiered.store import TieredStore
from tiered.tools.args import UsageError
from tiered.tools.cli import main
from tiered.tools.replay import run_real, run_replay
from tiered.traces import Trace, write_text

KiB = 1 << 10
pytestmark = pytest.mark.timeout(300)


def config(tmp_path):
    (tmp_path / "nvme").mkdir(exist_ok=True)
    return load_config({"tiers": {"host": {"capacity": "64MiB"},
                                  "nvme": {"path": str(tmp_path / "nvme"), "capacity": "1GiB"}},
                        "engine": {"workers": 2}})


def accesses(n, keys, sizes, writes, seed=0):
    """Zipf-popular keys, one size per object (drawn from ``sizes``), ``writes`` of them writes."""
    rng = np.random.default_rng(seed)
    k = rng.zipf(1.3, n) % keys
    size = np.asarray(sizes)[rng.integers(0, len(sizes), keys)][k]
    return np.arange(n) * 1e-4, k, size, (rng.random(n) < writes).astype(np.uint8), np.full(n, 5, np.uint8)


def two_tiers(fast_bytes):
    return (TierModel("host", fast_bytes, 1e-6, 1e10, 1e10), TierModel("nvme", math.inf, 80e-6, 3e9, 2e9))


def reads_of_stored_objects(prep):
    return int(((prep.op == 0) & (prep.prev >= 0)).sum())


@pytest.mark.parametrize("name", HEURISTICS)
def test_real_mode_makes_the_simulators_decisions(tmp_path, name):
    """Objects of one size (8 KiB): the fast tier never fragments, so the store refuses no move
    and the governor, fed the accesses one by one, serves each from the simulator's tier."""
    prep = prepare(*accesses(600, 100, [8 * KiB], writes=0.2))
    tiers = two_tiers(10 * 8 * KiB)
    sim = simulate(prep, tiers, create_policy(name))
    real = run_real(prep, tiers, name, config(tmp_path))
    e = real.extra
    assert np.array_equal(sim.served, real.served)
    assert real.decisions == sim.decisions == prep.n
    # The store keeps one copy of an object, so each demotion moves its bytes; the simulator's
    # backing tier holds a copy of every object, so there a clean demotion moves nothing.
    assert real.migrations - e["clean_demotions"] == sim.migrations
    assert real.bytes_migrated - e["clean_demoted_bytes"] == sim.bytes_migrated
    assert real.migrations == e["governor"]["migrations"] + e["fills"]  # the store's own count
    assert e["promotions"] + e["demotions"] == e["governor"]["migrations"]
    assert e["refused"] == 0 and e["placed_below"] == 0 and e["displaced_writes"] == 0
    assert e["rewrite_moves"] > 0  # writes found the fast tier full: covered too
    assert e["host_copies_read"] == 0  # every read reached its storage tier
    assert e["verified_reads"] == reads_of_stored_objects(prep)
    assert real.peak_used[0] <= tiers[0].capacity and np.all(real.latency_s > 0)
    assert not list((tmp_path / "nvme").iterdir()), "the replay left its directories"


def test_a_real_replay_reads_back_every_write_and_leaves_nothing_in_its_store(tmp_path):
    """Mixed sizes and many writes: every read returns the object's last write, and the store's
    manifest names nothing afterwards (its objects were ephemeral and deleted on close)."""
    prep = prepare(*accesses(500, 80, [4 * KiB, 8 * KiB, 12 * KiB], writes=0.4, seed=1))
    tiers = two_tiers(16 * 4 * KiB)
    real = run_real(prep, tiers, "arc", config(tmp_path), workdir=tmp_path / "replay")
    assert real.extra["verified_reads"] == reads_of_stored_objects(prep) > 100
    assert real.peak_used[0] <= tiers[0].capacity
    manifest = json.loads((tmp_path / "replay" / "fast" / "manifest.json").read_text())
    assert manifest["objects"] == {} and set(manifest["tiers"]) == {"fast", "backing"}
    cfg = {"tiers": {"host": {"capacity": "8MiB"}, **{t: {"path": str(tmp_path / "replay" / t), "capacity": "2MiB"}
                                                      for t in ("fast", "backing")}}}
    with TieredStore(cfg) as store:
        assert store.keys() == []


def test_a_read_of_other_bytes_than_the_last_write_stops_the_replay(tmp_path, monkeypatch):
    from tiered.io_engine import chain
    from tiered.tools.replay.real import ReplayDataError

    get = TieredStore.get

    def flipped(self, key, **kw):
        def flip(t):
            t[-1] ^= 1
            return t
        return chain(get(self, key, **kw), flip, f"get {key}")

    monkeypatch.setattr(TieredStore, "get", flipped)
    prep = prepare(*accesses(100, 20, [4 * KiB], writes=0.2))
    with pytest.raises(ReplayDataError, match=r"object replay/\d+ read back other bytes than its last write"):
        run_real(prep, two_tiers(4 * 4 * KiB), "lru", config(tmp_path))
    assert not list((tmp_path / "nvme").iterdir()), "a failed replay left its directories"


def test_policies_a_live_store_cannot_run_are_refused_in_one_line(tmp_path, capsys):
    cfg = config(tmp_path)
    p = tmp_path / "t.txt"
    write_text(Trace(*accesses(50, 10, [4096], writes=0.0)), p)
    for name, why in (("belady", "it needs the future"), ("rl", "its decisions cost")):
        argv = ["bench", "replay", str(p), "--mode", "real", "--config", str(tmp_path / "c.toml"), "--policy",
                f"lru,{name}"]
        (tmp_path / "c.toml").write_text(f'[tiers.host]\ncapacity = "64MiB"\n[tiers.nvme]\npath = "{tmp_path / "nvme"}"\ncapacity = "1GiB"\n')
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: policy {name!r} runs in --mode sim only: {why}") and err.count("\n") == 1
    prep_trace = Trace(*accesses(50, 10, [4096], writes=0.0))
    with pytest.raises(UsageError, match="options run in --mode sim only"):
        run_replay(prep_trace, ["lru"], two_tiers(8192), mode="real", cfg=cfg, policy_options={"lru": {"x": 1}})
    assert not list((tmp_path / "nvme").iterdir())


def test_real_mode_replays_every_heuristic_by_default(tmp_path, capsys):
    p = tmp_path / "t.txt"
    write_text(Trace(*accesses(120, 30, [4096], writes=0.2)), p)
    (tmp_path / "nvme").mkdir()
    (tmp_path / "c.toml").write_text(f'[tiers.host]\ncapacity = "64MiB"\n[tiers.nvme]\npath = "{tmp_path / "nvme"}"\ncapacity = "1GiB"\n')
    assert main(["bench", "replay", str(p), "--mode", "real", "--config", str(tmp_path / "c.toml"), "--json",
                 "--fast-fraction", "0.2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in rows] == list(HEURISTICS)
    assert all(r["accesses"] == 120 and r["mean_latency_us"] > 0 for r in rows)


def test_real_mode_refuses_a_footprint_over_its_limit_and_a_fast_tier_below_one_extent(tmp_path):
    prep = prepare(*accesses(50, 10, [4096], writes=0.0))
    cfg = config(tmp_path)
    with pytest.raises(UsageError, match="trace footprint 40 KiB exceeds the real-mode limit 32 KiB"):
        run_real(prep, two_tiers(8192), "lru", cfg, max_footprint=32 * KiB)
    with pytest.raises(UsageError, match="fast tier 'host' of 4000 bytes holds no 4 KiB extent; raise --fast-fraction"):
        run_real(prep, two_tiers(4000), "lru", cfg)
    assert not list((tmp_path / "nvme").iterdir())


def test_a_policy_that_raises_in_the_governor_stops_the_replay_with_its_error(tmp_path, monkeypatch):
    from tiered import policies
    from tiered.policies import PolicyError
    from tiered.policies.cache import CachingMigration
    from tiered.policies.lru import LRU

    class Broken(CachingMigration):
        def decide(self, batch):
            if any(o.count > 1 for o in batch):
                raise RuntimeError("broken policy")
            return super().decide(batch)

    monkeypatch.setitem(policies._POLICIES, "broken-test", lambda: Broken("broken-test", LRU))
    prep = prepare(*accesses(100, 20, [4096], writes=0.2))
    with pytest.raises(PolicyError, match="the store's governor stopped: RuntimeError: broken policy"):
        run_real(prep, two_tiers(4 * 4096), "broken-test", config(tmp_path))
    assert not list((tmp_path / "nvme").iterdir())
