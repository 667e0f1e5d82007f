"""Crash-safe small files: write temp -> fsync -> rename -> fsync directory.

A reader (or a process restarted after a crash) sees either the previous
complete file or the new complete file, never a mix.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".tmp-"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` so that a crash leaves the old file or the new one:
    temp file, fsync, rename, fsync the directory."""
    replace_json(path, obj)
    fsync_dir(Path(path).parent)


def replace_json(path: str | os.PathLike, obj: Any) -> None:
    """Temp file, fsync, rename to ``path``: the rename is the commit point; the caller fsyncs
    the directory (a failure before the rename leaves no trace)."""
    path = Path(path)
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def fsync_dir(directory: str | os.PathLike) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(directory: str | os.PathLike) -> int:
    """Delete temp files a crash left behind; returns how many."""
    n = 0
    for p in Path(directory).glob(TEMP_PREFIX + "*"):
        try:
            p.unlink()
            n += 1
        except FileNotFoundError:
            pass
    return n
