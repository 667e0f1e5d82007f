"""The KV cache tier: paged KV blocks across device, host and storage, with durable prefix reuse.

- :class:`TieredCache` -- a ``transformers.Cache`` for ``model.generate`` and manual decode loops;
- :class:`KVStore` -- prefix blocks (chained hashes, model identity) and spills in a TieredStore;
- :class:`SharedTier` -- prefix blocks on a Redis-protocol server, shared by every process using it;
- :mod:`tiered.kv.replay` -- prefix-store replay of a Mooncake trace (``python -m tiered.kv.replay``).

``TieredCache`` is imported on first use, so the replay and the KVStore do not need transformers.
"""

from tiered.policies import PrefixAware

from .prefix import KVStore, KVStoreError, chain_hashes, model_identity
from .shared import SharedTier, SharedTierError

_CACHE_NAMES = ("KVCacheError", "TieredCache", "TieredLayer", "kv_geometry")


def __getattr__(name: str):
    if name in _CACHE_NAMES:
        from . import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'tiered.kv' has no attribute {name!r}")


__all__ = ["KVCacheError", "KVStore", "KVStoreError", "PrefixAware", "SharedTier", "SharedTierError", "TieredCache",
           "TieredLayer", "chain_hashes", "kv_geometry", "model_identity"]
