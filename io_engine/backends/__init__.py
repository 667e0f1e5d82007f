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


def _native():
    from .native import NativeBackend

    return NativeBackend


def _aio():
    from .native import AioBackend

    return AioBackend


register_backend("threads", _threads)
register_backend("native", _native, "needs Linux with io_uring or AIO allowed (x86_64/aarch64); use 'threads'")
register_backend("aio", _aio, "needs Linux with AIO allowed (fs.aio-max-nr, seccomp); use 'threads'")
register_backend("aiofiles", _aiofiles, "install it with: pip install aiofiles")
register_backend("kvikio", _kvikio, "install it with: pip install 'tiered[gds]' (kvikio-cu12) on a CUDA machine")

__all__ = [
    "Backend", "available_backends", "backend_class", "backend_names", "create_backend", "register_backend",
]
