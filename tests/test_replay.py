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
    """512-byte objects (ARC pages) take a 4 KiB extent each on the store's tiers: real mode makes
    the decisions the simulator makes for 4 KiB objects on the same tiers."""
    cfg = load_config(write_config(tmp_path))
    rng = np.random.default_rng(5)
    k = rng.zipf(1.2, 800) % 200
    cols = np.zeros(800), k, np.full(800, 512), np.zeros(800, np.uint8), np.full(800, 5, np.uint8)
    prep = prepare(*cols)
    tiers = tier_models(cfg, 64 * 4096, 0.25)  # a fast tier of 16 extents
    as_stored = prepare(cols[0], k, np.full(800, 4096), *cols[3:])
    sim = simulate(as_stored, tiers, create_policy("lru"))
    real = run_real(prep, tiers, "lru", cfg)
    assert np.array_equal(sim.served, real.served) and real.peak_used[0] <= tiers[0].capacity
    assert real.extra["refused"] == 0 and real.extra["verified_reads"] > 0


def test_real_mode_leaves_the_configs_own_store_as_it_was(tmp_path):
    """Real mode opens a store of its own in directories beside the config's store, which may be
    open and in use meanwhile; it removes them after."""
    import torch

    cfg = {"tiers": {"host": {"capacity": "24MiB"}, "nvme": {"path": str(tmp_path / "nvme"), "capacity": "256MiB"}},
           "engine": {"workers": 2, "chunk": "1MiB"}}
    tr = small_trace(600, keys=100, seed=3)
    prep = prepare(tr.time, tr.key, tr.size, tr.op, tr.kind)
    tiers = tier_models(load_config(cfg), prep.footprint, 0.1)
    sim = simulate(prep, tiers, create_policy("lru"))
    with TieredStore(cfg, hugepages=False) as store:
        kept = torch.arange(64 * 1024, dtype=torch.float32)
        store.put("other/kept", kept, owner="other").result(timeout=60)
        real = run_real(prep, tiers, "lru", load_config(cfg))
        assert np.array_equal(sim.served, real.served)
        assert store.keys() == ["other/kept"] and torch.equal(store.get("other/kept").result(timeout=60), kept)
        assert "replay" not in store.owners()
    assert not list((tmp_path / "nvme").glob(".replay-*")), "real mode left its directories"
