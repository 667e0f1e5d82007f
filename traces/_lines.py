"""Line-by-line reading of plain or zstandard-compressed text traces, with line numbers.

A compressed file must end with a complete zstd frame: a truncated download
is an error, never a silently shorter trace.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from .errors import TraceFormatError

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CHUNK = 1 << 20


def is_zstd(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == ZSTD_MAGIC


def _zstd_chunks(path: Path) -> Iterator[bytes]:
    try:
        import zstandard
    except ImportError as e:  # pragma: no cover - an install without the traces extra
        raise TraceFormatError(path, None, "zstandard is not installed", "pip install 'tiered[traces]'") from e
    dctx = zstandard.ZstdDecompressor()
    obj = dctx.decompressobj()
    complete = False
    with open(path, "rb") as f:
        while True:
            raw = f.read(_CHUNK)
            if not raw:
                break
            while raw:
                try:
                    out = obj.decompress(raw)
                except zstandard.ZstdError as e:
                    raise TraceFormatError(path, None, f"corrupt zstd data: {e}", "a valid zstd stream") from None
                if out:
                    yield out
                complete = obj.eof
                raw = obj.unused_data if obj.eof else b""
                if obj.eof:
                    obj = dctx.decompressobj()  # another frame may follow
                    if raw:
                        complete = False
    if not complete:
        raise TraceFormatError(path, None, "truncated zstd stream (the last frame does not end)", "a complete zstd file")


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``(line number, line without newline)`` for every line, decompressing ``.zst`` by magic."""
    path = Path(path)
    if is_zstd(path):
        chunks: Iterator[bytes] = _zstd_chunks(path)
    else:
        def plain() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    yield chunk
        chunks = plain()
    rest = b""
    no = 0
    for chunk in chunks:
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for raw in parts:
            no += 1
            yield no, _decode(path, no, raw)
    if rest:
        no += 1
        yield no, _decode(path, no, rest)


def _decode(path: Path, no: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError:
        raise TraceFormatError(path, no, "bytes that are not UTF-8 text", "a text line") from None


def parse_uint(path: Path, no: int, tok: str, what: str) -> int:
    """A non-negative decimal integer (no sign, no underscores, ASCII digits only)."""
    if not (tok.isascii() and tok.isdigit()):
        raise TraceFormatError(path, no, f"{what} {tok[:40]!r}", f"{what} as a non-negative decimal integer")
    v = int(tok)
    if v >= 1 << 63:
        raise TraceFormatError(path, no, f"{what} {tok[:40]!r} is too large", f"{what} below 2**63")
    return v
