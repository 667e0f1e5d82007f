"""Declared futures: with a plan the host tier evicts what is read farthest in the future (and
what no plan names before anything planned), so a cyclic sweep larger than the host tier, which
LRU misses on every read, hits as Belady's choice does; plans replace each other per owner."""

from __future__ import annotations

import math
import time

import pytest
import torch

from tiered.store import TieredStore
from tiered.store.plans import Plan

KiB = 1 << 10
T = 30.0
OBJ = 256 * KiB


def config(tmp_path, host="1MiB"):
    return {"tiers": {"host": {"capacity": host}, "nvme": {"path": str(tmp_path / "nvme"), "capacity": "16MiB"}},
            "engine": {"workers": 2}}


def filled(v):
    return torch.full((OBJ // 4,), float(v))


def sweep(s, keys, rounds, plan_owner=None):
    """Read ``keys`` in order ``rounds`` times; the misses of the last rounds (the first warms up)."""
    for k in keys:
        s.get(k).result(T)
    before = s.stats()["misses"]
    for _ in range(rounds):
        if plan_owner is not None:
            s.plan(keys, owner=plan_owner)
        for k in keys:
            assert torch.equal(s.get(k).result(T), filled(int(k[1:])))
    return s.stats()["misses"] - before


def test_a_planned_cyclic_sweep_misses_what_belady_misses_and_lru_misses_everything(tmp_path):
    keys = [f"k{i}" for i in range(5)]  # 5 objects, room for 4
    with TieredStore(config(tmp_path), cache_on_put=False) as s:
        for k in keys:
            s.put(k, filled(int(k[1:]))).result(T)
        lru = sweep(s, keys, 3)
        planned = sweep(s, keys, 3, plan_owner="sweep")
    assert lru == 15, lru  # LRU evicts exactly the next one read
    assert planned <= 3 * 2, planned  # Belady: about one miss per round over a horizon of one round


def test_unplanned_copies_go_before_planned_ones(tmp_path):
    with TieredStore(config(tmp_path), cache_on_put=False) as s:
        for i in range(5):
            s.put(f"k{i}", filled(i)).result(T)
        for i in (0, 1, 2, 3):  # k0 is the least recently used
            s.get(f"k{i}").result(T)
        s.plan(["k0", "k1", "k4"], owner="a")
        s.get("k4").result(T)  # needs room: k2 (unplanned, least recent of the unplanned) goes
        cached = {k for k in ("k0", "k1", "k2", "k3") if s.meta(k)["in_host"]}
        assert "k2" not in cached and {"k0", "k1"} <= cached


def test_a_new_plan_replaces_the_owners_previous_one_and_an_empty_one_withdraws_it(tmp_path):
    with TieredStore(config(tmp_path)) as s:
        s.plan(["a", "b"], owner="x")
        s.plan(["c"], owner="x")
        s.plan(["d"], owner="y")
        assert s.stats()["plans"]["active"] == {"x": {"keys": 1, "position": 0}, "y": {"keys": 1, "position": 0}}
        s.plan([], owner="y")
        assert set(s.stats()["plans"]["active"]) == {"x"}
        with pytest.raises(TypeError, match="keys are strings"):
            s.plan([1], owner="x")


def test_a_plan_moves_past_reads_even_slightly_out_of_order_and_ends():
    p = Plan("o", ["a", "b", "c", "a"])
    assert p.next_use("a") == 0 and p.next_use("c") == 2 and p.next_use("z") == math.inf
    p.advance("b")  # a read ahead of the position (a prefetch order, a reordering) moves it
    assert p.pos == 2 and p.next_use("a") == 1
    p.advance("a")
    assert p.done and p.next_use("a") == math.inf


def test_an_offloaded_model_declares_its_unit_order_and_withdraws_it_when_detached(tmp_path):
    import transformers

    import tiered

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    store = TieredStore.shared(config(tmp_path, host="24MiB"))
    try:
        model = tiered.offload(model, store=store, share="400KiB")  # streamed: not every unit fits
        seen = []
        real_plan = store.plan
        store.plan = lambda keys, owner: (seen.append((owner, list(keys))), real_plan(keys, owner=owner))[1]
        with torch.no_grad():
            model(ids)
            model(ids)  # the second forward knows the first one's unit order
        owner, keys = seen[-1]
        assert owner.startswith("offload/") and len(keys) >= 4 and len(set(keys)) == len(keys)
        assert keys == [k for k in keys if k in store]  # the model's own objects, each once, in order
        tiered.detach(model)
        assert owner not in store.stats()["plans"]["active"]
    finally:
        store.close()


def test_plans_reach_listeners_and_the_governors_policy_in_order_with_the_accesses(tmp_path, monkeypatch):
    from tiered import policies
    from tiered.policies.cache import CachingMigration
    from tiered.policies.lru import LRU

    seen = []

    class Recording(CachingMigration):
        def decide(self, batch):
            seen.extend((o.op, o.key) for o in batch)
            return super().decide(batch)

        def plan(self, owner, keys):
            seen.append(("plan", owner, tuple(keys)))

    monkeypatch.setitem(policies._POLICIES, "recording-test", lambda: Recording("recording-test", LRU))
    cfg = config(tmp_path)
    cfg["tiers"]["flash"] = {"path": str(tmp_path / "flash"), "capacity": "16MiB"}
    cfg["policy"] = {"migration": "recording-test", "migration_batch": 1}
    events = []
    with TieredStore(cfg, cache_on_put=False) as s:
        s.add_listener(lambda ev: events.append(ev) if ev.op == "plan" else None)
        s.put("a", filled(1)).result(T)
        s.get("a").result(T)
        s.plan(["a", "b"], owner="me")
        s.get("a").result(T)
        deadline = time.monotonic() + T
        while len([x for x in seen if x[0] == "read"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert [(ev.key, ev.keys) for ev in events] == [("me", ("a", "b"))]
    assert seen == [("write", "a"), ("read", "a"), ("plan", "me", ("a", "b")), ("read", "a")], seen


# -- what the review of plans and migrate found -------------------------------------------------

def two_storage(tmp_path, host="1MiB"):
    return {"tiers": {"host": {"capacity": host}, "fast": {"path": str(tmp_path / "fast"), "capacity": "8MiB"},
                      "slow": {"path": str(tmp_path / "slow"), "capacity": "8MiB"}}, "engine": {"workers": 2}}


def test_the_owner_allocating_keeps_its_own_next_reads_over_another_owners_later_ones(tmp_path):
    """Positions of two owners' plans are no common clock: the model reading now must not evict
    its own next weights to keep chunks the optimizer reads only after the model's pass."""
    def model_misses(opt_plan):
        with TieredStore(config(tmp_path / str(opt_plan), host="2MiB"), cache_on_put=False) as s:
            for i in range(4):
                s.put(f"o{i}", filled(i), owner="opt").result(T)
            model = [f"m{i}" for i in range(12)]
            for k in model:
                s.put(k, filled(1), owner="model").result(T)
                s.get(k, owner="model").result(T)
            for i in range(4):
                s.get(f"o{i}", owner="opt").result(T)
            if opt_plan:
                s.plan([f"o{i}" for i in range(4)], owner="opt")
            before = s.stats()["misses"]
            for _ in range(3):
                s.plan(model + model, owner="model")  # this pass and the next
                for k in model:
                    s.get(k, owner="model").result(T)
            return s.stats()["misses"] - before
    assert model_misses(True) <= model_misses(False)


def test_a_prefetch_is_not_a_read_of_the_plan(tmp_path):
    with TieredStore(config(tmp_path), cache_on_put=False) as s:
        for i in range(3):
            s.put(f"k{i}", filled(i)).result(T)
        s.plan(["k0", "k1", "k2"], owner="me")
        s.prefetch("k0").result(T)
        s.prefetch("k1").result(T)
        assert s.stats()["plans"]["active"]["me"]["position"] == 0
        s.get("k0").result(T)
        assert s.stats()["plans"]["active"]["me"]["position"] == 1


def test_a_read_that_joins_a_load_the_store_started_is_an_access(tmp_path):
    from tiered.io_engine.testing import FaultyBackend

    fb = FaultyBackend()
    with TieredStore(two_storage(tmp_path, host="4MiB"), cache_on_put=False, backend=fb) as s:
        s.put("a", filled(1), tier="fast").result(T)
        events = []
        s.add_listener(lambda e: events.append((e.op, e.key)))
        s.plan(["a", "b"], owner="w")
        fb.delay("read", seconds=0.5, path="fast", times=1)
        moving = s.migrate("a", "slow")  # its own read of "a" is no access
        time.sleep(0.1)
        with s.acquire("a", owner="w").result(T):  # joins that read
            pass
        moving.result(T)
        assert ("read", "a") in events and s.stats()["plans"]["active"]["w"]["position"] == 1, events


def test_a_key_reregistered_as_an_external_file_during_a_move_is_not_rewritten(tmp_path):
    import numpy as np

    ext = tmp_path / "weights.bin"
    data = np.arange(5096, dtype=np.float32)
    data.tofile(ext)
    with TieredStore(two_storage(tmp_path)) as s:
        s.put("w", torch.zeros(1000), tier="fast").result(T)
        real = s._acquire

        def racing(key, *a, **k):  # the key becomes an external file's window meanwhile
            s.register_external("w", ext, 400, 4000, torch.float32, (1000,))
            s._acquire = real
            return real(key, *a, **k)

        s._acquire = racing
        assert s.migrate("w", "slow").result(T).get("superseded")
        assert torch.equal(s.get("w").result(T), torch.from_numpy(data[100:1100]))
        assert s.meta("w")["tier"] == "external"


def test_a_move_of_a_block_checksummed_object_does_not_wait_for_host_memory(tmp_path):
    from tiered.allocators import OutOfBudget

    with TieredStore(two_storage(tmp_path), cache_on_put=False, host_wait=5) as s:
        s.put("a", filled(1), tier="fast", block=4096, placed=False).result(T)
        lease = s.acquire("a").result(T)  # cached and pinned: the move needs only its crc table
        held = s.alloc_host(s.stats()["tiers"]["host"]["capacity"] - OBJ, owner="other")
        t0 = time.monotonic()
        try:
            with pytest.raises(OutOfBudget):
                s._migrate("a", "slow", wait=0, evict=False).result(T)
            assert time.monotonic() - t0 < 2
        finally:
            held.release()
            lease.release()
        assert s.meta("a")["tier"] == "fast" and torch.equal(s.get("a").result(T), filled(1))


def test_a_move_leaves_the_host_policys_order_as_it_was(tmp_path):
    cfg = two_storage(tmp_path)
    with TieredStore(cfg, cache_on_put=False) as s:
        for k in "abcd":
            s.put(k, filled(ord(k)), tier="fast").result(T)
            s.get(k).result(T)  # a is the least recently used of four cached copies
        s.migrate("a", "slow").result(T)
        s.put("e", filled(5), tier="fast").result(T)
        s.get("e").result(T)  # needs room: LRU evicts a, as before the move
        assert [k for k in "abcde" if s.meta(k)["in_host"]] == ["b", "c", "d", "e"]


def test_a_plan_resyncs_on_the_last_occurrence_of_a_key_far_ahead():
    p = Plan("o", [f"k{i}" for i in range(60)])
    p.advance("k30")  # 30 reads the store never saw (served from a device cache, say)
    assert p.pos == 31 and p.next_use("k59") == 28
    q = Plan("o", ["a", "b"] * 20)
    q.advance("b")
    q.advance("b")  # b recurs: only a near occurrence moves the position
    assert q.pos == 4
    q.advance("a")
    assert q.pos == 5
