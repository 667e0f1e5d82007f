"""TieredFeatureStore in DataLoader worker processes: NeighborLoader(num_workers=2) with the
'fork' and the 'spawn' start method gathers the same rows as the in-memory tensor; a pickled
copy is a read-only reader of the rows as they were when it was pickled (the parent keeps
those extents from being reused), and carries no lock, thread or open engine."""

from __future__ import annotations

import pickle

import pytest
import torch

pytest.importorskip("torch_geometric")
pytestmark = pytest.mark.filterwarnings("ignore:Using .* without a .pyg-lib. installation:UserWarning")

from helpers import store_config  # noqa: E402
from test_gnn import _reference_sampler_cls  # noqa: E402

from tiered.gnn.feature_store import FeatureStoreError, TieredFeatureStore  # noqa: E402
from tiered.store import TieredStore  # noqa: E402

# module level, so that a spawned worker can unpickle the sampler by name
ReferenceSampler = _reference_sampler_cls()
ReferenceSampler.__name__ = ReferenceSampler.__qualname__ = "ReferenceSampler"
ReferenceSampler.__module__ = __name__


def config(tmp_path) -> dict:
    return store_config(tmp_path, "32MiB")


def fstore(store) -> TieredFeatureStore:
    return TieredFeatureStore(store, chunk_bytes=16 << 10, cache_bytes=64 << 10, scratch_bytes=64 << 10,
                              max_read=16 << 10, timeout=20.0).open()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_neighbor_loader_with_worker_processes(tmp_path, start_method):
    import torch_geometric.typing as pyg_typing
    from torch_geometric.loader import NeighborLoader
    from torch_geometric.testing import MyGraphStore

    torch.manual_seed(0)
    n = 1500
    edge_index = torch.randint(0, n, (2, 5000))
    x, y = torch.randn(n, 24), torch.randint(0, 5, (n,))
    gs = MyGraphStore()
    gs.put_edge_index(edge_index, edge_type=None, layout="coo", size=(n, n))
    with TieredStore(config(tmp_path)) as s, fstore(s) as fs:
        fs.put_tensor(x, group_name=None, attr_name="x", index=None)
        fs.put_tensor(y, group_name=None, attr_name="y", index=None)
        fs.get_tensor(group_name=None, attr_name="x", index=torch.arange(10))  # the parent's engine is busy-ready
        kw = {} if pyg_typing.WITH_PYG_LIB or pyg_typing.WITH_TORCH_SPARSE else {
            "neighbor_sampler": ReferenceSampler((fs, gs), [4, 2])}
        loader = NeighborLoader((fs, gs), num_neighbors=[4, 2], batch_size=100, input_nodes=torch.arange(n),
                                shuffle=True, num_workers=2, multiprocessing_context=start_method, timeout=60, **kw)
        seen = 0
        for batch in loader:
            assert torch.equal(batch.x, x[batch.n_id])
            assert torch.equal(batch.y, y[batch.n_id])
            seen += 1
        assert seen == -(-n // 100)
        # the parent still works after its workers are gone
        assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=torch.arange(n)), x)
        # and, with the (non-persistent) workers gone, a write-back frees the replaced version
        tier = s._tiers["nvme"]
        used = tier.used
        for _ in range(3):
            fs.update_tensor(torch.randn(n, 24), group_name=None, attr_name="x", index=None)
        assert tier.used <= used + 4096


def test_pickled_copy_reads_its_snapshot_and_is_read_only(tmp_path):
    x = torch.randn(3000, 10)
    with TieredStore(config(tmp_path)) as s, fstore(s) as fs:
        fs.put_tensor(x, group_name="p", attr_name="x", index=None)
        blob = pickle.dumps(fs)
        copy = pickle.loads(blob)
        idx = torch.randint(0, 3000, (700,))
        assert torch.equal(copy.get_tensor(group_name="p", attr_name="x", index=idx), x[idx])
        assert torch.equal(copy["p", "x", None], x)
        assert copy.get_tensor_size(group_name="p", attr_name="x") == (3000, 10)
        with pytest.raises(KeyError, match=r"'p'/'nope'"):
            copy.get_tensor(group_name="p", attr_name="nope", index=None)
        with pytest.raises(FeatureStoreError, match="read-only"):
            copy.put_tensor(torch.zeros(3, 10), group_name="p", attr_name="x", index=torch.tensor([0, 1, 2]))
        # the parent replaces the attribute and writes over the freed space: the copy still
        # reads the rows it was given (their extents stay reserved while the parent is open)
        fs.put_tensor(torch.zeros(3000, 10), group_name="p", attr_name="x", index=None)
        fs.put_tensor(torch.full((3000, 10), 7.0), group_name="p", attr_name="w", index=None)
        assert torch.equal(copy.get_tensor(group_name="p", attr_name="x", index=None), x)
        assert torch.equal(pickle.loads(pickle.dumps(fs))["p", "x", None], torch.zeros(3000, 10))
        copy.close()


def test_pickled_copy_reads_in_place_and_zarr_attributes(tmp_path):
    import numpy as np

    a = np.random.default_rng(0).standard_normal((2000, 6)).astype(np.float32)
    npy = tmp_path / "f.npy"
    np.save(npy, a)
    with TieredStore(config(tmp_path)) as s, fstore(s) as fs:
        fs.import_array(npy, ("u", "to", "v"), "ext", in_place=True)
        fs.import_array(npy, ("u", "to", "v"), "cold", tier="zarr")
        copy = pickle.loads(pickle.dumps(fs))
        idx = torch.randint(-2000, 2000, (3, 50))
        for name in ("ext", "cold"):
            assert torch.equal(copy.get_tensor(("u", "to", "v"), name, index=idx), torch.from_numpy(a)[idx]), name
        assert {(t.group_name, t.attr_name) for t in copy.get_all_tensor_attrs()} == {
            (("u", "to", "v"), "ext"), (("u", "to", "v"), "cold")}
        copy.close()
