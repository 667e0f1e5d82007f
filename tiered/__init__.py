"""tiered: one store, one budget per tier, for everything a PyTorch job offloads.

Public entry points:
- :class:`TieredStore` — named tensors with a durable home on a storage tier
  and cached copies in faster tiers;
- :func:`load_config` / :func:`default_config` — the offload TOML config.
"""

from .config import Config, ConfigError, TierSpec, default_config, load_config
from .store import ChecksumError, Lease, Reservation, StoreError, TieredStore

__version__ = "0.1.0"

__all__ = [
    "ChecksumError", "Config", "ConfigError", "Lease", "Reservation", "StoreError", "TierSpec", "TieredStore",
    "default_config", "load_config",
]

from .offload import OffloadError, OffloadUnits, detach, offload, offload_stats, offload_units  # noqa: E402

__all__ += ["OffloadError", "OffloadUnits", "detach", "offload", "offload_stats", "offload_units"]
from .pretrained import from_pretrained  # noqa: E402

__all__ += ["from_pretrained"]
from .device_cache import DeviceCache, DeviceLease  # noqa: E402

__all__ += ["DeviceCache", "DeviceLease"]

# The workloads, imported on first use so `import tiered` does not pull in
# transformers, torch.distributed or torch_geometric.
_WORKLOADS = {
    "OffloadedAdamW": "tiered.optim", "ZOSGD": "tiered.optim",
    "TieredCache": "tiered.kv", "KVStore": "tiered.kv",
    "TieredFeatureStore": "tiered.gnn",
    "LazyCheckpointer": "tiered.checkpoint", "StoreRef": "tiered.checkpoint", "CheckpointError": "tiered.checkpoint",
}
__all__ += list(_WORKLOADS)


def __getattr__(name: str):
    module = _WORKLOADS.get(name)
    if module is None:
        raise AttributeError(f"module 'tiered' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
