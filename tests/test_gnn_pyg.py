"""TieredFeatureStore against PyG's FeatureStore contract: PyG's own feature-store test
scenarios (test/data/test_feature_store.py: test_feature_store, test_feature_store_override,
the same calls and asserts with TieredFeatureStore in place of MyFeatureStore), missing
attributes raising KeyError, and update_tensor / put_tensor with an index."""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("torch_geometric")

from torch_geometric.data import TensorAttr
from torch_geometric.data.feature_store import AttrView, _FieldStatus

from helpers import store_config
from tiered.gnn.feature_store import FeatureStoreError, TieredFeatureStore
from tiered.store import TieredStore


def config(tmp_path) -> dict:
    return store_config(tmp_path, "32MiB")


@pytest.fixture
def store(tmp_path):
    with TieredStore(config(tmp_path)) as s:
        yield s


def fstore(store, cls=TieredFeatureStore) -> TieredFeatureStore:
    return cls(store, chunk_bytes=8 << 10, cache_bytes=64 << 10, scratch_bytes=64 << 10, max_read=16 << 10).open()


# ----------------------------------------------------------------------- PyG's scenarios


@dataclass
class MyTensorAttrNoGroupName(TensorAttr):
    def __init__(self, attr_name=_FieldStatus.UNSET, index=_FieldStatus.UNSET):
        # Treat group_name as optional, and move it to the end
        super().__init__(None, attr_name, index)


class TieredFeatureStoreNoGroupName(TieredFeatureStore):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tensor_attr_cls = MyTensorAttrNoGroupName


def test_feature_store(store):
    store_ = store
    store = fstore(store_)
    tensor = torch.Tensor([[0, 0, 0], [1, 1, 1], [2, 2, 2]])

    group_name = 'A'
    attr_name = 'feat'
    index = torch.tensor([0, 1, 2])
    attr = TensorAttr(group_name, attr_name, index)
    attr2 = TensorAttr(group_name)
    attr2.update(attr)

    # Normal API:
    store.put_tensor(tensor, attr)
    assert torch.equal(store.get_tensor(attr), tensor)
    assert torch.equal(
        store.get_tensor(group_name, attr_name, index=torch.tensor([0, 2])),
        tensor[torch.tensor([0, 2])],
    )
    assert store.update_tensor(torch.tensor([0, 2]), group_name, attr_name, None)
    store.remove_tensor(group_name, attr_name, None)
    with pytest.raises(KeyError):
        _ = store.get_tensor(attr)

    # Views:
    view = store.view(group_name=group_name)
    view.attr_name = attr_name
    view['index'] = index
    assert view == AttrView(store, TensorAttr(group_name, attr_name, index))
    assert (view == 0) is False
    assert view.__repr__() == (f"AttrView(store={store!r}, attr=TensorAttr(group_name='A', attr_name='feat', "
                               "index=tensor([0, 1, 2])))")

    # Indexing:
    store[group_name, attr_name, index] = tensor

    # Fully-specified forms, all of which produce a tensor output
    assert torch.equal(store[group_name, attr_name, index], tensor)
    assert torch.equal(store[group_name, attr_name, None], tensor)
    assert torch.equal(store[group_name, attr_name, :], tensor)
    assert torch.equal(store[group_name][attr_name][:], tensor)
    assert torch.equal(store[group_name].feat[:], tensor)
    assert torch.equal(store.view().A.feat[:], tensor)

    with pytest.raises(AttributeError) as exc_info:
        _ = store.view(group_name=group_name, index=None).feat.A
        print(exc_info)

    # Partially-specified forms, which produce an AttrView object
    assert store[group_name] == store.view(TensorAttr(group_name=group_name))
    assert store[group_name].feat == store.view(TensorAttr(group_name=group_name, attr_name=attr_name))

    # Partially-specified forms, when called, produce a Tensor output
    # from the `TensorAttr` that has been partially specified.
    store[group_name] = tensor
    assert isinstance(store[group_name], AttrView)
    assert torch.equal(store[group_name](), tensor)

    # Deletion:
    del store[group_name, attr_name, index]
    with pytest.raises(KeyError):
        _ = store[group_name, attr_name, index]
    del store[group_name]
    with pytest.raises(KeyError):
        _ = store[group_name]()
    store.close()


