"""The ``schedule`` migration policy: Belady over declared plans, its fallback beyond them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiered.policies import HEURISTICS, Observation, TierModel, create_policy, eviction_policy_names
from tiered.policies.sim import prepare, simulate

pytestmark = pytest.mark.timeout(120)
FALLBACKS = [n for n in eviction_policy_names() if n != "prefix-aware"] + ["prefix-aware"]


def trace(keys, sizes=None, ops=None, plans=None):
    keys = np.asarray(keys, dtype=np.int64)
    n = keys.shape[0]
    sizes = np.full(n, 100) if sizes is None else np.asarray(sizes)
    ops = np.zeros(n, np.uint8) if ops is None else np.asarray(ops, np.uint8)
    return prepare(np.arange(n, dtype=np.float64), keys, sizes, ops, np.full(n, 5, np.uint8), plans)


def two_tiers(cap):
    return (TierModel("fast", cap, 1e-6, 1e9, 1e9), TierModel("slow", math.inf, 1e-4, 1e8, 1e8))


def three_tiers():
    return (TierModel("gpu", 2000, 1e-6, 2e10, 2e10), TierModel("host", 6000, 2e-6, 1e10, 1e10),
            TierModel("nvme", math.inf, 8e-5, 3e9, 2e9))


class Recording:
    """Wraps a policy and records every decide() answer (placement stays the policy's)."""

    def __init__(self, policy):
        self.policy, self.moves = policy, []

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def decide(self, batch):
        out = self.policy.decide(batch)
        self.moves.append(list(out))
        return out


def run(prep, tiers, name, **options):
    pol = Recording(create_policy(name, **options))
    res = simulate(prep, tiers, pol, placement=pol.policy, closed_loop=True)
    return res, pol.moves


def hits(res):
    return res.served.tolist().count(0)


def random_trace(seed, n=3000, nkeys=300, plans=None):
    rng = np.random.default_rng(seed)
    keys = rng.zipf(1.3, n) % nkeys
    sizes = (rng.integers(1, 50, nkeys) * 64)[keys]
    return trace(keys, sizes, (rng.random(n) < 0.3).astype(np.uint8), plans)


# ---------------------------------------------------------------- beyond the horizon: the fallback exactly

@pytest.mark.parametrize("fallback", ["lru", "arc", "s3fifo"])
@pytest.mark.parametrize("tiers", ["two", "three"])
def test_without_plans_schedule_makes_the_fallbacks_decisions(fallback, tiers):
    prep = random_trace(3)
    t = two_tiers(4000) if tiers == "two" else three_tiers()
    ref, ref_moves = run(prep, t, fallback)
    got, got_moves = run(prep, t, "schedule", fallback=fallback)
    assert got_moves == ref_moves
    assert np.array_equal(got.served, ref.served) and got.bytes_migrated == ref.bytes_migrated
    assert np.array_equal(got.latency_s, ref.latency_s)


def test_after_plans_end_it_is_the_fallback_again():
    # while planned, 4 objects fit the fast tier (decisions as LRU's: fill free room); the plan
    # is withdrawn, then 10 objects compete: every decision from there on is LRU's too
    rng = np.random.default_rng(7)
    head = [0, 1, 2, 3] * 5
    keys = head + rng.integers(0, 10, 400).tolist()
    prep = trace(keys, plans=[(0, "w", head), (len(head), "w", [])])
    ref, ref_moves = run(prep, two_tiers(500), "lru")
    got, got_moves = run(prep, two_tiers(500), "schedule")
    assert got_moves == ref_moves and np.array_equal(got.served, ref.served)
    still = trace(keys, plans=[(0, "w", head + keys[len(head):len(head) + 40])])  # a plan still active
    assert run(still, two_tiers(500), "schedule")[1] != ref_moves


# ---------------------------------------------------------------- over the horizon: Belady

@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys=st.lists(st.integers(0, 25), min_size=1, max_size=250), cap=st.integers(1, 12))
def test_a_plan_of_the_whole_trace_gets_beladys_hits(keys, cap):
    prep = trace(keys, plans=[(0, "all", keys)])
    tiers = two_tiers(cap * 100)
    best = hits(simulate(prep, tiers, create_policy("belady")))
    assert hits(simulate(prep, tiers, create_policy("schedule", prefetch=0))) == best
    # fetching ahead serves planned reads from the fast tier that demand fetching cannot
    assert hits(simulate(prep, tiers, create_policy("schedule"))) >= best


