"""Owners and reservations: one budget per tier shared by every workload of a store.

``TierOwnerTests`` is the conformance suite every tier kind passes (host arena, device region,
storage directory): an adapter per kind allocates and frees bytes charged to an owner.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from helpers import owner_figures
from tiered.store import DEFAULT_OWNER, StoreError, TieredStore

MiB = 1 << 20
T = 30.0


def config(tmp_path, host="8MiB", storage="16MiB", gpu=None, owners=""):
    tiers = {"host": {"capacity": host}, "nvme": {"path": str(tmp_path / "nvme"), "capacity": storage}}
    if gpu is not None:
        tiers = {"gpu": {"kind": "device", "device": "cpu", "capacity": gpu}, **tiers}
    cfg = {"tiers": tiers, "engine": {"workers": 2}}
    if owners:
        cfg["owners"] = owners
    return cfg


# -- the conformance suite: every tier kind ------------------------------------------------
class _Host:
    tier = "host"

    def __init__(self, store):
        self.store = store

    def alloc(self, owner, n):
        return self.store.alloc_host(n, wait=0, owner=owner)

    def free(self, h):
        h.release()


class _Device(_Host):
    tier = "gpu"

    def alloc(self, owner, n):
        return self.store._alloc_device(n, wait=0, owner=owner)


class _Storage(_Host):
    tier = "nvme"
    _keys = itertools.count()

    def alloc(self, owner, n):
        key = f"obj{next(self._keys)}"
        self.store.put(key, torch.zeros(n, dtype=torch.uint8), owner=owner).result(T)
        self.store.evict(key)  # only the extent stays charged
        return key

    def free(self, key):
        self.store.delete(key)
        self.store.commit()


class TierOwnerTests:
    """Shared by every tier kind: owners are charged, shares are kept, overcommit is refused."""

    kind: type

    @pytest.fixture
    def tier(self, tmp_path):
        with TieredStore(config(tmp_path, storage="8MiB", gpu="8MiB")) as store:
            if self.kind is _Host:  # the host tier's other users (cached copies) are not in the way
                store.cache_on_put = False
            yield self.kind(store)

    def figures(self, tier, owner):
        return owner_figures(tier.store, owner, tier.tier)

    def test_bytes_are_charged_to_their_owner(self, tier):
        a = tier.alloc("kv", MiB)
        b = tier.alloc("gnn", 2 * MiB)
        assert self.figures(tier, "kv")["held"] >= MiB and self.figures(tier, "gnn")["held"] >= 2 * MiB
        tier.free(a)
        assert self.figures(tier, "kv")["held"] == 0 and self.figures(tier, "kv")["peak"] >= MiB
        tier.free(b)

    def test_a_share_is_kept_for_its_owner(self, tier):
        with tier.store.reserve(tier.tier, "50%", owner="kv") as res:
            assert res.reserved >= 4 * MiB
            big = tier.alloc("gnn", 3 * MiB)
            with pytest.raises((StoreError, MemoryError)):
                tier.alloc("gnn", 2 * MiB)  # would eat into kv's share
            mine = tier.alloc("kv", 3 * MiB)
            tier.free(mine)
            tier.free(big)
        assert self.figures(tier, "kv")["reserved"] == 0

    def test_overcommitting_shares_is_refused_naming_the_owners(self, tier):
        with tier.store.reserve(tier.tier, "60%", owner="kv"):
            with pytest.raises(StoreError, match=r"'gnn'.*kv holds 0 of share"):
                tier.store.reserve(tier.tier, "60%", owner="gnn")

    def test_one_open_reservation_per_owner_and_tier(self, tier):
        with tier.store.reserve(tier.tier, 0, owner="kv"):
            with pytest.raises(StoreError, match="already holds a reservation"):
                tier.store.reserve(tier.tier, 0, owner="kv")
        tier.store.reserve(tier.tier, 0, owner="kv").close()


class TestHostTierOwners(TierOwnerTests):
    kind = _Host


class TestDeviceTierOwners(TierOwnerTests):
    kind = _Device


class TestStorageTierOwners(TierOwnerTests):
    kind = _Storage


# -- store-level behaviour -------------------------------------------------------------------
def test_puts_and_reads_charge_the_calling_owner(tmp_path):
    with TieredStore(config(tmp_path)) as store:
        store.put("w", torch.ones(MiB // 4), owner="offload").result(T)  # cached copy kept: charged
        assert store.owners()["offload"]["host"]["held"] == MiB
        assert store.owners()["offload"]["nvme"]["held"] == MiB
        store.evict("w")
        with store.acquire("w", owner="kv").result(T) as lease:
            assert lease.tensor.sum().item() == MiB // 4
            assert store.owners()["kv"]["host"]["held"] == MiB  # the reader that loaded it pays
        assert store.meta("w")["owner"] == "offload"
        assert store.stats()["owners"]["offload"]["nvme"]["peak"] == MiB


def test_storage_owners_survive_a_reopen(tmp_path):
    cfg = config(tmp_path)
    with TieredStore(cfg) as store:
        store.put("a", torch.zeros(MiB, dtype=torch.uint8), owner="optim").result(T)
        store.put("b", torch.zeros(MiB, dtype=torch.uint8)).result(T)
    with TieredStore(cfg) as store:
        owners = store.owners()
        assert owners["optim"]["nvme"]["held"] == MiB and owners[DEFAULT_OWNER]["nvme"]["held"] == MiB
        assert store.meta("a")["owner"] == "optim"


def test_an_owner_under_pressure_gives_memory_back(tmp_path):
    with TieredStore(config(tmp_path, host="8MiB")) as store:
        cached = []
        asked = []

        def give_back(nbytes):
            asked.append(nbytes)
            freed = 0
            while cached and freed < nbytes:
                b = cached.pop()
                freed += b.reserved
                b.release()
            return freed

        with store.reserve("host", owner="gnn", on_pressure=give_back) as gnn:
            cached.extend(gnn.alloc(MiB) for _ in range(7))  # a cache that fills the tier
            with store.reserve("host", owner="kv") as kv:
                buf = kv.alloc(3 * MiB, wait=1)  # no room until gnn gives some back
                assert asked and len(cached) <= 4
                assert kv.held == 3 * MiB and gnn.peak == 7 * MiB
                buf.release()
        for b in cached:
            b.release()


def test_the_config_gives_default_shares(tmp_path):
    cfg = config(tmp_path, owners={"kv": {"host": "25%", "nvme": "4MiB"}})
    with TieredStore(cfg) as store:
        with store.reserve("host", owner="kv") as res, store.reserve("nvme", owner="kv") as disk:
            assert res.reserved == 2 * MiB and disk.reserved == 4 * MiB
        with store.reserve("host", owner="kv/replica-2") as res2:
            assert res2.reserved == 2 * MiB


def test_unknown_tier_and_bad_share_are_clear_errors(tmp_path):
    with TieredStore(config(tmp_path)) as store:
        with pytest.raises(StoreError, match="unknown tier 'flash'.*host, nvme"):
            store.reserve("flash", 0, owner="kv")
        with pytest.raises(StoreError, match="percentage"):
            store.reserve("host", "150%", owner="kv")
        with pytest.raises(StoreError, match="no device tier"):
            store._alloc_device(10, owner="kv")


def test_device_tier_on_cpu_runs_the_same_code(tmp_path):
    with TieredStore(config(tmp_path, gpu="4MiB")) as store:
        assert store.device_tier == "gpu"
        with store.reserve("gpu", "1MiB", owner="kv") as res:
            buf = res.alloc(MiB)
            buf.tensor(torch.float32)[:] = 2.0
            assert store.stats()["tiers"]["gpu"]["used"] == MiB
            assert store.owners()["kv"]["gpu"] == {"held": MiB, "peak": MiB, "reserved": MiB}
            buf.release()
        with pytest.raises(MemoryError, match="owner 'offload'.*by owner"):
            store._alloc_device(5 * MiB, wait=0, owner="offload")


def test_copies_inside_another_owners_share_are_not_evicted_for_nothing(tmp_path):
    with TieredStore(config(tmp_path, host="8MiB")) as store:
        with store.reserve("host", "4MiB", owner="kv"):
            for i in range(4):
                store.put(f"k{i}", torch.zeros(MiB // 4), owner="kv").result(T)  # cached, charged to kv
            other = [store.alloc_host(MiB, owner="gnn") for _ in range(4)]
            with pytest.raises(MemoryError):
                store.alloc_host(MiB, wait=0.2, owner="gnn")
            assert all(store.meta(f"k{i}")["in_host"] for i in range(4))  # kv's copies survived
            for b in other:
                b.release()


def test_pressure_that_frees_nothing_useful_does_not_spin_past_the_deadline(tmp_path):
    import time

    with TieredStore(config(tmp_path, host="8MiB")) as store:
        calls = []
        kv = store.reserve("host", "4MiB", owner="kv", on_pressure=lambda n: calls.append(n) or n)
        held = [kv.alloc(MiB) for _ in range(4)] + [kv.alloc(MiB)]  # 1 MiB beyond its share
        other = [store.alloc_host(MiB, owner="gnn") for _ in range(3)]
        t0 = time.monotonic()
        with pytest.raises(MemoryError):
            store.alloc_host(MiB, wait=0.5, owner="gnn")  # kv claims to give back but frees nothing
        assert time.monotonic() - t0 < 5 and len(calls) < 1000
        for b in held + other:
            b.release()
        kv.close()


def test_placement_skips_a_tier_held_back_by_shares(tmp_path):
    cfg = config(tmp_path, storage="16MiB")
    cfg["tiers"]["flash"] = {"path": str(tmp_path / "flash"), "capacity": "64MiB"}
    with TieredStore(cfg) as store:
        with store.reserve("nvme", "12MiB", owner="kv"):
            store.put("x", torch.zeros(8 * MiB, dtype=torch.uint8), owner="gnn").result(T)
            assert store.meta("x")["tier"] == "flash"


def test_the_host_tier_answers_to_its_configured_name(tmp_path):
    cfg = config(tmp_path, owners={"kv": {"dram": "4MiB"}})
    cfg["tiers"] = {"dram": {**cfg["tiers"].pop("host"), "kind": "host"}, **cfg["tiers"]}
    with TieredStore(cfg) as store:
        with store.reserve("host", owner="kv") as a:
            assert a.reserved == 4 * MiB
        with store.reserve("dram", owner="kv") as b:
            assert b.reserved == 4 * MiB


def test_closing_a_reservation_of_an_earlier_open_leaves_the_new_one(tmp_path):
    store = TieredStore(config(tmp_path))
    with store:
        r1 = store.reserve("host", "4MiB", owner="kv")
    with store:
        r2 = store.reserve("host", "4MiB", owner="kv")
        r1.close()
        assert r2.reserved == 4 * MiB
        with pytest.raises(StoreError, match="closed"):
            r1.alloc(10)
