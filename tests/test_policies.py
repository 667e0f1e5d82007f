"""Policies: shared conformance tests for every policy, the simulator's cost model, the registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiered import policies
from tiered.policies import (
    HEURISTICS, KINDS, MigrationPolicy, Move, Observation, Outcome, PolicyError, StaticSplit, TierModel,
    create_eviction_policy, create_policy, eviction_policy_names, policy_names,
)
from tiered.policies.belady import Belady
from tiered.policies.sim import default_tiers, prepare, simulate

#: the registries, not hand-kept lists: a newly registered policy runs the same conformance tests
EVICTION = [n for n in eviction_policy_names() if n != "belady"]
MIGRATION = policy_names()


def make_trace(keys, sizes=None, ops=None, times=None, kind=5):
    keys = np.asarray(keys, dtype=np.int64)
    n = keys.shape[0]
    sizes = np.full(n, 100) if sizes is None else np.asarray(sizes)
    ops = np.zeros(n, np.uint8) if ops is None else np.asarray(ops, np.uint8)
    times = np.arange(n, dtype=np.float64) if times is None else np.asarray(times, np.float64)
    return prepare(times, keys, sizes, ops, np.full(n, kind, np.uint8))


def two_tiers(cap):
    return (TierModel("fast", cap, 1e-6, 1e9, 1e9), TierModel("slow", math.inf, 1e-4, 1e8, 1e8))


# ---------------------------------------------------------------- eviction policies (the store's API)

def _eviction(name):
    return Belady() if name == "belady" else create_eviction_policy(name)


@pytest.mark.parametrize("name", EVICTION + ["belady"])
def test_eviction_conformance(name):
    pol = _eviction(name)
    pol.resize(1000)
    for i in range(10):
        pol.admit(Observation(f"k{i}", 100, next_access=float(100 - i)))
    assert len(pol) == 10 and "k3" in pol and "zz" not in pol
    pol.touch(Observation("k3", 100, next_access=5.0))
    pinned = {"k0", "k1"}
    v = pol.victims(250, lambda k: k not in pinned)
    assert len(v) == len(set(v)) and set(v) <= {f"k{i}" for i in range(10)} - pinned
    assert sum(100 for _ in v) >= 250
    assert len(pol) == 10, "victims() proposes, it must not remove"
    for k in v:
        pol.remove(k)
    assert len(pol) == 10 - len(v) and all(k not in pol for k in v)
    assert pol.victims(10**9, lambda k: False) == []
    pol.remove("never-admitted")  # harmless


def test_eviction_registry_and_lru_order():
    assert set(EVICTION) <= set(eviction_policy_names())
    with pytest.raises(KeyError, match="known: .*lru"):
        create_eviction_policy("nope")
    lru = create_eviction_policy("lru")
    for k in "abc":
        lru.admit(Observation(k, 1))
    lru.touch(Observation("a", 1))
    assert lru.victims(2, lambda k: True) == ["b", "c"]


def test_observation_positional_compat():
    o = Observation("k", 10, "kv", "write", "host")
    assert (o.key, o.nbytes, o.kind, o.op, o.tier) == ("k", 10, "kv", "write", "host")
    assert o.count == 1 and o.recency == math.inf and o.tier_index == -1


# ---------------------------------------------------------------- registry

def test_policy_registry():
    assert set(MIGRATION + ["rl"]) <= set(policy_names())
    with pytest.raises(KeyError, match=r"unknown policy 'nope'; known: .*belady.*lru"):
        create_policy("nope")
    with pytest.raises(TypeError, match="takes no options"):
        create_policy("lru", foo=1)
    for name in MIGRATION:
        p = create_policy(name)
        assert isinstance(p, MigrationPolicy) and p.name == name
    assert create_policy("lru") is not create_policy("lru")


def test_rl_resolves_lazily(monkeypatch):
    import importlib
    import sys
    import types
    fake = types.ModuleType("tiered.policies.rl")
    monkeypatch.setitem(sys.modules, "tiered.policies.rl", fake)
    with pytest.raises(KeyError, match="no make_policy"):
        create_policy("rl")
    fake.make_policy = lambda **kw: StaticSplit(**kw)
    assert isinstance(create_policy("rl"), StaticSplit)
    assert importlib.import_module("tiered.policies.rl") is fake


# ---------------------------------------------------------------- migration policies through the simulator

@pytest.mark.parametrize("name", MIGRATION)
def test_known_hit_ratio_small(name):
    # 3 objects cycling through a 2-object cache: LRU gets no hit at all
    keys = [0, 1, 2] * 20
    r = simulate(make_trace(keys), two_tiers(200), create_policy(name))
    hr = r.summary()["hit_ratio"]["fast"]
    if name == "lru":
        assert hr == 0.0
    if name == "belady":
        # MIN with bypass keeps 0 and 1 and never admits 2: every later 0 and 1 hits (19 + 19)
        assert r.served.tolist().count(0) == 38
    assert 0.0 <= hr <= 1.0


@pytest.mark.parametrize("name", MIGRATION)
def test_capacity_and_decisions_on_random_traces(name):
    rng = np.random.default_rng(1)
    n = 3000
    keys = rng.zipf(1.3, n) % 300
    sizes_by_key = rng.integers(1, 50, 300) * 64
    tr = make_trace(keys, sizes_by_key[keys], (rng.random(n) < 0.3).astype(np.uint8))
    tiers = (TierModel("gpu", 2000, 1e-6, 2e10, 2e10), TierModel("host", 6000, 2e-6, 1e10, 1e10),
             TierModel("nvme", math.inf, 8e-5, 3e9, 2e9))
    r = simulate(tr, tiers, create_policy(name))  # raises PolicyError on any bad decision
    assert r.peak_used[0] <= 2000 and r.peak_used[1] <= 6000
    assert r.latency_s.shape == (n,) and np.all(r.latency_s > 0)
    assert sum(r.summary()["hit_ratio"].values()) == pytest.approx(1.0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys=st.lists(st.integers(0, 25), min_size=1, max_size=300), cap=st.integers(1, 12),
       writes=st.sampled_from([0, 1, 3]))
def test_belady_is_an_upper_bound(keys, cap, writes):
    # equal sizes (where MIN is optimal); writes=k: keys divisible by 4 below k are written
    k = np.asarray(keys)
    tr = make_trace(k, ops=((k % 4 == 0) & (k < 4 * writes)).astype(np.uint8))
    tiers = two_tiers(cap * 100)
    best = simulate(tr, tiers, create_policy("belady")).served.tolist().count(0)
    for name in HEURISTICS:
        hits = simulate(tr, tiers, create_policy(name)).served.tolist().count(0)
        assert hits <= best, name


@settings(max_examples=25, deadline=None)
@given(keys=st.lists(st.integers(0, 30), min_size=1, max_size=200), sizes=st.lists(st.integers(1, 400), min_size=31, max_size=31),
       cap=st.integers(0, 3000), writes=st.integers(0, 3))
def test_no_policy_breaks_budgets(keys, sizes, cap, writes):
    keys = np.asarray(keys)
    tr = make_trace(keys, np.asarray(sizes)[keys], (keys % 4 < writes).astype(np.uint8))
    for name in MIGRATION:
        r = simulate(tr, two_tiers(cap), create_policy(name))
        assert r.peak_used[0] <= cap


# ---------------------------------------------------------------- simulator cost model and contract

class Scripted(MigrationPolicy):
    """Returns prescribed moves at given access indices; records the call order."""

    name = "scripted"

    def __init__(self, moves=None, learns=False, batch=1):
        self.moves = moves or {}
        self.learns = learns
        self.batch = batch
        self.calls = []

    def reset(self, tiers):
        super().reset(tiers)
        self.calls.append(("reset", len(tiers)))

    def decide(self, batch):
        self.calls.append(("decide", [o.index for o in batch]))
        out = []
        for o in batch:
            out += self.moves.get(o.index, [])
        return out

    def observe(self, outcomes):
        self.calls.append(("observe", [(o.obs.index, o.latency_s, o.migrated_bytes) for o in outcomes]))


def test_latency_model_by_hand():
    tiers = (TierModel("fast", 1000, 0.0, 1000.0, 1000.0), TierModel("slow", math.inf, 1.0, 100.0, 100.0))
    # A at t=0 from slow (100 B / 100 B/s + 1 s = 2 s), placed on fast (fill: only the fast write,
    # 0.1 s, after the read completed); the 2nd access waits for the fill (2.1 .. 2.2)
    tr = make_trace([7, 7, 7], times=[0.0, 0.05, 10.0])
    r = simulate(tr, tiers, create_policy("lru"))
    assert r.latency_s.tolist() == pytest.approx([2.0, 2.15, 0.1])
    assert r.bytes_migrated == 100 and r.migrations == 1
    assert r.total_time_s == pytest.approx(10.1)


def test_migration_traffic_costs_both_devices_and_clean_demotion_is_free():
    tiers = (TierModel("fast", 1000, 0.0, 1000.0, 1000.0), TierModel("slow", math.inf, 1.0, 100.0, 100.0))
    # key 0 then key 1 at t=0,100; at access 1 promote key 0 (not just served: read slow + write fast)
    tr = make_trace([0, 1, 1, 0], times=[0.0, 100.0, 100.0, 200.0], ops=[0, 0, 0, 1])
    pol = Scripted({1: [Move(0, 0)], 3: [Move(0, 1)]})
    r = simulate(tr, tiers, pol)
    # access 2 (key 1, slow) queues behind access 1 (device busy until 101) and the
    # promotion's slow read (busy until 102): occupies 102..103, completes 1 s later
    assert r.latency_s[2] == pytest.approx(4.0)
    # access 3 is a write served on fast -> dirty; the demotion then writes back 100 bytes
    assert r.bytes_migrated == 200
    pol2 = Scripted({1: [Move(0, 0)], 2: [Move(0, 1)]})
    r2 = simulate(make_trace([0, 1, 1]), tiers, pol2)
    assert r2.bytes_migrated == 100  # clean copy dropped to the backing tier: no traffic


def test_call_order_batches_and_outcomes():
    tr = make_trace([0, 1, 0, 2, 0])
    pol = Scripted({1: [Move(0, 0)]}, learns=True, batch=2)
    r = simulate(tr, two_tiers(1000), pol)
    kinds = [c[0] for c in pol.calls]
    assert kinds == ["reset", "decide", "observe", "decide", "observe", "decide", "observe"]
    assert [c[1] for c in pol.calls if c[0] == "decide"] == [[0, 1], [2, 3], [4]]
    obs = [x for c in pol.calls if c[0] == "observe" for x in c[1]]
    assert [o[0] for o in obs] == [0, 1, 2, 3, 4]
    assert [o[1] for o in obs] == pytest.approx(r.latency_s.tolist())
    assert [o[2] for o in obs] == [0, 100, 0, 0, 0]  # migrated bytes on the batch's last outcome
    assert r.served.tolist() == [1, 1, 0, 1, 0]


def test_observation_fields_in_sim():
    seen = []

    class Spy(Scripted):
        needs_future = True

        def decide(self, batch):
            seen.extend(batch)
            return []

    simulate(make_trace([5, 6, 5, 5], times=[0.0, 1.0, 3.0, 3.5], kind=KINDS.index("kv")), two_tiers(1000), Spy())
    o = seen[2]
    assert (o.key, o.count, o.recency, o.reuse_distance, o.next_access, o.kind) == (0, 2, 3.0, 2, 3, "kv")
    assert seen[0].recency == math.inf and seen[3].next_access == math.inf
    assert o.tier_index == 1 and o.tier == "slow" and len(o.fill) == 2


@pytest.mark.parametrize("bad,match", [
    ({0: [Move(0, 0), Move(1, 0)]}, "unknown object 1"),
    ({0: [Move(0, 5)]}, "tiers are 0..1"),
    ({1: [Move(0, 0), Move(1, 0)]}, "would exceed its capacity"),
    ({0: [Move("x", 0)]}, "unknown object 'x'"),
])
def test_sim_refuses_bad_decisions(bad, match):
    with pytest.raises(PolicyError, match=match):
        simulate(make_trace([0, 1]), two_tiers(150), Scripted(bad))


def test_static_split_shares():
    # kind weight may use 50% of the fast tier, kv none of it
    pol = StaticSplit({"weight": [0.5], "kv": [0.0]})
    n = 10
    keys = np.arange(n)
    kinds = np.where(keys < 5, KINDS.index("weight"), KINDS.index("kv")).astype(np.uint8)
    tr = prepare(np.arange(n, dtype=float), keys, np.full(n, 100), np.ones(n, np.uint8), kinds)
    r = simulate(tr, two_tiers(1000), pol)
    assert r.served.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]  # writes land where placed
    assert r.bytes_migrated == 0
    # reads of never-seen objects come from the backing tier; placing them higher is a fill
    reads = prepare(np.arange(2 * n, dtype=float), np.r_[keys, keys], np.full(2 * n, 100),
                    np.zeros(2 * n, np.uint8), np.r_[kinds, kinds])
    r = simulate(reads, two_tiers(1000), StaticSplit({"weight": [0.5], "kv": [0.0]}))
    assert r.served.tolist() == [1] * 10 + [0] * 5 + [1] * 5
    assert r.bytes_migrated == 500
    with pytest.raises(ValueError, match="fractions"):
        StaticSplit({"kv": [1.5]})


def test_default_tiers_and_prepare_validation():
    t = default_tiers(10_000, 0.05)
    assert t[0].capacity == 500 and t[-1].capacity == math.inf
    with pytest.raises(ValueError, match="column 'op'"):
        prepare([0.0], [1], [1], [7], [0])
    with pytest.raises(ValueError, match="column 'size'"):
        prepare([0.0], [1], [-1], [0], [0])
    with pytest.raises(ValueError, match="capacity"):
        TierModel("x", -1)
    with pytest.raises(ValueError, match="two tiers"):
        simulate(make_trace([0]), (TierModel("only", 10),), create_policy("lru"))


def test_layering():
    from test_packaging import imports_outside

    assert imports_outside("policies") == set()


def test_rl_policy_conformance():
    """The RL agents (policies/rl, another module's work) obey the same contract when present."""
    pytest.importorskip("torch")
    try:
        pol = create_policy("rl")
    except KeyError as e:
        pytest.skip(f"rl policy not available: {e}")
    rng = np.random.default_rng(3)
    n = 1000
    keys = rng.zipf(1.3, n) % 200
    tr = make_trace(keys, (rng.integers(1, 8, 200) * 512)[keys], (rng.random(n) < 0.2).astype(np.uint8))
    try:
        r = simulate(tr, two_tiers(20_000), pol)  # PolicyError on any bad decision
    finally:
        pol.close()
    assert r.peak_used[0] <= 20_000 and r.latency_s.shape == (n,)


def test_migration_waiting_for_data_does_not_block_the_device():
    """A promotion whose bytes are still being read from a slow tier must not hold the fast
    device's queue: an unrelated hit on the fast tier meanwhile is served at once (regression:
    promotions used to occupy the fast device from when their data arrived)."""
    from tiered.policies import FirstFit

    tiers = (TierModel("fast", 1000, 0.0, 1e9, 1e9), TierModel("slow", math.inf, 1.0, 1e9, 1e9))
    # key 1 written first (FirstFit puts it on fast); key 0 read from slow at t=1 and promoted;
    # key 1 read at t=1.1 while key 0's bytes are in flight (keys are dense ids 0, 1)
    tr = make_trace([1, 0, 1, 0], times=[0.0, 1.0, 1.1, 1.2], ops=[1, 0, 0, 0])
    r = simulate(tr, tiers, Scripted({1: [Move(0, 0)]}), FirstFit())
    assert r.served.tolist() == [0, 1, 0, 0]
    assert r.latency_s[2] < 1e-6
    # key 0 itself is only readable on fast once its bytes arrived (t = 2.0 + write)
    assert r.latency_s[3] == pytest.approx(2.0 - 1.2, abs=1e-6)


# ---------------------------------------------------------------- SIEVE

def _sieve_with(keys, size=1):
    from tiered.policies import SIEVE

    p = SIEVE()
    for k in keys:
        p.admit(Observation(k, size))
    return p


def test_sieve_evicts_unvisited_objects_oldest_first_and_spares_visited_ones_once():
    p = _sieve_with("abcd")
    p.touch(Observation("a", 1))
    p.touch(Observation("c", 1))
    assert p.victims(2, lambda k: True) == ["b", "d"]  # a and c lose their bit, stay in place
    for k in "bd":
        p.remove(k)
    assert p.victims(1, lambda k: True) == ["a"]  # the hand wrapped; a's bit was cleared by the pass
    p.remove("a")
    p.admit(Observation("e", 1))
    assert p.victims(2, lambda k: True) == ["c", "e"] and len(p) == 2


def test_sieve_hand_keeps_its_place_and_skips_what_is_not_evictable():
    p = _sieve_with("abcde")
    assert p.victims(1, lambda k: k != "a") == ["b"]
    p.remove("b")
    p.touch(Observation("a", 1))
    assert p.victims(1, lambda k: True) == ["c"]  # from the hand, not from the tail again
    p.remove("c")
    assert p.victims(10, lambda k: False) == []  # all pinned: the walk ends
    assert "a" in p and "b" not in p


def test_sieve_beats_lru_on_a_scan_mixed_with_a_hot_set():
    rng = np.random.default_rng(0)
    hot = rng.integers(0, 20, 4000)
    scan = np.arange(1000, 5000)
    keys = np.empty(8000, dtype=np.int64)
    keys[0::2], keys[1::2] = hot, scan
    tr = make_trace(keys)
    tiers = two_tiers(30 * 100)
    hits = {n: simulate(tr, tiers, create_policy(n)).served.tolist().count(0) for n in ("lru", "sieve")}
    assert hits["sieve"] > 1.3 * hits["lru"], hits
