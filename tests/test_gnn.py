"""GNN features out of core: read planning, TieredFeatureStore parity with in-memory indexing
(random ids, duplicates, empty, slices, masks, negative and out-of-range ids), every policy
under eviction churn, imports (.npy in place, memmap, zarr source, zarr tier), updates,
removal, persistence, prefetch, injected read errors, and a real PyG NeighborLoader."""

from __future__ import annotations

import errno
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("torch_geometric")
pytestmark = pytest.mark.filterwarnings("ignore:Using .* without a .pyg-lib. installation:UserWarning")

from helpers import store_config
from tiered.allocators import OutOfBudget
from tiered.gnn.gather import PAGE, Layout, plan_reads, rows_from, split_rounds
from tiered.gnn.feature_store import FeatureStoreError, TieredFeatureStore, sampling_degree, window
from tiered.store import StoreError, TieredStore

try:
    from tiered.io_engine.testing import FaultyBackend
except ImportError:  # pragma: no cover
    FaultyBackend = None

T = 30.0


def config(tmp_path: Path, host: str = "32MiB", workers: int = 4) -> dict:
    return store_config(tmp_path, host, "256MiB", workers=workers)


def fstore(store, **kw) -> TieredFeatureStore:
    kw.setdefault("chunk_bytes", 32 << 10)  # many chunks even for small tensors
    kw.setdefault("scratch_bytes", 256 << 10)  # several read rounds per gather
    kw.setdefault("max_read", 64 << 10)
    kw.setdefault("cache_bytes", 64 << 10)
    return TieredFeatureStore(store, **kw).open()


@pytest.fixture
def store(tmp_path):
    with TieredStore(config(tmp_path)) as s:
        yield s


# ----------------------------------------------------------------------- read planning


def _layout(num_rows, row_bytes, chunk_rows, base=0, gap=0):
    nchunks = -(-num_rows // chunk_rows)
    sizes = [min(chunk_rows, num_rows - c * chunk_rows) * row_bytes for c in range(nchunks)]
    offs, pos = [], base
    for s in sizes:
        offs.append(pos)
        pos = -(-(pos + s + gap) // PAGE) * PAGE
    limit = [o + s for o, s in zip(offs, sizes)]
    return Layout(num_rows, row_bytes, chunk_rows, np.array(offs, np.int64), np.zeros(nchunks, np.int64),
                  np.array(limit, np.int64))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_plan_reads_covers_every_row_exactly(data):
    """Simulate the reads on a byte array: every row comes back bit-exact, reads are page
    aligned in the file and in the scratch buffer, never cross a chunk, and are fewer than rows
    whenever rows share pages."""
    row_bytes = data.draw(st.integers(1, 9000))
    num_rows = data.draw(st.integers(1, 400))
    chunk_rows = data.draw(st.integers(1, 64))
    base = data.draw(st.integers(0, 5000))
    lay = _layout(num_rows, row_bytes, chunk_rows, base=base)
    file = np.random.default_rng(row_bytes).integers(0, 256, int(lay.chunk_limit.max()) + PAGE, dtype=np.uint8)
    rows = np.unique(np.array(data.draw(st.lists(st.integers(0, num_rows - 1), min_size=1, max_size=80))))
    gap = data.draw(st.sampled_from([0, PAGE, 16 << 10]))
    plan = plan_reads(rows, lay, merge_gap=gap, max_read=data.draw(st.sampled_from([PAGE, 64 << 10])))
    assert (plan.offset % PAGE == 0).all() and (plan.buf_offset % PAGE == 0).all()
    scratch = np.zeros(plan.nbytes, np.uint8)
    for o, n, b in zip(plan.offset, plan.length, plan.buf_offset):
        assert n > 0
        scratch[b : b + n] = file[o : o + n]
    got = rows_from(scratch, plan.row_pos, row_bytes)
    chunk = rows // chunk_rows
    start = lay.chunk_offset[chunk] + (rows % chunk_rows) * row_bytes
    want = np.stack([file[s : s + row_bytes] for s in start])
    assert np.array_equal(got, want)
    run_chunk = [np.unique(chunk[plan.row_run == r]) for r in range(len(plan))]
    assert all(len(c) == 1 for c in run_chunk)  # one chunk per read
    assert (np.diff(plan.row_run) >= 0).all()
    for r in range(len(plan)):  # no read goes past its chunk's limit
        assert plan.offset[r] + plan.length[r] <= lay.chunk_limit[run_chunk[r][0]]


def test_plan_merges_rows_in_one_page_and_nearby_pages():
    lay = _layout(1000, 512, 1000)
    assert len(plan_reads(np.arange(8), lay)) == 1  # eight 512-byte rows share one page
    far = np.array([0, 8 * 3, 8 * 100])  # pages 0, 3 and 100
    assert len(plan_reads(far, lay, merge_gap=0)) == 3
    assert len(plan_reads(far, lay, merge_gap=16 << 10)) == 2  # the 2-page gap is read through
    assert len(plan_reads(np.array([], np.int64), lay)) == 0


def test_split_rounds_respects_the_budget():
    lay = _layout(10000, 4096, 10000)
    plan = plan_reads(np.arange(0, 10000, 7), lay, merge_gap=0, max_read=PAGE)
    rounds = split_rounds(plan, 10 * PAGE)
    assert rounds[0][0] == 0 and rounds[-1][1] == len(plan)
    for i, j in rounds:
        assert plan.buf_offset[j - 1] - plan.buf_offset[i] + PAGE <= 10 * PAGE
    with pytest.raises(ValueError, match="exceeds the scratch budget"):
        split_rounds(plan_reads(np.arange(100), lay, max_read=1 << 20), PAGE)


# ----------------------------------------------------------------------- parity


@pytest.mark.parametrize("policy", ["lru", "s3fifo", "hybrid"])
def test_gathers_equal_in_memory_indexing_under_churn(store, policy):
    x = torch.randn(5000, 37)  # 148-byte rows: never page aligned
    with fstore(store, policy=policy) as fs:
        fs.put_tensor(x, group_name=None, attr_name="x", index=None)
        if policy == "hybrid":
            fs.set_static_score(None, np.random.default_rng(0).pareto(1.5, 5000))
        g = torch.Generator().manual_seed(1)
        for _ in range(15):
            idx = torch.randint(-5000, 5000, (1500,), generator=g)
            assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=idx), x[idx])
        s = fs.stats()["attrs"]["'x'"]
        assert s["hits"] + s["victim_hits"] > 0 and s["evicted"] > 0  # the cache really churned
        assert fs.stats()["reads"]["requests"] < fs.stats()["reads"]["rows"]  # rows were coalesced


