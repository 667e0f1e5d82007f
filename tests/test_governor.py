"""The store's governor moves objects between storage tiers as the migration policy decides, and
the store refuses what the policy may not do: no lost or stale data under concurrent puts, no
overfilled tier, no move of an external file's object; every decision is counted and emitted."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tiered import policies
from tiered.config import ConfigError, load_config
from tiered.policies import Move
from tiered.policies.cache import CachingMigration
from tiered.policies.lru import LRU
from helpers import wait_until
from tiered.store import TieredStore

KiB, MiB = 1 << 10, 1 << 20
T = 30.0


def config(tmp_path, *, fast="1MiB", migration="lru", bandwidth="1GB/s", batch=1, host="8MiB"):
    return {"tiers": {"host": {"capacity": host},
                      "fast": {"path": str(tmp_path / "fast"), "capacity": fast},
                      "slow": {"path": str(tmp_path / "slow"), "capacity": "16MiB"}},
            "engine": {"workers": 2},
            "policy": {"migration": migration, "migration_bandwidth": bandwidth, "migration_batch": batch}}


def filled(v, n=64 * KiB // 4):
    return torch.full((n,), float(v), dtype=torch.float32)


def read(store, key):
    """A read that reaches the storage tier (the host copy dropped first), as the policy sees it."""
    store.evict(key)
    return store.get(key).result(T)


def test_a_hot_object_on_the_slow_tier_is_promoted_and_stays_intact(tmp_path):
    with TieredStore(config(tmp_path), cache_on_put=False) as s:
        for i in range(4):
            s.put(f"k{i}", filled(i), tier="slow", placed=False).result(T)
        assert torch.equal(read(s, "k1"), filled(1))
        assert wait_until(lambda: s.meta("k1")["tier"] == "fast"), s.stats()["governor"]
        assert torch.equal(read(s, "k1"), filled(1))
        g = s.stats()["governor"]
        assert g["policy"] == "lru" and g["migrations"] >= 1 and g["bytes_migrated"]["slow->fast"] >= 64 * KiB
        assert g["failed"] == 0 and g["last_error"] is None


def test_cold_objects_are_demoted_to_make_room_and_no_tier_is_overfilled(tmp_path):
    with TieredStore(config(tmp_path, fast="256KiB"), cache_on_put=False) as s:
        for i in range(4):  # fill the fast tier with objects never read again
            s.put(f"cold{i}", filled(i), tier="fast", placed=False).result(T)
        for i in range(4):
            s.put(f"hot{i}", filled(10 + i), tier="slow", placed=False).result(T)
        cap = s.stats()["tiers"]["fast"]["capacity"]
        for _ in range(3):
            for i in range(4):
                assert torch.equal(read(s, f"hot{i}"), filled(10 + i))
                assert s.stats()["tiers"]["fast"]["used"] <= cap
        assert wait_until(lambda: all(s.meta(f"hot{i}")["tier"] == "fast" for i in range(4))), \
            s.stats()["governor"]
        assert all(s.meta(f"cold{i}")["tier"] == "slow" for i in range(4))
        for i in range(4):
            assert torch.equal(read(s, f"cold{i}"), filled(i))
        assert s.stats()["governor"]["bytes_migrated"]["fast->slow"] >= 4 * 64 * KiB


def test_moves_under_concurrent_puts_and_reads_lose_nothing_and_never_bring_back_an_old_version(tmp_path):
    keys = [f"k{i}" for i in range(6)]
    latest = {}
    with TieredStore(config(tmp_path, fast="256KiB", batch=2), cache_on_put=False) as s:
        for i, k in enumerate(keys):
            s.put(k, filled(i), tier="slow", placed=False).result(T)
            latest[k] = i
        stop = threading.Event()
        errors = []

        def writer():
            v = 100
            while not stop.is_set():
                for k in keys[::2]:
                    v += 1
                    s.put(k, filled(v)).result(T)
                    latest[k] = v

        def reader():
            while not stop.is_set():
                for k in keys:
                    try:
                        got = read(s, k)
                    except Exception as e:  # noqa: BLE001 - reported below
                        errors.append(e)
                        return
                    if len(set(got.tolist())) != 1:
                        errors.append(AssertionError(f"{k}: a torn object"))

        threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
        for t in threads:
            t.start()
        moved = wait_until(lambda: s.stats()["governor"]["migrations"] >= 10, timeout=15)
        stop.set()
        for t in threads:
            t.join(T)
        assert not errors, errors
        assert moved, s.stats()["governor"]
        g = s.stats()["governor"]
        assert g["migrations"] >= 1 and g["failed"] == 0, g["last_error"]
        for k in keys:
            assert torch.equal(s.get(k).result(T), filled(latest[k])), k
    with TieredStore(config(tmp_path, migration="none")) as s:  # and after a reopen
        for k in keys:
            assert torch.equal(s.get(k).result(T), filled(latest[k])), k


def test_a_tier_kept_for_another_owners_share_refuses_the_move(tmp_path):
    with TieredStore(config(tmp_path, fast="256KiB"), cache_on_put=False) as s:
        s.reserve("fast", "256KiB", owner="other")  # all of it kept for an owner that holds nothing yet
        s.put("a", filled(1), tier="slow", placed=False).result(T)
        assert torch.equal(read(s, "a"), filled(1))
        assert wait_until(lambda: s.stats()["governor"]["refused_overfull"] >= 1), s.stats()["governor"]
        assert s.meta("a")["tier"] == "slow" and torch.equal(read(s, "a"), filled(1))
        assert s.stats()["governor"]["migrations"] == 0


class Scripted(CachingMigration):
    """No moves of its own; one scripted move proposed when it sees an access to ``when``."""

    def __init__(self, move, when):
        super().__init__("scripted-test", LRU)
        self.move, self.when = move, when

    def decide(self, batch):
        if self.move and any(o.key == self.when for o in batch):
            moves, self.move = [self.move], None
            return moves
        return []


def test_a_move_of_an_object_read_in_place_from_an_external_file_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    path.write_bytes(filled(7).numpy().tobytes())
    monkeypatch.setitem(policies._POLICIES, "scripted-test", lambda: Scripted(Move("w", 0), when="x"))
    with TieredStore(config(tmp_path, migration="scripted-test"), cache_on_put=False) as s:
        s.register_external("w", path, 0, 64 * KiB, torch.float32, (16 * KiB,))
        s.put("x", filled(1), tier="slow", placed=False).result(T)
        read(s, "x")
        assert wait_until(lambda: s.stats()["governor"]["refused_external"] == 1), s.stats()["governor"]
        assert s.meta("w")["tier"] == "external" and torch.equal(read(s, "w"), filled(7))
        assert path.read_bytes() == filled(7).numpy().tobytes()


def test_moves_stop_when_the_accesses_stop(tmp_path):
    """The store's own reads and writes of a move are no accesses: nothing moves back and forth."""
    with TieredStore(config(tmp_path, fast="256KiB"), cache_on_put=False) as s:
        for i in range(4):
            s.put(f"cold{i}", filled(i), tier="fast", placed=False).result(T)
        for i in range(4):
            s.put(f"hot{i}", filled(10 + i), tier="slow", placed=False).result(T)
        for i in range(4):
            read(s, f"hot{i}")
        assert wait_until(lambda: all(s.meta(f"hot{i}")["tier"] == "fast" for i in range(4))), s.stats()["governor"]
        time.sleep(0.3)
        before = s.stats()["governor"]["migrations"]
        time.sleep(1.0)
        assert s.stats()["governor"]["migrations"] == before <= 8, s.stats()["governor"]
        assert not any(s.meta(f"cold{i}")["in_host"] for i in range(4))  # moves leave the cache as it was


