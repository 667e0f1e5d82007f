"""A fault-injecting backend for tests: failures, short transfers, stalls and delays on demand.

``FaultyBackend`` wraps a real backend (``ThreadsBackend`` by default) and,
before each call, checks its rules in order. A rule matches by operation
(``"read"``, ``"write"``, ``"fsync"`` or ``"open"``), optionally by a
substring of the path and by a byte range of the file, and applies to the
first ``times`` matching calls (``None``: every one) after letting the first
``skip`` through::

    fb = FaultyBackend(rules=[FaultyBackend.fail("write", errno.ENOSPC, path="x", times=1)])
    fb.short("read", max_bytes=8192)          # on an instance: adds the rule, returns it
    fb.delay("read", seconds=0.05)
    with IOEngine(fb, workers=1) as engine: ...

Actions:

* ``fail(op, err)``: raise ``OSError(err)`` instead of doing the call.
* ``short(op, max_bytes)``: transfer at most ``max_bytes`` bytes (the engine must
  loop for the rest). On an O_DIRECT handle the cap is rounded down to a whole
  4 KiB page (at least one) so the kernel still accepts the transfer.
* ``no_progress(op)``: report a zero-byte transfer without doing it.
* ``delay(op, seconds)``: sleep, then do the call (combines with the other actions).
* ``gate(op)``: wait until ``rule.event`` is set (at most ``timeout`` s), then do the call;
  ``rule.entered`` tells the test that a transfer is parked there.
* ``no_direct(path)``: opening with O_DIRECT fails with EINVAL, as on a filesystem
  without O_DIRECT; the engine must fall back to buffered I/O.

Delay and gate rules all apply; of the other rules the first that matches
wins. Every rule counts its applications in ``hits`` and sets ``entered``
when first applied. The wrapper is thread-safe and has the capability flags
of the backend it wraps, including ``is_async`` (then ``apread``/``apwrite``
apply the same rules, sleeping on the event loop) and ``submits_batches`` (then
``queue(depth)`` wraps the kernel queue and applies them per submitted transfer).
"""

from __future__ import annotations

import asyncio
import errno as _errno
import functools
import os
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from .backends.base import Backend

_PAGE = 4096
_OPS = ("read", "write", "fsync", "open")
_ACTIONS = ("fail", "short", "zero", "delay", "gate")


@dataclass(eq=False)
class Rule:
    """One injected behaviour; see the module docstring. Build with the ``FaultyBackend`` helpers."""

    op: str
    action: str
    err: int = _errno.EIO
    path: str | None = None
    offset: tuple[int, int] | None = None  # [start, end) of the file; a transfer overlapping it matches
    times: int | None = None  # apply to this many matching calls; None: all
    skip: int = 0  # let this many matching calls through first
    max_bytes: int = 0
    seconds: float = 0.0
    direct: bool | None = None  # for "open": match only direct (True) / buffered (False) opens
    event: threading.Event = field(default_factory=threading.Event)  # "gate": set to let calls through
    entered: threading.Event = field(default_factory=threading.Event)  # set when first applied
    hits: int = 0
    seen: int = 0

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"rule op must be one of {_OPS}, got {self.op!r}")
        if self.action not in _ACTIONS:
            raise ValueError(f"rule action must be one of {_ACTIONS}, got {self.action!r}")
        if isinstance(self.offset, int):
            self.offset = (self.offset, self.offset + 1)
        if self.action == "short" and self.max_bytes <= 0:
            raise ValueError("a short rule needs max_bytes > 0")

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def release(self) -> None:
        """Open a gate rule's gate."""
        self.event.set()

    def _matches(self, op: str, path: str, offset: int | None, nbytes: int, direct: bool | None) -> bool:
        if op != self.op or self.exhausted:
            return False
        if self.path is not None and self.path not in path:
            return False
        if self.offset is not None and offset is not None:
            lo, hi = self.offset
            if not (offset < hi and offset + max(nbytes, 1) > lo):
                return False
        if self.direct is not None and direct is not None and self.direct != direct:
            return False
        return True


class _RuleMaker:
    """``FaultyBackend.fail(...)`` builds a Rule; ``backend.fail(...)`` also adds it to that backend."""

    def __init__(self, fn: Callable[..., Rule]) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __get__(self, obj: "FaultyBackend | None", cls=None):
        if obj is None:
            return self.fn

        @functools.wraps(self.fn)
        def add(*args, **kwargs) -> Rule:
            return obj.add(self.fn(*args, **kwargs))

        return add


@dataclass
class _Handle:
    inner: Any
    path: str
    write: bool
    direct: bool