def test_feature_store_override(store):
    store = fstore(store, TieredFeatureStoreNoGroupName)
    tensor = torch.Tensor([[0, 0, 0], [1, 1, 1], [2, 2, 2]])

    attr_name = 'feat'
    index = torch.tensor([0, 1, 2])

    # Only use attr_name and index, in that order:
    store[attr_name, index] = tensor

    # A few assertions to ensure group_name is not needed:
    assert isinstance(store[attr_name], AttrView)
    assert torch.equal(store[attr_name, index], tensor)
    assert torch.equal(store[attr_name][index], tensor)
    assert torch.equal(store[attr_name][:], tensor)
    assert torch.equal(store[attr_name, :], tensor)
    store.close()


# ----------------------------------------------------------------------- missing attributes


def test_missing_or_removed_attribute_raises_key_error_naming_it(store):
    with fstore(store) as fs:
        fs.put_tensor(torch.randn(10, 2), group_name="paper", attr_name="x", index=None)
        with pytest.raises(KeyError, match=r"'paper'/'y'.*known: 'paper'/'x'"):
            fs.get_tensor(group_name="paper", attr_name="y", index=None)
        with pytest.raises(KeyError, match=r"'author'/'x'"):
            fs["author", "x", torch.tensor([1])]
        attrs = [TensorAttr("paper", "x", torch.tensor([1])), TensorAttr("paper", "nope", torch.tensor([1]))]
        with pytest.raises(KeyError, match=r"'paper'/'nope'"):
            fs.multi_get_tensor(attrs)
        assert fs.remove_tensor(group_name="paper", attr_name="x", index=None)
        with pytest.raises(KeyError, match=r"'paper'/'x'"):
            fs.get_tensor(group_name="paper", attr_name="x", index=torch.tensor([0]))
        assert fs.get_tensor_size(group_name="paper", attr_name="x") is None  # PyG: None when absent


# ----------------------------------------------------------------------- update / put with an index


def test_update_tensor_with_index_updates_rows_and_keeps_the_rest(store):
    x = torch.randn(3000, 10)
    with fstore(store) as fs:
        fs.put_tensor(x, group_name=None, attr_name="x", index=None)
        ids = torch.tensor([7, 2999, 1500])
        vals = torch.randn(3, 10)
        assert fs.update_tensor(vals, group_name=None, attr_name="x", index=ids)
        x[ids] = vals
        assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=None), x)
        assert fs.update_tensor(torch.zeros(5, 4), group_name=None, attr_name="x", index=None)  # whole replace
        assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=None), torch.zeros(5, 4))


def test_failed_update_tensor_leaves_the_previous_data(store, monkeypatch):
    x = torch.randn(3000, 10)
    with fstore(store) as fs:
        fs.put_tensor(x, group_name=None, attr_name="x", index=None)
        real_put = store.put

        def failing_put(key, *args, **kw):
            raise OSError(errno.ENOSPC, "injected: no space left on device")

        monkeypatch.setattr(store, "put", failing_put)
        with pytest.raises(OSError, match="injected"):
            fs.update_tensor(torch.ones(2, 10), group_name=None, attr_name="x", index=torch.tensor([0, 2000]))
        with pytest.raises(OSError, match="injected"):
            fs.update_tensor(torch.ones(4, 4), group_name=None, attr_name="x", index=None)
        with pytest.raises(FeatureStoreError, match="rows of shape"):
            fs.update_tensor(torch.ones(2, 3), group_name=None, attr_name="x", index=torch.tensor([0, 1]))
        monkeypatch.setattr(store, "put", real_put)
        assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=None), x)  # nothing lost


def test_put_tensor_with_index_on_a_new_attribute(store):
    x = torch.randn(50, 3)
    with fstore(store) as fs:
        perm = torch.randperm(50)
        assert fs.put_tensor(x, group_name="n", attr_name="x", index=perm)  # row perm[i] is x[i]
        want = torch.empty_like(x)
        want[perm] = x
        assert torch.equal(fs.get_tensor(group_name="n", attr_name="x", index=None), want)
        assert fs.put_tensor(x, group_name="n", attr_name="y", index=slice(None))
        assert torch.equal(fs.get_tensor(group_name="n", attr_name="y", index=None), x)
        with pytest.raises(FeatureStoreError, match=r"'n'/'z'.*every row 0\.\.49 exactly once"):
            fs.put_tensor(x, group_name="n", attr_name="z", index=torch.arange(1, 51))
        assert fs.get_tensor_size(group_name="n", attr_name="z") is None


