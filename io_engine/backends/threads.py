"""The default backend: positional syscalls from the engine's worker threads.

``os.preadv``/``os.pwritev`` release the GIL for the whole transfer, so N
worker threads keep N requests in flight at the device, like fio's psync
engine with numjobs=N.
"""

from __future__ import annotations

import os

from .base import Backend


class ThreadsBackend(Backend):
    name = "threads"

    def open(self, path: str, *, write: bool, direct: bool) -> int:
        flags = os.O_RDWR | os.O_CREAT if write else os.O_RDONLY
        if direct:
            flags |= os.O_DIRECT
        return os.open(path, flags | os.O_CLOEXEC, 0o600)

    def pread(self, handle: int, buf, offset: int) -> int:
        return os.preadv(handle, [buf], offset)

    def pwrite(self, handle: int, buf, offset: int) -> int:
        return os.pwritev(handle, [buf], offset)

    def fsync(self, handle: int) -> None:
        os.fdatasync(handle)

    def close(self, handle: int) -> None:
        os.close(handle)