@settings(max_examples=12, deadline=None)
@given(ids=st.lists(st.integers(-300, 299), max_size=200), dim=st.sampled_from([1, 3, 128, 1500]))
def test_random_ids_with_duplicates_match(tmp_path_factory, ids, dim):
    tmp = tmp_path_factory.mktemp("h")
    x = torch.arange(300 * dim, dtype=torch.float32).reshape(300, dim)
    with TieredStore(config(tmp)) as s, fstore(s) as fs:
        fs["paper", "x", None] = x
        idx = torch.tensor(ids, dtype=torch.long)
        assert torch.equal(fs["paper", "x", idx], x[idx])
        # numpy indices through gather_rows (PyG's TensorAttr cannot hold a numpy array of length != 1)
        assert torch.equal(fs.gather_rows("paper", "x", np.array(ids, dtype=np.int64)), x[idx])


def test_index_kinds(store):
    x = torch.randn(1000, 5, 3)  # rows of any shape
    y = torch.arange(1000)  # 1-D attribute: 8-byte rows
    with fstore(store) as fs:
        fs.put_tensor(x, group_name="n", attr_name="x", index=None)
        fs.put_tensor(y, group_name="n", attr_name="y", index=None)
        get = lambda i, a="x": fs.get_tensor(group_name="n", attr_name=a, index=i)  # noqa: E731
        assert torch.equal(get(None), x)
        assert torch.equal(get(slice(10, 500, 7)), x[10:500:7])
        assert np.array_equal(get(slice(None, None, -3)).numpy(), x.numpy()[::-3])  # numpy semantics
        assert torch.equal(get(-1), x[-1]) and get(7).shape == (5, 3)
        assert get(torch.tensor([], dtype=torch.long)).shape == (0, 5, 3)
        mask = torch.rand(1000) > 0.5
        assert torch.equal(get(mask), x[mask])
        two_d = torch.randint(0, 1000, (4, 6))
        assert torch.equal(get(two_d), x[two_d])
        assert torch.equal(get(torch.tensor([3, 3, 3, 999, 0]), "y"), y[[3, 3, 3, 999, 0]])
        assert fs.get_tensor_size(group_name="n", attr_name="x") == (1000, 5, 3)
        assert fs.get_tensor_size(group_name="n", attr_name="nope") is None


