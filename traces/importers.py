"""Importers of public block-trace formats into the trace format.

Block traces name byte ranges of a device; the objects of a tiered store are
fixed-size blocks, so every request is split into the ``block_size`` blocks
it touches (one access each, at the request's time) and a block's key is
``device << 40 | block number``. Each parser checks every line and raises
:class:`TraceFormatError` with the file, line number and what was expected.

* MQSim ``.trace``: ``arrival_ns device start_sector size_sectors type``
  (type 0 write, 1 read; 512-byte sectors).
* ARC ``.lis`` / ``.lis.zst``: ``start_block num_blocks ignored request_id``
  (512-byte pages; no timestamps, so the trace is untimed: replay closed-loop).
* MSR Cambridge CSV: ``Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime``
  (Windows filetime, 100 ns ticks; Type Read/Write; bytes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..policies.base import KINDS, OPS

from ._lines import is_zstd, iter_lines, parse_uint
from .errors import TraceFormatError
from .format import Trace, read_text, read_trace
from .mooncake import import_mooncake

__all__ = ["FORMATS", "detect_format", "expand_blocks", "import_arc", "import_msr", "import_mqsim", "load"]

SECTOR = 512
_DEV_SHIFT = 40
_MAX_BLOCK = 1 << _DEV_SHIFT


def expand_blocks(time: np.ndarray, device: np.ndarray, offset: np.ndarray, length: np.ndarray,
                  op: np.ndarray, block_size: int) -> tuple[np.ndarray, ...]:
    """Split byte-range requests into one access per touched block (vectorised)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    first = offset // block_size
    last = (offset + np.maximum(length, 1) - 1) // block_size
    count = (last - first + 1).astype(np.int64)
    n = int(count.sum())
    rep = np.repeat(np.arange(count.shape[0]), count)
    within = np.arange(n, dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
    block = first[rep] + within
    if n and int(block.max()) >= _MAX_BLOCK:
        raise ValueError(f"block number {int(block.max())} too large for the key layout (< 2**{_DEV_SHIFT})")
    key = (device[rep].astype(np.int64) << _DEV_SHIFT) | block
    return time[rep], key, np.full(n, block_size, dtype=np.int64), op[rep]


def _trace(time, dev, off, length, op, block_size: int, timed: bool, meta: dict) -> Trace:
    t = np.asarray(time, dtype=np.float64)
    if t.size:
        t = t - t[0]
    tt, key, size, o = expand_blocks(t, np.asarray(dev, np.int64), np.asarray(off, np.int64),
                                     np.asarray(length, np.int64), np.asarray(op, np.uint8), block_size)
    meta = dict(meta, block_size=block_size, requests=int(t.shape[0]))
    return Trace(tt, key, size, o, np.full(key.shape[0], KINDS.index("blob"), np.uint8), None, timed, meta)


def _fields(path: Path, no: int, line: str, n: int, sep: str | None, names: str) -> list[str]:
    parts = line.split(sep) if sep else line.split()
    if len(parts) != n:
        raise TraceFormatError(path, no, f"{len(parts)} fields in {line[:80]!r}", f"{n} fields: {names}")
    return parts


def import_mqsim(path: str | os.PathLike, *, block_size: int = 4096) -> Trace:
    path = Path(path)
    names = "arrival_time_ns device start_sector size_in_sectors type(0 write, 1 read)"
    t, d, off, ln, op = [], [], [], [], []
    for no, line in iter_lines(path):
        if not line.strip():
            continue
        a, dev, sec, cnt, typ = _fields(path, no, line, 5, None, names)
        t.append(parse_uint(path, no, a, "arrival_time_ns"))
        d.append(parse_uint(path, no, dev, "device"))
        off.append(parse_uint(path, no, sec, "start_sector") * SECTOR)
        ln.append(parse_uint(path, no, cnt, "size_in_sectors") * SECTOR)
        if typ not in ("0", "1"):
            raise TraceFormatError(path, no, f"type {typ!r}", "0 (write) or 1 (read)")
        op.append(OPS.index("write") if typ == "0" else OPS.index("read"))
        if off[-1] + ln[-1] >= 1 << 62:
            raise TraceFormatError(path, no, "sector range beyond 2**62 bytes", "a plausible device range")
    return _trace(np.asarray(t, np.float64) * 1e-9, d, off, ln, op, block_size, True,
                  {"source": "mqsim", "file": os.fspath(path)})


def import_arc(path: str | os.PathLike, *, block_size: int = SECTOR) -> Trace:
    """ARC traces count 512-byte pages; the default block is one page, as in the ARC paper."""
    path = Path(path)
    names = "start_block num_blocks ignored request_id"
    off, ln = [], []
    for no, line in iter_lines(path):
        if not line.strip():
            continue
        start, cnt, ign, rid = _fields(path, no, line, 4, None, names)
        off.append(parse_uint(path, no, start, "start_block") * SECTOR)
        c = parse_uint(path, no, cnt, "num_blocks")
        if c == 0:
            raise TraceFormatError(path, no, "num_blocks 0", "num_blocks >= 1")
        ln.append(c * SECTOR)
        parse_uint(path, no, ign, "ignored field")
        parse_uint(path, no, rid, "request_id")
        if off[-1] + ln[-1] >= 1 << 62:
            raise TraceFormatError(path, no, "block range beyond 2**62 bytes", "a plausible device range")
    n = len(off)
    return _trace(np.zeros(n), np.zeros(n, np.int64), off, ln, np.zeros(n, np.uint8), block_size, False,
                  {"source": "arc", "file": os.fspath(path)})


def import_msr(path: str | os.PathLike, *, block_size: int = 4096) -> Trace:
    path = Path(path)
    names = "Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime"
    t, d, off, ln, op = [], [], [], [], []
    hosts: dict[str, int] = {}
    for no, line in iter_lines(path):
        if not line.strip():
            continue
        ts, host, disk, typ, o, s, rt = _fields(path, no, line, 7, ",", names)
        if no == 1 and ts.strip().lower() == "timestamp":
            continue  # a header row
        t.append(parse_uint(path, no, ts.strip(), "Timestamp"))
        if not host.strip():
            raise TraceFormatError(path, no, "empty Hostname", "a host name")
        h = hosts.setdefault(host.strip(), len(hosts))
        dn = parse_uint(path, no, disk.strip(), "DiskNumber")
        if dn >= 1 << 10 or h >= 1 << 12:
            raise TraceFormatError(path, no, f"disk {dn} of host #{h}", "fewer than 1024 disks and 4096 hosts")
        d.append(h << 10 | dn)
        typ = typ.strip()
        if typ not in ("Read", "Write"):
            raise TraceFormatError(path, no, f"Type {typ!r}", "Read or Write")
        op.append(OPS.index("read" if typ == "Read" else "write"))
        off.append(parse_uint(path, no, o.strip(), "Offset"))
        ln.append(parse_uint(path, no, s.strip(), "Size"))
        parse_uint(path, no, rt.strip(), "ResponseTime")
        if off[-1] + ln[-1] >= 1 << 62:
            raise TraceFormatError(path, no, "byte range beyond 2**62", "a plausible device range")
    return _trace(np.asarray(t, np.float64) * 1e-7, d, off, ln, op, block_size, True,
                  {"source": "msr", "file": os.fspath(path), "hosts": list(hosts)})


def _text_or_dir(path: str | os.PathLike) -> Trace:
    p = Path(path)
    return read_trace(p) if p.is_dir() else read_text(p)


#: format name -> importer(path) -> Trace
FORMATS: dict[str, Callable[..., Trace]] = {
    "tiered": _text_or_dir, "mqsim": import_mqsim, "arc": import_arc, "msr": import_msr, "mooncake": import_mooncake,
}


def detect_format(path: str | os.PathLike) -> str:
    """Guess the format from the name, then from the first line."""
    p = Path(path)
    if p.is_dir():
        return "tiered"
    name = p.name.lower()
    for suffix, fmt in ((".lis", "arc"), (".lis.zst", "arc"), (".jsonl", "mooncake"), (".csv", "msr"), (".trace", "mqsim")):
        if name.endswith(suffix):
            return fmt
    if is_zstd(p):
        return "arc"
    for _no, line in iter_lines(p):
        if not line.strip():
            continue
        s = line.strip()
        if s.startswith("# tiered-trace"):
            return "tiered"
        if s.startswith("{"):
            return "mooncake"
        if s.count(",") == 6:
            return "msr"
        n = len(s.split())
        if n == 5:
            return "mqsim"
        if n == 4:
            return "arc"
        break
    raise TraceFormatError(p, 1, "cannot tell the trace format", "one of " + ", ".join(FORMATS) + " (pass --format)")


def load(path: str | os.PathLike, fmt: str = "auto", **options) -> Trace:
    """Read ``path`` in ``fmt`` (``auto``: detect); options go to the importer (block_size, bytes_per_token)."""
    if fmt == "auto":
        fmt = detect_format(path)
    try:
        importer = FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown trace format {fmt!r}; known: auto, {', '.join(FORMATS)}") from None
    return importer(path, **options)
