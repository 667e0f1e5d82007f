"""Per-operation counters of an engine: bytes, requests, errors, latency percentiles."""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

_SAMPLES = 20_000  # latency samples kept per op (a sliding window)


class OpCounters:
    __slots__ = ("requests", "bytes", "chunks", "errors", "cancelled", "direct_bytes",
                 "buffered_bytes", "bounced_bytes", "latencies")

    def __init__(self) -> None:
        self.requests = self.bytes = self.chunks = self.errors = self.cancelled = 0
        self.direct_bytes = self.buffered_bytes = self.bounced_bytes = 0
        self.latencies: deque[float] = deque(maxlen=_SAMPLES)

    def summary(self) -> dict:
        lat = np.fromiter(self.latencies, dtype=np.float64) * 1e6
        pct = {f"p{p}_us": float(np.percentile(lat, p)) if lat.size else 0.0 for p in (50, 90, 99)}
        return {
            "requests": self.requests, "bytes": self.bytes, "chunks": self.chunks,
            "errors": self.errors, "cancelled": self.cancelled,
            "direct_bytes": self.direct_bytes, "buffered_bytes": self.buffered_bytes,
            "bounced_bytes": self.bounced_bytes,
            "mean_us": float(lat.mean()) if lat.size else 0.0, **pct,
        }


class EngineStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.ops = {"read": OpCounters(), "write": OpCounters()}

    def transfer(self, op: str, nbytes: int, *, direct: bool, bounced: int = 0) -> None:
        with self._lock:
            c = self.ops[op]
            c.chunks += 1
            if direct:
                c.direct_bytes += nbytes
            else:
                c.buffered_bytes += nbytes
            c.bounced_bytes += bounced

    def finished(self, op: str, nbytes: int, seconds: float, *, error: bool, cancelled: bool) -> None:
        with self._lock:
            c = self.ops[op]
            if cancelled:
                c.cancelled += 1
                return
            c.requests += 1
            if error:
                c.errors += 1
            else:
                c.bytes += nbytes
                c.latencies.append(seconds)

    def whole_direct_read(self, nbytes: int, seconds: float) -> None:
        """A read request done in one O_DIRECT transfer: ``transfer`` and ``finished`` under one lock."""
        with self._lock:
            c = self.ops["read"]
            c.chunks += 1
            c.direct_bytes += nbytes
            c.requests += 1
            c.bytes += nbytes
            c.latencies.append(seconds)

    def summary(self) -> dict:
        with self._lock:
            return {op: c.summary() for op, c in self.ops.items()}
