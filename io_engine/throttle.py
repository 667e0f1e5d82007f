"""Token-bucket bandwidth limits, so a directory can stand in for a slower device."""

from __future__ import annotations

import threading
import time


class TokenBucket:
    """``rate`` bytes/second with a burst of ``burst`` bytes.

    ``delay(n)`` takes ``n`` bytes of tokens (going into debt if needed) and
    returns how long the caller must sleep before transferring, so that
    sleeping happens outside the bucket's lock and works on threads and on
    an event loop alike.
    """

    def __init__(self, rate: int, burst: int | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"bandwidth limit must be > 0 bytes/s, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate // 10, 1 << 20))
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def delay(self, nbytes: int) -> float:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= nbytes
            return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
