"""Host memory for checkpoints: buffers of the store's host tier, at most ``cap`` bytes at once.

The checkpointer owns no memory of its own: snapshots and reads take buffers from
``TieredStore.alloc_host`` (which evicts cached copies to make room), and a byte budget
of ``host_buffer`` bounds how much of the host tier it holds at a time, so training's
own cached objects keep the rest.
"""

from __future__ import annotations

import time

from allocators import PAGE, Budget, HostBuffer, OutOfBudget, align_up

from .format import SEGMENT


class CheckpointHost:
    """Buffers of ``store``'s host tier for one checkpointer, within a budget of ``cap`` bytes."""

    def __init__(self, store, cap: int) -> None:
        self.store = store
        self.budget = Budget(min(cap, store.arena.capacity), name="checkpoint host_buffer")

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
            return self.store.alloc_host(nbytes, wait=0)
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
            return self.store.alloc_host(nbytes, wait=max(0.0, deadline - time.monotonic()))
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
        """Touch the free memory of the host tier now, so the first snapshots' copies do not run
        into page faults (on a busy machine they made the first snapshot ~5x slower, and the
        optimizer step waited for it). All of it, not just ``host_buffer``: the arena hands large
        buffers out ring-wise, so successive snapshots walk the whole tier anyway; this only
        touches it earlier. Cached copies are not evicted for it. Returns the bytes touched."""
        arena, bufs, size = self.store.arena, [], SEGMENT
        try:
            while size >= PAGE:
                buf = arena.try_alloc(size)
                if buf is None:
                    size //= 2  # what is left is in smaller free blocks
                    continue
                buf.array[::PAGE] = 0
                bufs.append(buf)
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
