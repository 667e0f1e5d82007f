"""Mooncake (FAST'25) request traces: JSON lines of requests and the KV-cache blocks they touch.

Each line: ``{"timestamp": ms, "input_length": tokens, "output_length":
tokens, "hash_ids": [block ids]}``; one hash id names one 512-token KV block
and equal ids across requests are a shared prefix. :func:`read_requests`
gives the requests (the KV-cache work uses it directly);
:func:`import_mooncake` turns them into block accesses of the trace format.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..policies.base import KINDS, OPS

from ._lines import iter_lines
from .errors import TraceFormatError
from .format import Trace

__all__ = ["BLOCK_TOKENS", "DEFAULT_BYTES_PER_TOKEN", "MooncakeRequest", "import_mooncake", "read_requests"]

#: tokens per KV block in the Mooncake traces
BLOCK_TOKENS = 512
#: K+V bytes per token of Llama-3-8B in fp16 (32 layers x 8 KV heads x 128 x 2 x 2 bytes)
DEFAULT_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2

_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


@dataclass(frozen=True, slots=True)
class MooncakeRequest:
    timestamp_ms: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def _uint(path: Path, no: int, obj: dict, name: str) -> int:
    v = obj[name]
    if type(v) is not int or v < 0:
        raise TraceFormatError(path, no, f"{name} = {v!r}", f"{name} as a non-negative integer")
    return v


def read_requests(path: str | os.PathLike) -> Iterator[MooncakeRequest]:
    """The requests in file order; malformed lines raise :class:`TraceFormatError` (file, line, expected).

    Blank lines are skipped; other keys on a line are ignored.
    """
    path = Path(path)
    for no, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            msg = e.msg if isinstance(e, json.JSONDecodeError) else "nesting too deep"
            raise TraceFormatError(path, no, f"invalid JSON: {msg}", "one JSON object per line") from None
        if not isinstance(obj, dict):
            raise TraceFormatError(path, no, f"a JSON {type(obj).__name__}", "a JSON object with " + ", ".join(_FIELDS))
        missing = [f for f in _FIELDS if f not in obj]
        if missing:
            raise TraceFormatError(path, no, f"missing {', '.join(missing)}", "keys " + ", ".join(_FIELDS))
        ts = _uint(path, no, obj, "timestamp")
        il = _uint(path, no, obj, "input_length")
        ol = _uint(path, no, obj, "output_length")
        ids = obj["hash_ids"]
        if not isinstance(ids, list) or not all(type(x) is int and 0 <= x < 1 << 63 for x in ids):
            raise TraceFormatError(path, no, f"hash_ids = {str(ids)[:60]}", "a list of non-negative integer block ids")
        yield MooncakeRequest(ts, il, ol, tuple(ids))


def import_mooncake(path: str | os.PathLike, *, bytes_per_token: int = DEFAULT_BYTES_PER_TOKEN,
                    block_tokens: int = BLOCK_TOKENS) -> Trace:
    """One access per (request, KV block), at the request's arrival time.

    The first access of a block is a write (prefill computes and stores it),
    later ones are reads (prefix reuse). Block size = ``block_tokens *
    bytes_per_token`` for every block.
    """
    if bytes_per_token <= 0 or block_tokens <= 0:
        raise ValueError(f"bytes_per_token and block_tokens must be > 0, got {bytes_per_token}, {block_tokens}")
    times: list[int] = []
    keys: list[int] = []
    lens: list[int] = []
    n_req = 0
    for r in read_requests(path):
        n_req += 1
        times.append(r.timestamp_ms)
        lens.append(len(r.hash_ids))
        keys.extend(r.hash_ids)
    key = np.asarray(keys, dtype=np.int64)
    t = np.repeat(np.asarray(times, dtype=np.float64) / 1e3, np.asarray(lens, dtype=np.int64))
    if t.size:
        t -= t[0]
    first = np.zeros(key.shape[0], dtype=bool)
    if key.size:
        _, idx = np.unique(key, return_index=True)
        first[idx] = True
    op = np.where(first, OPS.index("write"), OPS.index("read")).astype(np.uint8)
    return Trace(t, key, np.full(key.shape[0], block_tokens * bytes_per_token, dtype=np.int64), op,
                 np.full(key.shape[0], KINDS.index("kv"), dtype=np.uint8), None, True,
                 {"source": "mooncake", "file": os.fspath(path), "requests": n_req,
                  "bytes_per_token": bytes_per_token, "block_tokens": block_tokens})
