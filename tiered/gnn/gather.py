"""Turning a minibatch's row ids into few aligned reads, and the bytes back into rows.

Why: a neighbor-sampled minibatch asks for ~10^5 scattered rows; one request
per row costs more Python time (~70 us per engine request) than the device
takes to read a page. So ids are de-duplicated and sorted, each row becomes
the page range that holds it, and page ranges of one chunk closer than
``merge_gap`` bytes are merged into one read (rows smaller than a page share
it; reading a short gap is cheaper than another request). Reads are page
aligned in the file and laid out page-aligned in one scratch buffer, so every
read takes the engine's O_DIRECT fast path. Pure numpy: no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAGE = 4096


@dataclass(frozen=True)
class Layout:
    """Where the rows of one attribute live: fixed row-range chunks, each at its own extent.

    ``chunk_offset[c]`` is the file offset of chunk c's first row in file
    ``chunk_file[c]`` (an index into the caller's list of paths); ``chunk_limit[c]``
    is the first byte a read of chunk c must not reach (end of file or extent).
    """

    num_rows: int
    row_bytes: int
    chunk_rows: int
    chunk_offset: np.ndarray
    chunk_file: np.ndarray
    chunk_limit: np.ndarray


@dataclass(frozen=True)
class ReadPlan:
    """Reads (file index, file offset, length, offset in the scratch buffer) and, for each
    requested row, where its bytes land in the scratch buffer."""

    file: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    buf_offset: np.ndarray
    row_pos: np.ndarray
    row_run: np.ndarray  # which read each row comes from (non-decreasing)
    nbytes: int  # scratch bytes needed (page multiple)

    def __len__(self) -> int:
        return len(self.offset)


def unique_rows(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ids and, for each input position, its index among them."""
    if ids.size == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.unique(ids, return_inverse=True)


def plan_reads(rows: np.ndarray, layout: Layout, *, merge_gap: int = 16 << 10,
               max_read: int = 4 << 20, page: int = PAGE) -> ReadPlan:
    """Coalesce the page ranges of sorted unique ``rows`` into reads (see module docstring).

    A read never crosses a chunk (chunks are separate extents) nor a
    ``max_read`` boundary of the file, so no read outgrows a scratch round.
    ``page`` (a multiple of 4 KiB): the unit reads start and end on (a chunk's checksum
    block, so that each block read can be verified whole).
    """
    rows = np.asarray(rows, dtype=np.int64)
    n = len(rows)
    if n == 0:
        e = np.empty(0, dtype=np.int64)
        return ReadPlan(e, e, e, e, e, e, 0)
    rb = layout.row_bytes
    chunk = rows // layout.chunk_rows
    start = layout.chunk_offset[chunk] + (rows - chunk * layout.chunk_rows) * rb
    p0 = start // page
    p1 = -(-(start + rb) // page)
    gap_pages = max(0, merge_gap // page)
    block = max(1, max_read // page)
    new = np.ones(n, dtype=bool)
    if n > 1:
        # rows are sorted, so within a chunk p0 and p1 never decrease
        new[1:] = ((chunk[1:] != chunk[:-1]) | (p0[1:] - p1[:-1] > gap_pages)
                   | (p0[1:] // block != p0[:-1] // block))
    first = np.flatnonzero(new)
    last = np.append(first[1:], n) - 1
    run_p0 = p0[first]
    run_c = chunk[first]
    lo = run_p0 * page
    hi = np.minimum(p1[last] * page, layout.chunk_limit[run_c])
    length = hi - lo
    padded = -(-length // PAGE) * PAGE
    buf_off = np.zeros(len(first), dtype=np.int64)
    np.cumsum(padded[:-1], out=buf_off[1:])
    run_of_row = np.cumsum(new) - 1
    row_pos = buf_off[run_of_row] + (start - lo[run_of_row])
    return ReadPlan(layout.chunk_file[run_c].astype(np.int64), lo, length, buf_off, row_pos, run_of_row,
                    int(padded.sum()))


def split_rounds(plan: ReadPlan, budget: int) -> list[tuple[int, int]]:
    """Split the plan's reads into consecutive ranges [i, j) whose scratch fits ``budget``."""
    if not len(plan):
        return []
    padded = -(-plan.length // PAGE) * PAGE
    if int(padded.max()) > budget:
        raise ValueError(f"a single read of {int(padded.max())} bytes exceeds the scratch budget of {budget} bytes")
    rounds, i = [], 0
    ends = np.cumsum(padded)
    while i < len(plan):
        base = ends[i - 1] if i else 0
        j = int(np.searchsorted(ends, base + budget, side="right"))
        rounds.append((i, max(j, i + 1)))
        i = max(j, i + 1)
    return rounds


def rows_from(scratch: np.ndarray, positions: np.ndarray, row_bytes: int) -> np.ndarray:
    """Copy ``row_bytes`` at each byte position of ``scratch`` into an (n, row_bytes) array."""
    if not len(positions):
        return np.empty((0, row_bytes), dtype=np.uint8)
    if row_bytes and np.all(positions % row_bytes == 0) and len(scratch) % row_bytes == 0:
        return scratch.reshape(-1, row_bytes)[positions // row_bytes]
    end = int(positions.max()) + row_bytes
    win = np.lib.stride_tricks.sliding_window_view(scratch[:end], row_bytes)
    return win[positions]
