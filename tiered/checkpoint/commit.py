"""Commit and retire: make a snapshot a checkpoint, keep the last N, clean up after crashes.

Commit of one save, in this order (a crash between any two steps leaves the previous
checkpoints loadable, and the next ``open`` removes what the save left):

1. wait for the store puts of its pieces (written, not yet durable);
2. ``store.retain(tag, keys)``: one store commit (one fdatasync per tier, one store
   manifest) makes the pieces durable and keeps those exact versions for the tag;
3. write the checkpoint manifest (the commit point), naming the tag and the records;
4. delete the piece keys from the store's object table (``delete_prefix``: one store
   commit): the retention keeps the bytes.

Retiring a step removes its manifest (then fsyncs the directory), then releases its tag:
the store frees the extents, so the storage tier's ``used`` falls by the step's size.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from io_engine import gather

from ..atomic import TEMP_PREFIX, fsync_dir, remove_stale_temps, write_json_atomic
from .format import (
    COLD_RE, DATA_RE, FORMAT, FORMAT_VERSION, SEGMENT, CheckpointError, cold_name, committed_steps, manifest_name,
    read_manifest, referenced_zarrs, retain_tags, tensor_crcs,
)
from .snapshot import _COPIED, _PENDING, CheckpointHandle

log = logging.getLogger("tiered.checkpoint")

PART_FIELDS = ("key", "version", "tier", "offset", "nbytes", "crc32")


def part_record(located: dict) -> dict:
    """What a manifest keeps of a ``TieredStore.retain`` record."""
    if located.get("segment", SEGMENT) != SEGMENT:
        raise CheckpointError(f"store object {located['key']!r} is checksummed per {located['segment']} bytes, "
                              f"checkpoints per {SEGMENT}")
    return {k: located[k] for k in PART_FIELDS}


class Levels:
    """The commit, cold and retention half of :class:`~.lazy.LazyCheckpointer`."""

    # -- commit ----------------------------------------------------------------------
    def _commit(self, h) -> None:
        gather(h.writes).result()
        keys = [p.key for p in h.pieces]
        located = {r["key"]: r for r in (self.store.retain(h.retain_tag, keys) if keys else [])}
        tensors = []
        for rec in h.records:
            pieces = rec.pop("pieces", None)
            if pieces is not None:
                rec["parts"] = [part_record(located[p.key]) for p in pieces]
            tensors.append(rec)
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": h.step, "segment": SEGMENT,
               "created": time.time(), "tensors": tensors, "tree": h.tree, "retain_tag": h.retain_tag}
        mpath = self.directory / manifest_name(h.step)
        with self._retire_lock:  # read old -> publish new -> drop old: no retire or load in between
            old = read_manifest(mpath) if mpath.exists() else None
            doc["commit_seq"] = self._commit_seq + 1
            _publish(mpath, doc)  # the commit point: once renamed, the manifest is the checkpoint's
            self._commit_seq += 1
            h.doc = doc
            h.pieces = []
            h.stats["durable_s"] = time.perf_counter() - h.t_called
            if h.cold is not None:
                with self._lock:
                    self._cold_busy[h.step] += 1
                h.cold_pin = self._pin(self.directory, doc)
            try:  # committed: a failure from here on is not this save's, and must not undo it
                fsync_dir(self.directory)
                if old is not None:  # the same step saved again: its previous bytes are unreferenced now
                    self._drop(self.directory, old)
                self.store.delete_prefix(h.key_prefix)  # one store commit; the retention keeps the bytes
                self._retire(self.directory, self.keep_last)
            except BaseException as e:  # noqa: BLE001 - raised by the next save(), wait_all() or close()
                log.error("checkpoint step %d in %s: after its commit: %s", h.step, self.directory, e)
                failed = CheckpointHandle(h.step, h.seq)  # reported even when this save's handle is waited for
                failed.durable.set_exception(e)
                self._record_failure(failed, CheckpointError(f"after committing step {h.step} to "
                                                             f"{self.directory}: {e}"))
        h.durable.set_result({"step": h.step, "manifest": str(mpath), "bytes": h.stats["bytes"]})

    # -- cold level ------------------------------------------------------------------
    def _cold_copy(self, h) -> dict:
        """Copy a committed step from the storage tier to a zstd zarr group, then commit it there."""
        import zarr
        from zarr.codecs import ZstdCodec

        doc = h.doc
        zname = cold_name(h.step, h.token)
        zpath = self.cold_directory / zname
        group = zarr.open_group(store=zarr.storage.LocalStore(str(zpath)), mode="w", zarr_format=3)
        paths = self._retained_paths(doc, self.directory / manifest_name(h.step))
        tensors = []
        for i, t in enumerate(doc["tensors"]):
            n = t["nbytes"]
            arr = group.create_array(name=f"t{i}", shape=(n,), chunks=(max(1, min(SEGMENT, n)),), dtype="uint8",
                                     compressors=[ZstdCodec(level=self.cold_level)], fill_value=0)

            def put(lo: int, data, arr=arr) -> None:
                arr[lo:lo + len(data)] = data

            self._read_parts(t, paths, put, f"step {h.step} tensor {t['name']!r}")
            tensors.append({k: v for k, v in t.items() if k != "parts"}
                           | {"array": f"t{i}", "crc32": tensor_crcs(t), "segment": SEGMENT})
        _fsync_tree(zpath)
        cold_doc = dict(doc, zarr=zname, tensors=tensors, retain_tag=None)
        mpath = self.cold_directory / manifest_name(h.step)
        with self._retire_lock:
            old = read_manifest(mpath) if mpath.exists() else None
            write_json_atomic(mpath, cold_doc)
            if old is not None:
                self._drop(self.cold_directory, old)
            self._retire(self.cold_directory, self.cold_keep_last)
        h.stats["cold_s"] = time.perf_counter() - h.t_called
        return {"step": h.step, "manifest": str(mpath)}

    # -- retention -------------------------------------------------------------------
    def _retire(self, directory: Path, keep: int) -> None:
        """Keep the ``keep`` most recently *committed* steps: a run that rolls back to an earlier
        step and saves again keeps that save (ranking by step number would delete it)."""
        with self._retire_lock:
            steps = commit_order(directory)
            for step in steps[:-keep]:
                if directory == self.directory:
                    with self._lock:
                        if step in self._cold_busy:
                            continue  # the cold level still reads it; retired on a later pass
                self.delete(step, _directory=directory)

    def delete(self, step: int, *, _directory: Path | None = None) -> None:
        """Retire ``step`` from a level (default: the storage level): the manifest goes first
        (then the directory is fsynced), then its bytes (store retention, or zarr copy)."""
        directory = self.directory if _directory is None else _directory
        with self._retire_lock:
            mpath = directory / manifest_name(step)
            if not mpath.exists():
                raise CheckpointError(f"delete({step}): no committed checkpoint of that step in {directory}")
            doc = read_manifest(mpath)
            mpath.unlink()
            fsync_dir(directory)
            self._drop(directory, doc)

    def _drop(self, directory: Path, doc: dict) -> None:
        """Free the bytes of a manifest no longer visible; deferred while a reader pins them."""
        with self._retire_lock:
            key = _doc_key(directory, doc)
            if self._pins.get(key):
                self._deferred[key] = (directory, doc)  # the last reader drops it (_unpin)
                return
            self._drop_now(directory, doc)

    def _drop_now(self, directory: Path, doc: dict) -> None:
        if doc.get("zarr"):
            path = directory / doc["zarr"]
            if path.is_dir():
                shutil.rmtree(path)
        if doc.get("data_file"):  # format 1
            path = directory / doc["data_file"]
            self.store.engine.forget(path)
            path.unlink(missing_ok=True)
        if doc.get("retain_tag"):
            self.store.release(doc["retain_tag"])

    # -- readers ---------------------------------------------------------------------
    def _pin(self, directory: Path, doc: dict) -> tuple:
        """Keep the bytes of ``doc`` (read from a visible manifest, under ``_retire_lock``) until
        ``_unpin``: a retire, delete or re-save meanwhile removes the manifest at once and frees
        the bytes after the last reader (a load, a cold copy)."""
        key = _doc_key(directory, doc)
        with self._retire_lock:
            self._pins[key] += 1
        return key

    def _unpin(self, key: tuple) -> None:
        with self._retire_lock:
            self._pins[key] -= 1
            if self._pins[key] > 0:
                return
            del self._pins[key]
            deferred = self._deferred.pop(key, None)
            if deferred is not None:
                self._drop_now(*deferred)

    # -- recovery --------------------------------------------------------------------
    def _recover(self) -> None:
        """Remove what an interrupted save left: temp manifests, store retentions no committed
        manifest names, the store objects of unfinished saves, zarr copies no manifest names."""
        remove_stale_temps(self.directory)
        keep_tags = retain_tags(committed_steps(self.directory))
        stale_tags = [t for t in self.store.retained(self._tag_prefix) if t not in keep_tags]
        for tag in stale_tags:
            self.store.release(tag)
        stale_keys = self.store.delete_prefix(self._key_prefix)
        removed = _remove_unnamed_data_files(self.directory)
        if self.cold_directory is not None:
            removed += remove_stale_temps(self.cold_directory)
            keep = referenced_zarrs(committed_steps(self.cold_directory))
            for name in os.listdir(self.cold_directory):
                if COLD_RE.match(name) and name not in keep:
                    shutil.rmtree(self.cold_directory / name)
                    removed += 1
            if removed:
                fsync_dir(self.cold_directory)
        self._commit_seq = max(last_commit_seq(self.directory),
                               last_commit_seq(self.cold_directory) if self.cold_directory else 0)
        if stale_tags or stale_keys or removed:
            log.info("checkpoint %s: removed leftovers of interrupted saves (%d retentions, %d objects, %d files)",
                     self.directory, len(stale_tags), len(stale_keys), removed)

    # -- failures --------------------------------------------------------------------
    def _fail_safely(self, h, e: BaseException) -> None:
        """``_fail``, keeping the level's thread alive (and the sentinel chain intact) if the
        clean-up itself fails: that error is reported too, with the save's."""
        try:
            self._fail(h, e)
        except BaseException as e2:  # noqa: BLE001 - recorded below, raised by the next call
            log.error("checkpoint step %d: clean-up after the failure failed too: %s", h.step, e2)
            e2.add_note(f"while cleaning up after checkpoint step {h.step} failed: {e!r}")
            if h.durable.set_running_or_notify_cancel():
                h.durable.set_exception(e)
            h._snapshot.set()
            self._record_failure(h, e2)

    def _fail(self, h, e: BaseException) -> None:
        """A save failed: unblock hooks, free its buffers, remove its store objects and retention."""
        log.error("checkpoint step %d failed: %s", h.step, e)
        with self._lock:
            for p in h.pieces:
                if p.state == _PENDING:
                    p.state = _COPIED
                    lst = self._pending.get(p.ptr)
                    if lst is not None and p in lst:
                        lst.remove(p)
                        if not lst:
                            del self._pending[p.ptr]
                    p.src = None
                    p.event.set()
        for p in h.pieces:
            p.event.wait()
            if p.buf is not None and not p.submitted:
                self.host.free(p.buf)
                p.buf = None
        try:
            gather(h.writes).exception()
        finally:
            try:
                self.store.delete_prefix(h.key_prefix)
                self.store.release(h.retain_tag)
            finally:
                if h.durable.set_running_or_notify_cancel():
                    h.durable.set_exception(e)
                if h.cold is not None and h.cold.set_running_or_notify_cancel():
                    h.cold.set_exception(e)
                h._snapshot.set()
                self._record_failure(h, e)

    def _record_failure(self, h, e: BaseException) -> None:
        with self._lock:
            self._failures.append((h, e))


