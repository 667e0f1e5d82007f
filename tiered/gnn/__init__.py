"""GNN node features out of core: a PyG FeatureStore over the TieredStore.

``TieredFeatureStore`` needs torch_geometric (an optional extra); the gather
planning (``gather``) and the row cache (``cache``) do not.
"""

from .cache import CacheCounters, RowCache
from .gather import Layout, ReadPlan, plan_reads, split_rounds, unique_rows

__all__ = ["CacheCounters", "Layout", "ReadPlan", "RowCache", "TieredFeatureStore", "plan_reads",
           "sampling_degree", "split_rounds", "unique_rows", "window"]


def __getattr__(name):
    if name in ("TieredFeatureStore", "FeatureStoreError", "sampling_degree", "window"):
        from . import feature_store

        return getattr(feature_store, name)
    raise AttributeError(f"module 'tiered.gnn' has no attribute {name!r}")
