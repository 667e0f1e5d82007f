"""The KV cache tier: paged KV blocks across device, host and storage, with durable prefix reuse.

- :class:`TieredCache` -- a ``transformers.Cache`` for ``model.generate`` and manual decode loops;
- :class:`KVStore` -- prefix blocks (chained hashes, model identity) and spills in a TieredStore;
- :func:`replay_mooncake` (in :mod:`tiered.kv.replay`) -- prefix-store replay of a Mooncake trace.
"""

from policies import eviction_policy_names, register_eviction_policy
from policies.prefix_aware import PrefixAware

from .cache import KVCacheError, TieredCache, TieredLayer, kv_geometry
from .prefix import KVStore, KVStoreError, chain_hashes, model_identity

if "prefix-aware" not in eviction_policy_names():
    register_eviction_policy("prefix-aware", PrefixAware)

__all__ = ["KVCacheError", "KVStore", "KVStoreError", "PrefixAware", "TieredCache", "TieredLayer",
           "chain_hashes", "kv_geometry", "model_identity"]