@pytest.mark.parametrize("fallback,every", [(f, 1) for f in ("lru", "arc", "s3fifo", "sieve", "lfu")]
                         + [(f, e) for f in ("lru", "sieve") for e in (2, 3)])
def test_partial_plans_never_do_worse_than_the_fallback_on_cyclic_scans(fallback, every):
    """12 objects scanned cyclically through room for 5; a plan of the next cycle every ``every``
    cycles. (With plans only every 2nd or 3rd cycle, ARC, LFU and S3-FIFO can lose more in the
    unplanned cycles than the planned ones gain: Belady within a horizon leaves a state their
    adaptive rankings handle worse; LRU and SIEVE cannot be hurt that way on a scan.)"""
    cycle = list(range(12))
    keys, plans = [], []
    for c in range(12):
        if c % every == 0:
            plans.append((len(keys), "scan", cycle))
        keys += cycle
    prep = trace(keys, plans=plans)
    t = two_tiers(500)
    base, _ = run(prep, t, fallback)
    for prefetch in (0, 4):
        got, _ = run(prep, t, "schedule", fallback=fallback, prefetch=prefetch)
        assert hits(got) >= hits(base)
        assert got.latency_s.mean() <= base.latency_s.mean() * 1.0001
    assert hits(run(prep, t, "schedule", fallback=fallback, prefetch=0)[0]) > hits(base) or fallback != "lru"


def test_unplanned_objects_go_first_and_do_not_displace_planned_ones():
    pol = create_policy("schedule", prefetch=0)
    pol.reset(two_tiers(300))
    pol.plan("w", [0, 1, 2, 0, 1, 2])

    def obs(k, i, tier=1):
        return Observation(k, 100, "blob", "read", "fast" if tier == 0 else "slow", float(i), i, tier_index=tier)

    moves = []
    for i, k in enumerate([0, 1, 2]):
        moves += pol.decide([obs(k, i)])
    assert moves == [(0, 0), (1, 0), (2, 0)]
    assert pol.decide([obs(7, 3)]) == []  # unplanned: would displace planned objects -> bypass
    pol.plan("w", [0, 1, 0, 1])
    # 2 is no longer planned: it is the victim, before any planned object
    assert pol.decide([obs(7, 4)]) == [(2, 1), (7, 0)]


def test_reads_slightly_out_of_order_still_advance_the_plan():
    order = list(range(10)) * 4
    jittered = []
    for c in range(4):
        seq = list(range(10))
        seq[3], seq[4] = seq[4], seq[3]
        seq[7], seq[8] = seq[8], seq[7]
        jittered += seq
    prep = trace(jittered, plans=[(0, "w", order)])
    res, _ = run(prep, two_tiers(500), "schedule", prefetch=0)
    belady = hits(simulate(prep, two_tiers(500), create_policy("belady")))
    assert hits(res) >= belady - 4  # a swap may cost a little, never the plan
    assert hits(res) > hits(run(prep, two_tiers(500), "lru")[0])


def test_a_read_of_a_keys_last_planned_occurrence_resyncs_the_plan():
    pol = create_policy("schedule")
    pol.reset(two_tiers(1000))
    pol.plan("w", list(range(40)) + [5])
    for i, k in enumerate([0, 1, 39]):  # 39 is 37 positions ahead, but never planned again
        pol.decide([Observation(k, 100, tier="slow", tier_index=1, index=i)])
    plan = pol._plans["w"]
    assert plan.pos == 40
    assert pol._next_use(2) == math.inf  # passed long ago: no longer expected
    assert pol._next_use(38) < 0 and pol._next_use(25) < pol._next_use(38)  # just passed: overdue, in order
    assert pol._next_use(5) == 0  # 5's later occurrence is next
    pol.decide([Observation(5, 100, tier="slow", tier_index=1, index=3)])
    assert pol._plans["w"].pos == 41 and pol._next_use(5) == math.inf  # its early read was forgotten


# ---------------------------------------------------------------- contract and options

@pytest.mark.parametrize("fallback", FALLBACKS)
def test_budgets_and_decisions_with_plans_on_random_traces(fallback):
    rng = np.random.default_rng(5)
    n = 3000
    keys = rng.zipf(1.3, n) % 300
    plans = [(i, f"o{i % 3}", keys[i:i + int(rng.integers(0, 60))].tolist() + [999]) for i in range(0, n, 97)]
    prep = random_trace(5, n, plans=plans)
    res = simulate(prep, three_tiers(), create_policy("schedule", fallback=fallback))  # PolicyError on a bad move
    assert res.peak_used[0] <= 2000 and res.peak_used[1] <= 6000


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys=st.lists(st.integers(0, 30), min_size=1, max_size=200),
       sizes=st.lists(st.integers(1, 400), min_size=31, max_size=31), cap=st.integers(0, 3000),
       writes=st.integers(0, 3), every=st.integers(1, 50), span=st.integers(0, 80), three=st.booleans())
