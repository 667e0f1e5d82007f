"""Placement, migration and eviction decisions: pure logic, no I/O.

Never imports ``io_engine`` or ``tiered``, so every policy also runs in
trace simulation. Policies are looked up by name in a small registry.
"""

from __future__ import annotations

from typing import Callable

from .base import KINDS, EvictionPolicy, FirstFit, Observation, PlacementPolicy
from .lru import LRU

_EVICTION: dict[str, Callable[[], EvictionPolicy]] = {"lru": LRU}


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


__all__ = [
    "KINDS", "LRU", "EvictionPolicy", "FirstFit", "Observation", "PlacementPolicy",
    "create_eviction_policy", "eviction_policy_names", "register_eviction_policy",
]
