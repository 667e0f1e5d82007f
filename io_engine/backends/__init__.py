"""I/O backends behind one ABC, looked up by name (see ``base.register_backend``)."""

from .base import (
    Backend, available_backends, backend_class, backend_names, create_backend, register_backend,
)


def _threads():
    from .threads import ThreadsBackend

    return ThreadsBackend


def _aiofiles():
    from .aiofiles_backend import AiofilesBackend

    return AiofilesBackend


def _kvikio():
    from .kvikio_backend import KvikioBackend

    return KvikioBackend


register_backend("threads", _threads)
register_backend("aiofiles", _aiofiles, "install it with: pip install aiofiles")
register_backend("kvikio", _kvikio, "install it with: pip install 'tiered[gds]' (kvikio-cu12) on a CUDA machine")

__all__ = [
    "Backend", "available_backends", "backend_class", "backend_names", "create_backend", "register_backend",
]