def test_sizes_count_as_the_tier_counts_them(tmp_path):
    """Objects of 4100 bytes take 8 KiB extents: the policy must see 8 KiB to make room."""
    with TieredStore(config(tmp_path, fast="32KiB"), cache_on_put=False) as s:
        for i in range(4):
            s.put(f"cold{i}", filled(i, n=1025), tier="fast", placed=False).result(T)  # 4100 bytes each
        s.put("hot", filled(9, n=1025), tier="slow", placed=False).result(T)
        for _ in range(3):
            read(s, "hot")
        assert wait_until(lambda: s.meta("hot")["tier"] == "fast"), s.stats()["governor"]


def test_opening_a_store_moves_nothing_by_itself(tmp_path):
    cfg = config(tmp_path)
    cfg["tiers"]["flash"] = {"path": str(tmp_path / "flash"), "capacity": "16MiB"}
    with TieredStore({**cfg, "policy": {"migration": "none"}}) as s:
        for i in range(6):
            s.put(f"k{i}", filled(i), tier="slow", placed=False).result(T)  # the middle tier of three
    with TieredStore(cfg) as s:
        time.sleep(0.5)
        g = s.stats()["governor"]
        assert g["decisions"] == 0 and {s.meta(f"k{i}")["tier"] for i in range(6)} == {"slow"}, g


