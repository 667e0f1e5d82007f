"""Asynchronous storage I/O: requests become futures, served by a named backend.

Depends only on ``allocators`` (aligned bounce buffers).
"""

from .backends import Backend, available_backends, backend_names, create_backend, register_backend
from .engine import IOEngine
from .errors import BackendUnavailable, EngineClosed, IOEngineError, ShortTransferError
from .future import IOFuture, chain, completed, gather
from .request import Op, Priority, Request
from .throttle import TokenBucket

__all__ = [
    "Backend", "BackendUnavailable", "EngineClosed", "IOEngine", "IOEngineError", "IOFuture", "Op",
    "Priority", "Request", "ShortTransferError", "TokenBucket", "available_backends",
    "backend_names", "chain", "completed", "gather", "create_backend", "register_backend",
]
