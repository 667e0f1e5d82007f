"""Reading feature rows in a DataLoader worker process, without the parent's store.

Why: a worker process cannot use the parent's ``TieredStore`` (its engine threads do
not exist after a fork; a spawned worker cannot get them at all; and the store
directory is locked to one process). So the parent hands each worker a snapshot:
for every attribute its dtype, shape and where each chunk's bytes are (path,
offset, length), or its zarr path. The parent keeps those extents from being freed or
reused while any process holds the snapshot's lock file (see ``snapshots.py``); a worker
copy holds it from when it is made until it is closed or its process exits, and sees
the attributes as they were when it got the snapshot. After each read it checks that
the lock file is still there: the parent removes it on close() (before it gives the
extents back), so a copy of a closed store fails instead of returning reused bytes.
Rows are read with ``os.preadv`` in the worker's own thread: no engine, no threads,
no locks. Chunks stored with block checksums (``block`` > 0) are verified like the
parent's reads: each 4 KiB block read is checked against the crc32 table the store keeps
after the chunk's data (at data offset + the data's size rounded up to 4 KiB, one uint32
per block), read once per chunk. Limit: the store's crc32 of that table is not public, so
the table itself is not checked; a damaged table fails the read (a ChecksumError), it never
passes damaged rows. Chunks read in place from a ``.npy`` file carry no checksums.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from allocators import align_up

from ..checksums import crc32
from ..dtypes import dtype_name
from ..store import ChecksumError
from .attrs import FeatureStoreError, _jsonable_group, _label
from .gather import Layout, plan_reads, rows_from, unique_rows
from .indexing import _is_identity, _normalize_index


@dataclass
class SnapshotAttr:
    """One attribute as a worker sees it (plain data: it is pickled to the worker)."""

    group: Any
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunk_rows: int
    tier: str
    chunks: list[tuple[str, int, int]]  # (path, offset, nbytes) per chunk; empty for zarr
    zarr_path: str | None = None
    block: int = 0  # >0: each chunk has a crc32 per ``block`` bytes after its data
    keys: list[str] = field(default_factory=list)  # the chunks' object keys (for messages)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * torch.empty((), dtype=self.dtype).element_size()

    def describe(self) -> dict:
        return {"group": _jsonable_group(self.group), "attr": self.name, "dtype": dtype_name(self.dtype),
                "shape": list(self.shape), "chunk_rows": self.chunk_rows, "tier": self.tier,
                "zarr": self.zarr_path, "snapshot": True}


class WorkerRows:
    """Read-only rows of a snapshot (see the module docstring); one per worker process."""

    def __init__(self, namespace: str, attrs: list[SnapshotAttr], max_read: int, lock_path: str = "",
                 owner_pid: int = 0, session: str = "") -> None:
        self.namespace = namespace
        self.attrs = {(a.group, a.name): a for a in attrs}
        self.max_read = max_read
        self.lock_path, self.owner_pid, self.session = lock_path, owner_pid, session  # set by the parent
        self.pid = os.getpid()  # the process whose file descriptors ``_fds`` and ``_hold`` are
        self._fds: dict[str, int] = {}
        self._hold: int | None = None  # shared lock on ``lock_path`` (a worker copy's)
        self._hold_ino: tuple[int, int] | None = None
        self._layouts: dict[tuple, tuple[Layout, list[str]]] = {}
        self._tables: dict[tuple, np.ndarray] = {}  # (group, name, chunk) -> block crc32s
        self._zarr: dict[tuple, Any] = {}

    def __getstate__(self) -> dict:
        return {"namespace": self.namespace, "attrs": list(self.attrs.values()), "max_read": self.max_read,
                "lock_path": self.lock_path, "owner_pid": self.owner_pid, "session": self.session}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)
        self._attach()

    def fresh(self) -> "WorkerRows":
        """A copy for this process (no descriptors or zarr handles of another one), holding
        the snapshot's lock for as long as it is open."""
        w = WorkerRows(self.namespace, list(self.attrs.values()), self.max_read, self.lock_path,
                       self.owner_pid, self.session)
        w._attach()
        return w

    def _attach(self) -> None:
        """Take a shared lock on the snapshot's lock file; if it is gone (or being released),
        leave ``_hold`` unset: every read then fails (see ``_check_held``)."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            st = os.fstat(fd)
        except BlockingIOError:  # the parent holds it exclusively only to release it
            os.close(fd)
            return
        self._hold, self._hold_ino = fd, (st.st_dev, st.st_ino)
        self._check_held()  # unlinked between our open and our lock: released

    def _check_held(self) -> None:
        """Raise unless the parent still reserves this snapshot's extents."""
        try:
            st = os.stat(self.lock_path)
            ok = self._hold is not None and (st.st_dev, st.st_ino) == self._hold_ino
        except FileNotFoundError:
            ok = False
        if not ok:
            raise FeatureStoreError(
                f"feature store {self.namespace!r}: this worker copy's snapshot (session {self.session} of process "
                f"{self.owner_pid}) was released: the store was closed, or the snapshot was superseded by a "
                "write before this copy was made; its extents may hold other data now. Get a new copy from "
                "the open store")

    def close(self) -> None:
        if os.getpid() == self.pid:  # a forked copy must not close its parent's descriptors
            for fd in self._fds.values():
                os.close(fd)
            if self._hold is not None:
                os.close(self._hold)
        self._fds, self._hold = {}, None

    def __del__(self) -> None:
        if getattr(self, "_hold", None) is not None or getattr(self, "_fds", None):
            self.close()

    def attr(self, group, name: str) -> SnapshotAttr:
        a = self.attrs.get((group, name))
        if a is None:
            known = ", ".join(_label(g, n) for g, n in self.attrs) or "none"
            raise KeyError(f"no feature attribute {_label(group, name)} in namespace {self.namespace!r} "
                           f"(worker snapshot); known: {known}")
        return a

    def gather(self, group, name: str, index) -> torch.Tensor:
        """``x[index]`` of attribute (``group``, ``name``) as a new CPU tensor."""
        a = self.attr(group, name)
        ids, out_shape = _normalize_index(index, a.shape[0], _label(group, name))
        uniq, inv = unique_rows(ids)
        if not len(uniq):
            return torch.empty((*out_shape, *a.row_shape), dtype=a.dtype)
        if self._hold is None:
            self._check_held()
        raw = self._read(a, uniq)
        self._check_held()  # the extents were still reserved while they were read
        rows = torch.from_numpy(np.ascontiguousarray(raw))
        rows = (rows.view(a.dtype) if a.dtype != torch.uint8 else rows).reshape(len(uniq), *a.row_shape)
        if len(inv) != len(uniq) or not _is_identity(inv):
            rows = rows.index_select(0, torch.from_numpy(inv.reshape(-1)))
        return rows.reshape(*out_shape, *a.row_shape)

    def _read(self, a: SnapshotAttr, rows: np.ndarray) -> np.ndarray:
        """The bytes of sorted unique ``rows``, one row per line."""
        if a.tier == "zarr":
            z = self._zarr.get((a.group, a.name))
            if z is None:
                import zarr

                z = self._zarr[(a.group, a.name)] = zarr.open_array(a.zarr_path, mode="r")
            return np.ascontiguousarray(z.oindex[(rows,)]).reshape(len(rows), -1).view(np.uint8)
        layout, paths = self._layout(a)
        plan = plan_reads(rows, layout, merge_gap=0, max_read=max(self.max_read, a.block), page=a.block or 4096)
        scratch = np.empty(plan.nbytes, dtype=np.uint8)
        for c, off, n, b in zip(plan.file.tolist(), plan.offset.tolist(), plan.length.tolist(),
                                plan.buf_offset.tolist()):
            if a.block:  # chunk coordinates (see _layout)
                self._pread(paths[c], scratch[b : b + n], a.chunks[c][1] + off)
                self._verify(a, c, off, scratch[b : b + n])
            else:
                self._pread(paths[c], scratch[b : b + n], off)
        return rows_from(scratch, plan.row_pos, a.row_bytes)

    def _verify(self, a: SnapshotAttr, c: int, rel: int, data: np.ndarray) -> None:
        """Check bytes ``rel``.. of chunk ``c`` (a whole number of blocks) against its crc32 table."""
        table = self._tables.get((a.group, a.name, c))
        path, offset, nbytes = a.chunks[c]
        if table is None:
            padded = align_up(max(nbytes, 1))
            raw = np.empty(4 * -(-padded // a.block), dtype=np.uint8)
            self._pread(path, raw, offset + padded)
            table = self._tables[(a.group, a.name, c)] = raw.view(np.uint32)
        for i in range(0, len(data), a.block):
            got, want = crc32(data[i : i + a.block]), int(table[(rel + i) // a.block])
            if got != want:
                key = a.keys[c] if c < len(a.keys) else f"chunk {c}"
                raise ChecksumError(f"object {key!r} ({_label(a.group, a.name)} in a worker snapshot): block "
                                    f"{(rel + i) // a.block} (file {path} offset {offset + rel + i}) has crc32 "
                                    f"{got:#010x}, recorded {want:#010x}")

    def _layout(self, a: SnapshotAttr) -> tuple[Layout, list[str]]:
        got = self._layouts.get((a.group, a.name))
        if got is None:
            paths = [p for p, _o, _n in a.chunks]  # one per chunk: reads are verified per chunk
            if a.block:  # offsets in the chunk, so reads start on its blocks; whole blocks up to its padded end
                off = np.zeros(len(a.chunks), dtype=np.int64)
                limit = np.array([align_up(max(n, 1)) for _p, _o, n in a.chunks], dtype=np.int64)
            else:  # offsets in the file, so reads start on its pages
                off = np.array([o for _p, o, _n in a.chunks], dtype=np.int64)
                limit = np.array([o + n for _p, o, n in a.chunks], dtype=np.int64)
            files = np.arange(len(a.chunks), dtype=np.int64)
            got = self._layouts[(a.group, a.name)] = (
                Layout(a.shape[0], a.row_bytes, a.chunk_rows, off, files, limit), paths)
        return got

    def _pread(self, path: str, out: np.ndarray, offset: int) -> None:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        view, done = memoryview(out), 0
        while done < len(out):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise OSError(f"{path}: short read at offset {offset + done} ({done} of {len(out)} bytes of a "
                              "feature-row read): the file is shorter than the feature store recorded")
            done += n
