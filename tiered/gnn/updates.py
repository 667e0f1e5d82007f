"""Updates: replacing an attribute, or some of its rows, all or nothing (crash included)."""

from __future__ import annotations

import numpy as np
import torch
from torch_geometric.data import TensorAttr

from ..dtypes import dtype_name
from .attrs import FeatureStoreError, _Attr, _label
from .indexing import _names_every_row, _normalize_index, _rows_in_index_order


class _Updates:
    """Part of :class:`~tiered.gnn.TieredFeatureStore` (see its docstring)."""

    def update_tensor(self, tensor, *args, **kwargs) -> bool:
        """Replace the attribute (``index=None``) or its rows ``index``, all or nothing: a failed
        update leaves the previous data (PyG's default removes first, then puts). An index
        is handled as in :meth:`_put_tensor`."""
        attr = self._tensor_attr_cls.cast(*args, **kwargs)
        if not attr.is_fully_specified():
            raise ValueError(f"update_tensor: the TensorAttr {attr} is not fully specified "
                             "(group_name, attr_name and index are all needed; index=None means every row)")
        return self._put_tensor(tensor, attr)

    def _put_tensor(self, tensor, attr: TensorAttr) -> bool:
        """Put a whole attribute, or update rows of an existing one.

        ``index`` None, or an index naming each row 0..n-1 of the ``n``-row tensor once with
        ``n`` at least the attribute's rows, replaces the attribute (as PyG's reference store
        does: a re-put feature may grow). Any other index updates those rows, which must
        exist, with values of the attribute's dtype (they are not cast); rows are never
        dropped by an index that covers only some of them."""
        self._check_open()
        t = tensor if isinstance(tensor, torch.Tensor) else torch.as_tensor(np.asarray(tensor))
        t = t.detach().cpu()
        label = _label(attr.group_name, attr.attr_name)
        if attr.index is None:
            self.import_array(t.contiguous(), attr.group_name, attr.attr_name)
            return True
        a = self._attrs.get((attr.group_name, attr.attr_name))
        whole = _names_every_row(t, attr.index, label)
        if a is None or (whole and len(t) >= a.num_rows):
            self.import_array(_rows_in_index_order(t, attr.index, label), attr.group_name, attr.attr_name)
            return True
        a = self._attr(attr.group_name, attr.attr_name)
        if a.tier != "store":
            raise FeatureStoreError(f"put_tensor({a.label}, index=...): rows can be updated on the store tier only "
                                    f"(this attribute is on the {a.tier} tier); put the whole tensor instead")
        try:
            ids, _out_shape = _normalize_index(attr.index, a.num_rows, a.label)
        except IndexError as e:
            raise FeatureStoreError(f"put_tensor({a.label}, index=...): {e}; to replace the attribute, put a tensor "
                                    "with index=None or an index naming each of its rows 0..n-1 once") from e
        if t.numel() != len(ids) * int(np.prod(a.row_shape, dtype=np.int64)):
            raise FeatureStoreError(f"put_tensor({a.label}): {len(ids)} rows of shape {a.row_shape} expected, "
                                    f"got a tensor of shape {tuple(t.shape)}")
        if t.dtype != a.dtype:
            raise FeatureStoreError(f"put_tensor({a.label}, index=...): the attribute holds {dtype_name(a.dtype)}, "
                                    f"got {dtype_name(t.dtype)} rows; convert them (values are not cast)")
        self._update_rows(a, ids, t.reshape(len(ids), *a.row_shape))
        return True

    def _update_rows(self, a: _Attr, ids: np.ndarray, values: torch.Tensor) -> None:
        """Apply ``x[ids] = values`` all or nothing (the last value of a repeated id wins).

        The touched chunks are written as new objects of a new generation, then one
        catalog write switches the attribute to them, then the old chunks are deleted:
        a crash before the catalog write leaves every old row (the new chunks are
        orphans, collected on the next open), a crash after it every new one."""
        _u, last = np.unique(ids[::-1], return_index=True)
        pick = len(ids) - 1 - last
        ids, values = ids[pick], values[torch.from_numpy(pick)]
        chunk = ids // a.chunk_rows
        with self._lock:
            if not self._opened:
                raise FeatureStoreError(f"update of {a.label}: the feature store was closed")
            if self._attrs.get((a.group, a.name)) is not a:
                raise FeatureStoreError(f"update of {a.label}: the attribute was replaced or removed by another "
                                        "thread before this update could apply; nothing was written")
            self._shutdown_attr(a)  # prefetches finish first; the cache holds old rows
            gen = self._next_gen
            self._next_gen += 1
            prefix = self._chunk_prefix(a.group, a.name, gen)
            replaced: dict[int, tuple[str, str]] = {}
            old_keys = list(a.keys)
            try:
                for c in np.unique(chunk):
                    c = int(c)
                    sel = np.flatnonzero(chunk == c)
                    part = self.store.get(old_keys[c], owner=self.owner).result(timeout=self.timeout)
                    part[torch.from_numpy(ids[sel] - c * a.chunk_rows)] = values[torch.from_numpy(sel)]
                    key = f"{prefix}/c{c:06d}"
                    replaced[c] = (old_keys[c], key)
                    self.store.put(key, part, kind="gnn", owner=self.owner, block=a.block).result(timeout=self.timeout)
                    self.store.evict(key)
                for c, (_old, key) in replaced.items():
                    a.keys[c] = key
                self._write_catalog()  # the commit point
            except BaseException:
                a.keys[:] = old_keys
                for _old, key in replaced.values():
                    if key in self.store:
                        self.store.delete(key)
                raise
        for old, _key in replaced.values():
            self.store.delete(old)
        self._release_superseded()
