"""The decision interface every placement/eviction policy implements.

Policies are pure: they see observations of objects (never bytes, never the
engine or the store) and answer with decisions, so the same object runs
inside the real store and inside a trace simulator. The store never trusts
a policy with budgets: it only asks for candidates and checks them.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Iterable

#: the kinds of data the runtime keeps; policies may treat them differently
KINDS = ("weight", "optim", "kv", "gnn", "checkpoint", "blob")


@dataclass(frozen=True)
class Observation:
    """What a policy may know about one object at one access."""

    key: str
    nbytes: int
    kind: str = "blob"
    op: str = "read"  # read | write
    tier: str | None = None  # tier the access was served from, None when new


class EvictionPolicy(abc.ABC):
    """Tracks the objects resident in one tier and names victims when space is needed.

    Call order: ``admit`` when an object enters the tier, ``touch`` on each hit,
    ``remove`` when it leaves (for any reason); ``victims`` proposes, in
    order, objects to drop until ``nbytes`` are freed, skipping those for which
    ``evictable(key)`` is False (pinned or in use).
    """

    name: str = ""

    @abc.abstractmethod
    def admit(self, obs: Observation) -> None: ...

    @abc.abstractmethod
    def touch(self, obs: Observation) -> None: ...

    @abc.abstractmethod
    def remove(self, key: str) -> None: ...

    @abc.abstractmethod
    def victims(self, nbytes: int, evictable: Callable[[str], bool]) -> list[str]: ...

    @abc.abstractmethod
    def __contains__(self, key: str) -> bool: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...


class PlacementPolicy(abc.ABC):
    """Chooses the storage tier that becomes a new object's home."""

    name: str = ""

    @abc.abstractmethod
    def place(self, obs: Observation, tiers: Iterable[tuple[str, int, int]]) -> str | None:
        """``tiers`` is (name, capacity, free bytes), fastest first; None when nothing fits."""


class FirstFit(PlacementPolicy):
    """The fastest storage tier with room: what every offload runtime does by default."""

    name = "first-fit"

    def place(self, obs: Observation, tiers: Iterable[tuple[str, int, int]]) -> str | None:
        for name, _capacity, free in tiers:
            if free >= obs.nbytes:
                return name
        return None
