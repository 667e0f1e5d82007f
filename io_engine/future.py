"""IOFuture: a concurrent.futures.Future that is also awaitable and has kvikio's ``get()``.

Building on the stdlib future gives tested semantics for free: ``done()``,
``result(timeout)``, ``cancel()`` (only before the request started),
``add_done_callback`` and compatibility with ``concurrent.futures.wait`` and
``asyncio.wrap_future``. Callbacks run in the thread that completes the
request, so they must be short.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Callable


class IOFuture(concurrent.futures.Future):
    def __init__(self, description: str = "") -> None:
        super().__init__()
        self.description = description

    def get(self, timeout: float | None = None) -> Any:
        """kvikio-style alias of ``result``."""
        return self.result(timeout)

    def __await__(self):
        return asyncio.wrap_future(self).__await__()

    def __repr__(self) -> str:
        return f"<IOFuture {self.description} {self._state.lower()}>"


def completed(value: Any, description: str = "") -> IOFuture:
    """A future for work that needed no I/O (e.g. a cache hit)."""
    f = IOFuture(description)
    f.set_result(value)
    return f


def chain(source: concurrent.futures.Future, fn: Callable[[Any], Any], description: str = "",
          note: str | None = None) -> IOFuture:
    """A future for ``fn(source.result())``, run in the thread that completes ``source``.

    An exception from ``source`` or from ``fn`` fails the new future (with
    ``note`` added to it, e.g. which object was being read: the exception keeps
    its type and errno); cancelling the new future cancels ``source`` when it
    has not started.
    """
    out = IOFuture(description or getattr(source, "description", ""))

    def _done(f: concurrent.futures.Future) -> None:
        if f.cancelled():
            out.cancel()
            out.set_running_or_notify_cancel()
            return
        exc = f.exception()
        if exc is not None:
            _fail(out, exc, note)
            return
        try:
            value = fn(f.result())
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
            _fail(out, e, note)
            return
        if out.set_running_or_notify_cancel():
            out.set_result(value)

    _orig_cancel = out.cancel

    def _cancel() -> bool:
        return source.cancel() and _orig_cancel()

    out.cancel = _cancel  # type: ignore[method-assign]
    source.add_done_callback(_done)
    return out


def _fail(out: concurrent.futures.Future, exc: BaseException, note: str | None = None) -> None:
    if note and note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)
    if out.set_running_or_notify_cancel():
        out.set_exception(exc)


def gather(futures: list[concurrent.futures.Future], description: str = "") -> IOFuture:
    """A future for the list of results, completed only when every input is done.

    Waiting for all (even after a failure) matters: the caller may free the
    buffers those requests write into. Fails with the first exception in
    order, or is cancelled if any input was cancelled.
    """
    out = IOFuture(description)
    remaining = [len(futures)]
    lock = threading.Lock()

    def _one(_f) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        if any(f.cancelled() for f in futures):
            out.cancel()
            out.set_running_or_notify_cancel()
            return
        exc = next((f.exception() for f in futures if f.exception() is not None), None)
        if exc is not None:
            _fail(out, exc)
        elif out.set_running_or_notify_cancel():
            out.set_result([f.result() for f in futures])

    if not futures:
        out.set_result([])
    for f in futures:
        f.add_done_callback(_one)
    return out
