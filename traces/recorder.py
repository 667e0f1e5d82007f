"""Record a real run's accesses in the trace format: a listener for ``TieredStore.add_listener``.

Usage::

    with TraceRecorder("run.trace") as rec:
        store.add_listener(rec)
        ...  # the workload
    # closed: run.trace/ is a complete trace

Events are buffered in memory and appended to the column files of a
temporary directory every ``buffer_events`` events; ``close()`` writes the
key names and the header last and renames the directory into place, so a
crash leaves no directory that looks like a trace. Only reads and writes are
accesses; plan declarations (op ``"plan"``) are recorded in the plan columns,
their keys named like accesses' (ids into keys.json); evict/delete events are
counted in the header's ``meta``. Kinds
are mapped to ``policies.KINDS`` (aliases such as "optimizer" -> "optim");
an unknown kind is recorded as "blob" and counted in ``meta``, never dropped.
Thread-safe: the store may call listeners from several threads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..policies.base import KINDS, OPS

from .events import AccessEvent, normalize_kind
from .format import COLUMNS, PLAN_COLUMNS, _write_file, header, install_dir, plans_header

__all__ = ["TraceRecorder"]


class TraceRecorder:
    def __init__(self, path: str | os.PathLike, *, buffer_events: int = 65536,
                 meta: dict[str, Any] | None = None, overwrite: bool = False) -> None:
        if buffer_events < 1:
            raise ValueError(f"buffer_events must be >= 1, got {buffer_events}")
        self.path = Path(path)
        self.buffer_events = buffer_events
        self.meta = dict(meta or {})
        self.overwrite = overwrite
        self._lock = threading.Lock()
        self._tmp: Path | None = None
        self._files: dict[str, BinaryIO] = {}
        self._ids: dict[str, int] = {}
        self._buf: dict[str, list] = {c: [] for c in COLUMNS}
        self._plan_buf: dict[str, list] = {c: [] for c in PLAN_COLUMNS}
        self._plan_files: dict[str, BinaryIO] = {}
        self._owners: dict[str, int] = {}
        self._plans = 0  # declarations recorded
        self._plan_keys = 0  # keys in them
        self._t0: float | None = None
        self._n = 0
        self._skipped: dict[str, int] = {}
        self._unknown: dict[str, int] = {}  # kinds outside KINDS (and its aliases), recorded as blob
        self._closed = False
        self._op = {x: i for i, x in enumerate(OPS)}
        self._kind = {x: i for i, x in enumerate(KINDS)}

    def open(self) -> "TraceRecorder":
        if self._tmp is not None or self._closed:
            raise RuntimeError(f"recorder for {self.path} already opened")
        if self.path.exists() and not self.overwrite:
            raise FileExistsError(f"{self.path}: exists (pass overwrite=True to replace it)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.rec-", dir=self.path.parent))
        self._files = {c: open(self._tmp / f"{c}.bin", "wb") for c in COLUMNS}
        return self

    def __enter__(self) -> "TraceRecorder":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.meta["complete"] = False  # the run failed: the events up to the failure are still real
        self.close()

    def __call__(self, ev: AccessEvent) -> None:
        with self._lock:
            if self._tmp is None or self._closed:
                raise RuntimeError(f"trace recorder for {self.path} is not open")
            if ev.op == "plan":
                self._record_plan(ev)
                return
            op = self._op.get(ev.op)
            if op is None:
                self._skipped[ev.op] = self._skipped.get(ev.op, 0) + 1
                return
            kind = self._kind.get(ev.kind)
            if kind is None:
                # never drop an access: an unknown kind is recorded as a blob and counted in the header
                name = normalize_kind(ev.kind, KINDS)
                if name is None:
                    self._unknown[ev.kind] = self._unknown.get(ev.kind, 0) + 1
                    name = "blob"
                kind = self._kind[name]
            if self._t0 is None:
                self._t0 = ev.time
            b = self._buf
            b["time"].append(ev.time - self._t0)
            b["key"].append(self._ids.setdefault(str(ev.key), len(self._ids)))
            b["size"].append(ev.nbytes)
            b["op"].append(op)
            b["kind"].append(kind)
            self._n += 1
            if len(b["time"]) >= self.buffer_events:
                self._flush()

    def _record_plan(self, ev: AccessEvent) -> None:
        """Call with the lock held: ``ev.key`` (the owner) declared it reads ``ev.keys`` next."""
        if not self._plan_files:
            self._plan_files = {c: open(self._tmp / f"{c}.bin", "wb") for c in PLAN_COLUMNS}
        keys = [self._ids.setdefault(str(k), len(self._ids)) for k in ev.keys or ()]
        b = self._plan_buf
        b["plan_at"].append(self._n)
        b["plan_owner"].append(self._owners.setdefault(str(ev.key), len(self._owners)))
        b["plan_start"].append(self._plan_keys)
        b["plan_keys"].extend(keys)
        self._plans += 1
        self._plan_keys += len(keys)
        if len(b["plan_keys"]) + len(b["plan_at"]) >= self.buffer_events:
            self._flush()

    def _flush(self) -> None:
        for c, dtype in COLUMNS.items():
            if self._buf[c]:
                self._files[c].write(np.asarray(self._buf[c], dtype=dtype).tobytes())
                self._buf[c].clear()
        for c, dtype in PLAN_COLUMNS.items():
            if self._plan_buf[c]:
                self._plan_files[c].write(np.asarray(self._plan_buf[c], dtype=dtype).tobytes())
                self._plan_buf[c].clear()

    @property
    def events(self) -> int:
        return self._n

    def close(self) -> Path | None:
        """Flush, write key names and header, install the directory; returns its path."""
        with self._lock:
            if self._closed:
                return self.path
            self._closed = True
            if self._tmp is None:
                return None
            tmp = self._tmp
            try:
                if self._plans:
                    self._plan_buf["plan_start"].append(self._plan_keys)  # the end of the last plan's keys
                self._flush()
                for f in (*self._files.values(), *self._plan_files.values()):
                    f.flush()
                    os.fsync(f.fileno())
                    f.close()
                _write_file(tmp / "keys.json", json.dumps(list(self._ids)).encode())
                meta = dict(self.meta, source=self.meta.get("source", "recorder"))
                if self._skipped:
                    meta["skipped_events"] = dict(self._skipped)
                if self._unknown:
                    meta["unknown_kinds_as_blob"] = dict(self._unknown)
                hdr = header(self._n, timed=True, named=True, meta=meta,
                             plans=plans_header(self._plans, self._plan_keys, list(self._owners)))
                _write_file(tmp / "header.json", json.dumps(hdr, indent=1).encode())
                install_dir(tmp, self.path)
            except BaseException:
                for f in (*self._files.values(), *self._plan_files.values()):
                    f.close()
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return self.path