def test_a_move_never_waits_for_host_memory_and_close_is_prompt(tmp_path, monkeypatch):
    monkeypatch.setitem(policies._POLICIES, "scripted-test", lambda: Scripted(Move("a", 0), when="trigger"))
    s = TieredStore(config(tmp_path, host="1MiB", migration="scripted-test"), cache_on_put=False, host_wait=20)
    with s:
        s.put("a", filled(1), tier="slow", placed=False).result(T)
        held = s.alloc_host(1 << 20, owner="other")  # every host byte pinned by another owner
        # a write out of that buffer needs no host memory; its event makes the policy move "a"
        s.put_buffer("trigger", held, torch.uint8, (1 << 20,), tier="slow", placed=False).result(T)
        assert wait_until(lambda: s.stats()["governor"]["refused_host"] == 1), s.stats()["governor"]
        assert s.meta("a")["tier"] == "slow"
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 5
    held.release()


def test_a_policy_that_raises_stops_the_governor_not_the_store(tmp_path, monkeypatch):
    class Broken(CachingMigration):
        def decide(self, batch):
            raise RuntimeError("broken policy")

    monkeypatch.setitem(policies._POLICIES, "broken-test", lambda: Broken("broken-test", LRU))
    with TieredStore(config(tmp_path, migration="broken-test"), cache_on_put=False) as s:
        s.put("a", filled(1), tier="slow", placed=False).result(T)
        read(s, "a")
        assert wait_until(lambda: s.stats()["governor"]["stopped"] is not None)
        assert "broken policy" in s.stats()["governor"]["stopped"]
        for _ in range(3):
            assert torch.equal(read(s, "a"), filled(1))
        assert s.stats()["governor"]["queued"] == 0


