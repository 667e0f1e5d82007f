"""Checked reads and aligned writes of checkpoint bytes through an IOEngine and host buffers."""

from __future__ import annotations

import zlib
from typing import Callable

from allocators import HostArena, align_up
from io_engine import IOEngine, IOFuture, Priority, chain, gather

from .format import CheckpointChecksumError, CheckpointError, segment_crcs


def read_verified(engine: IOEngine, arena: HostArena, path: str, offset: int, nbytes: int, crcs: list[int],
                  segment: int, put: Callable[[int, object], None], where: str, wait: float) -> None:
    """Read ``nbytes`` at ``offset`` of ``path`` segment by segment into host buffers (O_DIRECT:
    ``offset`` is 4 KiB aligned and files are written padded), check each segment's crc32 on
    the worker that read it, and hand it to ``put(start, bytes)``; blocks until all are done."""
    gather(submit_verified(engine, arena, path, offset, nbytes, crcs, segment, put, where, wait)).result()


def read_parts(engine: IOEngine, arena, parts: list[tuple[str, int, int, list[int], int]], segment: int,
               put: Callable[[int, object], None], where: str, wait: float) -> None:
    """``read_verified`` of several extents at once, (path, offset, nbytes, crcs, start) each:
    the bytes of one lie at ``start`` onwards of what ``put`` fills; all are read in parallel."""
    futs: list[IOFuture] = []
    try:
        for path, offset, nbytes, crcs, start in parts:
            futs.extend(submit_verified(engine, arena, path, offset, nbytes, crcs, segment,
                                        lambda lo, data, start=start: put(start + lo, data), where, wait))
    finally:
        gather(futs).exception()  # submitted reads end (and free their buffers) before a failure is raised
    gather(futs).result()


def submit_verified(engine: IOEngine, arena, path: str, offset: int, nbytes: int, crcs: list[int], segment: int,
                    put: Callable[[int, object], None], where: str, wait: float) -> list[IOFuture]:
    """Start the reads of ``read_verified``; ``arena.alloc(n, timeout=...)`` gives the host buffers
    (waiting for those of earlier segments to be handed over). Returns one future per segment."""
    if nbytes == 0:
        return []
    if len(crcs) != -(-nbytes // segment):
        raise CheckpointError(f"{where}: {len(crcs)} checksums recorded for {nbytes} bytes in "
                              f"{segment}-byte segments")
    futs = []
    for k, lo in enumerate(range(0, nbytes, segment)):
        m = min(segment, nbytes - lo)
        buf = arena.alloc(m, timeout=wait)
        try:
            rf = engine.read(path, offset + lo, buf.padded, align_up(m))
        except BaseException:
            buf.release()
            raise

        def check(_n, k=k, lo=lo, m=m, buf=buf) -> None:
            try:
                got = zlib.crc32(buf.array[:m])
                if got != crcs[k]:
                    raise CheckpointChecksumError(
                        f"{where}: segment {k} (bytes {lo}..{lo + m}) read from {path} at offset {offset + lo} "
                        f"has crc32 {got:#010x}, recorded {crcs[k]:#010x}")
                put(lo, buf.array[:m])
            finally:
                buf.release()

        rf.add_done_callback(lambda f, buf=buf: f.exception() is not None and buf.release())
        futs.append(chain(rf, check, where))
    return futs


def write_bytes(engine: IOEngine, arena: HostArena, path: str, offset: int, data, segment: int,
                wait: float) -> tuple[list[IOFuture], list[int]]:
    """Copy ``data`` (a uint8 tensor or buffer) segment by segment into aligned host buffers and
    write each at ``offset`` + its start (O_DIRECT; ``offset`` 4 KiB aligned); returns the write
    futures (buffers are freed as they complete) and the crc32 of each segment."""
    import torch

    src = data if isinstance(data, torch.Tensor) else torch.frombuffer(memoryview(data), dtype=torch.uint8)
    n = src.numel()
    futs: list[IOFuture] = []
    crcs: list[int] = []
    for lo in range(0, n, segment):
        m = min(segment, n - lo)
        buf = arena.alloc(m, timeout=wait)
        try:
            torch.from_numpy(buf.array).copy_(src[lo:lo + m])
            crcs.extend(segment_crcs(buf.array))
            buf.padded[m:] = 0
            f = engine.write(path, offset + lo, buf.padded, priority=Priority.WRITEBACK)
        except BaseException:
            buf.release()
            raise
        f.add_done_callback(lambda _f, buf=buf: buf.release())
        futs.append(f)
    return futs, crcs or segment_crcs(b"")
