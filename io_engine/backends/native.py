"""Kernel-queue backends: one engine thread submits and reaps batches through io_uring or Linux AIO.

With ``submits_batches`` set, the engine runs no worker pool: its batch driver
(``io_engine/batch.py``) takes up to ``queue_depth`` pieces off the priority
heap, hands all their transfers to the kernel in one syscall and completes
futures as the kernel reports them, so in-flight depth costs no threads.
Opening files, fsync and the blocking ``pread``/``pwrite`` (used by callers
that drive the backend directly) are the thread backend's.

``native`` uses io_uring where the kernel allows it and AIO otherwise;
``aio`` always uses AIO (for kernels or sandboxes without io_uring, and to test that path).
"""

from __future__ import annotations

from .rings import open_queue, unavailable_reason
from .threads import ThreadsBackend


class NativeBackend(ThreadsBackend):
    name = "native"
    submits_batches = True
    #: kernel mechanisms in order of preference
    mechanisms: tuple[str, ...] = ("io_uring", "aio")

    @classmethod
    def unavailable_reason(cls) -> str | None:
        reasons = [unavailable_reason(m) for m in cls.mechanisms]
        if any(r is None for r in reasons):
            return None
        return "; ".join(reasons)

    @classmethod
    def mechanism(cls) -> str:
        """The kernel interface this backend's queues use here."""
        for m in cls.mechanisms:
            if unavailable_reason(m) is None:
                return m
        raise OSError(f"{cls.name}: {cls.unavailable_reason()}")

    def queue(self, depth: int):
        """A new kernel queue of ``depth`` entries, owned by the calling thread."""
        return open_queue(self.mechanism(), depth)


class AioBackend(NativeBackend):
    name = "aio"
    mechanisms = ("aio",)
