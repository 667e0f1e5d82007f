"""Host memory for checkpoints: buffers of the store's host tier, charged to the checkpointer.

The checkpointer owns no memory of its own: snapshots and reads take buffers through its
reservation of the store's host tier (owner ``checkpoint/<name>``; allocating evicts cached
copies to make room). With a guaranteed share (``host_share``, or the config's
``[owners.checkpoint]`` entry) the share bounds what it holds at once; without one it
competes for free memory, and a byte budget of ``host_buffer`` bounds what it holds, so the
other owners of the tier keep the rest.
"""

from __future__ import annotations

import time

from allocators import PAGE, Budget, HostBuffer, OutOfBudget, align_up

from .format import SEGMENT, CheckpointError


class CheckpointHost:
    """Buffers of ``store``'s host tier for one checkpointer (owner ``owner``), at most ``cap``
    bytes at once, or the reservation's share when it has one."""

    def __init__(self, store, cap: int, owner: str, share: int | str | None = None, *, reserve: bool = True) -> None:
        from ..store import StoreError

        self.store = store
        self.owner = owner
        self.res = None  # reserve=False: an elastic owner without a reservation (several may run at once)
        if reserve:
            try:
                self.res = store.reserve("host", share, owner=owner)
            except StoreError as e:
                raise CheckpointError(f"host memory for the checkpointer {owner!r}: {e}") from e
        capacity = store.arena.capacity
        cap = (self.res.reserved if self.res is not None else 0) or min(cap, capacity)
        self.budget = Budget(cap, name=f"{owner} host buffers")

    def close(self) -> None:
        if self.res is not None:
            self.res.close()

    def _alloc(self, nbytes: int, wait: float):
        if self.res is not None:
            return self.res.alloc(nbytes, wait=wait)
        return self.store.alloc_host(nbytes, wait, owner=self.owner)

    @property
    def capacity(self) -> int:
        return self.budget.capacity

    @property
    def pinned(self) -> bool:
        return self.store.arena.pinned

    def try_alloc(self, nbytes: int) -> HostBuffer | None:
        """A buffer now, or None when the budget or the host tier has no room."""
        size = align_up(max(nbytes, 1))
        if not self.budget.try_reserve(size):
            return None
        try:
            return self._alloc(nbytes, 0)
        except OutOfBudget:
            self.budget.release(size)
            return None
        except BaseException:
            self.budget.release(size)
            raise

    def alloc(self, nbytes: int, timeout: float) -> HostBuffer:
        """A buffer, waiting up to ``timeout`` s for the budget and the host tier; OutOfBudget else."""
        size = align_up(max(nbytes, 1))
        deadline = time.monotonic() + timeout
        self.budget.reserve(size, timeout)
        try:
            return self._alloc(nbytes, max(0.0, deadline - time.monotonic()))
        except BaseException:
            self.budget.release(size)
            raise

    def returned(self, nbytes: int) -> None:
        """A buffer of ``nbytes`` went back to the store (a put that was given it has ended)."""
        self.budget.release(align_up(max(nbytes, 1)))

    def free(self, buf: HostBuffer) -> None:
        n = buf.nbytes
        buf.release()
        self.returned(n)

    def prefault(self) -> int:
        """Touch up to ``capacity`` bytes of free host-tier memory now, charged to this owner, so
        the first snapshot's copies do not run into page faults (on a busy machine they made the
        first snapshot ~5x slower, and the optimizer step waited for it). Only memory free for
        this owner is touched: cached copies are not evicted and other owners' shares are left
        alone. Returns the bytes touched."""
        arena, bufs, size, left = self.store.arena, [], SEGMENT, self.capacity
        try:
            while size >= PAGE and left >= PAGE:
                size = min(size, left // PAGE * PAGE)
                buf = arena.try_alloc(size, owner=self.owner)
                if buf is None:
                    size //= 2  # what is left is in smaller free blocks
                    continue
                buf.array[::PAGE] = 0
                bufs.append(buf)
                left -= buf.reserved
        finally:
            for buf in bufs:
                buf.release()
        return sum(b.nbytes for b in bufs)

    def loans(self) -> "_Loans":
        """An allocator for :func:`._io.read_verified`: its buffers give the budget back on release."""
        return _Loans(self)


class _Loan:
    __slots__ = ("_host", "_buf", "array", "padded")

    def __init__(self, host: CheckpointHost, buf: HostBuffer) -> None:
        self._host, self._buf = host, buf
        self.array, self.padded = buf.array, buf.padded

    def release(self) -> None:
        self.array = self.padded = None
        self._host.free(self._buf)


class _Loans:
    def __init__(self, host: CheckpointHost) -> None:
        self._host = host

    def alloc(self, nbytes: int, timeout: float) -> _Loan:
        return _Loan(self._host, self._host.alloc(nbytes, timeout))
