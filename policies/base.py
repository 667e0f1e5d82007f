"""The decision interface every placement/migration/eviction policy implements.

Policies are pure: they see observations of objects (never bytes, never the
engine or the store) and answer with decisions, so the same object runs
inside the real store and inside the trace simulator (:mod:`policies.sim`).
Neither the store nor the simulator trusts a policy with budgets: they check
every decision and refuse one that overfills a tier or names an unknown
object (:class:`PolicyError`).

Three roles, one observation type:

* :class:`PlacementPolicy` -- which tier becomes a *new* object's home.
* :class:`MigrationPolicy` -- as accesses arrive, what to promote to a faster
  tier and what to demote to a slower one; batched, and told the outcome of
  each access (latency, bytes migrated) so learning policies can learn online.
* :class:`EvictionPolicy` -- the per-tier ranking the real store uses to pick
  victims; the heuristic migration policies are built from one per tier.

Tiers are always ordered fastest first and named by index in decisions
(``0`` is the fastest); the last tier is the backing tier that holds every
object not cached above it.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, NamedTuple, Sequence

#: the kinds of data the runtime keeps; policies may treat them differently.
#: Trace files store a kind as its index in this tuple (append only!).
KINDS = ("weight", "optim", "kv", "gnn", "checkpoint", "blob")
#: operations, stored in trace files as their index
OPS = ("read", "write")

Key = Hashable


class PolicyError(RuntimeError):
    """A policy returned a decision the caller refuses (overfull tier, unknown object)."""


@dataclass(frozen=True, slots=True)
class TierModel:
    """One tier as policies and the simulator see it: budget and speed.

    ``capacity`` in bytes (``math.inf`` for an unbounded backing tier);
    ``latency_s`` is paid once per access or transfer; bandwidths in bytes/s.
    """

    name: str
    capacity: float
    latency_s: float = 0.0
    read_bw: float = math.inf
    write_bw: float = math.inf

    def __post_init__(self) -> None:
        if not self.capacity >= 0:
            raise ValueError(f"tier {self.name!r}: capacity must be >= 0, got {self.capacity!r}")
        if not self.latency_s >= 0:
            raise ValueError(f"tier {self.name!r}: latency_s must be >= 0, got {self.latency_s!r}")
        for attr in ("read_bw", "write_bw"):
            if not getattr(self, attr) > 0:
                raise ValueError(f"tier {self.name!r}: {attr} must be > 0, got {getattr(self, attr)!r}")


class Observation(NamedTuple):
    """What a policy may know about one object at one access.

    The first five fields are what the store has always passed; the rest have
    neutral defaults so old call sites keep working. In the simulator every
    field is filled; ``next_access`` only for policies that declare
    ``needs_future`` (Belady's optimum). A NamedTuple, not a frozen
    dataclass: one is built per access, and a frozen dataclass costs ~15x
    more to construct (measured), which dominated replay time.
    """

    key: Key
    nbytes: int
    kind: str = "blob"
    op: str = "read"  # read | write
    tier: str | None = None  # tier the object is on (normally: served the access); None when new
    time: float = 0.0  # seconds since the start of the run/trace
    index: int = -1  # position of this access in the stream (0, 1, 2, ...)
    count: int = 1  # accesses to this key so far, this one included
    recency: float = math.inf  # seconds since this key's previous access (inf: first access)
    reuse_distance: float = math.inf  # accesses (to any key) since this key's previous access
    tier_index: int = -1  # index of ``tier`` (0 = fastest), -1 when new
    fill: tuple[float, ...] = ()  # used/capacity per tier, fastest first
    next_access: float = math.inf  # index of this key's next access (offline policies only)


class Move(NamedTuple):
    """A migration decision: put ``key`` on tier ``dst`` (index, 0 = fastest)."""

    key: Key
    dst: int


class Outcome(NamedTuple):
    """What happened at one access, told to learning policies after their decisions ran.

    ``latency_s`` is the access latency the caller observed (queueing behind
    earlier migrations included); ``migrated_bytes`` the bytes the decisions
    returned for this access's batch moved (counted on the batch's last
    access, 0 on the others).
    """

    obs: Observation
    latency_s: float
    tier_index: int  # tier that served the access
    migrated_bytes: int = 0


class EvictionPolicy(abc.ABC):
    """Tracks the objects resident in one tier and names victims when space is needed.

    Call order: ``admit`` when an object enters the tier, ``touch`` on each hit,
    ``remove`` when it leaves (for any reason); ``victims`` proposes, in
    order, objects to drop until ``nbytes`` are freed, skipping those for which
    ``evictable(key)`` is False (pinned or in use). ``victims`` does not remove:
    the caller calls ``remove`` for each victim it actually drops.
    """

    name: str = ""

    @abc.abstractmethod
    def admit(self, obs: Observation) -> None: ...

    @abc.abstractmethod
    def touch(self, obs: Observation) -> None: ...

    @abc.abstractmethod
    def remove(self, key: Key) -> None: ...

    @abc.abstractmethod
    def victims(self, nbytes: int, evictable: Callable[[Key], bool]) -> list[Key]: ...

    @abc.abstractmethod
    def __contains__(self, key: Key) -> bool: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...

    def resize(self, capacity: float) -> None:
        """The tier's capacity in bytes (adaptive policies such as ARC size their lists by it)."""

    def should_admit(self, obs: Observation, free: int) -> bool:
        """Whether ``obs.key`` should enter the tier at all (bypass); ``free``: bytes free now."""
        return True


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


