"""The carving shared by the host and the device arena: one fixed region, exact-size buffers,
per-owner accounting and guaranteed shares.

Both arenas hand out aligned pieces of one region placed by a :class:`FreeList`, wait (up to a
timeout) when nothing fits, and report the same figures; only how the region is mapped and
viewed differs. Every buffer is charged to an *owner* (a workload: ``"kv"``, ``"optim"``...),
so the tier can say who holds what, and an owner may hold a *share*: bytes the others may not
take while it does not use them. An allocation is admitted only if, after it, the bytes in use
plus every other owner's unused share still fit the capacity, so a share is a guarantee of
room (not of content: cached data inside a share may still be evicted by its tier).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from .budget import OutOfBudget
from .freelist import FreeList

#: the owner charged when an allocation names none
NO_OWNER = "-"


PAGE = 4096


def align_up(n: int, alignment: int = PAGE) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class OwnerStats:
    """One owner's use of an arena: bytes it ``held`` now, its ``peak``, its ``reserved`` share."""

    held: int
    peak: int
    reserved: int
    buffers: int


class _Owner:
    __slots__ = ("held", "peak", "share", "buffers")

    def __init__(self) -> None:
        self.held = self.peak = self.share = self.buffers = 0


class Arena:
    """A fixed-capacity region carved into exact-size buffers (see the module docstring).

    Subclasses map the region (``_map``/``_unmap``), build buffers (``_buffer``) and may place
    them differently (``_take``).
    """

    def __init__(self, capacity: int, alignment: int, name: str) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"{name}: alignment must be a power of two, got {alignment}")
        if capacity <= 0:
            raise ValueError(f"{name}: arena capacity must be > 0, got {capacity}")
        self.name = name
        self.alignment = alignment
        self.capacity = align_up(int(capacity), alignment)
        self._cond = threading.Condition()
        self._changes = 0  # bumped by every free and notify(): see wait_change()
        self._free_list = FreeList(0)
        self._in_use = 0
        self._peak = 0
        self._buffers = 0
        self._owners: dict[str, _Owner] = {}

    # -- what subclasses provide ------------------------------------------------------
    @property
    def is_open(self) -> bool:
        raise NotImplementedError

    def _buffer(self, offset: int, nbytes: int, reserved: int, owner: str):
        raise NotImplementedError

    def _take(self, reserved: int) -> int | None:
        return self._free_list.take(reserved)

    def _reset(self) -> None:
        """Called by a subclass's ``open`` once the region exists: all of it is free."""
        self._free_list = FreeList(self.capacity)

    # -- allocation ----------------------------------------------------------------
    def alloc(self, nbytes: int, timeout: float | None = 0.0, *, owner: str = NO_OWNER):
        """An aligned buffer of exactly ``nbytes`` charged to ``owner``.

        ``timeout=0`` fails at once with :class:`OutOfBudget` when no free block fits (or taking
        one would eat into another owner's share); ``None`` waits indefinitely; a positive value
        waits that long.
        """
        if not self.is_open:
            raise RuntimeError(f"{self.name}: arena is not open")
        if nbytes < 0:
            raise ValueError(f"{self.name}: cannot allocate {nbytes} bytes")
        reserved = align_up(max(nbytes, 1), self.alignment)
        if reserved > self.capacity:
            raise OutOfBudget(f"{self.name}: {nbytes} bytes requested but the arena holds {self.capacity} bytes")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                offset = self._take(reserved) if self._admits(owner, reserved) else None
                if offset is not None:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise OutOfBudget(self._full_message(owner, reserved))
                self._cond.wait(remaining)
            self._charge(owner, reserved)
        return self._buffer(offset, nbytes, reserved, owner)

    def try_alloc(self, nbytes: int, *, owner: str = NO_OWNER):
        try:
            return self.alloc(nbytes, timeout=0, owner=owner)
        except OutOfBudget:
            return None

    def _admits(self, owner: str, reserved: int) -> bool:
        return self._in_use + reserved + self._held_back(owner) <= self.capacity

    def limit_for(self, owner: str) -> int:
        """The most ``owner`` could hold if every other owner held nothing beyond its share:
        the capacity less the others' unused shares."""
        with self._cond:
            return self.capacity - self._held_back(owner)

    def over_share(self) -> dict[str, int]:
        """Per owner, the bytes it holds beyond its share: what giving memory back to another
        owner can free (bytes within a share stay kept for their owner even when freed)."""
        with self._cond:
            return {n: o.held - o.share for n, o in self._owners.items() if o.held > o.share}

    def _held_back(self, owner: str) -> int:
        """Bytes kept free for other owners' shares."""
        return sum(max(0, o.share - o.held) for name, o in self._owners.items() if name != owner)

    def _charge(self, owner: str, reserved: int) -> None:
        self._in_use += reserved
        self._peak = max(self._peak, self._in_use)
        self._buffers += 1
        o = self._owners.get(owner)
        if o is None:
            o = self._owners[owner] = _Owner()
        o.held += reserved
        o.peak = max(o.peak, o.held)
        o.buffers += 1

    def _free(self, offset: int, size: int, owner: str = NO_OWNER) -> None:
        with self._cond:
            self._free_list.give(offset, size)
            self._in_use -= size
            self._buffers -= 1
            o = self._owners[owner]
            o.held -= size
            o.buffers -= 1
            self._changes += 1
            self._cond.notify_all()

    def _full_message(self, owner: str, reserved: int) -> str:
        kept = self._held_back(owner)
        msg = (f"{self.name}: no free block of {reserved} bytes for owner {owner!r} "
               f"({self.capacity - self._in_use} of {self.capacity} bytes free, "
               f"largest free block {self._free_list.largest()} bytes")
        if kept:
            msg += f", {kept} bytes kept for other owners' shares: {self._describe_owners()}"
        return msg + ")"

    def _describe_owners(self) -> str:
        return ", ".join(f"{n} holds {o.held} of share {o.share}" for n, o in sorted(self._owners.items())
                         if o.held or o.share)

    # -- shares ----------------------------------------------------------------------
    def set_share(self, owner: str, nbytes: int) -> None:
        """Guarantee ``owner`` room for ``nbytes`` (0: no guarantee; it competes for what is free).

        Refused with :class:`OutOfBudget` when the shares would overcommit the arena, or when the
        bytes other owners hold already leave no room for it.
        """
        nbytes = align_up(int(nbytes), self.alignment) if nbytes > 0 else 0
        with self._cond:
            o = self._owners.get(owner)
            if o is None:
                o = self._owners[owner] = _Owner()
            others = sum(x.share for n, x in self._owners.items() if n != owner)
            if nbytes and (others + nbytes > self.capacity or
                           self._in_use - o.held + self._held_back(owner) + max(nbytes, o.held) > self.capacity):
                raise OutOfBudget(
                    f"{self.name}: cannot reserve {nbytes} bytes for owner {owner!r}: the arena holds "
                    f"{self.capacity} bytes, {others} are reserved by other owners and "
                    f"{self._in_use - o.held} are in use by them ({self._describe_owners() or 'none'})")
            o.share = nbytes
            self._changes += 1
            self._cond.notify_all()

    def owners(self) -> dict[str, OwnerStats]:
        """Per owner: held, peak and reserved bytes (owners that never allocated nor reserved are absent)."""
        with self._cond:
            return {n: OwnerStats(o.held, o.peak, o.share, o.buffers) for n, o in self._owners.items()}

    # -- waiting for room --------------------------------------------------------------
    @property
    def changes(self) -> int:
        """A counter of frees and :meth:`notify` calls (read it before trying to find room)."""
        return self._changes

    def notify(self) -> None:
        """Wake :meth:`wait_change` waiters without freeing anything (an owner of buffers made
        some of them freeable, e.g. a cache whose entries became evictable)."""
        with self._cond:
            self._changes += 1
            self._cond.notify_all()

    def wait_change(self, seen: int, timeout: float) -> bool:
        """Wait until :attr:`changes` differs from ``seen`` (a free or a notify since it was
        read), at most ``timeout`` seconds; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._changes != seen, timeout)

    def rewind(self) -> None:
        """Make the next large buffers come from the largest free block, one after another
        (for a group of buffers that must fit together, e.g. the tensors of one unit)."""
        with self._cond:
            self._free_list.rewind()

    # -- reporting -----------------------------------------------------------------
    @property
    def in_use(self) -> int:
        return self._in_use

    def _largest_free(self) -> int:
        return self._free_list.largest()