def test_bad_indices_fail_clearly(store):
    with fstore(store) as fs:
        fs.put_tensor(torch.randn(100, 4), group_name=None, attr_name="x", index=None)
        with pytest.raises(IndexError, match=r"'x'.*index 100 is out of range for 100 rows"):
            fs.get_tensor(group_name=None, attr_name="x", index=torch.tensor([1, 100]))
        with pytest.raises(IndexError, match="index -101 is out of range"):
            fs.get_tensor(group_name=None, attr_name="x", index=torch.tensor([-101]))
        with pytest.raises(IndexError, match="must be integers"):
            fs.get_tensor(group_name=None, attr_name="x", index=torch.tensor([1.5]))
        with pytest.raises(IndexError, match="boolean mask of shape"):
            fs.get_tensor(group_name=None, attr_name="x", index=torch.ones(5, dtype=torch.bool))
        with pytest.raises(KeyError, match="no feature attribute 'y'.*known: 'x'"):
            fs.gather_rows(None, "y", [1])
        with pytest.raises(FeatureStoreError, match="rows of shape"):
            fs.put_tensor(torch.randn(3, 5), group_name=None, attr_name="x", index=torch.tensor([0, 1, 2]))


def test_multi_get_shares_one_index(store):
    x, y = torch.randn(2000, 16), torch.randint(0, 10, (2000,))
    with fstore(store) as fs:
        fs.put_tensor(x, group_name="a", attr_name="x", index=None)
        fs.put_tensor(y, group_name="a", attr_name="y", index=None)
        idx = torch.randint(0, 2000, (700,))
        attrs = fs.get_all_tensor_attrs()
        for a in attrs:
            a.index = idx
        out = fs.multi_get_tensor(attrs)
        by_name = {a.attr_name: t for a, t in zip(attrs, out)}
        assert torch.equal(by_name["x"], x[idx]) and torch.equal(by_name["y"], y[idx])


# ----------------------------------------------------------------------- imports, updates, persistence


def test_imports_npy_in_place_memmap_and_zarr(store, tmp_path):
    import zarr

    rng = np.random.default_rng(3)
    a = rng.standard_normal((3000, 24)).astype(np.float32)
    npy = tmp_path / "feat.npy"
    np.save(npy, a)
    z = zarr.create_array(str(tmp_path / "src.zarr"), shape=a.shape, dtype=a.dtype, chunks=(256, 24))
    z[:] = a
    idx = rng.integers(0, 3000, 900)
    with fstore(store) as fs:
        fs.import_array(npy, "g", "inplace", in_place=True)  # rows served from the .npy file itself
        fs.import_array(np.load(npy, mmap_mode="r"), "g", "copied")
        fs.import_array(np.load(npy, mmap_mode="r")[1000:], "g", "sliced", in_place=True)
        fs.import_array(z, "g", "from_zarr")
        fs.import_array(npy, "g", "cold", tier="zarr")
        for name, ref in [("inplace", a), ("copied", a), ("from_zarr", a), ("cold", a), ("sliced", a[1000:])]:
            i = idx % len(ref)
            got = fs.get_tensor("g", name, index=torch.from_numpy(i))
            assert np.array_equal(got.numpy(), ref[i]), name
        tiers = {d["attr"]: d["tier"] for d in fs.attributes()}
        assert tiers == {"inplace": "external", "copied": "store", "sliced": "external", "from_zarr": "store",
                         "cold": "zarr"}
        with pytest.raises(FeatureStoreError, match="in_place=True"):
            fs.import_array(a, "g", "bad", in_place=True)


def test_reopen_keeps_attributes(tmp_path):
    x = torch.randn(1200, 8)
    npy = tmp_path / "f.npy"
    np.save(npy, x.numpy())
    with TieredStore(config(tmp_path)) as s, fstore(s) as fs:
        fs.put_tensor(x, group_name="p", attr_name="x", index=None)
        fs.import_array(npy, "p", "ext", in_place=True)
        fs.import_array(npy, "p", "cold", tier="zarr")
    with TieredStore(config(tmp_path)) as s, fstore(s) as fs:
        idx = torch.randint(0, 1200, (300,))
        for name in ("x", "ext", "cold"):
            assert torch.equal(fs.get_tensor("p", name, index=idx), x[idx]), name
    npy.write_bytes(npy.read_bytes())  # same bytes, new mtime: the in-place import is stale
    with TieredStore(config(tmp_path)) as s:
        with pytest.raises(FeatureStoreError, match="changed since it was imported"):
            fstore(s)


