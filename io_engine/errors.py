"""Errors of the I/O engine: each names the operation, file, offset and size."""

from __future__ import annotations

import errno as _errno


class IOEngineError(OSError):
    """An I/O request failed; ``errno`` is kept from the underlying OSError."""

    def __init__(self, op: str, path: str, offset: int, length: int, reason: str, err: int | None = None):
        self.op, self.path, self.offset, self.length = op, path, offset, length
        msg = f"{op} of {length} bytes at offset {offset} of {path} failed: {reason}"
        super().__init__(err if err is not None else _errno.EIO, msg)
        self.filename = path

    def __str__(self) -> str:
        return self.strerror


class ShortTransferError(IOEngineError):
    """The device transferred fewer bytes than asked and then made no progress."""


class BackendUnavailable(RuntimeError):
    """A named backend cannot run here (missing package or device); says how to fix it."""


class EngineClosed(RuntimeError):
    """A request was submitted to an engine that is not open."""
