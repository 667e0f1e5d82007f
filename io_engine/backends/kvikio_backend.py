"""kvikio (cuFile): GPUDirect Storage when the driver has it, kvikio's POSIX compat path otherwise.

It reads straight into device buffers (CuPy arrays or CUDA torch tensors),
which no other backend can. kvikio cannot move host buffers without libcuda,
so it is unavailable on CPU-only machines; ``pip install 'tiered[gds]'`` brings it.
"""

from __future__ import annotations

from typing import Any

from .base import Backend


def _to_kvikio_buffer(buf: Any) -> Any:
    # torch CUDA tensors expose __cuda_array_interface__ only when contiguous; give kvikio a uint8 view
    try:
        import torch

        if isinstance(buf, torch.Tensor):
            return buf.view(torch.uint8) if buf.dtype != torch.uint8 else buf
    except ImportError:
        pass
    return buf


class KvikioBackend(Backend):
    name = "kvikio"
    supports_device_buffers = True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import torch

            if not torch.cuda.is_available():
                return "no CUDA device (kvikio needs libcuda even for host buffers)"
        except ImportError:
            return "torch is not installed"
        return None

    @classmethod
    def gds_available(cls) -> bool:
        """True when kvikio would use GPUDirect Storage rather than its POSIX compat path."""
        try:
            import kvikio.defaults

            return not kvikio.defaults.is_compat_mode_preferred()
        except (ImportError, AttributeError, RuntimeError):
            return False

    def __init__(self) -> None:
        import kvikio

        self._kvikio = kvikio

    def start(self, workers: int) -> None:
        try:
            import kvikio.defaults as d

            d.set({"num_threads": workers})
        except (ImportError, AttributeError, TypeError):
            pass  # older/newer kvikio keep their own default thread count

    def open(self, path: str, *, write: bool, direct: bool) -> Any:
        if write:
            import os

            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))  # "r+" needs it to exist
        return self._kvikio.CuFile(path, "r+" if write else "r")

    def pread(self, handle: Any, buf: Any, offset: int) -> int:
        return handle.pread(_to_kvikio_buffer(buf), file_offset=offset).get()

    def pwrite(self, handle: Any, buf: Any, offset: int) -> int:
        return handle.pwrite(_to_kvikio_buffer(buf), file_offset=offset).get()

    def fsync(self, handle: Any) -> None:
        import os

        os.fdatasync(handle.fileno())

    def close(self, handle: Any) -> None:
        handle.close()
