"""The host tier: cached copies in the arena, evicted by the placement policy to make room."""

from __future__ import annotations

import time

from tiered.allocators import HostBuffer, OutOfBudget, align_up

from .errors import StoreError
from .objects import DEFAULT_OWNER, HostCopy, ObjectMeta


class _HostTier:
    """Part of :class:`~tiered.store.TieredStore` (see its docstring)."""

    # -- host memory ---------------------------------------------------------------
    def _evictable(self, key: str) -> bool:
        m = self._objects.get(key)
        return m is not None and m.host is not None and m.host.ready and m.host.pins == 0

    def _alloc_host(self, nbytes: int, wait: float | None = None, owner: str = DEFAULT_OWNER,
                    evict: bool = True) -> HostBuffer:
        """A host buffer charged to ``owner``: evicting unpinned cached copies (policy's choice)
        whose eviction makes room for it, then asking other owners holding memory beyond their
        shares to give some back (their reservations' ``on_pressure``), then waiting up to
        ``wait`` (default ``host_wait``) seconds for pins to go. ``evict=False``: only memory that
        is free now (the store's own background work must not displace the workloads')."""
        size = align_up(max(nbytes, 1))
        if size > self.arena.capacity:
            raise OutOfBudget(f"host tier: {nbytes} bytes requested but its budget is {self.arena.capacity} bytes")
        if size > self.arena.limit_for(owner):
            raise OutOfBudget(f"host tier: {nbytes} bytes for owner {owner!r} cannot fit beside the other owners' "
                              f"shares ({self._describe_owners('host')})")
        if not evict:
            buf = self.arena.try_alloc(nbytes, owner=owner)
            if buf is None:
                raise OutOfBudget(f"host tier: {nbytes} bytes for owner {owner!r} are not free now")
            return buf
        wait = self.host_wait if wait is None else wait
        deadline = time.monotonic() + wait
        relieved_late = False  # past the deadline, one more round after others gave memory back
        while True:
            seen = self.arena.changes  # read before trying: a change after it ends the wait below
            buf = self._alloc_evicting(nbytes, size, owner)
            if buf is not None:
                return buf
            remaining = deadline - time.monotonic()
            if (remaining > 0 or not relieved_late) and self._relieve("host", size, owner) \
                    and self.arena.changes != seen:
                relieved_late = remaining <= 0
                continue  # another owner gave memory back: try again at once
            if remaining <= 0:
                st = self.arena.stats()
                raise OutOfBudget(
                    f"host tier: no room for {nbytes} bytes for owner {owner!r} within {wait} s "
                    f"({st.in_use} of {st.capacity} bytes held by pinned or loading objects; "
                    f"{self._describe_owners('host')})"
                )
            # wait for a buffer to be freed or a cached copy to become evictable (unpinned, or a
            # put's copy installed), then retry with eviction
            self.arena.wait_change(seen, min(0.05, remaining))

    def _alloc_evicting(self, nbytes: int, size: int, owner: str) -> HostBuffer | None:
        """Try to allocate, evicting cached copies whose space ``owner`` may take: its own, and
        those of owners holding more than their shares (a copy inside another owner's share
        frees room only for that owner)."""
        evicted = []
        with self._lock:
            buf = self.arena.try_alloc(nbytes, owner=owner)
            if buf is None:
                over = self.arena.over_share()

                def helps(key: str) -> bool:
                    if not self._evictable(key):
                        return False
                    o = self._objects[key].host.buffer.owner
                    return o == owner or o in over

                while buf is None:
                    victims = self._host_victims(size, helps, owner)
                    if not victims:
                        break
                    for key in victims:
                        meta = self._objects[key]
                        self._drop_host(meta)
                        self.counters.evictions += 1
                        evicted.append(meta)
                    buf = self.arena.try_alloc(nbytes, owner=owner)
                    over = self.arena.over_share()
        for meta in evicted:
            self._emit(meta.key, meta.nbytes, "evict", meta.kind, "host")
        return buf

    def _host_victims(self, size: int, helps, owner: str) -> list[str]:
        """Cached copies to evict for ``size`` bytes for ``owner`` (under ``self._lock``): first
        those no plan names and those planned beyond the horizon, in the policy's order; then
        copies other owners planned, then ``owner``'s own, each the one read farthest in its
        plan first. Positions of different owners' plans are not one clock: the owner
        allocating now is the one reading now, so its own next reads are the surest."""
        plans = self._plans
        if not plans.active:
            return self.host_policy.victims(size, helps)
        near = plans.near()  # key -> (positions to its next read, owner of that plan)
        out = self.host_policy.victims(size, lambda k: k not in near and helps(k))
        freed = sum(align_up(max(1, self._objects[k].nbytes)) for k in out)
        if freed < size:
            ranked = sorted((k for k in near if helps(k)),
                            key=lambda k: (near[k][1] != owner, near[k][0]), reverse=True)
            for k in ranked:
                out.append(k)
                freed += align_up(max(1, self._objects[k].nbytes))
                if freed >= size:
                    break
        return out

    def _drop_host(self, meta: ObjectMeta) -> None:
        copy = meta.host
        meta.host = None
        if copy is not None:
            self.host_policy.remove(meta.key)
            copy.detached = True
            self._maybe_free(copy)

    def _maybe_free(self, copy: HostCopy) -> None:
        """Free a detached copy's buffer once nobody pins it and no read is filling it."""
        if copy.detached and copy.pins == 0 and not copy.loading and copy.buffer is not None:
            copy.buffer.release()
            copy.buffer = None

    def _detach_copy(self, key: str, copy: HostCopy, nbytes: int) -> HostBuffer | None:
        """Take a copy's buffer out of the cache; None when others pin it (or it is a window)."""
        with self._lock:
            if copy.pins != 1 or copy.loading or copy.buffer is None or copy.start or copy.buffer.nbytes != nbytes:
                return None
            meta = self._objects.get(key)
            if meta is not None and meta.host is copy:
                meta.host = None
                self.host_policy.remove(key)
            buf, copy.buffer = copy.buffer, None
            copy.pins = 0
            copy.detached = True
            return buf

    def _notify_host(self) -> None:
        """Wake allocations waiting for room: a cached copy may have become evictable."""
        arena = self.arena
        if arena is not None:  # None once closed (a lease released late)
            arena.notify()

    def _unpin(self, copy: HostCopy) -> None:
        with self._lock:
            copy.pins -= 1
            self._maybe_free(copy)
        self._notify_host()  # it may be evictable now

    def alloc_host(self, nbytes: int, wait: float | None = None, *, owner: str = DEFAULT_OWNER) -> HostBuffer:
        """A buffer of the host tier charged to ``owner``, for :meth:`put_buffer` or the owner's
        own use (evicting cached copies for room, waiting up to ``wait`` seconds); the caller
        releases it unless it gives it to a put. Owners with a reserved share (:meth:`reserve`) allocate
        through their :class:`Reservation` instead."""
        self._check_open()
        return self._alloc_host(nbytes, wait, owner)

    def prefault_host(self) -> bool:
        """Fault the whole host tier's memory in now (its pages are touched without changing a
        byte, so this is safe at any time), so the first copies into it (a checkpoint's
        snapshot, a model's first units) do not pay page faults. It commits the tier's budget of
        RAM. False where the kernel cannot do it safely."""
        self._check_open()
        return self.arena.populate()

    # -- eviction, migration, deletion ---------------------------------------------
    def trim(self) -> int:
        """Drop every cached host copy that nobody pins and no read is filling; returns how many.

        Eviction on demand frees only as much as the policy picks, and a copy that is pinned again
        (a cache hit) stays where it was: after trim() the host tier's free space is all but what
        is pinned or loading, merged, for a group of buffers that must fit together."""
        self._check_open()
        dropped = []
        with self._lock:
            for key, meta in self._objects.items():
                if self._evictable(key):
                    self._drop_host(meta)
                    self.counters.evictions += 1
                    dropped.append(meta)
        for meta in dropped:
            self._emit(meta.key, meta.nbytes, "evict", meta.kind, "host")
        return len(dropped)

    def evict(self, key: str, tier: str = "host") -> bool:
        """Drop the cached copy of ``key`` from ``tier``; False when it is pinned or not there."""
        self._check_open()
        if tier != "host":
            raise StoreError(f"evict({key!r}, {tier!r}): only cached copies can be evicted; "
                             "use migrate() to move an object's home between storage tiers")
        with self._lock:
            meta = self._objects.get(key)
            if meta is None:
                raise KeyError(f"no object {key!r}")
            if meta.host is None or not meta.host.ready or meta.host.pins:
                return False
            self._drop_host(meta)
            self.counters.evictions += 1
        self._emit(key, meta.nbytes, "evict", meta.kind, "host")
        return True