def _rank(doc: dict) -> tuple:
    """Commit order of a manifest: its ``commit_seq`` (a counter, immune to wall-clock steps);
    manifests written before it existed come first, by ``created``."""
    if "commit_seq" in doc:
        return (1, int(doc["commit_seq"]))
    return (0, float(doc.get("created", 0.0)))


def _ranked(directory: Path) -> list[tuple[tuple, int]]:
    ranked = []
    for step, path in committed_steps(directory).items():
        try:
            ranked.append((_rank(read_manifest(path)), step))
        except FileNotFoundError:
            continue  # retired meanwhile by another pass
    return sorted(ranked)


def commit_order(directory: Path) -> list[int]:
    """Committed steps in ``directory``, oldest commit first (``commit_seq``, then step)."""
    return [step for _rank, step in _ranked(directory)]


def last_commit_seq(directory: Path) -> int:
    """The highest ``commit_seq`` of the manifests in ``directory`` (0 when none has one)."""
    return max((r[1] for r, _step in _ranked(directory) if r[0] == 1), default=0)


def _doc_key(directory: Path, doc: dict) -> tuple:
    """What identifies the bytes of one manifest (a step saved again has other bytes)."""
    return (str(directory), doc.get("retain_tag") or doc.get("zarr") or doc.get("data_file") or doc["step"])


def _publish(path: Path, doc: dict) -> None:
    """Write ``doc`` to a temp file, fsync it, rename it to ``path``. A failure before the rename
    leaves no trace; the rename is the commit point (the caller fsyncs the directory)."""
    data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
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


def _remove_unnamed_data_files(directory: Path) -> int:
    """Delete the data files of format-1 saves that never committed (no manifest names them)."""
    keep = {doc.get("data_file") for doc in map(read_manifest, committed_steps(directory).values())}
    removed = 0
    for name in os.listdir(directory):
        if DATA_RE.match(name) and name not in keep:
            (directory / name).unlink(missing_ok=True)
            removed += 1
    if removed:
        fsync_dir(directory)
    return removed


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (zarr writes without syncing)."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)
    fsync_dir(root.parent)
