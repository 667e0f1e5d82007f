"""Helpers for training loops: the hybrid policy's static score, and window prefetch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from .feature_store import TieredFeatureStore


def sampling_degree(edge_index, num_nodes: int) -> np.ndarray:
    """How often each node can be drawn as a neighbor: its count as an edge source.

    PyG's neighbor samplers walk incoming edges (``edge_index[1]`` is the node
    sampled from), so a node's features are fetched in proportion to this
    degree; it is the static score the hybrid policy wants.
    """
    src = edge_index[0].numpy() if isinstance(edge_index, torch.Tensor) else np.asarray(edge_index)[0]
    return np.bincount(src.astype(np.int64), minlength=num_nodes).astype(np.float64)


def window(batches: Iterable, fs: "TieredFeatureStore", *, depth: int = 1, group_name=None,
           attr_names: Sequence[str] | None = None) -> Iterator:
    """Yield ``batches`` (node-id tensors/arrays) with prefetches of the next ``depth`` already
    issued: the window prefetch of GIDS, for loops that know upcoming ids. The batch yielded
    and those queued behind it are declared to the store as the feature store's plan
    (:meth:`TieredFeatureStore.plan`; each batch's chunks are worked out once, when it is
    queued), withdrawn when the loop ends."""
    it = iter(batches)
    queue: list = []  # (batch, its prefetch or None, the chunk keys it reads)

    def enqueue(b, prefetch: bool) -> None:
        f = fs.prefetch(b, group_name, attr_names) if prefetch else None
        queue.append((b, f, fs.chunk_keys(b, group_name, attr_names)))

    for _ in range(depth + 1):
        try:
            enqueue(next(it), bool(queue))
        except StopIteration:
            break
    try:
        while queue:
            b, f, keys = queue.pop(0)
            try:
                enqueue(next(it), True)
            except StopIteration:
                pass
            fs._declare([*keys, *(k for _b, _f, ks in queue for k in ks)])
            if f is not None:
                f.result(timeout=fs.timeout)  # surfaces prefetch errors in the consumer's thread
            yield b
    finally:
        fs._withdraw_plan()
