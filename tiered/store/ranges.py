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
from tiered.io_engine import IOFuture, Op, Priority, Request, chain, completed, gather
from tiered.io_engine.batch import submit_read_arrays

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

        def check(held) -> None:
            for key, off, length, out in reads:
                self._check_range(key, held[key][0], off, length, out)

        def submit_reads(held, metas) -> IOFuture:
            reqs = [Request(Op.READ, held[key][1], held[key][0].extent.offset + off, length, out_[:length], priority)
                    for key, off, length, out_ in reads]
            return self._submit_verified(reads, reqs, metas)

        return self._run_ranges([key for key, *_rest in reads], check, submit_reads,
                                lambda metas: self._account_ranges(reads, metas), f"read {len(reads)} ranges", priority)

    def read_range_arrays(self, keys, which, offsets, lengths, buf, buf_offsets, *, owner: str = DEFAULT_OWNER,
                          priority: Priority = Priority.DEMAND) -> IOFuture:
        """:meth:`read_ranges` for many ranges given as arrays: range i is bytes ``[offsets[i],
        offsets[i] + lengths[i])`` of ``keys[which[i]]`` into ``buf[buf_offsets[i]:]`` (``buf`` a
        writable uint8 numpy array). The same checks, block verification, extent holds and
        accounting, done with numpy calls instead of a tuple, a check and an engine request per
        range (a minibatch gather issues ~10^4 ranges); on a kernel-queue engine (``native``,
        ``aio``) each group of aligned ranges goes to the driver as one batch."""
        self._check_open()
        keys = list(keys)
        which, offsets, lengths, buf_offsets = (np.asarray(x, dtype=np.int64).reshape(-1)
                                                for x in (which, offsets, lengths, buf_offsets))
        _check_arrays(keys, which, offsets, lengths, buf, buf_offsets)

        def submit_reads(held, _metas) -> IOFuture:
            if not len(offsets):
                return completed([0])
            return self._submit_verified_arrays(keys, held, which, offsets, lengths, buf, buf_offsets, priority)

        return self._run_ranges(keys, lambda held: _check_range_arrays(keys, [held[k][0] for k in keys], which,
                                                                       offsets, lengths),
                                submit_reads, lambda metas: self._account_range_arrays(keys, which, lengths, metas),
                                f"read {len(offsets)} ranges", priority)

    def _run_ranges(self, keys, check, submit_reads, account, label: str, priority: Priority) -> IOFuture:
        """What both range reads do around their reads: hold ``keys``' current extents,
        ``check(held)`` the ranges, read the block tables not read yet, then
        ``submit_reads(held, metas)`` (a future of byte counts, started on whichever thread read
        the last table: it never blocks) and ``account(metas)``; the extents are released either
        way. Returns a future of the bytes read."""
        held: dict[str, tuple[ObjectMeta, str]] = {}
        try:
            with self._lock:
                for key in keys:
                    if key not in held:
                        held[key] = self._hold_for_ranges(key)
            check(held)
            missing = [(meta, path) for meta, path in held.values() if meta.block and meta.block_crcs is None]
            tables = [self._load_block_table(meta, path, priority) for meta, path in missing]
        except BaseException:
            self._release_held(held)
            raise
        metas = {key: meta for key, (meta, _path) in held.items()}
        names = ", ".join(list(metas)[:3]) + ("..." if len(metas) > 3 else "")
        out = IOFuture(label)

        def fail(e: BaseException) -> None:
            self._release_held(held)
            e.add_note(f"while reading ranges of {names}")
            out.set_exception(e)

        def finish(f) -> None:
            try:
                nbytes = sum(f.result())
                account(metas)
            except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
                fail(e)
                return
            self._release_held(held)
            out.set_result(nbytes)

        def submit(_f=None) -> None:
            try:
                if _f is not None:
                    _f.result()
                fut = submit_reads(held, metas)
            except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
                fail(e)
                return
            fut.add_done_callback(finish)

        if tables:
            gather(tables).add_done_callback(submit)
        else:
            submit()
        return out

    def _submit_verified_arrays(self, keys, held, which, offsets, lengths, buf, buf_offsets,
                                priority: Priority) -> IOFuture:
        """As :meth:`_submit_verified`, for :meth:`read_range_arrays`: per group one
        ``submit_read_arrays`` batch (or, when the engine cannot take it so, ``submit_many``)."""
        paths = sorted({held[k][1] for k in keys})
        key_path = np.array([paths.index(held[k][1]) for k in keys], dtype=np.int64)
        key_base = np.array([held[k][0].extent.offset for k in keys], dtype=np.int64)
        key_block = np.array([held[k][0].block or 0 for k in keys], dtype=np.int64)
        metas = {k: held[k][0] for k in keys}
        path_idx, file_off = key_path[which], key_base[which] + offsets
        aligned = ((file_off | lengths | (buf_offsets + buf.ctypes.data)) % 4096) == 0
        futs = []
        try:
            for i, j in _array_groups(lengths):
                fut = self._submit_group(paths, path_idx, file_off, lengths, buf, buf_offsets, aligned, i, j, priority)
                blocked = np.flatnonzero(key_block[which[i:j]]) + i
                if len(blocked):
                    part = [(keys[w], o, n, buf[b: b + n]) for w, o, n, b in
                            zip(which[blocked].tolist(), offsets[blocked].tolist(), lengths[blocked].tolist(),
                                buf_offsets[blocked].tolist())]
                    fut = chain(fut, lambda nb, part=part: self._verify_ranges(part, metas, nb))
                futs.append(fut)
        except BaseException as e:  # noqa: BLE001 - reported once the submitted groups ended
            failed = IOFuture("ranges not submitted")
            failed.set_exception(e)
            futs.append(failed)
        return gather(futs, f"verified reads of {len(offsets)} ranges")

    def _submit_group(self, paths, path_idx, file_off, lengths, buf, buf_offsets, aligned, i: int, j: int,
                      priority: Priority) -> IOFuture:
        """Reads [i, j): the 4 KiB-aligned ones as one ``submit_read_arrays`` batch where the engine
        takes it, the others (a chunk's unaligned edges in an in-place file) as ordinary requests;
        one future of their total bytes."""
        pick = np.arange(i, j)
        fast = pick[aligned[i:j]]
        futs = []
        if len(fast):
            f = submit_read_arrays(self.engine, paths, path_idx[fast], file_off[fast], lengths[fast], buf,
                                   buf_offsets[fast], priority)
            if f is not None:
                futs.append(f)
                pick = pick[~aligned[i:j]]
        if len(pick):
            futs.append(self.engine.submit_many(
                [Request(Op.READ, paths[p], o, n, buf[b: b + n], priority) for p, o, n, b in
                 zip(path_idx[pick].tolist(), file_off[pick].tolist(), lengths[pick].tolist(),
                     buf_offsets[pick].tolist())]))
        if len(futs) == 1:
            return futs[0]
        return chain(gather(futs), sum)

    def _account_range_arrays(self, keys, which, lengths, metas: dict[str, ObjectMeta]) -> None:
        """:meth:`_account_ranges` for :meth:`read_range_arrays`."""
        per_pos = np.bincount(which, weights=lengths, minlength=len(keys)).astype(np.int64).tolist()
        per_key: dict[str, int] = {}
        for key, n in zip(keys, per_pos):
            if n:
                per_key[key] = per_key.get(key, 0) + n
        self._account_ranges([(k, 0, n, None) for k, n in per_key.items()], metas)

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


