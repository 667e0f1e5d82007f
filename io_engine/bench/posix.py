"""The device limit without the engine: threads doing O_DIRECT ``os.preadv``/``os.pwritev``."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np

from .common import GB, BenchError, wait_timeout


def posix_read(path: str, size: int, slots: list[np.ndarray], workers: int, bs: int) -> dict:
    """The device limit without the engine: ``workers`` threads, O_DIRECT ``os.preadv`` of ``bs``.

    Request ``k`` covers file bytes ``[k*bs, (k+1)*bs)`` and lands in the slot
    window the engine would use, so buffers and request sizes match the engine's.
    The first stamp of each request is checked.
    """
    return _posix_transfer(path, size, slots, workers, bs, write=False)


def posix_write(path: str, size: int, slots: list[np.ndarray], workers: int, bs: int) -> dict:
    """The write limit without the engine: ``workers`` threads of O_DIRECT ``os.pwritev`` of ``bs``
    from the huge-page arena, then fdatasync (timed). Writes the slots as they are; the engine
    write that follows restores the verified pattern."""
    return _posix_transfer(path, size, slots, workers, bs, write=True)


def _posix_transfer(path: str, size: int, slots: list[np.ndarray], workers: int, bs: int, *, write: bool) -> dict:
    window = len(slots[0])
    if window % bs:
        bs = window  # keep requests inside one slot
    flags = (os.O_WRONLY if write else os.O_RDONLY) | getattr(os, "O_DIRECT", 0) | os.O_CLOEXEC
    fd = os.open(path, flags)
    op = "write" if write else "read"
    lock = threading.Lock()
    nreq = (size + bs - 1) // bs
    state: dict[str, Any] = {"next": 0, "error": None}

    def worker() -> None:
        while True:
            with lock:
                k = state["next"]
                if k >= nreq or state["error"] is not None:
                    return
                state["next"] = k + 1
            off = k * bs
            n = min(bs, size - off)
            slot = slots[(off // window) % len(slots)]
            view = slot[off % window : off % window + n]
            try:
                pos = 0
                while pos < n:
                    got = (os.pwritev if write else os.preadv)(fd, [view[pos:]], off + pos)
                    if got <= 0:
                        raise BenchError(f"{path}: short {op} at offset {off + pos}")
                    pos += got
                if not write and int(view[:8].view(np.uint64)[0]) != off:
                    raise BenchError(f"{path}: posix read at offset {off} returned the wrong block")
            except BaseException as e:  # noqa: BLE001 - re-raised below
                with lock:
                    state["error"] = state["error"] or e
                return

    threads = [threading.Thread(target=worker, name=f"bench-posix-{op}-{i}", daemon=True) for i in range(workers)]
    t0 = time.perf_counter()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(wait_timeout(size))
            if t.is_alive():
                raise BenchError(f"posix {op} of {path} did not finish in {wait_timeout(size):.0f} s")
        if write and state["error"] is None:
            os.fdatasync(fd)
    finally:
        seconds = time.perf_counter() - t0
        os.close(fd)
    if state["error"] is not None:
        raise BenchError(f"posix {op} failed: {state['error']}")
    return {"gbps": size / seconds / GB, "seconds": seconds, "bs": bs, "workers": workers}
