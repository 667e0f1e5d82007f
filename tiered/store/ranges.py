"""Byte-range reads: parts of objects straight into the caller's buffers, verified.

A feature table's minibatch wants thousands of scattered rows, not whole objects: loading the
objects into the host tier would read (and cache) far more than asked. :meth:`read_ranges` reads
just the requested ranges of the objects' current versions, in a few batches of engine requests,
verifies each against the crc32 recorded per ``block`` bytes when the object was put with
``block=``, counts the bytes and emits an access event per object, and holds the versions'
extents against freeing until the reads are done. Each batch is verified by the engine worker
that completes it while later batches are still read: a gather's ~10^4 crc32 calls (4 KiB each,
too small for crc32 to release the GIL) no longer run after the whole read, on one thread.
"""

from __future__ import annotations

import numpy as np

from tiered.allocators import aligned_empty
from tiered.io_engine import IOFuture, Op, Priority, Request, chain, gather

from ..checksums import block_crcs, crc32
from .errors import ChecksumError, StoreError
from .extents import file_identity
from .objects import DEFAULT_OWNER, ObjectMeta

#: reads are submitted and verified in up to this many groups of consecutive ranges per call
MAX_GROUPS = 16
#: but no group smaller than this (unless the call is)
GROUP_BYTES = 1 << 20


class _Ranges:
    """Part of :class:`~tiered.store.TieredStore` (see its docstring)."""

    def read_ranges(self, reads, *, owner: str = DEFAULT_OWNER, priority: Priority = Priority.DEMAND) -> IOFuture:
        """Read ``(key, offset, length, out)`` ranges: bytes ``[offset, offset + length)`` of each
        key's current version into ``out`` (a writable uint8 numpy array of ``length`` bytes; a
        page-aligned buffer, offset and length take the O_DIRECT path). Submitted in a few
        groups of consecutive ranges, each verified as soon as it was read.

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
                nbytes = sum(f.result())
                self._account_ranges(reads, metas)
            except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
                fail(e)
                return
            self._release_held(held)
            out.set_result(nbytes)

        def submit(_f=None) -> None:
            # never blocks: it may run on the engine worker that read the last checksum table
            try:
                if _f is not None:
                    _f.result()
                reqs = [Request(Op.READ, held[key][1], held[key][0].extent.offset + off, length, out_[:length],
                                priority) for key, off, length, out_ in reads]
            except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
                fail(e)
                return
            self._submit_verified(reads, reqs, metas).add_done_callback(finish)

        if tables:
            gather(tables).add_done_callback(submit)
        else:
            submit()
        return out

    def _submit_verified(self, reads, reqs, metas: dict[str, ObjectMeta]) -> IOFuture:
        """Submit the reads in groups of consecutive ranges, each verified by the engine worker
        that completes it, while later groups are still being read (verifying a round only after
        all of it was read left the disk idle meanwhile). The future completes once every group
        ended (the caller may free the buffers then), with the groups' byte counts or the first
        error in range order."""
        futs = []
        try:
            for i, j in _groups([r[2] for r in reads]):
                part = reads[i:j]
                futs.append(chain(self.engine.submit_many(reqs[i:j]),
                                  lambda n, part=part: self._verify_ranges(part, metas, n)))
        except BaseException as e:  # noqa: BLE001 - reported once the submitted groups ended
            failed = IOFuture("ranges not submitted")
            failed.set_exception(e)
            futs.append(failed)
        return gather(futs, f"verified reads of {len(reads)} ranges")

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

    @staticmethod
    def _verify_ranges(reads, metas: dict[str, ObjectMeta], nbytes: int) -> int:
        """Check every block of each range against its object's block crc32s (the version read):
        the group's checksums first, compared per object in one numpy call (a range costs a few
        Python calls, whether it holds one block or a thousand); a mismatch is then located range
        by range and raised as a ChecksumError naming the object, the block and the file offset."""
        per_key: dict[str, tuple[list[int], list[int]]] = {}  # key -> (crc32s read, their block numbers)
        for key, off, length, out in reads:
            b = metas[key].block
            if not b:
                continue
            got, blocks = per_key.get(key) or per_key.setdefault(key, ([], []))
            if length <= b:  # most gathers read one block per range: no list, no range
                got.append(crc32(out[:length]))
                blocks.append(off // b)
            else:
                got += block_crcs(out[:length], b)
                blocks += range(off // b, off // b + len(got) - len(blocks))
        if any(not np.array_equal(np.array(got, dtype=np.uint32), metas[key].block_crcs[blocks])
               for key, (got, blocks) in per_key.items()):
            for key, off, length, out in reads:
                if metas[key].block:
                    _check_blocks(key, metas[key], off, length, out)
            raise ChecksumError(f"ranges of {', '.join(sorted({r[0] for r in reads}))}: a block's crc32 differed "
                                "from the recorded one, then matched on a second look (the buffer changed)")
        return nbytes

    def _account_ranges(self, reads, metas: dict[str, ObjectMeta]) -> None:
        """Count the bytes read per tier and emit one read event per object."""
        per_key: dict[str, int] = {}
        for key, _off, length, _out in reads:
            per_key[key] = per_key.get(key, 0) + length
        with self._lock:
            for key, n in per_key.items():
                tier = metas[key].extent.tier
                self.counters.bytes_read[tier] = self.counters.bytes_read.get(tier, 0) + n
        for key, n in per_key.items():
            self._emit(key, n, "read", metas[key].kind, metas[key].extent.tier)


def _groups(lengths: list[int]) -> list[tuple[int, int]]:
    """Consecutive ranges [i, j) of about ``total / MAX_GROUPS`` bytes each, at least
    GROUP_BYTES (a group costs one engine submission and one verification call)."""
    target = max(GROUP_BYTES, sum(lengths) // MAX_GROUPS)
    out, i, acc = [], 0, 0
    for j, n in enumerate(lengths, 1):
        acc += n
        if acc >= target:
            out.append((i, j))
            i, acc = j, 0
    if i < len(lengths):
        out.append((i, len(lengths)))
    return out


def _check_blocks(key: str, meta: ObjectMeta, off: int, length: int, out) -> None:
    """Raise a ChecksumError for the first block of the range whose crc32 is not the recorded one."""
    b, table = meta.block, meta.block_crcs
    for i, got in enumerate(block_crcs(out[:length], b)):
        want = int(table[off // b + i])
        if got != want:
            at = off + i * b
            raise ChecksumError(
                f"object {key!r} (version {meta.version}): block {at // b} (bytes {at}.."
                f"{off + min((i + 1) * b, length)}, file offset {meta.extent.offset + at}) has crc32 "
                f"{got:#010x}, recorded {want:#010x}")