class FaultyBackend(Backend):
    """A Backend that forwards to ``inner`` but injects the faults its rules describe."""

    def __init__(self, inner: Backend | None = None, *, rules: list[Rule] | tuple[Rule, ...] = ()) -> None:
        if inner is None:
            from .backends.threads import ThreadsBackend

            inner = ThreadsBackend()
        self.inner = inner
        self.name = f"faulty:{inner.name}"
        self.supports_host_buffers = inner.supports_host_buffers
        self.supports_device_buffers = inner.supports_device_buffers
        self.is_async = inner.is_async
        self.submits_batches = getattr(inner, "submits_batches", False)
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self.calls: Counter[str] = Counter()  # op -> calls seen (faulty or not)
        self.events: deque[tuple[str, str, str, int | None, int]] = deque(maxlen=10_000)
        for r in rules:
            self.add(r)

    # -- rules -----------------------------------------------------------------------
    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        with self._lock:
            self._rules.remove(rule)

    def clear(self) -> None:
        """Drop every rule (opening any gates first, so nothing stays parked)."""
        with self._lock:
            rules, self._rules = self._rules, []
        for r in rules:
            r.event.set()

    @property
    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    @_RuleMaker
    def fail(op: str, err: int = _errno.EIO, *, path: str | None = None, offset=None,
             times: int | None = None, skip: int = 0) -> Rule:
        """Raise ``OSError(err)`` for matching calls."""
        return Rule(op, "fail", err=err, path=path, offset=offset, times=times, skip=skip)

    @_RuleMaker
    def short(op: str, max_bytes: int, *, path: str | None = None, offset=None,
              times: int | None = None, skip: int = 0) -> Rule:
        """Transfer at most ``max_bytes`` per matching call (page-rounded on O_DIRECT handles)."""
        return Rule(op, "short", max_bytes=max_bytes, path=path, offset=offset, times=times, skip=skip)

    @_RuleMaker
    def no_progress(op: str, *, path: str | None = None, offset=None,
                    times: int | None = None, skip: int = 0) -> Rule:
        """Return 0 bytes transferred without touching the file."""
        return Rule(op, "zero", path=path, offset=offset, times=times, skip=skip)

    @_RuleMaker
    def delay(op: str, seconds: float, *, path: str | None = None, offset=None,
              times: int | None = None, skip: int = 0) -> Rule:
        """Sleep ``seconds`` before doing matching calls."""
        return Rule(op, "delay", seconds=seconds, path=path, offset=offset, times=times, skip=skip)

    @_RuleMaker
    def gate(op: str, *, path: str | None = None, offset=None, times: int | None = None,
             skip: int = 0, timeout: float = 30.0) -> Rule:
        """Park matching calls until ``rule.release()`` (or ``timeout`` s), then do them."""
        return Rule(op, "gate", seconds=timeout, path=path, offset=offset, times=times, skip=skip)

    @_RuleMaker
    def no_direct(*, path: str | None = None, times: int | None = None) -> Rule:
        """O_DIRECT opens fail with EINVAL (a filesystem without O_DIRECT)."""
        return Rule("open", "fail", err=_errno.EINVAL, path=path, times=times, direct=True)

    def _select(self, op: str, path: str, offset: int | None, nbytes: int,
                direct: bool | None) -> tuple[list[Rule], Rule | None]:
        """The waiting rules (delay/gate) and the one other rule to apply to this call."""
        waits: list[Rule] = []
        chosen: Rule | None = None
        with self._lock:
            self.calls[op] += 1
            for r in self._rules:
                if (r.action not in ("delay", "gate") and chosen is not None) or \
                        not r._matches(op, path, offset, nbytes, direct):
                    continue
                r.seen += 1
                if r.seen <= r.skip:
                    continue
                r.hits += 1
                r.entered.set()
                if r.action in ("delay", "gate"):
                    waits.append(r)
                else:
                    chosen = r
            self.events.append((op, chosen.action if chosen else "ok", path, offset, nbytes))
        return waits, chosen

    @staticmethod
    def _cap(rule: Rule | None, nbytes: int, direct: bool) -> int | None:
        """The byte count to hand to the inner backend (None: the whole buffer), or raise."""
        if rule is None:
            return None
        if rule.action == "fail":
            raise OSError(rule.err, f"{os.strerror(rule.err)} (injected)")
        if rule.action == "zero":
            return 0
        cap = rule.max_bytes
        if direct:
            cap = max(_PAGE, cap - cap % _PAGE)
        return cap if cap < nbytes else None

    def _before(self, op: str, h: _Handle | None, offset: int | None, nbytes: int) -> int | None:
        waits, chosen = self._select(op, h.path if h else "", offset, nbytes, None)
        for r in waits:
            if r.action == "delay":
                time.sleep(r.seconds)
            else:
                r.event.wait(r.seconds)
        return self._cap(chosen, nbytes, bool(h and h.direct))

    async def _abefore(self, op: str, h: _Handle, offset: int, nbytes: int) -> int | None:
        waits, chosen = self._select(op, h.path, offset, nbytes, None)
        for r in waits:
            if r.action == "delay":
                await asyncio.sleep(r.seconds)
            else:
                await asyncio.get_running_loop().run_in_executor(None, r.event.wait, r.seconds)
        return self._cap(chosen, nbytes, h.direct)

    # -- Backend ---------------------------------------------------------------------
    def start(self, workers: int) -> None:
        self.inner.start(workers)

    def stop(self) -> None:
        self.inner.stop()

    def open(self, path: str, *, write: bool, direct: bool) -> _Handle:
        waits, chosen = self._select("open", path, None, 0, direct)
        for r in waits:
            time.sleep(r.seconds) if r.action == "delay" else r.event.wait(r.seconds)
        if chosen is not None:
            if chosen.action != "fail":
                raise ValueError(f"open rules can only fail, got {chosen.action!r}")
            raise OSError(chosen.err, f"{os.strerror(chosen.err)} (injected)", path)
        return _Handle(self.inner.open(path, write=write, direct=direct), path, write, direct)

    def pread(self, handle: _Handle, buf, offset: int) -> int:
        n = self._before("read", handle, offset, len(buf))
        if n == 0:
            return 0
        return self.inner.pread(handle.inner, buf if n is None else buf[:n], offset)

    def pwrite(self, handle: _Handle, buf, offset: int) -> int:
        n = self._before("write", handle, offset, len(buf))
        if n == 0:
            return 0
        return self.inner.pwrite(handle.inner, buf if n is None else buf[:n], offset)

    async def apread(self, handle: _Handle, buf, offset: int) -> int:
        n = await self._abefore("read", handle, offset, len(buf))
        if n == 0:
            return 0
        view = buf if n is None else buf[:n]
        if hasattr(self.inner, "apread"):
            return await self.inner.apread(handle.inner, view, offset)
        return self.inner.pread(handle.inner, view, offset)

    async def apwrite(self, handle: _Handle, buf, offset: int) -> int:
        n = await self._abefore("write", handle, offset, len(buf))
        if n == 0:
            return 0
        view = buf if n is None else buf[:n]
        if hasattr(self.inner, "apwrite"):
            return await self.inner.apwrite(handle.inner, view, offset)
        return self.inner.pwrite(handle.inner, view, offset)

    def fsync(self, handle: _Handle) -> None:
        self._before("fsync", handle, None, 0)  # a fail rule raises; short/zero mean nothing here
        self.inner.fsync(handle.inner)

    async def afsync(self, handle: _Handle) -> None:
        await self._abefore("fsync", handle, None, 0)
        if hasattr(self.inner, "afsync"):
            await self.inner.afsync(handle.inner)
        else:
            self.inner.fsync(handle.inner)

    def close(self, handle: _Handle) -> None:
        self.inner.close(handle.inner)

    def queue(self, depth: int) -> "_FaultyQueue":
        """The inner backend's kernel queue, with the rules applied to each transfer as it is submitted."""
        return _FaultyQueue(self, self.inner.queue(depth))

    def __repr__(self) -> str:
        return f"FaultyBackend({self.inner.name}, {len(self.rules)} rules)"


class _FaultyQueue:
    """A kernel queue (see ``backends/rings.py``) behind a FaultyBackend: before a transfer goes to
    the kernel its rules run as for ``pread``/``pwrite`` (delays and gates stall the submitting
    thread, as they stall a worker); failed and zero-byte transfers complete without the kernel."""

    def __init__(self, owner: FaultyBackend, inner: Any) -> None:
        self.owner, self.inner = owner, inner

    def submit_and_wait(self, ops, timeout: float | None) -> list[tuple[int, int]]:
        passed, done = [], []
        for tag, write, h, addr, n, off in ops:
            try:
                cap = self.owner._before("write" if write else "read", h, off, n)
            except OSError as e:
                done.append((tag, -(e.errno or _errno.EIO)))
                continue
            if cap == 0:
                done.append((tag, 0))
                continue
            passed.append((tag, write, h.inner, addr, n if cap is None else cap, off))
        return done + self.inner.submit_and_wait(passed, None if done else timeout)

    def close(self) -> None:
        self.inner.close()


__all__ = ["FaultyBackend", "Rule"]