def test_put_rows_update_remove_and_replace(store):
    x = torch.randn(2000, 10)
    with fstore(store) as fs:
        fs.put_tensor(x, group_name=None, attr_name="x", index=None)
        idx = torch.arange(2000)
        fs.get_tensor(group_name=None, attr_name="x", index=idx)  # fill the cache with old rows
        upd = torch.tensor([5, 1999, 5, 700])
        vals = torch.randn(4, 10)
        assert fs.put_tensor(vals, group_name=None, attr_name="x", index=upd)
        x[upd] = vals  # last write of a repeated id wins, as in torch
        assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=idx), x)
        keys_before = {k for k in store.keys() if k.startswith("gnn/")}
        x2 = torch.randn(50, 3)
        fs.put_tensor(x2, group_name=None, attr_name="x", index=None)  # replace: new shape
        assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=None), x2)
        keys_after = {k for k in store.keys() if k.startswith("gnn/")}
        assert not (keys_before - {"gnn/features/catalog"}) & keys_after  # old chunks deleted
        assert fs.remove_tensor(group_name=None, attr_name="x", index=None) is True
        assert fs.remove_tensor(group_name=None, attr_name="x", index=None) is False
        assert fs.get_all_tensor_attrs() == []
        assert [k for k in store.keys() if k.startswith("gnn/")] == ["gnn/features/catalog"]


def test_row_update_across_chunks_is_all_or_nothing(store, monkeypatch):
    """A put failing on the second touched chunk leaves every old row and no new object;
    the next update then applies whole."""
    x = torch.randn(2000, 10)
    with fstore(store) as fs:
        fs.put_tensor(x, group_name=None, attr_name="x", index=None)
        keys = set(store.keys())
        rows = torch.tensor([3, 900, 1990])  # three chunks (chunk_rows = 819)
        puts, real_put = [], store.put

        def failing_put(key, *args, **kw):
            puts.append(key)
            if len(puts) == 2:
                raise OSError(errno.ENOSPC, "injected: no space left on device")
            return real_put(key, *args, **kw)

        monkeypatch.setattr(store, "put", failing_put)
        with pytest.raises(OSError, match="injected"):
            fs.put_tensor(torch.ones(3, 10), group_name=None, attr_name="x", index=rows)
        monkeypatch.setattr(store, "put", real_put)
        assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=None), x)  # all old
        assert set(store.keys()) == keys  # the new chunk written before the failure was deleted
        fs.put_tensor(torch.ones(3, 10), group_name=None, attr_name="x", index=rows)
        x[rows] = 1.0
        assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=None), x)
    with fstore(store) as fs:  # durable, and the replaced chunks are gone
        assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=None), x)
        assert len([k for k in store.keys() if k.startswith("gnn/features/") and "/c0" in k]) == 3


_UPDATE_CHILD = """
import json, sys, torch
sys.path.insert(0, {root!r})
from tiered.store import TieredStore
from tiered.gnn.feature_store import TieredFeatureStore
cfg = json.loads(sys.argv[1])
with TieredStore(cfg) as store:
    fs = TieredFeatureStore(store, chunk_bytes=32 << 10, cache_bytes=64 << 10).open()
    rows = torch.arange(0, 2000, 100)  # one row in every chunk
    i = int(fs.get_tensor(group_name=None, attr_name="x", index=rows)[0, 0])
    print("READY", flush=True)
    while True:
        i += 1
        fs.put_tensor(torch.full((len(rows), 10), float(i)), group_name=None, attr_name="x", index=rows)
        print("updated", i, flush=True)
"""


