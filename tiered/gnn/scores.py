"""Static per-node scores for the hybrid row-cache policy, computed once from the graph.

Why not just the degree: under neighbor sampling a node is fetched when it is
a seed, or drawn from the in-edges of a node of the previous hop, and a hub's
in-edges are drawn with probability ``fanout / in-degree`` each. Propagating
the seed distribution through those probabilities hop by hop (a PageRank-like
walk truncated at the number of hops, with the sampler's fan-out clipping)
gives each node's expected number of fetches per seed, which is what a static
cache should rank by (degree is its one-hop, unclipped approximation).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def sampling_score(indptr, nbr, fanout: Sequence[int], seed_prob=None) -> np.ndarray:
    """Expected fetches of each node per seed for a sampler walking in-edges.

    ``indptr``/``nbr``: CSC of the graph (``nbr[indptr[v]:indptr[v+1]]`` are the
    nodes with an edge into ``v``, the ones the sampler draws); ``fanout``: the
    sampler's per-hop fan-out (-1: all); ``seed_prob``: probability of each node
    being a seed (default uniform).
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    nbr = np.asarray(nbr)
    n = len(indptr) - 1
    if n < 0 or len(nbr) != indptr[-1]:
        raise ValueError(f"indptr ends at {indptr[-1] if n >= 0 else None} but nbr has {len(nbr)} entries")
    indeg = np.diff(indptr)
    cur = np.full(n, 1.0 / n) if seed_prob is None else np.asarray(seed_prob, dtype=np.float64)
    if len(cur) != n:
        raise ValueError(f"seed_prob has {len(cur)} entries, expected {n}")
    total = cur.copy()
    dst = np.repeat(np.arange(n, dtype=np.int32 if n < 2**31 else np.int64), indeg)
    for f in fanout:
        take = np.ones(n) if f < 0 else np.minimum(1.0, f / np.maximum(indeg, 1))
        cur = np.bincount(nbr, weights=(cur * take)[dst], minlength=n)
        total += cur
    return total


def csc_from_edge_index(edge_index, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, nbr) over destinations from a (2, E) ``edge_index`` (source row 0)."""
    ei = edge_index.numpy() if hasattr(edge_index, "numpy") else np.asarray(edge_index)
    src, dst = ei[0].astype(np.int64), ei[1].astype(np.int64)
    order = np.argsort(dst, kind="stable")
    indptr = np.zeros(num_nodes + 1, np.int64)
    np.cumsum(np.bincount(dst, minlength=num_nodes), out=indptr[1:])
    return indptr, src[order]
