"""The governor: a migration policy deciding, from the store's own accesses, which storage tier
each object lives on.

An access only appends its event to a bounded queue; a thread started by ``open()`` drains it in
batches, turns the events into :class:`~tiered.policies.Observation`s (tier = where the object
lives now, the store's truth; size = the bytes it takes there), asks the ``[policy] migration``
policy for moves and carries them out one at a time through :meth:`TieredStore.migrate`
(write-back priority, never waiting for host memory), paced so that the bytes moved per second
stay within ``[policy] migration_bandwidth`` (each byte moved is read once and written once).
When the policy is also a placement policy, it picks the tier of each new object put without
one (first-fit otherwise, and whenever it names a tier without room). Moves are the store's own I/O: they reach listeners as one ``migrate`` event each, never as
accesses, so they are not mistaken for the workload's.

The store checks every move rather than trusting the policy: a move of an object deleted
meanwhile, of an object read in place from an external file, to a tier without room for the
object's owner, or one whose copy finds no free host memory is refused and the policy told where
the object really is (:meth:`MigrationPolicy.locate`); a move overtaken by a newer put is
dropped by ``migrate``'s version check. A move leaves the object's host copy as it found it
(cached or not). ``stats()["governor"]`` counts decisions, migrations, refusals by reason and
bytes migrated per tier pair. A policy that raises stops the governor (the store goes on
without it; ``stopped`` says why).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import threading
import time
from typing import TYPE_CHECKING

from tiered.allocators import OutOfBudget
from tiered.io_engine import IOFuture
from tiered.policies import MigrationPolicy, Move, Observation, PlacementPolicy, TierModel

from .errors import StoreError, TierFullError

if TYPE_CHECKING:
    from tiered.traces import AccessEvent

    from .core import TieredStore

log = logging.getLogger("tiered.store.governor")

MAX_QUEUE = 1 << 16  # events kept while the governor is behind; older ones are dropped and counted
POLL_S = 0.05  # how long the governor waits for a full batch before deciding on a partial one
MOVE_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


class Governor:
    """See the module docstring. ``start()`` from ``open()``, ``stop()`` from ``close()``."""

    def __init__(self, store: "TieredStore", policy: MigrationPolicy, *, bandwidth: int, batch: int) -> None:
        if policy.needs_future or policy.learns:
            raise StoreError(f"migration policy {policy.name!r} cannot govern a live store: it "
                             + ("needs the future of the accesses" if policy.needs_future
                                else "learns from access latencies the governor does not report"))
        self.store = store
        self.policy = policy
        self.bandwidth = bandwidth
        self.batch = batch
        self._events: collections.deque = collections.deque(maxlen=MAX_QUEUE)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: dict[str, tuple[int, float]] = {}  # key -> (accesses so far, time of the last)
        self._index = 0
        self._paced_until = 0.0
        self._vacated: set[str] = set()  # tiers moves left since the last commit (room not free yet)
        self._policy_lock = threading.Lock()  # the policy is called from the governor and from puts (place)
        self._lock = threading.Lock()  # guards the counters below
        self.counts = {"events": 0, "offered": 0, "decisions": 0, "migrations": 0, "in_place": 0,
                       "superseded": 0, "refused_gone": 0, "refused_external": 0, "refused_placed": 0, "refused_overfull": 0,
                       "refused_host": 0, "failed": 0}
        self.bytes_migrated: dict[str, int] = {}  # "src->dst" -> bytes of objects moved
        self.last_error: str | None = None
        self.stopped: str | None = None  # why the governor stopped deciding, if it did

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        order = self.store._tier_order
        with self._policy_lock:
            self.policy.reset([TierModel(n, self.store._tiers[n].space.capacity if i < len(order) - 1 else math.inf)
                               for i, n in enumerate(order)])
        self._thread = threading.Thread(target=self._run, name="tiered-governor", daemon=True)
        self._thread.start()

    def stop(self) -> bool:
        """Stop deciding and wait for the thread (a move in flight finishes as the engine drains);
        False when it did not end in time (then the policy is left open)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
            if self._thread.is_alive():
                log.error("the governor of %s did not stop within %.0f s", self.store.root, STOP_TIMEOUT_S)
                return False
            self._thread = None
        with self._policy_lock:
            self.policy.close()
        return True

    def place(self, obs: Observation, choices: list[tuple[str, int, int]]) -> str | None:
        """The tier the policy picks for a new object (``choices``: name, capacity, free bytes in
        one piece), when it is also a placement policy and names a tier with room; else None."""
        if not isinstance(self.policy, PlacementPolicy) or self.stopped is not None:
            return None
        with self._policy_lock:
            name = self.policy.place(obs, choices)
        return name if any(n == name and free >= obs.nbytes for n, _c, free in choices) else None

    def offer(self, ev: "AccessEvent") -> None:
        """Called on every access (any thread): queue the event; never blocks. The deque drops the
        oldest event when full (``offered - events`` counts what was dropped or is queued)."""
        if self.stopped is not None or ev.op not in ("read", "write", "delete", "plan"):
            return
        self._events.append(ev)
        self.counts["offered"] += 1  # approximate under races; only reported
        if len(self._events) >= self.batch:
            self._wake.set()

    def sync(self, timeout: float) -> bool:
        """Wait until every event offered before this call was decided on and its moves carried
        out; False on timeout, or when the governor has stopped or is stopping."""
        if self.stopped is not None or self._stopping.is_set():
            return False
        marker = threading.Event()
        self._events.append(marker)
        self._wake.set()
        return marker.wait(timeout) and self.stopped is None and not self._stopping.is_set()

    def stats(self) -> dict:
        with self._lock:
            return {"policy": self.policy.name or type(self.policy).__name__, "running": self.stopped is None,
                    **self.counts,
                    "bytes_migrated": dict(self.bytes_migrated), "queued": len(self._events),
                    "bandwidth": self.bandwidth, "last_error": self.last_error, "stopped": self.stopped}

    # -- the thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._seed()
            while not self._stopping.is_set():
                self._wake.wait(POLL_S)
                self._wake.clear()
                while self._events and not self._stopping.is_set():
                    self._round(self._drain())
        except Exception as e:  # noqa: BLE001 - the store goes on without its governor; stats say why
            log.exception("the governor of %s stopped", self.store.root)
            with self._lock:
                self.stopped = f"{type(e).__name__}: {e}"
        finally:
            self._release_markers()

    def _release_markers(self) -> None:
        """The thread ends: nothing waits on it any more (sync() then sees stopped or stopping)."""
        while self._events:
            ev = self._events.popleft()
            if isinstance(ev, threading.Event):
                ev.set()

    def _drain(self) -> list["AccessEvent"]:
        out = []
        while self._events and len(out) < self.batch:
            out.append(self._events.popleft())
        return out

    def _seed(self) -> None:
        """Tell the policy where the objects of the faster tiers are (it assumes the slowest)."""
        back = self.store._tier_order[-1]
        with self.store._lock:
            found = [(m.key, m.extent.tier, m.extent.length) for m in self.store._objects.values()
                     if not m.extent.external and m.extent.tier != back]
        with self._policy_lock:
            for key, tier, length in found:
                self.policy.locate(key, self.store._tier_order.index(tier), length)

    def _round(self, events: list["AccessEvent"]) -> None:
        obs: list[Observation] = []
        for ev in events:
            if isinstance(ev, threading.Event):  # a sync() marker: what came before it is done
                self._decide(obs)
                obs = []
                ev.set()
                continue
            if ev.op == "plan":  # in order with the accesses around it: the policy sees it when they do
                self._decide(obs)
                obs = []
                with self._policy_lock:
                    self.policy.plan(ev.key, ev.keys)
                continue
            if ev.op == "delete":
                with self._policy_lock:
                    self.policy.forget(ev.key)
                self._seen.pop(ev.key, None)
                continue
            where = self._where(ev.key)
            if where is not None:
                obs.append(self._observation(ev.key, where[1], ev.kind, ev.op, where[0], ev.time))
        with self._lock:
            self.counts["events"] += sum(not isinstance(ev, threading.Event) for ev in events)
        self._decide(obs)

    def _decide(self, obs: list[Observation]) -> None:
        step = max(1, self.policy.batch)
        for i in range(0, len(obs), step):
            with self._policy_lock:
                moves = self.policy.decide(obs[i:i + step])
            self._apply(moves)
        self._commit()  # one manifest commit for the round's moves, not one per move

    def _commit(self) -> None:
        """Make the moves so far durable; their old extents are free only from then on."""
        if self._vacated:
            self.store.commit()
            self._vacated = set()

    def _observation(self, key: str, nbytes: int, kind: str, op: str, tier: str, now: float) -> Observation:
        count, last = self._seen.get(key, (0, None))
        self._seen[key] = (count + 1, now)
        self._index += 1
        order = self.store._tier_order
        tiers = self.store._tiers
        return Observation(key, nbytes, kind, op, tier, now, self._index, count + 1,
                           math.inf if last is None else now - last, math.inf, order.index(tier),
                           tuple(tiers[n].used / max(1, tiers[n].space.capacity) for n in order))

    # -- carrying decisions out --------------------------------------------------------------
    def _apply(self, moves: list[Move]) -> None:
        for move in moves:
            if self._stopping.is_set():
                return
            with self._lock:
                self.counts["decisions"] += 1
            why = self._carry_out(move)
            if why is not None:
                self._count(why)
                self._tell_truth(move.key)

    def _carry_out(self, move: Move) -> str | None:
        """Carry one move out; the reason it was refused, or None."""
        store = self.store
        dst = store._tier_order[move.dst]
        if dst in self._vacated:  # a move out of dst frees its room only once committed
            self._commit()
        with store._lock:
            meta = store._objects.get(move.key)
            why = self._refusal(meta, dst)
            if why is not None:
                return why
            src, length, cached = meta.extent.tier, meta.extent.length, meta.host is not None
        if src == dst:
            self._count("in_place")
            return None
        self._pace(length)
        try:
            return self._move(move.key, src, dst, meta.nbytes)
        finally:
            if not cached:  # the move read it into host memory: leave the cache as it was
                try:
                    store.evict(move.key)
                except KeyError:
                    pass  # deleted since: nothing is cached

    def _move(self, key: str, src: str, dst: str, nbytes: int) -> str | None:
        """Migrate and count the outcome; the reason it was refused, or None."""
        try:
            result = _wait(self.store._migrate(key, dst, wait=0, evict=False, commit=False), self._stopping)
        except KeyError:
            return "refused_gone"
        except TierFullError:  # a put took the room since the check
            return "refused_overfull"
        except OutOfBudget:  # no host memory free for the copy right now: never wait for it
            return "refused_host"
        except Exception as e:  # noqa: BLE001 - counted and reported in stats(); the object stays where it was
            with self._lock:
                self.counts["failed"] += 1
                self.last_error = f"migrate {key!r} {src}->{dst}: {type(e).__name__}: {e}"
            return None
        if result is None:  # stopping: the move finishes (or not) as the engine drains
            return None
        if result.get("placed"):  # its caller placed it while the move was under way
            return "refused_placed"
        if result.get("superseded"):
            self._count("superseded")
            return None
        self._vacated.add(src)
        with self._lock:
            self.counts["migrations"] += 1
            pair = f"{src}->{dst}"
            self.bytes_migrated[pair] = self.bytes_migrated.get(pair, 0) + nbytes
        return None

    def _refusal(self, meta, dst: str) -> str | None:
        """Why a move of ``meta`` to ``dst`` is refused (call under the store's lock), or None."""
        if meta is None:
            return "refused_gone"
        if meta.extent.external:
            return "refused_external"
        if meta.placed:
            return "refused_placed"
        if meta.extent.tier != dst and self.store._tiers[dst].room_for(meta.owner) < meta.extent.length:
            return "refused_overfull"
        return None

    def _where(self, key: str) -> tuple[str, int] | None:
        """(tier, bytes taken there) of the object, the store's truth; None: gone, or an external file."""
        with self.store._lock:
            meta = self.store._objects.get(key)
            return None if meta is None or meta.extent.external else (meta.extent.tier, meta.extent.length)

    def _tell_truth(self, key: str) -> None:
        """After a refused move: where the object really is, so the policy does not build on it."""
        where = self._where(key)
        with self._policy_lock:
            if where is None:
                self.policy.forget(key)
            else:
                self.policy.locate(key, self.store._tier_order.index(where[0]), where[1])

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def _pace(self, nbytes: int) -> None:
        """Wait until moving ``nbytes`` keeps the moves within the bandwidth budget."""
        now = time.monotonic()
        start = max(now, self._paced_until)
        self._paced_until = start + nbytes / self.bandwidth
        if start > now:
            self._stopping.wait(start - now)


def _wait(fut: IOFuture, stopping: threading.Event) -> dict | None:
    """The move's result; None when the store is closing first (the engine finishes it)."""
    deadline = time.monotonic() + MOVE_TIMEOUT_S
    while not fut.done():
        if stopping.is_set():
            return None
        if time.monotonic() > deadline:
            raise TimeoutError(f"no result after {MOVE_TIMEOUT_S:.0f} s")
        concurrent.futures.wait([fut], timeout=POLL_S)
    return fut.result()