def _array_groups(lengths: np.ndarray) -> list[tuple[int, int]]:
    """:func:`_groups` for an array of lengths, with numpy: a group ends at the first range whose
    cumulative bytes reach the next multiple of the target."""
    n = len(lengths)
    if not n:
        return []
    ends = np.cumsum(lengths)
    target = max(GROUP_BYTES, int(ends[-1]) // MAX_GROUPS)
    cuts = np.unique(np.searchsorted(ends, np.arange(target, int(ends[-1]), target), side="left") + 1)
    bounds = [0, *[int(c) for c in cuts if 0 < c < n], n]
    return list(zip(bounds[:-1], bounds[1:]))


def _check_arrays(keys: list, which, offsets, lengths, buf, buf_offsets) -> None:
    """The shapes and the buffer of a :meth:`read_range_arrays` call."""
    n = len(offsets)
    if not (len(which) == len(lengths) == len(buf_offsets) == n):
        raise StoreError(f"read_range_arrays: which ({len(which)}), offsets ({n}), lengths ({len(lengths)}) and "
                         f"buf_offsets ({len(buf_offsets)}) must have one entry per range")
    if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1 or not buf.flags.writeable:
        raise StoreError("read_range_arrays: buf must be a writable 1-D uint8 numpy array")
    if n and ((which < 0).any() or int(which.max()) >= len(keys)):
        raise StoreError(f"read_range_arrays: which must index the {len(keys)} keys")
    if n and ((buf_offsets < 0).any() or int((buf_offsets + np.maximum(lengths, 0)).max()) > len(buf)):
        i = int(np.argmax((buf_offsets < 0) | (buf_offsets + lengths > len(buf))))
        raise StoreError(f"read_range_arrays({keys[int(which[i])]!r}): range {i} lands at buffer bytes "
                         f"{int(buf_offsets[i])}..{int(buf_offsets[i] + lengths[i])}, "
                         f"outside the {len(buf)}-byte buffer")


def _check_range_arrays(keys: list, metas: list, which, offsets, lengths) -> None:
    """:meth:`_Ranges._check_range` for every range at once; the first bad one is named."""
    if not len(offsets):
        return
    ends = np.array([m.nbytes if m.extent.external else -(-max(m.nbytes, 1) // 4096) * 4096 for m in metas],
                    dtype=np.int64)[which]
    blocks = np.array([m.block or 0 for m in metas], dtype=np.int64)[which]
    stop = offsets + lengths
    bad = (offsets < 0) | (lengths <= 0) | (stop > ends)
    b = np.maximum(blocks, 1)
    bad |= (blocks > 0) & ((offsets % b != 0) | ((lengths % b != 0) & (stop != ends)))
    if bad.any():
        i = int(np.argmax(bad))
        w = int(which[i])
        _Ranges._check_range(keys[w], metas[w], int(offsets[i]), int(lengths[i]), np.empty(int(max(lengths[i], 0)),
                                                                                          np.uint8))
        raise AssertionError("unreachable: the range check above raises")  # pragma: no cover


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
