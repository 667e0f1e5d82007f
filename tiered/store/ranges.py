"""Byte-range reads: parts of objects straight into the caller's buffers, verified.

A feature table's minibatch wants thousands of scattered rows, not whole objects: loading the
objects into the host tier would read (and cache) far more than asked. :meth:`read_ranges` reads
just the requested ranges of the objects' current versions, as one batch of engine requests,
verifies each against the crc32 recorded per ``block`` bytes when the object was put with
``block=``, counts the bytes and emits an access event per object, and holds the versions'
extents against freeing until the reads are done.
"""

from __future__ import annotations

import numpy as np

from allocators import aligned_empty
from io_engine import IOFuture, Op, Priority, Request, chain, gather

from ..checksums import crc32
from .errors import ChecksumError, StoreError
from .extents import file_identity
from .objects import DEFAULT_OWNER, ObjectMeta


class _Ranges:
    """Part of :class:`~tiered.store.TieredStore` (see its docstring)."""

    def read_ranges(self, reads, *, owner: str = DEFAULT_OWNER, priority: Priority = Priority.DEMAND) -> IOFuture:
        """Read ``(key, offset, length, out)`` ranges: bytes ``[offset, offset + length)`` of each
        key's current version into ``out`` (a writable uint8 numpy array of ``length`` bytes; a
        page-aligned buffer, offset and length take the O_DIRECT path). One engine call for all.

        Objects put with ``block=B`` are verified block by block: offsets must be multiples of
        ``B`` and lengths too, except a range that ends at the object's padded end (its size
        rounded up to 4 KiB, which may be read). Objects read in place from external files
        (:meth:`register_external`) are checked by file identity. Other objects are refused (put
        them with ``block=`` to read parts of them). Returns a future of the bytes read; it fails
        with a ChecksumError naming the object, the block and the file offset."""
        self._check_open()
        reads = list(reads)
        held: dict[str, tuple[ObjectMeta, str]] = {}
        try:
            with self._lock:
                for key, _off, _len, _out in reads:
                    if key not in held:
                        held[key] = self._hold_for_ranges(key)
            for key, off, length, out in reads:
                self._check_range(key, held[key][0], off, length, out)
            missing = [(meta, path) for meta, path in held.values() if meta.block and meta.block_crcs is None]
            tables = [self._load_block_table(meta, path, priority) for meta, path in missing]
        except BaseException:
            self._release_held(held)
            raise
        metas = {key: meta for key, (meta, _path) in held.items()}
        names = ", ".join(list(metas)[:3]) + ("..." if len(metas) > 3 else "")
        out = IOFuture(f"read {len(reads)} ranges")

        def fail(e: BaseException) -> None:
            self._release_held(held)
            e.add_note(f"while reading ranges of {names}")
            out.set_exception(e)

        def finish(f) -> None:
            try:
                out.set_result(self._verify_ranges(reads, metas, f.result()))
            except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
                fail(e)
                return
            self._release_held(held)

        def submit(_f=None) -> None:
            # never blocks: it may run on the engine worker that read the last checksum table
            try:
                if _f is not None:
                    _f.result()
                reqs = [Request(Op.READ, held[key][1], held[key][0].extent.offset + off, length, out_[:length],
                                priority) for key, off, length, out_ in reads]
                self.engine.submit_many(reqs).add_done_callback(finish)
            except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
                fail(e)

        if tables:
            gather(tables).add_done_callback(submit)
        else:
            submit()
        return out

    def _hold_for_ranges(self, key: str) -> tuple[ObjectMeta, str]:
        meta = self._objects.get(key)
        if meta is None:
            raise KeyError(f"no object {key!r} in the store at {self.root}")
        ext = meta.extent
        if ext.external:
            if file_identity(ext.path) != ext.identity:
                raise StoreError(f"object {key!r}: {ext.path} changed since it was registered "
                                 "(size, mtime or inode differ); register it again")
            path = ext.path
        elif not meta.block:
            raise StoreError(f"read_ranges({key!r}): the object has no block checksums to verify parts of it "
                             "with; put it with block=4096 (or read it whole)")
        else:
            path = self._tiers[ext.tier].data_file
        ext.readers += 1
        return meta, path

    def _release_held(self, held: dict) -> None:
        for meta, _path in held.values():
            self._release_extent(meta.extent)
        held.clear()

    @staticmethod
    def _check_range(key: str, meta: ObjectMeta, off: int, length: int, out) -> None:
        end = meta.nbytes if meta.extent.external else -(-max(meta.nbytes, 1) // 4096) * 4096
        if off < 0 or length <= 0 or off + length > end:
            raise StoreError(f"read_ranges({key!r}): bytes {off}..{off + length} are outside the object's {end} bytes")
        if meta.block and (off % meta.block or (length % meta.block and off + length != end)):
            raise StoreError(f"read_ranges({key!r}): bytes {off}..{off + length} are not whole blocks of "
                             f"{meta.block} bytes (the object's checksum block)")
        if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.nbytes < length:
            raise StoreError(f"read_ranges({key!r}): out must be a uint8 numpy array of at least {length} bytes")

    def _load_block_table(self, meta: ObjectMeta, path: str, priority: Priority) -> IOFuture:
        """Read and verify the object's table of block crc32s (stored after its data) into
        ``meta.block_crcs``, without blocking the caller. The table is the store's own metadata
        (4 bytes per block), read into a private page-aligned buffer."""
        data = -(-max(meta.nbytes, 1) // 4096) * 4096
        n = -(-data // meta.block)
        buf = aligned_empty(-(-4 * n // 4096) * 4096)

        def check(_nbytes: int) -> None:
            table = buf[: 4 * n]
            got = crc32(table)
            if got != meta.table_crc:
                raise ChecksumError(f"object {meta.key!r} (version {meta.version}): its block checksum table in "
                                    f"{path} at offset {meta.extent.offset + data} has crc32 {got:#010x}, recorded "
                                    f"{meta.table_crc:#010x}")
            meta.block_crcs = table.view(np.uint32).copy()

        return chain(self.engine.read(path, meta.extent.offset + data, buf, len(buf), priority=priority), check,
                     f"checksums of {meta.key}")

    def _verify_ranges(self, reads, metas: dict[str, ObjectMeta], nbytes: int) -> int:
        """Check each range against its object's block crc32s (the versions read), count and emit."""
        per_key: dict[str, int] = {}
        for key, off, length, out in reads:
            meta = metas[key]
            per_key[key] = per_key.get(key, 0) + length
            if not meta.block:
                continue
            table, b = meta.block_crcs, meta.block
            for i in range(0, length, b):
                got = crc32(out[i:min(i + b, length)])
                want = int(table[(off + i) // b])
                if got != want:
                    raise ChecksumError(
                        f"object {key!r} (version {meta.version}): block {(off + i) // b} (bytes {off + i}.."
                        f"{off + min(i + b, length)}, file offset {meta.extent.offset + off + i}) has crc32 "
                        f"{got:#010x}, recorded {want:#010x}")
        with self._lock:
            for key, n in per_key.items():
                tier = metas[key].extent.tier
                self.counters.bytes_read[tier] = self.counters.bytes_read.get(tier, 0) + n
        for key, n in per_key.items():
            self._emit(key, n, "read", metas[key].kind, metas[key].extent.tier)
        return nbytes
