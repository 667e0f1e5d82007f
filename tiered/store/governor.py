"""The governor: a migration policy deciding, from the store's own accesses, which storage tier
each object lives on.

An access only appends its event to a bounded queue; a thread started by ``open()`` drains it in
batches, turns the events into :class:`~tiered.policies.Observation`s (tier = where the object
lives now, the store's truth), asks the ``[policy] migration`` policy for moves and carries them
out one at a time through :meth:`TieredStore.migrate` (write-back priority), paced to
``[policy] migration_bandwidth`` so they never take more than that from the workloads.

The store checks every move rather than trusting the policy: a move of an object deleted
meanwhile, of an object read in place from an external file, or to a tier without room for the
object's owner is refused; a move overtaken by a newer put is dropped by ``migrate``'s version
check. Every decision is emitted to the store's listeners as an event (op ``"migrate"``) and
counted in ``stats()["governor"]``. Tiers are the storage tiers, fastest first, as configured;
the host tier stays the host policy's.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import threading
import time
from typing import TYPE_CHECKING

from tiered.io_engine import IOFuture
from tiered.policies import MigrationPolicy, Move, Observation, TierModel

from .errors import TierFullError

if TYPE_CHECKING:
    from tiered.traces import AccessEvent

    from .core import TieredStore

log = logging.getLogger("tiered.store.governor")

MAX_QUEUE = 1 << 16  # events kept while the governor is behind; older ones are dropped and counted
POLL_S = 0.05  # how long the governor waits for a full batch before deciding on a partial one
MOVE_TIMEOUT_S = 120.0


class Governor:
    """See the module docstring. ``start()`` from ``open()``, ``stop()`` from ``close()``."""

    def __init__(self, store: "TieredStore", policy: MigrationPolicy, *, bandwidth: int, batch: int) -> None:
        self.store = store
        self.policy = policy
        self.bandwidth = bandwidth
        self.batch = batch
        self._events: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: dict[str, tuple[int, float]] = {}  # key -> (accesses so far, time of the last)
        self._index = 0
        self._paced_until = 0.0
        self._lock = threading.Lock()  # guards the counters below
        self.counts = {"events": 0, "dropped_events": 0, "decisions": 0, "migrations": 0,
                       "in_place": 0, "superseded": 0, "refused_gone": 0, "refused_external": 0,
                       "refused_overfull": 0, "failed": 0}
        self.bytes_migrated: dict[str, int] = {}  # "src->dst" -> bytes
        self.last_error: str | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        order = self.store._tier_order
        self.policy.reset([TierModel(n, self.store._tiers[n].space.capacity if i < len(order) - 1 else math.inf)
                           for i, n in enumerate(order)])
        self._thread = threading.Thread(target=self._run, name="tiered-governor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = MOVE_TIMEOUT_S) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the governor of %s did not stop within %.0f s", self.store.root, timeout)
            self._thread = None
        self.policy.close()

    def offer(self, ev: "AccessEvent") -> None:
        """Called on every access (any thread): queue the event; never blocks."""
        if ev.op not in ("read", "write", "delete", "plan"):
            return
        if len(self._events) >= MAX_QUEUE:
            self._events.popleft()
            with self._lock:
                self.counts["dropped_events"] += 1
        self._events.append(ev)
        if len(self._events) >= self.batch:
            self._wake.set()

    def stats(self) -> dict:
        with self._lock:
            return {"policy": self.policy.name or type(self.policy).__name__, **self.counts,
                    "bytes_migrated": dict(self.bytes_migrated), "queued": len(self._events),
                    "bandwidth": self.bandwidth, "last_error": self.last_error}

    # -- the thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._seed()
            while not self._stopping.is_set():
                self._wake.wait(POLL_S)
                self._wake.clear()
                while self._events and not self._stopping.is_set():
                    self._round(self._drain())
        except BaseException as e:  # noqa: BLE001 - the store keeps working without its governor
            log.exception("the governor of %s stopped", self.store.root)
            with self._lock:
                self.last_error = f"governor stopped: {type(e).__name__}: {e}"

    def _drain(self) -> list["AccessEvent"]:
        out = []
        while self._events and len(out) < self.batch:
            out.append(self._events.popleft())
        return out

    def _seed(self) -> None:
        """Tell the policy where the objects of the faster tiers are (it assumes the slowest)."""
        back = self.store._tier_order[-1]
        with self.store._lock:
            found = [(m.key, m.nbytes, m.kind, m.extent.tier) for m in self.store._objects.values()
                     if not m.extent.external and m.extent.tier != back]
        for i in range(0, len(found), self.batch):
            obs = [self._observation(key, n, kind, "read", tier, time.monotonic()) for key, n, kind, tier in
                   found[i:i + self.batch]]
            self._apply(self.policy.decide(obs))

    def _round(self, events: list["AccessEvent"]) -> None:
        obs = []
        for ev in events:
            if ev.op == "plan":  # in order with the accesses around it: the policy sees it when they do
                self._decide(obs)
                obs = []
                self.policy.plan(ev.key, ev.keys)
                continue
            if ev.op == "delete":
                self.policy.forget(ev.key)
                self._seen.pop(ev.key, None)
                continue
            with self.store._lock:
                meta = self.store._objects.get(ev.key)
                tier = None if meta is None or meta.extent.external else meta.extent.tier
            if tier is None:
                continue
            obs.append(self._observation(ev.key, ev.nbytes, ev.kind, ev.op, tier, ev.time))
        with self._lock:
            self.counts["events"] += len(events)
        self._decide(obs)

    def _decide(self, obs: list[Observation]) -> None:
        step = max(1, self.policy.batch)
        for i in range(0, len(obs), step):
            self._apply(self.policy.decide(obs[i:i + step]))

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
            self._carry_out(move)

    def _carry_out(self, move: Move) -> None:
        store = self.store
        dst = store._tier_order[move.dst]
        with store._lock:
            meta = store._objects.get(move.key)
            why = self._refusal(meta, dst)
            if why is None:
                src, size = meta.extent.tier, meta.extent.length
        if why is not None:
            self._count(why)
            return
        if src == dst:
            self._count("in_place")
            return
        self._pace(size)
        store._emit(move.key, meta.nbytes, "migrate", meta.kind, dst)
        try:
            result = _wait(store.migrate(move.key, dst), self._stopping)
        except TierFullError:  # a put took the room since the check: the object stays where it was
            self._count("refused_overfull")
            return
        except Exception as e:  # noqa: BLE001 - counted and reported in stats(); the object stays where it was
            with self._lock:
                self.counts["failed"] += 1
                self.last_error = f"migrate {move.key!r} {src}->{dst}: {type(e).__name__}: {e}"
            return
        if result is None:  # stopping: the move finishes (or not) as the engine drains
            return
        if result.get("superseded"):
            self._count("superseded")
            return
        with self._lock:
            self.counts["migrations"] += 1
            pair = f"{src}->{dst}"
            self.bytes_migrated[pair] = self.bytes_migrated.get(pair, 0) + meta.nbytes

    def _refusal(self, meta, dst: str) -> str | None:
        """Why a move of ``meta`` to ``dst`` is refused (call under the store's lock), or None."""
        if meta is None:
            return "refused_gone"
        if meta.extent.external:
            return "refused_external"
        if meta.extent.tier != dst and self.store._tiers[dst].room_for(meta.owner) < meta.extent.length:
            return "refused_overfull"
        return None

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
