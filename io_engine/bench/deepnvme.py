"""DeepSpeed's DeepNVMe (``ds_io``'s ``aio_handle``): a reference when deepspeed is installed."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any

import numpy as np

from .common import GB, MiB, BenchError, Progress


def deepnvme(path: str, size: int, workers: int, progress: Progress) -> tuple[dict | None, str | None]:
    """DeepSpeed's aio_handle (what ``ds_io`` drives) reading/writing the file from a page-locked tensor."""
    try:
        # deepspeed logs to stdout from import on; results go to stdout, so send its chatter to stderr
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed  # noqa: F401
            from deepspeed.ops.op_builder import AsyncIOBuilder
    except ImportError:
        return None, "deepspeed not installed (DeepNVMe/ds_io reference skipped; pip install deepspeed)"
    except Exception as e:  # noqa: BLE001 - a broken install is reported, not fatal
        return None, f"deepspeed import failed: {e}"
    try:
        import psutil
        import torch

        if size > psutil.virtual_memory().available // 2:
            return None, f"DeepNVMe skipped: needs a {progress.size(size)} page-locked buffer (too little RAM free)"
        with contextlib.redirect_stdout(sys.stderr):
            lib = AsyncIOBuilder().load(verbose=False)
        best: dict[str, Any] = {}
        for block in (1 * MiB, 8 * MiB):
            handle = lib.aio_handle(block, 32, False, True, workers)
            try:
                buf = handle.new_cpu_locked_tensor(size, torch.empty(0, dtype=torch.uint8))
            except Exception:  # noqa: BLE001 - older releases: pinned torch memory
                buf = torch.empty(size, dtype=torch.uint8).pin_memory()
            progress.phase(f"DeepNVMe read block={progress.size(block)} qd=32 threads={workers}")
            t0 = time.perf_counter()
            handle.sync_pread(buf, path)
            rd = size / (time.perf_counter() - t0) / GB
            if int(buf[:8].numpy().view(np.uint64)[0]) != 0:  # block 0 is stamped with offset 0
                raise BenchError("DeepNVMe read returned the wrong first block")
            progress.phase(f"DeepNVMe write block={progress.size(block)}")
            t0 = time.perf_counter()
            handle.sync_pwrite(buf, path)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            wr = size / (time.perf_counter() - t0) / GB
            if rd > best.get("read_gbps", 0):
                best.update(read_gbps=rd, read_block=block)
            if wr > best.get("write_gbps", 0):
                best.update(write_gbps=wr, write_block=block)
            try:
                handle.free_cpu_locked_tensor(buf)
            except Exception:  # noqa: BLE001
                pass
            del buf
        return best, None
    except Exception as e:  # noqa: BLE001
        return None, f"DeepNVMe (ds_io) failed: {type(e).__name__}: {e}"