class Backing(PlacementPolicy):
    """New objects start on the slowest (backing) tier; a migration policy promotes them.

    The placement every demand-filled cache (LRU, ARC, ...) implies.
    """

    name = "backing"

    def place(self, obs: Observation, tiers: Iterable[tuple[str, int, int]]) -> str | None:
        last = None
        for last, _capacity, _free in tiers:
            pass
        return last


class MigrationPolicy(abc.ABC):
    """Decides, as accesses arrive, which objects move between tiers.

    Call order (the simulator and the store follow it exactly)::

        reset(tiers)                      # once, before the first access
        prepare_future(keys)              # once, only if needs_future
        for each batch of accesses (batch size = self.batch, default 1):
            # every access in the batch is served first, from its current tier
            moves = decide(observations)  # one Observation per access, in order
            # caller applies moves in order, refusing (PolicyError) any that
            # names an object never seen or overfills its destination tier;
            # so a policy lists demotions before the promotions they make room for
            if self.learns:
                observe(outcomes)         # one Outcome per access, same order
        close()

    A policy keeps its own view of where objects are (it made every move);
    ``Observation.tier_index`` is the caller's truth for the accessed object,
    which a policy must follow when it differs (e.g. a placement policy put a
    new object on a fast tier). A policy that also subclasses
    :class:`PlacementPolicy` is used as the placement policy too when the
    caller is given none (two cooperating agents in one object).
    """

    name: str = ""
    #: accesses per decide() call; learning policies batch to amortise inference
    #: (read again after every decide(): a policy may adapt it)
    batch: int = 1
    #: True: observe() is called with outcomes (heuristics leave it False: no cost)
    learns: bool = False
    #: True: Observation.next_access is filled and prepare_future() is called
    needs_future: bool = False

    def reset(self, tiers: Sequence[TierModel]) -> None:
        """Start from empty tiers (fastest first)."""
        self.tiers = tuple(tiers)

    def prepare_future(self, keys: Sequence[Key]) -> None:
        """The whole future key sequence (offline policies only)."""

    @abc.abstractmethod
    def decide(self, batch: Sequence[Observation]) -> list[Move]:
        """Moves to apply after the accesses in ``batch`` were served."""

    def observe(self, outcomes: Sequence[Outcome]) -> None:
        """Outcomes of the last batch (only called when ``learns``)."""

    def plan(self, owner: str, keys: Sequence[Key]) -> None:
        """``owner`` declared the keys it reads next, in order, replacing its previous plan (empty:
        withdrawn). Called between decisions, in order with the accesses around the declaration,
        live and in simulation alike; policies that do not plan ignore it."""

    def locate(self, key: Key, tier: int, nbytes: int) -> None:
        """``key`` (``nbytes``) is on tier ``tier`` now, as the caller knows it: a live store tells
        this at start for what is already placed, and after refusing one of the policy's moves.
        Not an access: recency and counts stay. The default keeps no placement of its own."""

    def forget(self, key: Key) -> None:
        """``key`` no longer exists (deleted in a live store): drop what is kept about it, so its
        room counts as free. The simulator never deletes; the default keeps nothing per key."""

    def close(self) -> None:
        """Release anything held (threads, files); the default holds nothing."""
