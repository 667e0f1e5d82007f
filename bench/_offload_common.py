"""Units, progress log and number formatting shared by ``bench/offload_inference.py``'s modules."""

from __future__ import annotations

import sys
import time

GB = 1e9
MiB = 1 << 20
GiB = 1 << 30

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / MiB:.1f} MiB"


def fmt(v, pattern="{:.3f}") -> str:
    """``v`` formatted by ``pattern``, or "n/a" when it is None."""
    return "n/a" if v is None else pattern.format(v)
