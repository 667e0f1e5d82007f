"""Retention: versions kept where they are for a checkpoint, even when the key is rewritten."""

from __future__ import annotations

from ..checksums import SEGMENT
from ..dtypes import dtype_name
from .errors import StoreError
from .objects import Extent, check_key


class _Retention:
    """Part of :class:`~tiered.store.TieredStore` (see its docstring)."""

    # -- retention (checkpoints of stored objects) ----------------------------------
    def retain(self, tag: str, keys: list[str]) -> list[dict]:
        """Keep the current version of each of ``keys`` where it is until ``release(tag)``.

        The extents are neither overwritten nor freed, even when a key is put again or
        deleted, and the retention is in the committed manifest before this returns (one
        commit for all keys), so it survives a restart: a checkpoint can name the bytes
        instead of copying them. Returns, per key, where its bytes are: data file
        (``path``), offset, nbytes, dtype, shape, version, and the crc32 of each
        ``segment`` bytes.
        """
        self._check_open()
        check_key(tag)
        entries: list[tuple[dict, Extent]] = []
        with self._lock:
            for key in keys:
                meta = self._objects.get(key)
                if meta is None:
                    raise KeyError(f"retain: no object {key!r} in the store at {self.root}")
                if meta.extent.external:
                    raise StoreError(f"retain({key!r}): object is served in place from {meta.extent.path}, "
                                     "which the store does not own; copy it instead")
                if self._puts_in_flight.get(key):
                    raise StoreError(f"retain({key!r}): a put of it is still in flight, so the current "
                                     f"version {meta.version} may not be what the caller last wrote; "
                                     "wait for that put's future first")
            for key in keys:
                meta = self._objects[key]
                ext = meta.extent
                rec = {"key": key, "version": meta.version, "tier": ext.tier, "offset": ext.offset,
                       "nbytes": meta.nbytes, "dtype": dtype_name(meta.dtype), "shape": list(meta.shape),
                       "crc32": list(meta.crc32), "segment": SEGMENT, "owner": meta.owner,
                       **({"block": meta.block} if meta.block else {})}
                if meta.ephemeral:  # its bytes were never fdatasync'ed: the commit below must first
                    self._unsynced.add(ext.tier)
                ext.readers += 1
                entries.append((rec, ext))
            self._retained.setdefault(tag, []).extend(entries)
            self._gen += 1
            gen = self._gen

        def undo() -> None:
            recs = self._retained.get(tag, [])
            mine = {id(e) for e in entries}
            recs[:] = [e for e in recs if id(e) not in mine]  # identity: equal extents may differ
            for _rec, ext in entries:
                ext.readers -= 1
            if not recs:
                self._retained.pop(tag, None)
            self._free_retired()

        self._commit_through(gen, undo)
        return [{**rec, "path": self._tiers[rec["tier"]].data_file} for rec, _e in entries]

    def release(self, tag: str) -> bool:
        """Drop every retention of ``tag``; False when it holds none. Extents no version names any
        more are freed once a manifest without the retention is committed."""
        self._check_open()
        with self._lock:
            entries = self._retained.pop(tag, None)
            if entries is None:
                return False
            self._gen += 1
            gen = self._gen
            for _rec, ext in entries:
                ext.readers -= 1
                if ext.retired_gen is not None:
                    ext.retired_gen = max(ext.retired_gen, gen)
                    ext.punch = True  # kept for a checkpoint, not reused by its key: give it back
        self._commit_through(gen)
        return True

    def retained(self, prefix: str = "") -> dict[str, list[dict]]:
        """Retention tags starting with ``prefix`` and what each keeps (as :meth:`retain` returned)."""
        with self._lock:
            return {tag: [{**rec, "path": self._tiers[rec["tier"]].data_file} for rec, _e in recs]
                    for tag, recs in self._retained.items() if tag.startswith(prefix)}
