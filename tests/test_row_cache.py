"""Row-cache policies (LRU, S3-FIFO, hybrid) and the victim buffer: one conformance suite for
every policy (slot bookkeeping never lies, whatever the op sequence), then each policy's
own behaviour, and the simulator."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiered.policies.row_cache import (
    ROW_CACHE_POLICIES, RowHybrid, RowLRU, RowS3FIFO, VictimBuffer, create_row_cache_policy, simulate,
)

NAMES = sorted(ROW_CACHE_POLICIES)


def check_invariants(p) -> None:
    occ = np.flatnonzero(p.row_of >= 0)
    assert len(occ) == p.occupied <= p.num_slots
    assert np.array_equal(p.slot_of[p.row_of[occ]], occ)  # row -> slot -> row round-trips
    cached = np.flatnonzero(p.slot_of >= 0)
    assert len(cached) == len(occ)
    assert np.array_equal(p.row_of[p.slot_of[cached]], cached)


def step(p, rows: np.ndarray, model: set) -> None:
    """One minibatch: lookup, admit the misses, and keep ``model`` (the cached set) in sync."""
    rows = np.unique(rows)
    slots = p.lookup(rows)
    assert set(rows[slots >= 0].tolist()) == model & set(rows.tolist())
    miss = rows[slots < 0]
    got, ev_rows, ev_slots = p.admit(miss)
    assert len(got) == len(miss)
    evicted = set(ev_rows.tolist())
    assert evicted <= model  # only cached rows are evicted
    if p.name == "lru" and len(rows) <= p.num_slots:  # LRU drops this batch's hits only when it must
        assert not evicted & set(rows[slots >= 0].tolist())
    model -= evicted
    admitted = miss[got >= 0]
    assert len(set(got[got >= 0].tolist())) == len(admitted)  # distinct slots
    assert set(ev_slots.tolist()) <= set(got[got >= 0].tolist()) | set(np.flatnonzero(p.row_of < 0).tolist())
    model |= set(admitted.tolist())
    check_invariants(p)
    assert set(np.flatnonzero(p.slot_of >= 0).tolist()) == model


@pytest.mark.parametrize("name", NAMES)
def test_admit_then_hit(name):
    p = create_row_cache_policy(name, 100, 10)
    slots, ev, _ = p.admit(np.array([3, 5, 7]))
    assert (slots >= 0).all() and len(ev) == 0
    assert (p.lookup(np.array([3, 5, 7])) == slots).all()
    assert (p.lookup(np.array([4])) == -1).all()
    check_invariants(p)


@pytest.mark.parametrize("name", NAMES)
def test_capacity_is_never_exceeded_and_evicted_rows_are_gone(name):
    p = create_row_cache_policy(name, 1000, 16)
    model: set = set()
    rng = np.random.default_rng(1)
    for _ in range(50):
        step(p, rng.integers(0, 1000, 40), model)
    assert p.occupied == 16


@pytest.mark.parametrize("name", NAMES)
def test_more_rows_than_slots_in_one_batch(name):
    p = create_row_cache_policy(name, 1000, 8)
    slots, _ev, _ = p.admit(np.arange(100))
    assert (slots >= 0).sum() <= 8
    check_invariants(p)


@pytest.mark.parametrize("name", NAMES)
def test_admit_of_cached_row_is_refused(name):
    p = create_row_cache_policy(name, 10, 4)
    p.admit(np.array([1]))
    with pytest.raises(ValueError, match="already cached"):
        p.admit(np.array([1, 2]))


@pytest.mark.parametrize("name", NAMES)
def test_invalidate_frees_slots(name):
    p = create_row_cache_policy(name, 100, 4)
    p.admit(np.array([1, 2, 3, 4]))
    freed = p.invalidate(np.array([2, 4, 50]))
    assert len(freed) == 2 and p.occupied == 2
    assert (p.lookup(np.array([2, 4])) == -1).all()
    slots, ev, _ = p.admit(np.array([5, 6]))
    assert (slots >= 0).all() and len(ev) == 0  # the freed slots were reused, nothing evicted
    check_invariants(p)


@pytest.mark.parametrize("name", NAMES)
def test_zero_slots(name):
    p = create_row_cache_policy(name, 10, 0)
    assert (p.lookup(np.arange(10)) == -1).all()
    slots, ev, _ = p.admit(np.arange(10))
    assert (slots == -1).all() and len(ev) == 0


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_random_batches_keep_bookkeeping_exact(name, data):
    n = data.draw(st.integers(1, 200))
    slots = data.draw(st.integers(0, 40))
    kw = {"static_score": np.arange(n, dtype=float)} if name == "hybrid" else {}
    p = create_row_cache_policy(name, n, slots, **kw)
    model: set = set()
    for _ in range(data.draw(st.integers(1, 12))):
        rows = np.array(data.draw(st.lists(st.integers(0, n - 1), max_size=60)), dtype=np.int64)
        if data.draw(st.booleans()) and model:
            p.invalidate(np.array(sorted(model))[: data.draw(st.integers(0, len(model)))])
            model = set(np.flatnonzero(p.slot_of >= 0).tolist())
        step(p, rows, model)


def test_unknown_policy_names_the_known_ones():
    with pytest.raises(KeyError, match="hybrid, lru, s3fifo"):
        create_row_cache_policy("fifo", 10, 2)


def test_lru_evicts_the_least_recently_used():
    p = RowLRU(100, 3)
    p.lookup(np.array([1, 2, 3]))
    p.admit(np.array([1, 2, 3]))
    p.lookup(np.array([1]))  # 2 and 3 are now older than 1
    p.lookup(np.array([3]))
    p.lookup(np.array([9]))
    _s, ev, _ = p.admit(np.array([9]))
    assert ev.tolist() == [2]


def test_s3fifo_one_hit_wonders_leave_before_reused_rows():
    p = RowS3FIFO(1000, 20)  # small queue of 2
    hot = np.arange(10)
    p.lookup(hot)
    p.admit(hot)
    for _ in range(3):
        p.lookup(hot)  # hot rows gain frequency
    for i in range(30):  # a scan of rows seen once
        scan = np.array([100 + i])
        p.lookup(scan)
        p.admit(scan)
    assert (p.lookup(hot) >= 0).all(), "the scan flushed rows that were re-used"


def test_s3fifo_ghost_hit_enters_main():
    p = RowS3FIFO(1000, 10)  # small 1, main 9
    p.admit(np.arange(10))
    _s, ev, _ = p.admit(np.array([10]))  # evicts the oldest of small (0, never re-used) into the ghost
    assert ev.tolist() == [0]
    assert p.lookup(np.array([0]))[0] == -1
    s, _ev, _ = p.admit(np.array([0]))
    assert p._queue[s[0]] == 1  # straight into main


def test_hybrid_keeps_high_score_rows_and_refuses_low_ones():
    score = np.zeros(100)
    score[:5] = 1000.0  # rows 0..4 are hubs
    p = RowHybrid(100, 5, static_score=score)
    p.lookup(np.arange(5))
    p.admit(np.arange(5))
    p.lookup(np.array([50, 51]))
    s, ev, _ = p.admit(np.array([50, 51]))
    assert (s == -1).all() and len(ev) == 0  # cold rows do not displace hubs
    score2 = RowHybrid(100, 5, static_score=np.arange(100.0))
    score2.admit(np.array([1, 2, 3, 4, 5]))
    s, ev, _ = score2.admit(np.array([90, 0]))
    assert s[0] >= 0 and s[1] == -1 and ev.tolist() == [1]  # 90 beats the lowest (1); 0 does not


def test_hybrid_frequency_lets_a_hot_row_in():
    p = RowHybrid(100, 2, static_score=np.r_[np.full(2, 10.0), np.zeros(98)], prior=4.0, decay_every=0)
    p.admit(np.array([0, 1]))
    for _ in range(200):
        p.lookup(np.array([42]))
    s, ev, _ = p.admit(np.array([42]))
    assert s[0] >= 0 and len(ev) == 1


def test_hybrid_force_admits_despite_score():
    p = RowHybrid(100, 2, static_score=np.r_[np.full(2, 10.0), np.zeros(98)])
    p.admit(np.array([0, 1]))
    s, ev, _ = p.admit(np.array([70]), force=True)
    assert s[0] >= 0 and len(ev) == 1


def test_hybrid_rejects_bad_scores():
    with pytest.raises(ValueError, match="one per row"):
        RowHybrid(10, 2, static_score=np.ones(3))
    with pytest.raises(ValueError, match="finite"):
        RowHybrid(3, 2, static_score=np.array([1.0, np.nan, 2.0]))


def test_victim_buffer_fifo_and_removal():
    v = VictimBuffer(100, 3)
    pos = v.add(np.array([1, 2, 3, 4]))  # only the newest three are kept
    assert pos[0] == -1 and (pos[1:] >= 0).all()
    assert (v.find(np.array([1, 2, 3, 4])) >= 0).tolist() == [False, True, True, True]
    v.add(np.array([5]))  # overwrites the oldest (2)
    assert (v.find(np.array([2, 3, 4, 5])) >= 0).tolist() == [False, True, True, True]
    v.remove(np.array([3]))
    assert v.find(np.array([3]))[0] == -1
    assert (VictimBuffer(10, 0).add(np.array([1])) == -1).all()


def test_simulate_counts_unique_rows_and_victim_hits():
    p = RowLRU(100, 1)
    v = VictimBuffer(100, 2)
    r = simulate(p, [np.array([1, 1, 2]), np.array([1, 2])], v)
    # batch 1: two misses (1 admitted, then 2 evicts it into the victim buffer... one slot)
    assert r["rows"] == 4
    assert r["hits"] + r["victim_hits"] >= 1
    assert 0 < r["hit_rate"] <= 1


def test_hybrid_beats_lru_on_a_skewed_static_workload():
    """A Zipf-like stream whose popularity the static score knows: the hybrid policy must
    keep the popular rows where LRU churns (the property the benchmark measures at scale)."""
    rng = np.random.default_rng(0)
    n = 20000
    pop = 1.0 / np.arange(1, n + 1) ** 0.9
    perm = rng.permutation(n)
    score = np.empty(n)
    score[perm] = pop
    prob = pop / pop.sum()
    batches = [perm[rng.choice(n, 2000, p=prob)] for _ in range(30)]
    lru = simulate(RowLRU(n, 1000), batches, warmup=5)["hit_rate"]
    hyb = simulate(RowHybrid(n, 1000, static_score=score), batches, warmup=5)["hit_rate"]
    assert hyb > lru + 0.05, (hyb, lru)
