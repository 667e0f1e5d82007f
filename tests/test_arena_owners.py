"""Owner accounting and shares, the same for every arena kind (host memory, a device region)."""

from __future__ import annotations

import threading

import pytest

from tiered.allocators import DeviceArena, HostArena, OutOfBudget

MiB = 1 << 20


def _host(cap):
    return HostArena(cap, hugepages=False, pin=False, name="host test")


def _device(cap):
    return DeviceArena(cap, "cpu", alignment=4096)


@pytest.fixture(params=[_host, _device], ids=["host", "device"])
def arena(request):
    with request.param(8 * MiB) as a:
        yield a


def test_every_buffer_is_charged_to_its_owner(arena):
    a = arena.alloc(MiB, owner="kv")
    b = arena.alloc(2 * MiB, owner="optim")
    c = arena.alloc(MiB, owner="kv")
    o = arena.owners()
    assert (o["kv"].held, o["kv"].buffers, o["optim"].held) == (2 * MiB, 2, 2 * MiB)
    a.release()
    c.release()
    o = arena.owners()
    assert o["kv"].held == 0 and o["kv"].peak == 2 * MiB
    assert sum(x.held for x in o.values()) == arena.in_use == 2 * MiB
    b.release()


def test_a_share_is_kept_free_for_its_owner(arena):
    arena.set_share("kv", 3 * MiB)
    big = arena.alloc(5 * MiB, owner="gnn")  # 8 - 3 reserved for kv
    with pytest.raises(OutOfBudget, match="kept for other owners' shares"):
        arena.alloc(MiB, owner="gnn")
    kv = arena.alloc(3 * MiB, owner="kv")  # the share is there
    assert arena.owners()["kv"].reserved == 3 * MiB
    big.release()
    kv.release()


def test_shares_that_overcommit_are_refused_naming_the_owners(arena):
    arena.set_share("kv", 5 * MiB)
    with pytest.raises(OutOfBudget, match="'optim'.*kv holds 0 of share"):
        arena.set_share("optim", 4 * MiB)
    arena.set_share("kv", 0)
    g = arena.alloc(6 * MiB, owner="gnn")
    with pytest.raises(OutOfBudget, match="in use by them"):
        arena.set_share("kv", 4 * MiB)  # 6 held by gnn: no room for a 4 MiB guarantee
    g.release()


def test_an_owner_beyond_its_share_competes_for_the_rest(arena):
    arena.set_share("kv", 2 * MiB)
    kv = [arena.alloc(MiB, owner="kv") for _ in range(5)]  # share 2, then 3 more from the free part
    assert arena.owners()["kv"].held == 5 * MiB
    other = arena.alloc(3 * MiB, owner="gnn")
    with pytest.raises(OutOfBudget):
        arena.alloc(MiB, owner="gnn")
    for b in kv + [other]:
        b.release()


def test_waiting_allocation_is_admitted_when_a_share_shrinks(arena):
    arena.set_share("kv", 6 * MiB)
    got = []
    t = threading.Thread(target=lambda: got.append(arena.alloc(4 * MiB, timeout=10, owner="gnn")))
    t.start()
    t.join(0.2)
    assert t.is_alive()
    arena.set_share("kv", 0)
    t.join(10)
    assert not t.is_alive() and got[0].nbytes == 4 * MiB
    got[0].release()
