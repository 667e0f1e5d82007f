"""What readers hold: a pinned zero-copy view of a host copy (Lease), an extent kept from
being freed (ExtentLease), and the shared future of a host-copy load."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tiered.allocators import HostBuffer
from tiered.io_engine import IOFuture

from .errors import StoreError
from .objects import Extent, HostCopy, ObjectMeta


if TYPE_CHECKING:
    from .core import TieredStore



class Lease:
    """A pinned, zero-copy view of an object's host copy. Release it (or use ``with``)."""

    def __init__(self, store: "TieredStore", meta: ObjectMeta, copy: HostCopy) -> None:
        self._store = store
        self._copy = copy
        self._version = meta.version
        self.key = meta.key
        raw = torch.from_numpy(copy.buffer.array[copy.start : copy.start + meta.nbytes])
        self.tensor = (raw.view(meta.dtype) if meta.dtype != torch.uint8 else raw).view(meta.shape)
        self._released = False

    @property
    def version(self) -> int:
        """The object version this lease pins (a later put makes a new one)."""
        return self._version

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.tensor = None
            self._store._unpin(self._copy)

    def detach(self) -> HostBuffer:
        """The leased bytes in a buffer the caller owns (and releases, or gives to
        :meth:`TieredStore.put_buffer`); the lease is released. For a reader that changes the
        bytes in place and puts them back: the pinned buffer itself is taken out of the cache,
        without a copy (the object's next read reads it from storage again), unless another
        lease pins it too, or it is an external object's window; then it is a copy."""
        if self._released:
            raise StoreError(f"lease of {self.key!r} was released")
        buf = self._store._detach_copy(self.key, self._copy, self.tensor.numel() * self.tensor.element_size())
        if buf is None:
            src = self.tensor.reshape(-1).view(torch.uint8).numpy()
            buf = self._store._alloc_host(len(src), owner=self._copy.buffer.owner)
            buf.array[:] = src
            self.release()
            return buf
        self._released = True
        self.tensor = None
        return buf

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ExtentLease:
    """Where one object version's bytes are (``path``, ``offset``, ``nbytes``), kept from
    being freed or reused until ``release()`` (see :meth:`TieredStore.locate`)."""

    def __init__(self, store: "TieredStore", key: str, version: int, path: str, offset: int, nbytes: int,
                 extent: Extent) -> None:
        self.key, self.version, self.path, self.offset, self.nbytes = key, version, path, offset, nbytes
        self._store, self._extent = store, extent

    def release(self) -> None:
        if self._extent is not None:
            ext, self._extent = self._extent, None
            self._store._release_extent(ext)

    def __enter__(self) -> "ExtentLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _LoadFuture(IOFuture):
    """The future of a host-copy load, created before its read is submitted so that
    concurrent readers of the same key can wait on it."""

    def __init__(self, description: str = "") -> None:
        super().__init__(description)
        self._reads: list[IOFuture] = []

    def follow(self, result: IOFuture, reads: list[IOFuture]) -> None:
        self._reads = reads

        def relay(f) -> None:
            if f.cancelled():
                super(_LoadFuture, self).cancel()
                self.set_running_or_notify_cancel()
            elif self.set_running_or_notify_cancel():
                if f.exception() is not None:
                    self.set_exception(f.exception())
                else:
                    self.set_result(f.result())

        result.add_done_callback(relay)

    def cancel(self) -> bool:
        """Joined waiters share this future: only ``prefetch`` may cancel, via ``cancel_read``."""
        return False

    def cancel_read(self) -> bool:
        """Cancel the segment reads that have not started; True when none had."""
        return all([r.cancel() for r in self._reads]) if self._reads else False