def test_plans_never_make_it_break_budgets(keys, sizes, cap, writes, every, span, three):
    k = np.asarray(keys)
    plans = [(i, f"o{i % 2}", keys[i:i + span][::-1 if i % 3 else 1]) for i in range(0, len(keys), every)]
    prep = trace(k, np.asarray(sizes)[k], (k % 4 < writes).astype(np.uint8), plans)
    tiers = ((TierModel("a", cap // 2), TierModel("b", cap), TierModel("c", math.inf)) if three else two_tiers(cap))
    res = simulate(prep, tiers, create_policy("schedule"))  # PolicyError on a move that overfills
    assert res.peak_used[0] <= tiers[0].capacity and (not three or res.peak_used[1] <= cap)


def test_it_follows_the_callers_truth():
    pol = create_policy("schedule", prefetch=2)
    pol.reset(two_tiers(200))
    pol.plan("w", [0, 1, 2, 0])
    # the caller says 0 and 1 are already on the fast tier (a placement put them there)
    assert pol.decide([Observation(0, 100, tier="fast", tier_index=0, index=0)]) == []
    assert pol.decide([Observation(1, 100, tier="fast", tier_index=0, index=1)]) == []
    assert pol.free[0] == 0
    # 2 is read next, then 0: 1 (never read again) makes room; fetching 0 ahead displaces nothing sooner
    moves = pol.decide([Observation(2, 100, tier="slow", tier_index=1, index=2)])
    assert moves == [(1, 1), (2, 0)]


def test_options():
    assert create_policy("schedule").name == "schedule"
    with pytest.raises(KeyError, match="unknown fallback eviction policy 'nope'; known: .*lru"):
        create_policy("schedule", fallback="nope")
    with pytest.raises(TypeError, match="takes options fallback and prefetch"):
        create_policy("schedule", horizon=3)
    with pytest.raises(ValueError, match="prefetch must be an integer >= 0"):
        create_policy("schedule", prefetch=-1)
    assert "schedule" not in HEURISTICS


def test_bad_decisions_are_still_refused():
    # the simulator checks schedule like any policy: a tier smaller than an object is never overfilled
    prep = trace([0, 1, 0, 1], sizes=[300, 100, 300, 100], plans=[(0, "w", [0, 1, 0, 1])])
    res = simulate(prep, two_tiers(200), create_policy("schedule"))
    assert res.peak_used[0] <= 200 and hits(res) == 1  # only 1 fits: its second read hits


# ---------------------------------------------------------------- live: the store's governor

def test_schedule_runs_live_as_the_stores_migration_policy(tmp_path):
    torch = pytest.importorskip("torch")
    from tiered.store import TieredStore

    cfg = {"tiers": {"host": {"capacity": "8MiB"}, "fast": {"path": str(tmp_path / "fast"), "capacity": "256KiB"},
                     "slow": {"path": str(tmp_path / "slow"), "capacity": "16MiB"}},
           "engine": {"workers": 2}, "policy": {"migration": "schedule", "migration_bandwidth": "1GB/s"}}
    keys = [f"k{i}" for i in range(6)]
    with TieredStore(cfg, cache_on_put=False) as s:
        for i, k in enumerate(keys):
            s.put(k, torch.full((16384,), float(i)), tier="slow", placed=False).result(30)
        for _ in range(3):
            s.plan(keys, owner="scan")
            for i, k in enumerate(keys):
                s.evict(k)  # the read reaches the storage tier, as the policy sees it
                assert torch.equal(s.get(k).result(30), torch.full((16384,), float(i)))
        s.plan([], owner="scan")
        assert s.sync_governor(30)
        g = s.stats()["governor"]
        assert g["policy"] == "schedule" and g["failed"] == 0 and g["last_error"] is None
        assert g["migrations"] >= 1 and g["bytes_migrated"].get("slow->fast", 0) >= 64 << 10
        assert sum(1 for k in keys if s.meta(k)["tier"] == "fast") <= 4
        for i, k in enumerate(keys):
            assert torch.equal(s.get(k).result(30), torch.full((16384,), float(i)))
