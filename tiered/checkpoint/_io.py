"""Checked reads of checkpoint bytes through a store's engine into host buffers."""

from __future__ import annotations

import zlib
from typing import Callable

from allocators import align_up
from io_engine import IOFuture, chain, gather

from .format import CheckpointChecksumError, CheckpointError


def read_verified(engine, arena, path: str, offset: int, nbytes: int, crcs: list[int],
                  segment: int, put: Callable[[int, object], None], where: str, wait: float) -> None:
    """Read ``nbytes`` at ``offset`` of ``path`` segment by segment into host buffers (O_DIRECT:
    ``offset`` is 4 KiB aligned and files are written padded), check each segment's crc32 on
    the worker that read it, and hand it to ``put(start, bytes)``; blocks until all are done."""
    gather(submit_verified(engine, arena, path, offset, nbytes, crcs, segment, put, where, wait)).result()


def read_parts(engine, arena, parts: list[tuple[str, int, int, list[int], int]], segment: int,
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


def submit_verified(engine, arena, path: str, offset: int, nbytes: int, crcs: list[int], segment: int,
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