def test_sigkill_during_row_updates_leaves_one_whole_update(tmp_path):
    """Kill a child updating one row in every chunk per step, at random moments: on reopen all
    those rows hold the same step (never a mix), at least the last one it reported."""
    import random
    import sys

    from killing import run_and_kill

    cfg = config(tmp_path)
    with TieredStore(cfg) as s, fstore(s) as fs:
        fs.put_tensor(torch.zeros(2000, 10), group_name=None, attr_name="x", index=None)
    script = tmp_path / "child.py"
    script.write_text(_UPDATE_CHILD.format(root=str(Path(__file__).resolve().parent.parent)))
    rng = random.Random(7)
    rows = torch.arange(0, 2000, 100)
    for _round in range(4):
        lines = run_and_kill([sys.executable, str(script), json.dumps(cfg)], rng.uniform(0.05, 0.5))
        done = [int(x.split()[1]) for x in lines if x.startswith("updated")]
        with TieredStore(cfg) as s, fstore(s) as fs:
            got = fs.get_tensor(group_name=None, attr_name="x", index=rows)
            assert torch.equal(got, torch.full_like(got, got[0, 0].item())), got[:, 0]  # one whole update
            if done:
                assert got[0, 0].item() >= done[-1]
            others = fs.get_tensor(group_name=None, attr_name="x", index=rows + 1)
            assert not others.any()  # rows never updated stay zero
            names = {k for k in s.keys() if k.startswith("gnn/features/") and k != "gnn/features/catalog"}
            assert len(names) == -(-2000 // 819)  # no orphan chunk survives an open


def test_orphan_chunks_are_collected_on_open(store):
    with fstore(store) as fs:
        fs.put_tensor(torch.randn(10, 2), group_name=None, attr_name="x", index=None)
    store.put("gnn/features/deadbeef/g99/c000000", torch.zeros(4)).result(T)  # as left by a crash
    with fstore(store) as fs:
        assert "gnn/features/deadbeef/g99/c000000" not in store
        assert fs.get_tensor_size(group_name=None, attr_name="x") == (10, 2)


def test_cache_budget_comes_from_the_host_tier(store):
    """The cache is the owner's reserved share of the host tier: a share the tier cannot hold is
    refused when the feature store opens, naming the owner."""
    with pytest.raises(StoreError, match="gnn/features"):
        TieredFeatureStore(store, cache_bytes=1 << 40).open()
    with TieredFeatureStore(store, cache_bytes=1 << 20).open() as fs:
        assert store.owners()["gnn/features"]["host"]["reserved"] == 1 << 20
        fs.put_tensor(torch.randn(100000, 128), group_name=None, attr_name="x", index=None)
        fs.set_cache(None, "x", 64 << 20)  # more than the host tier: fails at once, naming the cache
        with pytest.raises(OutOfBudget, match="row cache of 'x'"):
            fs.get_tensor(group_name=None, attr_name="x", index=torch.tensor([1]))


# ----------------------------------------------------------------------- prefetch


def test_prefetch_loads_misses_in_the_background(store):
    x = torch.randn(4000, 32)
    with fstore(store, cache_bytes=1 << 20, policy="lru") as fs:
        fs.put_tensor(x, group_name=None, attr_name="x", index=None)
        nxt = torch.randint(0, 4000, (500,))
        f = fs.prefetch(nxt)
        n = f.result(T)
        assert n == len(torch.unique(nxt))
        before = fs.stats()["reads"]["requests"]
        assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=nxt), x[nxt])
        assert fs.stats()["reads"]["requests"] == before  # everything came from the cache
        assert fs.stats()["attrs"]["'x'"]["prefetched"] == n
        assert fs.prefetch(nxt).result(T) == 0  # nothing left to read


@pytest.mark.skipif(FaultyBackend is None, reason="needs io_engine.testing.FaultyBackend")
def test_gather_waits_for_a_running_prefetch_instead_of_reading_twice(tmp_path):
    fb = FaultyBackend()
    x = torch.randn(3000, 16)
    with TieredStore(config(tmp_path), backend=fb) as s, fstore(s, cache_bytes=1 << 20, policy="lru") as fs:
        fs.put_tensor(x, group_name=None, attr_name="x", index=None)
        ids = torch.arange(0, 3000, 3)
        fs.get_tensor(group_name=None, attr_name="x", index=ids)  # the store reads each chunk's crc table once
        fs.set_cache(None, "x", 1 << 20)  # an empty cache again
        gate = fb.gate("read")
        f = fs.prefetch(ids)
        assert gate.entered.wait(T)  # the prefetch's reads are parked in the backend
        assert not f.done()  # a real future on the engine, not one completed up front
        reqs = fs.stats()["reads"]["requests"]
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("x", fs.get_tensor(group_name=None, attr_name="x",
                                                                              index=ids)))
        t.start()
        t.join(0.3)
        assert t.is_alive()  # the gather waits for the prefetch
        gate.event.set()
        t.join(T)
        assert torch.equal(out["x"], x[ids])
        assert fs.stats()["reads"]["requests"] == reqs  # and issued no reads of its own


