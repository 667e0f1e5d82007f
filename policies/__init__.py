"""Placement, migration and eviction decisions: pure logic, no I/O.

Never imports ``io_engine`` or ``tiered``, so every policy also runs in
trace simulation (:mod:`policies.sim`). Policies are looked up by name:

* eviction policies (one tier's ranking, used by the store): lru, lfu, arc, s3fifo, sieve,
  prefix-aware (keeps KV blocks that queued requests will read)
* row-cache policies (vectorized, one call per minibatch of GNN rows): see :mod:`policies.row_cache`
* migration policies (whole-hierarchy decisions, used by the simulator and
  ``tiered bench replay``): lru, lfu, arc, s3fifo, sieve, static, belady, rl, and
  schedule (Belady's choice over the futures workloads declare with ``plan``, the ``fallback``
  eviction policy beyond them; options ``fallback`` (default lru) and ``prefetch``)

``rl`` is resolved lazily: it imports :mod:`policies.rl` (torch) and calls its
``make_policy(**options)``, which returns a :class:`MigrationPolicy` that is
also a :class:`PlacementPolicy` (the two cooperating agents).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from .arc import ARC
from .base import (
    KINDS, OPS, Backing, EvictionPolicy, FirstFit, MigrationPolicy, Move, Observation, Outcome,
    PlacementPolicy, PolicyError, TierModel,
)
from .belady import Belady
from .cache import CachingMigration
from .lfu import LFU
from .lru import LRU
from .prefix_aware import PrefixAware
from .row_cache import ROW_CACHE_POLICIES, RowCachePolicy, VictimBuffer, create_row_cache_policy
from .s3fifo import S3FIFO
from .schedule import ScheduledMigration
from .sieve import SIEVE
from .static import StaticSplit

_EVICTION: dict[str, Callable[[], EvictionPolicy]] = {
    "lru": LRU, "lfu": LFU, "arc": ARC, "s3fifo": S3FIFO, "sieve": SIEVE, "prefix-aware": PrefixAware,
}


def register_eviction_policy(name: str, factory: Callable[[], EvictionPolicy]) -> None:
    _EVICTION[name] = factory


def eviction_policy_names() -> list[str]:
    return sorted(_EVICTION)


def create_eviction_policy(name: str) -> EvictionPolicy:
    try:
        return _EVICTION[name]()
    except KeyError:
        raise KeyError(
            f"unknown eviction policy {name!r}; known: {', '.join(eviction_policy_names())}"
        ) from None


def _caching(name: str, factory: Callable[[], EvictionPolicy]) -> Callable[..., MigrationPolicy]:
    def make(**options: Any) -> MigrationPolicy:
        if options:
            raise TypeError(f"policy {name!r} takes no options, got {sorted(options)}")
        return CachingMigration(name, factory)
    return make


def _schedule(fallback: str = "lru", **options: Any) -> MigrationPolicy:
    """``schedule``: Belady over the declared plans, ``fallback`` (an eviction policy name) beyond."""
    if fallback not in _EVICTION:
        raise KeyError(f"policy 'schedule': unknown fallback eviction policy {fallback!r}; "
                       f"known: {', '.join(eviction_policy_names())}")
    unknown = sorted(set(options) - {"prefetch"})
    if unknown:
        raise TypeError(f"policy 'schedule' takes options fallback and prefetch, got {unknown}")
    return ScheduledMigration(_EVICTION[fallback], **options)


def _rl(**options: Any) -> MigrationPolicy:
    try:
        mod = importlib.import_module(".rl", __name__)
    except ImportError as e:
        raise KeyError(f"policy 'rl' needs the policies.rl package (and torch): {e}") from e
    factory = getattr(mod, "make_policy", None)
    if factory is None:
        raise KeyError("policy 'rl': policies.rl has no make_policy(**options) factory")
    return factory(**options)


_POLICIES: dict[str, Callable[..., MigrationPolicy]] = {
    "lru": _caching("lru", LRU),
    "lfu": _caching("lfu", LFU),
    "arc": _caching("arc", ARC),
    "s3fifo": _caching("s3fifo", S3FIFO),
    "sieve": _caching("sieve", SIEVE),
    "belady": _caching("belady", Belady),
    "static": StaticSplit,
    "schedule": _schedule,
    "rl": _rl,
}
#: the policies that need no future and no training: what "best heuristic" means
HEURISTICS = ("lru", "lfu", "arc", "s3fifo", "sieve", "static")


def register_policy(name: str, factory: Callable[..., MigrationPolicy]) -> None:
    """Make ``create_policy(name, **options)`` call ``factory(**options)``."""
    _POLICIES[name] = factory


def policy_names() -> list[str]:
    return sorted(_POLICIES)


def create_policy(name: str, **options: Any) -> MigrationPolicy:
    """A fresh migration policy by name; unknown names list the known ones."""
    try:
        factory = _POLICIES[name]
    except KeyError:
        raise KeyError(f"unknown policy {name!r}; known: {', '.join(policy_names())}") from None
    return factory(**options)


__all__ = [
    "ARC", "HEURISTICS", "KINDS", "LFU", "LRU", "OPS", "S3FIFO", "Backing", "Belady",
    "CachingMigration", "EvictionPolicy", "FirstFit", "MigrationPolicy", "Move", "Observation",
    "Outcome", "PlacementPolicy", "PolicyError", "PrefixAware", "ROW_CACHE_POLICIES", "RowCachePolicy", "SIEVE",
    "ScheduledMigration",
    "StaticSplit", "TierModel", "VictimBuffer", "create_row_cache_policy",
    "create_eviction_policy", "create_policy", "eviction_policy_names", "policy_names",
    "register_eviction_policy", "register_policy",
]
