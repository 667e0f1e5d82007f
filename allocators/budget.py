"""Byte budgets: the hard capacity of a tier, with wait-or-fail admission.

A budget is only accounting; it owns no memory. The host arena and the
device budget both use it so that "over budget" means the same thing, and
reports (in use, peak) look the same, on every tier.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


class OutOfBudget(MemoryError):
    """A reservation did not fit the budget within the allowed wait."""


@dataclass(frozen=True)
class BudgetStats:
    name: str
    capacity: int
    in_use: int
    peak: int
    reservations: int
    waits: int
    failures: int


class Budget:
    """A thread-safe byte budget.

    ``reserve(n, timeout=0)`` fails at once when ``n`` does not fit;
    ``timeout=None`` waits forever and ``timeout>0`` waits that long for
    other holders to ``release``. A reservation larger than the whole
    capacity can never succeed and fails at once whatever the timeout.
    """

    def __init__(self, capacity: int, name: str = "budget") -> None:
        if capacity < 0:
            raise ValueError(f"{name}: capacity must be >= 0, got {capacity}")
        self.name = name
        self.capacity = int(capacity)
        self._in_use = 0
        self._peak = 0
        self._reservations = 0
        self._waits = 0
        self._failures = 0
        self._cond = threading.Condition()

    def reserve(self, nbytes: int, timeout: float | None = 0.0) -> None:
        if nbytes < 0:
            raise ValueError(f"{self.name}: cannot reserve {nbytes} bytes")
        with self._cond:
            if nbytes > self.capacity:
                self._failures += 1
                raise OutOfBudget(
                    f"{self.name}: {nbytes} bytes requested but the whole budget is "
                    f"{self.capacity} bytes"
                )
            if not self._fits(nbytes):
                if timeout == 0:
                    self._failures += 1
                    raise OutOfBudget(self._full_message(nbytes))
                self._waits += 1
                deadline = None if timeout is None else time.monotonic() + timeout
                while not self._fits(nbytes):
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        self._failures += 1
                        raise OutOfBudget(self._full_message(nbytes) + f" (waited {timeout} s)")
                    self._cond.wait(remaining)
            self._take(nbytes)

    def try_reserve(self, nbytes: int) -> bool:
        """Reserve if it fits now; never waits, never raises for a full budget."""
        with self._cond:
            if nbytes <= self.capacity and self._fits(nbytes):
                self._take(nbytes)
                return True
            return False

    def release(self, nbytes: int) -> None:
        with self._cond:
            if nbytes > self._in_use:
                raise RuntimeError(
                    f"{self.name}: releasing {nbytes} bytes but only {self._in_use} are reserved"
                )
            self._in_use -= nbytes
            self._cond.notify_all()

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def free(self) -> int:
        return self.capacity - self._in_use

    def stats(self) -> BudgetStats:
        with self._cond:
            return BudgetStats(
                self.name, self.capacity, self._in_use, self._peak,
                self._reservations, self._waits, self._failures,
            )

    def _fits(self, nbytes: int) -> bool:
        return self._in_use + nbytes <= self.capacity

    def _take(self, nbytes: int) -> None:
        self._in_use += nbytes
        self._reservations += 1
        self._peak = max(self._peak, self._in_use)

    def _full_message(self, nbytes: int) -> str:
        return (
            f"{self.name}: {nbytes} bytes requested, {self.capacity - self._in_use} of "
            f"{self.capacity} bytes free"
        )
