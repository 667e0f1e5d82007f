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