@pytest.mark.skipif(FaultyBackend is None, reason="needs io_engine.testing.FaultyBackend")
def test_read_errors_name_the_attribute_and_leave_the_store_usable(tmp_path):
    fb = FaultyBackend()
    x = torch.randn(3000, 16)
    with TieredStore(config(tmp_path), backend=fb) as s, fstore(s, cache_bytes=0) as fs:
        fs.put_tensor(x, group_name="paper", attr_name="x", index=None)
        held = s.arena.stats().in_use
        fb.fail("read", errno.EIO, times=1)
        with pytest.raises(OSError, match="Input/output error|EIO") as ei:
            fs.get_tensor("paper", "x", index=torch.arange(100))
        assert any("'paper'/'x'" in n for n in getattr(ei.value, "__notes__", []))
        assert s.arena.stats().in_use == held  # the scratch buffer went back
        assert torch.equal(fs.get_tensor("paper", "x", index=torch.arange(100)), x[:100])
        fb.short("read", max_bytes=4096)  # short transfers: the engine finishes them
        assert torch.equal(fs.get_tensor("paper", "x", index=torch.arange(0, 3000, 5)), x[::5])


def test_window_prefetches_the_next_batches(store):
    x = torch.randn(3000, 8)
    with fstore(store, cache_bytes=1 << 20, policy="lru") as fs:
        fs.put_tensor(x, group_name=None, attr_name="x", index=None)
        batches = [torch.randint(0, 3000, (200,)) for _ in range(5)]
        seen = []
        for b in window(batches, fs, depth=2):
            seen.append(b)
            assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=b), x[b])
        assert [id(b) for b in seen] == [id(b) for b in batches]
        assert fs.stats()["attrs"]["'x'"]["prefetched"] > 0


def test_window_declares_the_chunks_of_the_coming_batches_as_the_feature_stores_plan(store, monkeypatch):
    x = torch.randn(3000, 8)
    with fstore(store, cache_bytes=1 << 20, policy="lru", chunk_bytes=8192) as fs:  # 256 rows a chunk
        fs.put_tensor(x, group_name=None, attr_name="x", index=None)
        batches = [torch.tensor([0, 1]), torch.tensor([2999]), torch.tensor([600, 5])]
        declared, plan = [], store.plan

        def record(keys, *, owner):  # what was declared (a prefetch's reads may finish the plan at once)
            if owner == fs.owner and keys:
                declared.append(len(keys))
            plan(keys, owner=owner)

        monkeypatch.setattr(store, "plan", record)
        for b in window(batches, fs, depth=1):
            fs.get_tensor(group_name=None, attr_name="x", index=b)
        monkeypatch.setattr(store, "plan", plan)
        assert declared == [4, 3, 2]  # chunks of the batch yielded and of those queued behind it
        assert fs.owner not in store.stats()["plans"]["active"]  # withdrawn when the loop ended
        fs.plan([torch.tensor([1000])])
        assert store.stats()["plans"]["active"][fs.owner]["keys"] == 1
    assert fs.owner not in store.stats()["plans"]["active"]  # and when the feature store closed


def test_window_works_out_each_batchs_chunks_once(store, monkeypatch):
    x = torch.randn(3000, 8)
    with fstore(store, cache_bytes=1 << 20, policy="lru", chunk_bytes=8192) as fs:
        fs.put_tensor(x, group_name=None, attr_name="x", index=None)
        calls = []
        chunk_keys = fs.chunk_keys
        monkeypatch.setattr(fs, "chunk_keys", lambda b, *a: calls.append(b) or chunk_keys(b, *a))
        batches = [torch.randint(0, 3000, (50,), generator=torch.Generator().manual_seed(i)) for i in range(6)]
        for b in window(batches, fs, depth=2):
            assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=b), x[b])
        assert [id(b) for b in calls] == [id(b) for b in batches]


# ----------------------------------------------------------------------- PyG


