"""``tiered bench replay``: sim and real modes, table/JSON/plot, errors, sim-vs-real decision parity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tiered.policies import create_policy
from tiered.policies.sim import prepare, simulate
from tiered.tools.cli import main
from tiered.config import load_config
from tiered.store import TieredStore
from tiered.tools.replay import run_real, tier_models
from tiered.traces import Trace, read_trace, write_text

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "traces" / "data"
PUBLIC = ROOT.parent / "shared" / "traces" / "public"
pytestmark = pytest.mark.timeout(120)


def small_trace(n=3000, keys=400, seed=0, writes=0.2) -> Trace:
    rng = np.random.default_rng(seed)
    k = rng.zipf(1.3, n) % keys
    return Trace(np.arange(n) * 1e-4, k, np.full(n, 4096), (rng.random(n) < writes).astype(np.uint8),
                 np.full(n, 5, np.uint8), None, True)


def write_config(tmp_path: Path) -> Path:
    (tmp_path / "nvme").mkdir(exist_ok=True)
    p = tmp_path / "tiers.toml"
    p.write_text(f'[tiers.host]\ncapacity = "64MiB"\n\n[tiers.nvme]\npath = "{tmp_path / "nvme"}"\n'
                 f'capacity = "1GiB"\nread_bandwidth = "1GB/s"\n\n[engine]\nworkers = 2\nchunk = "1MiB"\n')
    return p


def test_json_rows_and_plot(tmp_path, capsys):
    out = tmp_path / "p.png"
    rc = main(["bench", "replay", str(DATA / "offload-llama-generate.trace"), "--json", "--plot", str(out),
               "--policy", "lru,lfu,arc,s3fifo,static,belady", "--fast-fraction", "0.5"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in rows] == ["lru", "lfu", "arc", "s3fifo", "static", "belady"]
    for r in rows:
        assert {"policy", "hit_ratio", "mean_latency_us", "p99_latency_us", "bytes_migrated"} <= set(r)
        assert set(r["hit_ratio"]) == {"host", "nvme"} and math.isclose(sum(r["hit_ratio"].values()), 1.0)
        assert r["p99_latency_us"] >= r["mean_latency_us"] * 0.0 and r["accesses"] == 451
    best = max(r["hit_ratio"]["host"] for r in rows if r["policy"] != "belady")
    assert rows[-1]["hit_ratio"]["host"] >= best
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"


def test_table_output_and_text_trace(tmp_path, capsys):
    p = tmp_path / "t.txt"
    write_text(small_trace(500), p)
    assert main(["bench", "replay", str(p), "--policy", "lru,belady", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "500 accesses" in out and "hit host" in out and "mean us" in out
    assert out.splitlines()[2].startswith("lru") and out.splitlines()[3].startswith("belady")


def test_config_tiers_and_capacity(tmp_path):
    cfg = load_config(write_config(tmp_path))
    t = tier_models(cfg, 1_000_000, 0.05)
    assert [x.name for x in t] == ["host", "nvme"] and t[0].capacity == 50_000 and t[1].capacity == math.inf
    assert t[1].read_bw == 1e9
    t = tier_models(cfg, 1_000_000, 0.05, use_config_capacity=True)
    assert t[0].capacity == 64 << 20
    with pytest.raises(ValueError, match="fast fraction"):
        tier_models(cfg, 1, 0.0)
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"storage": [{"name": "nvme", "read_gbps": 2.5, "write_gbps": None}]}))
    from tiered.tools.replay import measured_bandwidths
    t = tier_models(cfg, 1_000_000, 0.05, measured=measured_bandwidths(probe))
    assert t[1].read_bw == 2.5e9 and t[1].write_bw == 2e9  # measured read, typical write


def test_errors_are_clear(tmp_path, capsys):
    assert main(["bench", "replay", str(DATA / "store-roundtrip.trace"), "--policy", "lru,nope"]) == 2
    assert "unknown policy 'nope'; known:" in capsys.readouterr().err
    bad = tmp_path / "bad.trace"
    bad.write_text("1 2 3 4 1\n1 2 x 4 1\n")
    assert main(["bench", "replay", str(bad)]) == 2
    assert f"{bad}:2: start_sector 'x'" in capsys.readouterr().err


def test_learning_policy_gets_final_window_row(tmp_path, capsys, monkeypatch):
    from tiered.policies import register_policy
    from tiered.policies.cache import CachingMigration
    from tiered.policies.lru import LRU

    class Learner(CachingMigration):
        learns = True

        def __init__(self):
            super().__init__("learner", LRU)
            self.seen = 0

        def observe(self, outcomes):
            self.seen += len(outcomes)

    register_policy("learner-test", Learner)
    p = tmp_path / "t.txt"
    write_text(small_trace(1000), p)
    assert main(["bench", "replay", str(p), "--policy", "learner-test", "--json", "--window", "0.25"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in rows] == ["learner", "learner (final 25%)"]
    assert rows[1]["accesses"] == 250 and rows[1]["window_start"] == 750


@pytest.mark.parametrize("name", ["lru", "arc", "s3fifo", "belady"])
def test_real_mode_makes_the_simulators_decisions(tmp_path, name):
    """Real I/O through the engine serves every access from the same tier as the simulator
    (the heuristics' decisions do not depend on timing) and migrates the same bytes."""
    cfg = load_config(write_config(tmp_path))
    tr = small_trace(2500)
    prep = prepare(tr.time, tr.key, tr.size, tr.op, tr.kind)
    tiers = tier_models(cfg, prep.footprint, 0.1)
    sim = simulate(prep, tiers, create_policy(name))
    real = run_real(prep, tiers, create_policy(name), cfg)
    assert np.array_equal(sim.served, real.served)
    assert sim.bytes_migrated == real.bytes_migrated
    assert real.peak_used[0] <= tiers[0].capacity
    assert np.all(real.latency_s > 0) and real.total_time_s > 0
    assert not list((tmp_path / "nvme").glob(".replay-*")), "real mode left its data file"
    with TieredStore(cfg) as store:
        assert store.keys() == [], "real mode left objects in the store"


def test_real_mode_cli(tmp_path, capsys):
    cfg = write_config(tmp_path)
    p = tmp_path / "t.txt"
    write_text(small_trace(800), p)
    assert main(["bench", "replay", str(p), "--mode", "real", "--config", str(cfg), "--policy", "lru,static",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in rows] == ["lru", "static"] and all(r["mean_latency_us"] > 0 for r in rows)


def test_an_mqsim_trace_replays_from_the_cli(tmp_path, capsys):
    import trace_samples  # tests/trace_samples.py: the public MQSim format, generated

    p = tmp_path / "tpcc.trace"
    trace_samples.mqsim(p, requests=3000)
    assert main(["bench", "replay", str(p), "--json", "--policy", "lru,belady"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[1]["hit_ratio"]["host"] >= rows[0]["hit_ratio"]["host"]  # Belady is optimal
    assert rows[0]["accesses"] == rows[1]["accesses"] >= 3000


@pytest.mark.skipif(not (PUBLIC / "mqsim-tpcc-small.trace").exists(), reason="the public traces are not beside this checkout")
def test_public_mqsim_replays(capsys):
    p = PUBLIC / "mqsim-tpcc-small.trace"
    assert main(["bench", "replay", str(p), "--json", "--policy", "lru,belady"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[1]["hit_ratio"]["host"] >= rows[0]["hit_ratio"]["host"]
    assert all(r["accesses"] == 20669 for r in rows)


def test_loop_choice():
    from tiered.tools.replay import choose_loop

    tiers = tier_models(None, 1 << 20, 0.1)
    slow = Trace(np.arange(10.0), np.arange(10), np.full(10, 4096), np.zeros(10, np.uint8), np.full(10, 5, np.uint8))
    assert choose_loop(slow, tiers)[0] is False
    fast = Trace(np.arange(10.0) * 1e-9, np.arange(10), np.full(10, 1 << 20), np.zeros(10, np.uint8),
                 np.full(10, 5, np.uint8))
    closed, why = choose_loop(fast, tiers)
    assert closed and "exceeds the nvme tier" in why
    untimed = Trace(np.zeros(3), np.arange(3), np.ones(3), np.zeros(3, np.uint8), np.zeros(3, np.uint8), timed=False)
    assert choose_loop(untimed, tiers) == (True, "closed loop (the trace has no timestamps)")


def test_real_mode_small_objects(tmp_path):
    """512-byte objects (ARC pages) are page-aligned in the arena: the budget still holds."""
    cfg = load_config(write_config(tmp_path))
    rng = np.random.default_rng(5)
    k = rng.zipf(1.2, 1500) % 300
    prep = prepare(np.zeros(1500), k, np.full(1500, 512), np.zeros(1500, np.uint8), np.full(1500, 5, np.uint8))
    tiers = tier_models(cfg, prep.footprint, 0.5)
    sim = simulate(prep, tiers, create_policy("lru"))
    real = run_real(prep, tiers, create_policy("lru"), cfg)
    assert np.array_equal(sim.served, real.served) and real.peak_used[0] <= tiers[0].capacity


def test_real_mode_runs_in_a_live_store_shared_with_another_owner(tmp_path):
    """Real mode's fast tier is the store's host tier, charged to owner "replay", next to another
    owner's buffer and cached objects; it makes the simulator's decisions and leaves nothing behind."""
    import torch

    cfg = {"tiers": {"host": {"capacity": "24MiB"}, "nvme": {"path": str(tmp_path / "nvme"), "capacity": "256MiB"}},
           "engine": {"workers": 2, "chunk": "1MiB"}}
    tr = small_trace(2000, seed=3)
    prep = prepare(tr.time, tr.key, tr.size, tr.op, tr.kind)
    tiers = tier_models(load_config(cfg), prep.footprint, 0.1)
    sim = simulate(prep, tiers, create_policy("lru"))
    with TieredStore(cfg, hugepages=False) as store, store.reserve("host", "6MiB", owner="other") as other:
        mine = other.alloc(4 << 20)
        mine.array[:] = 7
        kept = torch.arange(64 * 1024, dtype=torch.float32)
        store.put("other/kept", kept, owner="other").result(timeout=60)
        real = run_real(prep, tiers, create_policy("lru"), store=store)
        assert np.array_equal(sim.served, real.served) and sim.bytes_migrated == real.bytes_migrated
        figures = store.owners()["replay"]
        assert figures["host"]["held"] == 0 and figures["host"]["peak"] >= real.peak_used[0] > 0
        assert figures["nvme"]["peak"] >= prep.footprint and figures["nvme"]["held"] == 0
        assert store.keys() == ["other/kept"] and torch.equal(store.get("other/kept").result(timeout=60), kept)
        assert (mine.array == 7).all()
        assert store.stats()["tiers"]["nvme"]["bytes_read"] > 0  # the backing tier was read for real
        mine.release()
