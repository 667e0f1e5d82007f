"""A short cold bandwidth test of one directory (what ``tiered probe`` reports per storage tier)."""

from __future__ import annotations

import os

from ...allocators import HostArena

from ..backends import available_backends
from ..engine import IOEngine
from .common import MiB, Progress
from .passes import engine_seq
from .pattern import Pattern


def measure_storage(directory: str | os.PathLike, size: int, *, backend: str = "threads", workers: int = 4,
                    queue_depth: int = 32, chunk: int = 8 << 20, direct: bool = True) -> dict:
    """Cold O_DIRECT write (+fdatasync) and verified read of ``size`` bytes in ``directory``.

    Host buffers come from a huge-page arena of at most four 64 MiB windows; ``backend`` falls
    back to threads when it cannot run here (or is "auto": kvikio needs CUDA for host buffers).
    The test file is removed however the test ends.
    """
    if backend == "auto" or available_backends().get(backend) is not None:
        backend = "threads"
    window = min(64 * MiB, size)
    slots = max(1, min(4, size // window))
    path = os.path.join(os.fspath(directory), f".tiered-probe-{os.getpid()}.dat")
    pattern = Pattern(window, seed=1)
    quiet = Progress()
    with HostArena(window * slots, hugepages=True, pin=False, name="probe") as arena:
        bufs = [arena.alloc(window).array for _ in range(slots)]
        with IOEngine(backend, workers=workers, queue_depth=queue_depth, chunk=chunk, direct=direct) as eng:
            try:
                w = engine_seq(eng, path, size, bufs, pattern, write=True, progress=quiet, what="")
                r = engine_seq(eng, path, size, bufs, pattern, write=False, progress=quiet, what="")
            finally:
                eng.forget(path)
                try:
                    os.unlink(path)
                except OSError:
                    pass
    return {
        "bytes": size, "backend": backend, "workers": workers, "chunk": chunk,
        "write_gbps": w["gbps"], "read_gbps": r["gbps"],
        "cold": r["buffered_bytes"] == 0, "read_buffered_bytes": r["buffered_bytes"],
    }
