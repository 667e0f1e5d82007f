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

from tiered.io_engine import Priority

from . import stream as store_stream
from .errors import ChecksumError, StoreError
from .extents import punch_hole
from .objects import DATA_FILE, MANIFEST
from ..atomic import write_json_atomic

if TYPE_CHECKING:
    from .core import TieredStore

log = logging.getLogger("tiered.store")

#: the host tier of a store opened from a directory by ``tiered store`` (objects stream through it)
CLI_HOST_CAPACITY = 64 << 20


TIER_MARKER = "tier.json"
_MARKER_FORMAT = "tiered-tier"


def _read_marker(directory: Path) -> dict | None:
    try:
        doc = json.loads((directory / TIER_MARKER).read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise StoreError(f"{directory / TIER_MARKER}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != _MARKER_FORMAT:
        raise StoreError(f"{directory / TIER_MARKER}: not a tiered tier marker")
    return doc


def check_tier_markers(store: "TieredStore") -> None:
    """Each storage tier directory records which store it belongs to (``tier.json``): a config that
    lists the tiers in another order, or names a tier directory of another store, is refused before
    anything is read or written there (its manifest would be missing, and a repair would destroy
    the other store's data)."""
    root = _read_marker(store.root)
    if root is not None and not root.get("root"):
        raise StoreError(f"{store.root} is tier {root.get('tier')!r} of the store at {root.get('root_path')}, not a "
                         f"store's first tier: open that store (with its config, tiers in their order)")
    store_id = root.get("store_id") if root else None
    for tier in list(store._tiers.values())[1:]:
        m = _read_marker(tier.path)
        if m is None:
            continue
        if store_id is None:  # markers are written first tier first: this tier belongs to another store
            raise StoreError(f"{tier.path} is tier {m.get('tier')!r} of the store at "
                             f"{m.get('root_path') or tier.path}; it cannot be tier {tier.name!r} of a new store at "
                             f"{store.root}")
        if m.get("root"):
            raise StoreError(f"{tier.path} is the first tier of another store; it cannot be tier {tier.name!r} "
                             f"of the store at {store.root}")
        if store_id is not None and m.get("store_id") != store_id:
            raise StoreError(f"{tier.path} is tier {m.get('tier')!r} of the store at {m.get('root_path')}, not of "
                             f"the store at {store.root}")


def write_tier_markers(store: "TieredStore") -> None:
    """Write the markers :func:`check_tier_markers` reads (once; they never change)."""
    import secrets

    root = _read_marker(store.root)
    store_id = root["store_id"] if root else secrets.token_hex(8)
    if root is None:
        write_json_atomic(store.root / TIER_MARKER, {"format": _MARKER_FORMAT, "store_id": store_id, "root": True,
                                                     "tier": store._tier_order[0]})
    for tier in list(store._tiers.values())[1:]:
        if _read_marker(tier.path) is None:
            write_json_atomic(tier.path / TIER_MARKER, {"format": _MARKER_FORMAT, "store_id": store_id,
                                                        "root": False, "tier": tier.name,
                                                        "root_path": str(store.root)})


def check_data_files(store: "TieredStore", created: list[str]) -> None:
    """Every data file the manifest names objects in exists and is not empty (a tier whose disk is
    not mounted shows an empty directory: refuse, rather than start the tier anew). A data file cut
    short is opened: reads past its end fail naming it, the objects before it stay readable."""
    ends: dict[str, int] = {}
    for meta in store._objects.values():
        if not meta.extent.external:
            ends[meta.extent.tier] = max(ends.get(meta.extent.tier, 0), meta.extent.offset + meta.extent.length)
    for name, end in ends.items():
        path = store._tiers[name].data_file
        size = os.path.getsize(path)
        if path in created or size == 0:
            what = "is missing" if path in created else f"holds {size} bytes"
            raise StoreError(f"{path} {what}, but the manifest names objects of tier {name!r} up to byte {end}: "
                             "is the tier's disk mounted? (nothing was changed)")


def manifest_missing(store: "TieredStore", path: Path, start_empty: bool) -> None:
    """No manifest: a new store (write an empty one), or a lost one (refuse, unless ``start_empty``)."""

    held = []
    for tier in store._tiers.values():
        st = os.stat(tier.data_file)
        if st.st_size and st.st_blocks:
            held.append(f"{tier.data_file} ({st.st_size} bytes)")
    if held and not start_empty:
        raise StoreError(
            f"{path} is missing, but data file {', '.join(held)} holds objects that cannot be found "
            f"without it. Restore {path}, or run `tiered store check {_check_target(store)} --repair` to "
            "start the store empty and give the data files' blocks back (its objects are lost)")
    if held:
        log.warning("%s was missing: starting an empty store; %s are reclaimed by check(repair=True)",
                    path, ", ".join(held))
        store.recovered["manifest_missing"] = True
    write_json_atomic(path, store._snapshot())  # from now on, a missing manifest means a lost one


def _check_target(store: "TieredStore") -> str:
    if len(store._tiers) > 1:
        return f"--config {store.config.source}"
    return str(store.root)


def check_store(store: "TieredStore", repair: bool) -> dict:
    """Verify every object's crc32s and measure (``repair``: punch out) the allocated bytes of each
    data file that nothing names. Returns ``objects`` and ``bytes_verified`` (checked),
    ``corrupt`` (key -> error), ``removed`` (corrupt keys deleted by ``repair``),
    ``reclaimable_bytes`` (tier -> allocated bytes nothing names, including space of superseded
    versions kept for reuse), ``reclaimed_bytes``, ``repaired``, and what ``open`` recovered
    (``ephemeral_removed``: a crashed process's ephemeral objects; ``manifest_missing``)."""
    report: dict = {"root": str(store.root), "objects": 0, "bytes_verified": 0, "corrupt": {}, "unreadable": {},
                    "removed": [], "reclaimable_bytes": {}, "reclaimed_bytes": 0, "repaired": repair,
                    **store.recovered}
    corrupt_versions: dict[str, int] = {}
    for key in store.keys():
        checked = _verify(store, key)
        if checked is None:
            continue
        nbytes, version, error, corrupt = checked
        report["objects"] += 1
        if not error:
            report["bytes_verified"] += nbytes
        elif corrupt:
            report["corrupt"][key] = error
            corrupt_versions[key] = version
        else:  # an I/O error is not proof of corruption (a disk not mounted, a transient EIO): never deleted
            report["unreadable"][key] = error
    if repair and corrupt_versions:
        report["removed"] = _remove(store, corrupt_versions)
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


def _verify(store: "TieredStore", key: str) -> tuple[int, int, str, bool] | None:
    """(bytes, version, error, corrupt): error '' when ``key`` reads back with its recorded crc32s;
    corrupt only for a checksum mismatch. None when it is gone or external (no checksums)."""
    with store._lock:
        meta = store._objects.get(key)
        if meta is None or meta.extent.external:
            return None
        meta.extent.readers += 1
    try:
        store_stream.read_streamed(store, meta, lambda _o, _b: None, Priority.WRITEBACK)
    except ChecksumError as e:
        return meta.nbytes, meta.version, str(e), True
    except (OSError, RuntimeError) as e:  # engine I/O errors
        return meta.nbytes, meta.version, str(e), False
    finally:
        store._release_extent(meta.extent)
    return meta.nbytes, meta.version, "", False


def _remove(store: "TieredStore", versions: dict[str, int]) -> list[str]:
    """Delete the corrupt versions found; a key put again since it was checked keeps its new version."""
    with store._lock:
        doomed = [m for k, v in versions.items() if (m := store._objects.get(k)) is not None and m.version == v]
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

    d = Path(directory)
    if not d.is_dir():
        raise StoreError(f"{d}: not a directory (expected a storage tier directory holding {MANIFEST})")
    marker = _read_marker(d)
    if marker is not None and not marker.get("root"):
        raise StoreError(f"{d} is tier {marker.get('tier')!r} of the store at {marker.get('root_path')}: "
                         f"run this on {marker.get('root_path')} (or with --config FILE)")
    manifest, data = d / MANIFEST, d / DATA_FILE
    if not manifest.exists() and not data.exists():
        raise StoreError(f"{d} holds no store: neither {MANIFEST} nor {DATA_FILE} is there")
    try:
        doc = json.loads(manifest.read_bytes()) if manifest.exists() else {}
    except ValueError as e:
        raise StoreError(f"{manifest}: manifest is not valid JSON ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("objects", {}), dict) or \
            not isinstance(doc.get("tiers", {}), dict):
        raise StoreError(f"{manifest}: not a tiered store manifest (expected a JSON object with an 'objects' table)")
    tiers = doc.get("tiers")
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
    for n, t in ordered.items():
        if not isinstance(t, dict) or not isinstance(t.get("path"), str) or not isinstance(t.get("capacity"), int):
            raise StoreError(f"{manifest}: tier {n!r} is recorded as {t!r}; expected a path and an integer capacity")
    return {"tiers": {"host": {"capacity": CLI_HOST_CAPACITY},
                      **{n: {"path": t["path"], "capacity": int(t["capacity"])} for n, t in ordered.items()}}}


def _only_tier(doc: dict, manifest: Path) -> str:

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
