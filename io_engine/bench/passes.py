"""The engine's own passes: sequential write/verified read through a few slots, and 64 KiB
random reads kept queued on the engine until a deadline."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from ..engine import IOEngine
from .common import GB, RAND_BS, BenchError, Progress, wait_timeout, windows
from .pattern import Pattern


def engine_seq(
    engine: IOEngine, path: str, size: int, slots: list[np.ndarray], pattern: Pattern, *,
    write: bool, progress: Progress, what: str,
) -> dict:
    """One timed sequential pass (write incl. fsync, or verified read) through the slots."""
    wins = windows(size, len(slots[0]))
    if write:
        for s in slots:
            pattern.fill(s)
    engine.reset_stats()
    inflight: list[tuple[Any, int, int, int]] = []  # (future, slot index, offset, n)
    done_bytes = verified = 0
    nxt = 0

    def submit(slot_i: int) -> None:
        nonlocal nxt
        off, n = wins[nxt]
        nxt += 1
        buf = slots[slot_i]
        if write:
            pattern.stamp(buf, off, n)
            fut = engine.write(path, off, buf, n)
        else:
            fut = engine.read(path, off, buf, n)
        inflight.append((fut, slot_i, off, n))

    t0 = time.perf_counter()
    for i in range(min(len(slots), len(wins))):
        submit(i)
    while inflight:
        fut, slot_i, off, n = inflight.pop(0)
        fut.result(timeout=wait_timeout(n))
        if not write:
            verified += pattern.verify(slots[slot_i], off, n, path)
        done_bytes += n
        if nxt < len(wins):
            submit(slot_i)
        progress.update(what, done_bytes, size)
    if write:
        engine.fsync(path)
    seconds = time.perf_counter() - t0
    st = engine.stats()["write" if write else "read"]
    return {
        "gbps": size / seconds / GB, "seconds": seconds, "bytes": size,
        "direct_bytes": st["direct_bytes"], "buffered_bytes": st["buffered_bytes"],
        "bounced_bytes": st["bounced_bytes"], "verified_blocks": verified,
    }


class RandLoop:
    """Keeps ``depth`` 64 KiB random reads queued on the engine until the deadline.

    Each completion (in the engine's worker thread) checks the block's stamp
    and submits the next read into the same slot, so the caller's thread does
    nothing while it runs. A thread-local trampoline avoids recursion when a
    future is already complete as its callback is attached.
    """

    def __init__(self, engine: IOEngine, path: str, size: int, slots: list[np.ndarray],
                 seconds: float, seed: int) -> None:
        self.engine, self.path, self.slots = engine, path, slots
        nblocks = size // RAND_BS
        if nblocks < 1:
            raise BenchError(f"file of {size} bytes is too small for {RAND_BS}-byte random reads")
        rng = np.random.default_rng(seed)
        self.offsets = (rng.integers(0, nblocks, size=1 << 20, dtype=np.int64) * RAND_BS).tolist()
        self.seconds = seconds
        self._i = 0
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._outstanding = 0
        self.completed = 0
        self.error: BaseException | None = None
        self._tls = threading.local()
        self.deadline = 0.0

    def _next_offset(self) -> int:
        with self._lock:
            off = self.offsets[self._i]
            self._i = (self._i + 1) % len(self.offsets)
            return off

    def _submit(self, slot: int) -> None:
        tls = self._tls
        if getattr(tls, "active", False):
            tls.pending.append(slot)
            return
        tls.active, tls.pending = True, [slot]
        try:
            while tls.pending:
                s = tls.pending.pop()
                off = self._next_offset()
                try:
                    fut = self.engine.read(self.path, off, self.slots[s], RAND_BS)
                except BaseException as e:  # noqa: BLE001 - reported by run()
                    self._finish(e)
                    continue
                fut.add_done_callback(lambda f, s=s, off=off: self._on_done(f, s, off))
        finally:
            tls.active = False

    def _finish(self, err: BaseException | None) -> None:
        with self._lock:
            if err is not None and self.error is None:
                self.error = err
            self._outstanding -= 1
            last = self._outstanding == 0
        if last:
            self._done.set()

    def _on_done(self, fut, slot: int, off: int) -> None:
        err = fut.exception()
        if err is None:
            stamp = int(self.slots[slot][:8].view(np.uint64)[0])
            if stamp != off:
                err = BenchError(f"{self.path}: 64 KiB read at offset {off} returned the block stamped {stamp}")
        if err is not None:
            self._finish(err)
            return
        with self._lock:
            self.completed += 1
            go_on = self.error is None and time.perf_counter() < self.deadline
        if go_on:
            self._submit(slot)
        else:
            self._finish(None)

    def run(self) -> dict:
        self.engine.reset_stats()
        self._outstanding = len(self.slots)
        t0 = time.perf_counter()
        self.deadline = t0 + self.seconds
        for s in range(len(self.slots)):
            self._submit(s)
        if not self._done.wait(self.seconds + 120):
            raise BenchError(f"random reads of {self.path} did not finish within {self.seconds + 120:.0f} s")
        seconds = time.perf_counter() - t0
        if self.error is not None:
            raise BenchError(f"random read failed: {self.error}") from self.error
        st = self.engine.stats()["read"]
        return {
            "iops": self.completed / seconds, "gbps": self.completed * RAND_BS / seconds / GB,
            "ios": self.completed, "seconds": seconds, "queued": len(self.slots),
            "p50_us": st["p50_us"], "p99_us": st["p99_us"], "buffered_bytes": st["buffered_bytes"],
        }