def _neighbor_sampler_kw(data, num_neighbors) -> dict:
    """NeighborLoader samples with pyg-lib or torch-sparse; where neither is installed, hand it
    a plain-Python sampler with the same outputs, so the loader itself (and its calls into the
    feature store) runs unchanged."""
    import torch_geometric.typing as pyg_typing

    if pyg_typing.WITH_PYG_LIB or pyg_typing.WITH_TORCH_SPARSE:
        return {}
    return {"neighbor_sampler": _ReferenceSampler(data, num_neighbors)}


def _reference_sampler_cls():
    from torch_geometric.sampler import HeteroSamplerOutput, NeighborSampler, SamplerOutput
    from torch_geometric.sampler.utils import remap_keys

    class ReferenceSampler(NeighborSampler):
        """Directional neighbor sampling without replacement, in Python (tests only)."""

        def _hop(self, colptr, row, nodes, fanout, gen):
            for v in nodes:
                lo, hi = int(colptr[v]), int(colptr[v + 1])
                pos = torch.randperm(hi - lo, generator=gen)[: fanout if fanout >= 0 else None] + lo
                for e in pos.tolist():
                    yield v, int(row[e]), e

        def _sample(self, seed, seed_time=None, **kwargs):
            gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
            if isinstance(seed, dict):
                return self._hetero(seed, gen)
            nodes = list(dict.fromkeys(seed.tolist()))
            local = {n: i for i, n in enumerate(nodes)}
            rows, cols, edges, front = [], [], [], nodes
            nsn, nse = [len(nodes)], []
            for fanout in self.num_neighbors.get_mapped_values():
                new, ne = [], 0
                for v, u, e in self._hop(self.colptr, self.row, front, fanout, gen):
                    if u not in local:
                        local[u] = len(nodes)
                        nodes.append(u)
                        new.append(u)
                    rows.append(local[u]); cols.append(local[v]); edges.append(e); ne += 1
                front = new
                nsn.append(len(new)); nse.append(ne)
            t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
            return SamplerOutput(node=t(nodes), row=t(rows), col=t(cols), edge=t(edges), batch=None,
                                 num_sampled_nodes=nsn, num_sampled_edges=nse)

        def _hetero(self, seed, gen):
            fan = self.num_neighbors.get_mapped_values(self.edge_types)
            nodes = {nt: [] for nt in self.node_types}
            local = {nt: {} for nt in self.node_types}
            for nt, s in seed.items():
                for n in dict.fromkeys(s.tolist()):
                    local[nt][n] = len(nodes[nt])
                    nodes[nt].append(n)
            front = {nt: list(v) for nt, v in nodes.items()}
            rows = {r: [] for r in self.colptr_dict}
            cols = {r: [] for r in self.colptr_dict}
            edges = {r: [] for r in self.colptr_dict}
            for hop in range(self.num_neighbors.num_hops):
                new = {nt: [] for nt in self.node_types}
                for rel, colptr in self.colptr_dict.items():
                    src, _r, dst = self.to_edge_type[rel]
                    for v, u, e in self._hop(colptr, self.row_dict[rel], front[dst], fan[rel][hop], gen):
                        if u not in local[src]:
                            local[src][u] = len(nodes[src])
                            nodes[src].append(u)
                            new[src].append(u)
                        rows[rel].append(local[src][u]); cols[rel].append(local[dst][v]); edges[rel].append(e)
                front = new
            t = lambda d: {k: torch.tensor(v, dtype=torch.long) for k, v in d.items()}  # noqa: E731
            return HeteroSamplerOutput(node=t(nodes), row=remap_keys(t(rows), self.to_edge_type),
                                       col=remap_keys(t(cols), self.to_edge_type),
                                       edge=remap_keys(t(edges), self.to_edge_type), batch=None)

    return ReferenceSampler


def _ReferenceSampler(data, num_neighbors):
    return _reference_sampler_cls()(data, num_neighbors)


