"""Store maintenance: a missing manifest, verifying every object, reclaiming unnamed blocks.

A crash between a put's data write and its manifest commit leaves blocks allocated
in the data file that no manifest entry names; nothing else would ever free them.
:func:`check_store` (``TieredStore.check``, ``tiered store check``) finds them by
walking the free ranges of each tier (everything the manifest, retentions and
in-flight puts do not hold) and asking the filesystem which of those bytes are
allocated; ``repair`` punches them out.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from io_engine import Priority

from . import store_stream
from .atomic import write_json_atomic

if TYPE_CHECKING:
    from .store import TieredStore

log = logging.getLogger("tiered.store")

#: the host tier of a store opened from a directory by ``tiered store`` (objects stream through it)
CLI_HOST_CAPACITY = 64 << 20


def manifest_missing(store: "TieredStore", path: Path, start_empty: bool) -> None:
    """No manifest: a new store (write an empty one), or a lost one (refuse, unless ``start_empty``)."""
    from .store import StoreError

    held = []
    for tier in store._tiers.values():
        st = os.stat(tier.data_file)
        if st.st_size and st.st_blocks:
            held.append(f"{tier.data_file} ({st.st_size} bytes)")
    if held and not start_empty:
        raise StoreError(
            f"{path} is missing, but data file {', '.join(held)} holds objects that cannot be found "
            f"without it. Restore {path}, or run `tiered store check {store.root} --repair` to start "
            "the store empty and give the data file's blocks back (its objects are lost)")
    if held:
        log.warning("%s was missing: starting an empty store; %s are reclaimed by check(repair=True)",
                    path, ", ".join(held))
        store.recovered["manifest_missing"] = True
    write_json_atomic(path, store._snapshot())  # from now on, a missing manifest means a lost one


def check_store(store: "TieredStore", repair: bool) -> dict:
    """Verify every object's crc32s and measure (``repair``: punch out) the allocated bytes of each
    data file that nothing names. Returns ``objects`` and ``bytes_verified`` (checked),
    ``corrupt`` (key -> error), ``removed`` (corrupt keys deleted by ``repair``),
    ``reclaimable_bytes`` (tier -> allocated bytes nothing names, including space of superseded
    versions kept for reuse), ``reclaimed_bytes``, ``repaired``, and what ``open`` recovered
    (``ephemeral_removed``: a crashed process's ephemeral objects; ``manifest_missing``)."""
    report: dict = {"root": str(store.root), "objects": 0, "bytes_verified": 0, "corrupt": {}, "removed": [],
                    "reclaimable_bytes": {}, "reclaimed_bytes": 0, "repaired": repair, **store.recovered}
    from .store import punch_hole

    for key in store.keys():
        checked = _verify(store, key)
        if checked is None:
            continue
        nbytes, error = checked
        report["objects"] += 1
        if error:
            report["corrupt"][key] = error
        else:
            report["bytes_verified"] += nbytes
    if repair and report["corrupt"]:
        report["removed"] = _remove(store, list(report["corrupt"]))
    for name, tier in store._tiers.items():
        with store._lock:  # no extent is taken from the free ranges while they are measured and punched
            ranges = _unnamed_ranges(tier)
            found = _allocated(tier.data_file, ranges)
            if repair:
                for offset, length in ranges:
                    punch_hole(tier.data_file, offset, length)
        report["reclaimable_bytes"][name] = found
        if repair:
            report["reclaimed_bytes"] += found
    return report


def _verify(store: "TieredStore", key: str) -> tuple[int, str] | None:
    """(bytes, '') when ``key`` reads back with its recorded crc32s, else (bytes, the error); None
    when it is gone or external (no checksums)."""
    with store._lock:
        meta = store._objects.get(key)
        if meta is None or meta.extent.external:
            return None
        meta.extent.readers += 1
    try:
        store_stream.read_streamed(store, meta, lambda _o, _b: None, Priority.WRITEBACK)
    except (OSError, RuntimeError) as e:  # ChecksumError (a StoreError), engine I/O errors
        return meta.nbytes, str(e)
    finally:
        store._release_extent(meta.extent)
    return meta.nbytes, ""


def _remove(store: "TieredStore", keys: list[str]) -> list[str]:
    with store._lock:
        doomed = [store._objects[k] for k in keys if k in store._objects]
        gen = store._remove(doomed)
    store._commit_through(gen)
    return [m.key for m in doomed]


def _unnamed_ranges(tier) -> list[tuple[int, int]]:
    """The tier's free ranges, and whatever of its data file lies beyond its capacity."""
    space = tier.space
    ranges = [(off, space._sizes[off]) for off in space._offsets]
    size = os.path.getsize(tier.data_file)
    if size > space.capacity:
        ranges.append((space.capacity, size - space.capacity))
    return ranges


def _allocated(path: str, ranges: list[tuple[int, int]]) -> int:
    """Bytes of ``ranges`` that the filesystem has blocks for (SEEK_DATA / SEEK_HOLE)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        return sum(_allocated_in(fd, off, min(off + n, size)) for off, n in ranges if off < size)
    finally:
        os.close(fd)


def _allocated_in(fd: int, start: int, end: int) -> int:
    total, pos = 0, start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                break
            raise
        if data >= end:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        total += min(hole, end) - data
        pos = hole
    return total


def config_for_directory(directory: str | os.PathLike) -> dict:
    """A store config for the storage tier directory ``directory`` (as ``tiered store`` opens it):
    its tiers as its manifest records them, or, for a manifest that does not, one tier holding
    every object."""
    from .store import DATA_FILE, MANIFEST, StoreError

    d = Path(directory)
    if not d.is_dir():
        raise StoreError(f"{d}: not a directory (expected a storage tier directory holding {MANIFEST})")
    manifest, data = d / MANIFEST, d / DATA_FILE
    if not manifest.exists() and not data.exists():
        raise StoreError(f"{d} holds no store: neither {MANIFEST} nor {DATA_FILE} is there")
    try:
        doc = json.loads(manifest.read_bytes()) if manifest.exists() else {}
    except ValueError as e:
        raise StoreError(f"{manifest}: manifest is not valid JSON ({e})") from e
    tiers = doc.get("tiers") if isinstance(doc, dict) else None
    if not tiers:
        tiers = {_only_tier(doc, manifest): {"path": str(d), "capacity": _span(doc, data)}}
    here = os.path.realpath(d)
    root = [n for n, t in tiers.items() if os.path.realpath(t.get("path", "")) == here]
    if not root and len(tiers) == 1:  # a one-tier store moved to another directory
        root = list(tiers)
        tiers = {root[0]: {**tiers[root[0]], "path": str(d)}}
    if not root:
        raise StoreError(f"{manifest} records tiers {sorted(tiers)}, none of them in {d}; pass --config FILE")
    ordered = {root[0]: tiers[root[0]], **{n: t for n, t in tiers.items() if n != root[0]}}
    return {"tiers": {"host": {"capacity": CLI_HOST_CAPACITY},
                      **{n: {"path": t["path"], "capacity": int(t["capacity"])} for n, t in ordered.items()}}}


def _only_tier(doc: dict, manifest: Path) -> str:
    from .store import StoreError

    names = sorted({o.get("tier") for o in doc.get("objects", {}).values()}) if doc else []
    if len(names) > 1:
        raise StoreError(f"{manifest} names objects on tiers {names} but not where those tiers are; "
                         "pass --config FILE")
    return names[0] if names else "storage"


def _span(doc: dict, data: Path) -> int:
    """A capacity that holds the data file and every extent the manifest names (4 KiB-aligned)."""
    ends = [int(o.get("offset", 0)) + int(o.get("nbytes", 0)) for o in (doc.get("objects", {}) if doc else {}).values()]
    size = max([data.stat().st_size if data.exists() else 0, 4096, *ends])
    return -(-size // 4096) * 4096
