"""An asyncio backend through aiofiles, for callers that live on an event loop.

aiofiles runs each blocking file call in the loop's executor; here every
transfer is an ``aiofiles.os.wrap``-ped ``os.preadv``/``os.pwritev`` awaited on
the engine's own event-loop thread (started in ``IOEngine.open()``), with up to
``queue_depth`` transfers in flight. It exists so asyncio code can be compared
with, and need not block on, the thread backend; the engine's futures are
awaitable with any backend.
"""

from __future__ import annotations

import os

from .threads import ThreadsBackend


class AiofilesBackend(ThreadsBackend):
    name = "aiofiles"
    is_async = True

    def __init__(self) -> None:
        import aiofiles.os

        self._apreadv = aiofiles.os.wrap(os.preadv)
        self._apwritev = aiofiles.os.wrap(os.pwritev)
        self._afdatasync = aiofiles.os.wrap(os.fdatasync)

    async def apread(self, handle: int, buf, offset: int) -> int:
        return await self._apreadv(handle, [buf], offset)

    async def apwrite(self, handle: int, buf, offset: int) -> int:
        return await self._apwritev(handle, [buf], offset)

    async def afsync(self, handle: int) -> None:
        await self._afdatasync(handle)