def test_neighbor_loader_over_the_tiered_feature_store(store):
    from torch_geometric.loader import NeighborLoader
    from torch_geometric.testing import MyGraphStore

    torch.manual_seed(0)
    n = 3000
    edge_index = torch.randint(0, n, (2, 8000))
    x = torch.randn(n, 64)
    y = torch.randint(0, 7, (n,))
    gs = MyGraphStore()
    gs.put_edge_index(edge_index, edge_type=None, layout="coo", size=(n, n))
    with fstore(store, cache_bytes=256 << 10, policy="hybrid") as fs:
        fs.put_tensor(x, group_name=None, attr_name="x", index=None)
        fs.put_tensor(y, group_name=None, attr_name="y", index=None)
        fs.set_static_score(None, sampling_degree(edge_index, n))
        loader = NeighborLoader((fs, gs), num_neighbors=[5, 3], batch_size=64, input_nodes=torch.arange(n),
                                shuffle=True, **_neighbor_sampler_kw((fs, gs), [5, 3]))
        batches = 0
        for batch in loader:
            assert torch.equal(batch.x, x[batch.n_id])
            assert torch.equal(batch.y, y[batch.n_id])
            assert batch.n_id.numel() > 64  # neighbors were sampled, not only seeds
            batches += 1
            if batches == 12:
                break
        assert batches == 12
        assert fs.stats()["attrs"]["'x'"]["hits"] > 0


def test_hetero_neighbor_loader(store):
    from torch_geometric.loader import NeighborLoader
    from torch_geometric.testing import MyGraphStore

    torch.manual_seed(1)
    npaper, nauthor = 800, 300
    xp, xa = torch.randn(npaper, 16), torch.randn(nauthor, 8)
    writes = torch.stack([torch.randint(0, nauthor, (3000,)), torch.randint(0, npaper, (3000,))])
    cites = torch.randint(0, npaper, (2, 4000))
    gs = MyGraphStore()
    gs.put_edge_index(writes, edge_type=("author", "writes", "paper"), layout="coo", size=(nauthor, npaper))
    gs.put_edge_index(writes.flip(0), edge_type=("paper", "rev_writes", "author"), layout="coo",
                      size=(npaper, nauthor))
    gs.put_edge_index(cites, edge_type=("paper", "cites", "paper"), layout="coo", size=(npaper, npaper))
    with fstore(store) as fs:
        fs.put_tensor(xp, group_name="paper", attr_name="x", index=None)
        fs.put_tensor(xa, group_name="author", attr_name="x", index=None)
        loader = NeighborLoader((fs, gs), num_neighbors=[4, 2], batch_size=32,
                                input_nodes=("paper", torch.arange(npaper)),
                                **_neighbor_sampler_kw((fs, gs), [4, 2]))
        for i, batch in enumerate(loader):
            assert torch.equal(batch["paper"].x, xp[batch["paper"].n_id])
            assert torch.equal(batch["author"].x, xa[batch["author"].n_id])
            assert batch["author"].n_id.numel() > 0
            if i == 5:
                break


def test_catalog_is_json_named_by_the_store(store):
    with fstore(store) as fs:
        fs.put_tensor(torch.randn(10, 2), group_name=("a", "b"), attr_name="x", index=None)
    raw = store.get("gnn/features/catalog").result(T).numpy().tobytes()
    doc = json.loads(raw)
    assert doc["format"] == "tiered-gnn-features" and doc["attrs"][0]["group"] == ["a", "b"]
    with fstore(store) as fs:
        assert fs.get_tensor_size(group_name=("a", "b"), attr_name="x") == (10, 2)


def test_sampling_score_is_expected_fetches_per_seed():
    from tiered.gnn.scores import csc_from_edge_index, sampling_score

    # chain 0 -> 1 -> 2: with fan-out [1, 1] and uniform seeds, node 0 is fetched as a seed,
    # as 1's neighbor and as 2's two-hop neighbor
    indptr, nbr = csc_from_edge_index(torch.tensor([[0, 1], [1, 2]]), 3)
    assert np.allclose(sampling_score(indptr, nbr, [1, 1]), [1.0, 2 / 3, 1 / 3])
    # star: four leaves point at 0; fan-out 2 draws each in-edge with probability 1/2
    indptr, nbr = csc_from_edge_index(torch.tensor([[1, 2, 3, 4], [0, 0, 0, 0]]), 5)
    s = sampling_score(indptr, nbr, [2])
    assert np.allclose(s, [0.2] + [0.2 + 0.2 * 0.5] * 4)
    assert np.allclose(sampling_score(indptr, nbr, [-1]), [0.2] + [0.4] * 4)  # -1: every neighbor
    with pytest.raises(ValueError, match="seed_prob has 2 entries"):
        sampling_score(indptr, nbr, [2], seed_prob=np.ones(2))
