"""Turning PyG's indexes (None, slices, ints, masks, id tensors) into checked row ids."""

from __future__ import annotations

import numpy as np
import torch

from .attrs import FeatureStoreError


def _is_identity(inv: np.ndarray) -> bool:
    return bool(len(inv) == 0 or (inv[0] == 0 and np.all(np.diff(inv) == 1)))


def _normalize_index(index, n: int, label: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """Row ids (int64, non-negative, checked) and the leading output shape for ``x[index]``."""
    if index is None:
        return np.arange(n, dtype=np.int64), (n,)
    if isinstance(index, slice):
        ids = np.arange(*index.indices(n), dtype=np.int64)
        return ids, (len(ids),)
    if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"feature attribute {label}: index {i} is out of range for {n} rows")
        return np.array([i % n if n else i], dtype=np.int64), ()
    if isinstance(index, torch.Tensor):
        arr = index.detach().cpu().numpy()
    else:
        arr = np.asarray(index)
    if arr.dtype == np.bool_:
        if arr.shape != (n,):
            raise IndexError(f"feature attribute {label}: boolean mask of shape {arr.shape}, expected ({n},)")
        ids = np.flatnonzero(arr).astype(np.int64)
        return ids, (len(ids),)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64), arr.shape
    if not np.issubdtype(arr.dtype, np.integer):
        raise IndexError(f"feature attribute {label}: index must be integers, a boolean mask, a slice or None, "
                         f"got dtype {arr.dtype}")
    ids = arr.reshape(-1).astype(np.int64)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < -n or hi >= n:
        bad = lo if lo < -n else hi
        raise IndexError(f"feature attribute {label}: index {bad} is out of range for {n} rows "
                         f"(valid: {-n}..{n - 1})")
    if lo < 0:
        ids = np.where(ids < 0, ids + n, ids)
    return ids, arr.shape


def _names_every_row(t: torch.Tensor, index, label: str) -> bool:
    """Whether ``index`` names each row 0..len(t)-1 of ``t`` exactly once."""
    n = len(t) if t.dim() else 0
    try:
        ids, _shape = _normalize_index(index, n, label)
    except IndexError:
        return False
    return len(ids) == n and np.array_equal(np.sort(ids), np.arange(n))


def _rows_in_index_order(t: torch.Tensor, index, label: str) -> torch.Tensor:
    """The rows of a new attribute put with ``index``: row ``index[i]`` is ``t[i]``. The index
    must name every row 0..len(t)-1 exactly once (the attribute has no other rows)."""
    n = len(t) if t.dim() else 0
    why = f"put_tensor({label}, index=...): a new attribute needs an index naming every row 0..{n - 1} exactly once"
    try:
        ids, _shape = _normalize_index(index, n, label)
    except IndexError as e:
        raise FeatureStoreError(f"{why} ({e})") from e
    if len(ids) != n or not np.array_equal(np.sort(ids), np.arange(n)):
        raise FeatureStoreError(f"{why}; got {len(ids)} ids, {len(np.unique(ids))} distinct")
    if _is_identity(ids):
        return t.contiguous()
    out = torch.empty_like(t)
    out[torch.from_numpy(ids)] = t
    return out