def test_decisions_are_emitted_and_paced_to_the_bandwidth_budget(tmp_path):
    events = []
    with TieredStore(config(tmp_path, fast="4MiB", bandwidth="1MB/s"), cache_on_put=False) as s:
        s.add_listener(lambda ev: events.append(ev) if ev.op == "migrate" else None)
        for i in range(3):
            s.put(f"k{i}", filled(i, n=256 * KiB // 4), tier="slow", placed=False).result(T)
        t0 = time.monotonic()
        for i in range(3):
            read(s, f"k{i}")
        assert wait_until(lambda: s.stats()["governor"]["migrations"] == 3), s.stats()["governor"]
        took = time.monotonic() - t0
    assert took >= 0.45, f"three 256 KiB moves at 1 MB/s took {took:.2f} s"  # the first is not paced
    assert [(ev.key, ev.tier) for ev in events] == [(f"k{i}", "fast") for i in range(3)]


def test_a_deleted_object_frees_the_policys_room(tmp_path):
    with TieredStore(config(tmp_path, fast="128KiB"), cache_on_put=False) as s:
        s.put("a", filled(1), tier="slow", placed=False).result(T)
        read(s, "a")
        assert wait_until(lambda: s.meta("a")["tier"] == "fast")
        s.delete("a")
        s.put("b", filled(2), tier="slow", placed=False).result(T)
        s.put("c", filled(3), tier="slow", placed=False).result(T)
        read(s, "b")
        read(s, "c")
        assert wait_until(lambda: {s.meta(k)["tier"] for k in "bc"} == {"fast"}), s.stats()["governor"]
        assert s.stats()["governor"]["refused_gone"] == 0


def test_migration_none_starts_no_governor_and_bad_names_are_refused(tmp_path):
    with TieredStore(config(tmp_path, migration="none")) as s:
        g = s.stats()["governor"]
        assert g["running"] is False and "none" in g["why"]
    with pytest.raises(ConfigError, match="policy.migration.*expected one of"):
        load_config(config(tmp_path, migration="nope"))
    with pytest.raises(ConfigError, match="policy.migration.*live store cannot run 'belady'.*future"):
        load_config(config(tmp_path, migration="belady"))
    with pytest.raises(ConfigError, match="policy.migration_bandwidth"):
        load_config(config(tmp_path, bandwidth="fast"))
    one = config(tmp_path)
    del one["tiers"]["slow"]
    with pytest.raises(ConfigError, match="policy.migration.*two or more"):
        load_config(one)


def test_sync_governor_returns_once_the_moves_of_earlier_accesses_are_done(tmp_path):
    with TieredStore(config(tmp_path), cache_on_put=False) as s:
        s.put("a", filled(1), tier="slow", placed=False).result(T)
        read(s, "a")
        assert s.sync_governor(T)
        assert s.meta("a")["tier"] == "fast" and s.stats()["governor"]["migrations"] == 1
    with TieredStore(config(tmp_path, migration="none")) as s:
        assert s.sync_governor(0)


def test_new_objects_go_where_the_policy_places_them(tmp_path, monkeypatch):
    class Backing(CachingMigration):
        def place(self, obs, tiers):
            return list(tiers)[-1][0]

    monkeypatch.setitem(policies._POLICIES, "backing-test", lambda: Backing("backing-test", LRU))
    with TieredStore(config(tmp_path, migration="backing-test"), cache_on_put=False) as s:
        s.put("a", filled(1)).result(T)  # first-fit would take the fast tier: it has room
        assert s.meta("a")["tier"] == "slow"
        s.put("b", filled(2), tier="fast").result(T)  # an explicit tier is the caller's
        assert s.meta("b")["tier"] == "fast"
    with TieredStore(config(tmp_path, migration="none")) as s:
        s.put("c", filled(3)).result(T)
        assert s.meta("c")["tier"] == "fast"


def test_a_move_that_fails_after_its_read_leaves_the_cache_as_it_found_it(tmp_path, monkeypatch):
    from tiered.io_engine.testing import FaultyBackend

    fb = FaultyBackend()
    monkeypatch.setitem(policies._POLICIES, "scripted-test", lambda: Scripted(Move("a", 0), when="trigger"))
    with TieredStore(config(tmp_path, migration="scripted-test"), cache_on_put=False, backend=fb) as s:
        s.put("a", filled(1), tier="slow", placed=False).result(T)  # not cached
        fb.fail("write", path=str(tmp_path / "fast"), times=1)  # the move's write to the fast tier fails
        s.put("trigger", filled(2), tier="slow", placed=False).result(T)
        assert s.sync_governor(T)
        assert s.stats()["governor"]["failed"] == 1, s.stats()["governor"]
        assert not s.meta("a")["in_host"] and s.meta("a")["tier"] == "slow"
        assert torch.equal(read(s, "a"), filled(1))


def test_auto_is_schedule_with_the_fallback_where_there_are_two_storage_tiers(tmp_path):
    cfg = config(tmp_path, migration="auto")
    with TieredStore(cfg, cache_on_put=False) as s:
        g = s.stats()["governor"]
        assert g is not None and g["policy"] == "schedule"
        s.put("a", filled(1), tier="slow", placed=False).result(T)
        s.plan(["a"], owner="me")
        read(s, "a")
        assert s.sync_governor(T) and s.meta("a")["tier"] == "fast"
    one = config(tmp_path / "one", migration="auto")
    del one["tiers"]["slow"]
    with TieredStore(one) as s:  # nothing to move between
        g = s.stats()["governor"]
        assert g["running"] is False and "one storage tier" in g["why"]
    default = config(tmp_path / "default")
    del default["policy"]
    with TieredStore(default, cache_on_put=False) as s:  # on by default
        g = s.stats()["governor"]
        assert g["running"] is True and g["policy"] == "schedule"
        s.put("b", filled(2), tier="slow", placed=False).result(T)
        s.plan(["b"], owner="me")
        read(s, "b")
        assert s.sync_governor(T) and s.meta("b")["tier"] == "fast"
    with pytest.raises(ConfigError, match="policy.fallback"):
        load_config({**config(tmp_path), "policy": {"fallback": "nope"}})


def test_a_round_of_moves_is_committed_once(tmp_path):
    with TieredStore(config(tmp_path, batch=8), cache_on_put=False) as s:
        for i in range(8):
            s.put(f"k{i}", filled(i), tier="slow", placed=False).result(T)
        commits = s.stats()["commits"]
        for i in range(8):
            s.get(f"k{i}").result(T)  # cached: the store's own reads of the moves find the copies
        assert s.sync_governor(T)
        g = s.stats()["governor"]
        assert g["migrations"] == 8 and s.stats()["commits"] - commits <= 2, (g, s.stats()["commits"] - commits)
    with TieredStore(config(tmp_path, migration="none")) as s:  # the moves were committed
        assert {s.meta(f"k{i}")["tier"] for i in range(8)} == {"fast"}
        assert all(torch.equal(s.get(f"k{i}").result(T), filled(i)) for i in range(8))


def test_an_object_put_on_a_named_tier_stays_there_and_the_refusal_is_counted(tmp_path):
    cfg = config(tmp_path, migration="auto")
    with TieredStore(cfg, cache_on_put=False) as s:
        s.put("chosen", filled(1), tier="slow").result(T)  # the caller chose the slow tier
        s.put("free", filled(2), tier="slow", placed=False).result(T)
        assert s.meta("chosen")["placed"] and not s.meta("free")["placed"]
        s.plan(["chosen", "free"], owner="me")
        read(s, "chosen")
        read(s, "free")
        assert s.sync_governor(T)
        g = s.stats()["governor"]
        assert s.meta("chosen")["tier"] == "slow" and s.meta("free")["tier"] == "fast", g
        assert g["refused_placed"] >= 1
        assert torch.equal(read(s, "chosen"), filled(1))
        s.migrate("free", "slow").result(T)  # an explicit migrate places it too
        assert s.meta("free")["placed"] and s.meta("free")["tier"] == "slow"
        s.put("chosen", filled(3)).result(T)  # a later put without a tier decides again
        assert not s.meta("chosen")["placed"]
    with TieredStore(cfg) as s:  # placement survives a reopen (the manifest records it)
        assert s.meta("free")["placed"] and not s.meta("chosen")["placed"]


def test_placement_first_fit_ignores_the_policys_placement(tmp_path, monkeypatch):
    class Backing(CachingMigration):
        def place(self, obs, tiers):
            return list(tiers)[-1][0]

    monkeypatch.setitem(policies._POLICIES, "backing-test2", lambda: Backing("backing-test2", LRU))
    cfg = config(tmp_path, migration="backing-test2")
    cfg["policy"]["placement"] = "first-fit"
    with TieredStore(cfg, cache_on_put=False) as s:
        s.put("a", filled(1)).result(T)
        assert s.meta("a")["tier"] == "fast" and not s.meta("a")["placed"]


def test_migrate_to_the_tier_an_object_is_on_places_it_durably(tmp_path):
    cfg = config(tmp_path, migration="none")
    with TieredStore(cfg) as s:
        s.put("a", filled(1), tier="slow", placed=False).result(T)
        assert s.migrate("a", "slow").result(T)["placed"]
    with TieredStore(cfg) as s:
        assert s.meta("a")["placed"] and s.meta("a")["tier"] == "slow"


def test_an_object_placed_while_the_governor_moves_it_stays_where_its_caller_put_it(tmp_path, monkeypatch):
    from tiered.store import governor as gov_mod

    pace = gov_mod.Governor._pace
    with TieredStore(config(tmp_path, migration="auto"), cache_on_put=False) as s:
        placed = []

        def pace_after_a_users_migrate(self, n):  # the user's choice lands after the governor's check
            if not placed:
                placed.append(s.migrate("a", "slow").result(T))
            return pace(self, n)

        monkeypatch.setattr(gov_mod.Governor, "_pace", pace_after_a_users_migrate)
        s.put("a", filled(1), tier="slow", placed=False).result(T)
        s.plan(["a"], owner="me")
        read(s, "a")
        assert s.sync_governor(T) and placed
        assert (s.meta("a")["tier"], s.meta("a")["placed"]) == ("slow", True)
        g = s.stats()["governor"]
        assert g["refused_placed"] >= 1 and g["migrations"] == 0, g
        assert torch.equal(read(s, "a"), filled(1))
