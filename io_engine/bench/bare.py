"""The storage device as the engine sees it, with no store above it: large O_DIRECT requests
from and into a huge-page arena, sequential write, read, and both at once. The strictest I/O
bound a workload's benchmark can compare itself with (bench/finetune.py)."""

from __future__ import annotations

import os
import time

MiB = 1 << 20
GB = 1e9


def engine_bandwidth(directory: str, size: int, workers: int) -> dict:
    """The device as tiered's I/O engine sees it, without the store: 8 MiB O_DIRECT requests
    (16 in flight) from and into a huge-page host arena (physically contiguous, which the
    virtio disk needs for its full read rate; fio's own buffers are not). Sequential write
    of ``size`` bytes (then fdatasync), read of them, and both at once (a second file read
    while the first is rewritten), each over its own bytes."""
    from allocators import HostArena

    from ..engine import IOEngine
    from ..request import Priority

    req, depth = 8 * MiB, 16
    n = size // req
    paths = [os.path.join(directory, f"engine{i}.dat") for i in range(2)]
    out: dict = {"request_bytes": req, "in_flight": depth, "workers": workers}
    with HostArena(2 * depth * req, hugepages=True, prefault=True) as arena, \
            IOEngine("threads", workers=workers, chunk=req).open() as eng:
        bufs = [arena.alloc(req) for _ in range(2 * depth)]
        for b in bufs:
            b.array[:] = 7

        def run(ops) -> float:
            """ops: (read?, path, index); returns seconds for all of them, depth at a time."""
            t0, infl = time.perf_counter(), []
            for j, (rd, path, i) in enumerate(ops):
                if len(infl) >= depth:
                    infl.pop(0).result(timeout=120)
                buf = bufs[j % (2 * depth)].array
                infl.append(eng.read(path, i * req, buf, req) if rd else
                            eng.write(path, i * req, buf, req, priority=Priority.DEMAND))
            for f in infl:
                f.result(timeout=120)
            if any(not rd for rd, _p, _i in ops):
                eng.fsync(paths[0])
            return time.perf_counter() - t0

        try:
            for path in paths:  # both files exist and are allocated before anything is timed
                run([(False, path, i) for i in range(n)])
                eng.fsync(path)
            t = run([(False, paths[0], i) for i in range(n)])
            out["write_gbps"] = n * req / t / GB
            t = run([(True, paths[1], i) for i in range(n)])
            out["read_gbps"] = n * req / t / GB
            t = run([op for i in range(n) for op in ((True, paths[1], i), (False, paths[0], i))])
            out["mixed_s"] = t
            out["mixed_read_gbps"] = out["mixed_write_gbps"] = n * req / t / GB  # each, at once
        finally:
            for path in paths:
                eng.forget(path)
                if os.path.exists(path):
                    os.remove(path)
    return out