def test_put_tensor_with_an_index_of_every_row_replaces_the_attribute(store):
    """As PyG's reference store does: re-putting a feature with index 0..n-1 (in any order)
    replaces it, also with more rows; an index of only some rows updates them."""
    with fstore(store) as fs:
        fs.put_tensor(torch.zeros(3, 2), group_name="A", attr_name="x", index=torch.arange(3))
        fs.put_tensor(torch.ones(5, 2), group_name="A", attr_name="x", index=torch.arange(5))
        assert torch.equal(fs.get_tensor("A", "x", None), torch.ones(5, 2))
        perm = torch.tensor([4, 2, 0, 1, 3, 5])
        vals = torch.arange(12.0).view(6, 2)
        fs.update_tensor(vals, group_name="A", attr_name="x", index=perm)  # grows to 6 rows
        want = torch.empty(6, 2)
        want[perm] = vals
        assert torch.equal(fs.get_tensor("A", "x", None), want)
        fs.put_tensor(torch.full((2, 2), 9.0), group_name="A", attr_name="x", index=torch.tensor([1, 0]))
        want[:2] = 9.0  # rows 0 and 1 updated, the others kept
        assert torch.equal(fs.get_tensor("A", "x", None), want)
        with pytest.raises(FeatureStoreError, match=r"'A'/'x'.*6 rows"):
            fs.put_tensor(torch.ones(2, 2), group_name="A", attr_name="x", index=torch.tensor([1, 7]))
        assert torch.equal(fs.get_tensor("A", "x", None), want)


def test_row_updates_of_another_dtype_are_refused(store):
    with fstore(store) as fs:
        fs.put_tensor(torch.zeros(4, 2), group_name="A", attr_name="x", index=None)
        with pytest.raises(FeatureStoreError, match=r"'A'/'x'.*float32.*float64"):
            fs.put_tensor(torch.ones(2, 2, dtype=torch.float64), group_name="A", attr_name="x",
                          index=torch.tensor([0, 1]))
        with pytest.raises(FeatureStoreError, match=r"'A'/'x'.*float32.*int64"):
            fs.update_tensor(torch.ones(1, 2, dtype=torch.int64), group_name="A", attr_name="x",
                             index=torch.tensor([3]))
        assert torch.equal(fs.get_tensor("A", "x", None), torch.zeros(4, 2))


@pytest.mark.parametrize("fail_at", ["second chunk", "catalog"])
def test_failed_full_replace_leaves_no_orphan_chunks(store, monkeypatch, fail_at):
    x = torch.randn(3000, 10)
    with fstore(store) as fs:
        fs.put_tensor(x, group_name=None, attr_name="x", index=None)
        keys = set(store.keys())
        real_put, puts = store.put, []

        def failing_put(key, *args, **kw):
            puts.append(key)
            if (fail_at == "catalog") == key.endswith("/catalog") and (fail_at == "catalog" or len(puts) == 2):
                raise OSError(errno.ENOSPC, "injected: no space left on device")
            return real_put(key, *args, **kw)

        monkeypatch.setattr(store, "put", failing_put)
        with pytest.raises(OSError, match="injected"):
            fs.update_tensor(torch.ones(3000, 10), group_name=None, attr_name="x", index=None)
        monkeypatch.setattr(store, "put", real_put)
        assert set(store.keys()) == keys  # the chunks written before the failure are gone
        assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=None), x)


@pytest.mark.parametrize("slow_drop", [False, True])
def test_row_update_racing_a_replace_is_refused_naming_the_attribute(store, slow_drop):
    """Another thread replaces the attribute between update_tensor's lookup and its lock: the
    update is refused (not applied to the replaced version, nor lost silently)."""
    with fstore(store) as fs:
        fs.put_tensor(torch.zeros(3000, 10), group_name=None, attr_name="x", index=None)
        real = fs._update_rows

        def interleaved(a, ids, values):
            held, real_drop = [], fs._drop
            if slow_drop:
                fs._drop = held.append  # the replacing thread has not dropped the old version yet
            t = threading.Thread(target=fs.put_tensor, args=(torch.full((3000, 10), 5.0),),
                                 kwargs=dict(group_name=None, attr_name="x", index=None))
            t.start()
            t.join(timeout=30)
            try:
                return real(a, ids, values)
            finally:
                fs._drop = real_drop
                for old in held:
                    real_drop(old)

        fs._update_rows = interleaved
        with pytest.raises((KeyError, FeatureStoreError), match=r"'x'.*replaced"):
            fs.update_tensor(torch.ones(2, 10), group_name=None, attr_name="x", index=torch.tensor([0, 2000]))
        del fs._update_rows
        assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=None), torch.full((3000, 10), 5.0))
        named = {k for a in fs._attrs.values() for k in a.keys}
        assert {k for k in store.keys() if k.startswith("gnn/features/") and not k.endswith("catalog")} == named
