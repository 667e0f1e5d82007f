"""The manifest: loading it, snapshotting it, and the group commit that makes changes durable;
extents are freed only once a committed manifest no longer names them."""

from __future__ import annotations

import logging
import json
from pathlib import Path
from typing import Callable


from .. import ranks
from ..atomic import write_json_atomic
from ..dtypes import dtype_from, dtype_name
from . import check as store_check
from .errors import StoreError
from .objects import DEFAULT_OWNER, Extent, FORMAT, FORMAT_VERSION, MANIFEST, ObjectMeta, extent_length
from .extents import punch_hole

log = logging.getLogger("tiered.store")


def _writer_layout(path: Path, per_rank: bool) -> dict | None:
    """This process's rank record for the manifest at ``path``. A per-rank shard needs it (bad rank
    variables are an error); a store at a fixed path checks nothing, so there it is best effort:
    None where the variables cannot be read (they may be meant for something else)."""
    try:
        return ranks.layout_record()
    except ranks.RankError as e:
        if per_rank:
            raise StoreError(f"{path}: {e}") from None
        return None


class _Manifest:
    """Part of :class:`~tiered.store.TieredStore` (see its docstring)."""

    # -- manifest ------------------------------------------------------------------
    def _load_manifest(self) -> None:
        path = self.root / MANIFEST
        per_rank = any(t.path_template for t in self.config.storage_tiers)
        self._layout = _writer_layout(path, per_rank)  # who writes it: recorded in every snapshot
        try:
            with open(path, "rb") as f:
                doc = json.loads(f.read())
        except FileNotFoundError:
            store_check.manifest_missing(self, path, self._start_empty)
            return
        except ValueError as e:
            raise StoreError(f"{path}: manifest is not valid JSON ({e})") from e
        dropped = []
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest")
        if not self._check_layout:  # opened by a reader of another layout: the shard stays its writer's
            self._layout = doc.get("layout")
        elif per_rank and doc.get("objects"):  # a per-rank shard holding objects: its rank's only
            try:
                ranks.check_layout(path, doc.get("layout"))
            except ranks.RankError as e:
                raise StoreError(str(e)) from None
        for key, o in doc.get("objects", {}).items():
            try:
                tier_name, offset, nbytes = o["tier"], int(o["offset"]), int(o["nbytes"])
                meta = ObjectMeta(key, str(o["kind"]), dtype_from(o["dtype"]), tuple(int(d) for d in o["shape"]),
                                  nbytes, int(o["version"]), [int(c) for c in o["crc32"]],
                                  Extent(tier_name, offset, extent_length(nbytes, int(o.get("block", 0)))),
                                  owner=str(o.get("owner", DEFAULT_OWNER)), block=int(o.get("block", 0)),
                                  table_crc=int(o.get("table_crc", 0)), placed=o.get("placed") is True)
            except (KeyError, TypeError, ValueError) as e:
                raise StoreError(f"{path}: object {key!r} has a malformed entry ({e!r}): {o!r}") from e
            if o.get("ephemeral"):  # scratch of a process that crashed: delete it
                dropped.append((key, meta.extent))
                continue
            tier = self._tiers.get(tier_name)
            if tier is None:
                raise StoreError(
                    f"{path}: object {key!r} lives on tier {tier_name!r}, which the config "
                    f"({self.config.source}) does not define; known: {', '.join(self._tier_order)}"
                )
            try:
                tier.mark_used(meta.extent.offset, meta.extent.length, meta.owner)
            except RuntimeError as e:
                raise StoreError(f"{path}: object {key!r}: extent {offset}+{meta.extent.length} on tier "
                                 f"{tier_name!r} does not fit the tier's capacity or overlaps another") from e
            tier.objects += 1
            self._objects[key] = meta
        self._gen = self._committed_gen = int(doc.get("generation", 0))
        self._load_retained(doc.get("retained", {}), path)
        if dropped:
            self._forget_ephemeral(dropped)

    def _forget_ephemeral(self, dropped: list[tuple[str, Extent]]) -> None:
        """Commit a manifest without a crashed process's ephemeral objects, then give their
        blocks back (except any a retention tag keeps)."""
        write_json_atomic(self.root / MANIFEST, self._snapshot())
        kept = {(rec["tier"], int(rec["offset"])) for recs in self._retained.values() for rec, _e in recs}
        for _key, ext in dropped:
            if (ext.tier, ext.offset) not in kept and ext.tier in self._tiers:
                punch_hole(self._tiers[ext.tier].data_file, ext.offset, ext.length)
        self.recovered["ephemeral_removed"] = [key for key, _e in dropped]
        log.info("removed %d ephemeral objects left by a process that did not close %s", len(dropped), self.root)

    def _load_retained(self, retained: dict, path: Path) -> None:
        """Rebuild the extents kept for retention tags (see :meth:`retain`) from the manifest."""
        extents = {(m.extent.tier, m.extent.offset): m.extent for m in self._objects.values()}
        for tag, recs in retained.items():
            for r in recs:
                try:
                    tier_name, offset, nbytes = r["tier"], int(r["offset"]), int(r["nbytes"])
                except (KeyError, TypeError, ValueError) as e:
                    raise StoreError(f"{path}: retained extent of tag {tag!r} is malformed ({e!r}): {r!r}") from e
                tier = self._tiers.get(tier_name)
                if tier is None:
                    raise StoreError(f"{path}: tag {tag!r} retains an extent on tier {tier_name!r}, which the "
                                     f"config ({self.config.source}) does not define")
                ext = extents.get((tier_name, offset))
                if ext is None:  # a superseded or deleted version: still reserved until released
                    ext = Extent(tier_name, offset, extent_length(nbytes, int(r.get("block", 0))), retired_gen=0)
                    try:
                        tier.mark_used(offset, ext.length, str(r.get("owner", DEFAULT_OWNER)))
                    except RuntimeError as e:
                        raise StoreError(f"{path}: tag {tag!r}: retained extent {offset}+{ext.length} on tier "
                                         f"{tier_name!r} overlaps another or exceeds the capacity") from e
                    extents[(tier_name, offset)] = ext
                    self._retired.append(ext)
                ext.readers += 1
                self._retained.setdefault(tag, []).append((r, ext))

    def _snapshot(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "generation": self._gen, "layout": self._layout,
            "tiers": {n: {"path": str(t.path), "capacity": t.spec.capacity} for n, t in self._tiers.items()},
            "objects": {
                k: {"kind": m.kind, "dtype": dtype_name(m.dtype), "shape": list(m.shape),
                    "nbytes": m.nbytes, "version": m.version, "crc32": m.crc32,
                    "tier": m.extent.tier, "offset": m.extent.offset, **({"ephemeral": True} if m.ephemeral else {}),
                    **({"owner": m.owner} if m.owner != DEFAULT_OWNER else {}),
                    **({"placed": True} if m.placed else {}),
                    **({"block": m.block, "table_crc": m.table_crc} if m.block else {})}
                for k, m in self._objects.items() if not m.extent.external
            },
            **({"retained": {tag: [rec for rec, _e in recs] for tag, recs in self._retained.items()}}
               if self._retained else {}),
        }

    def _commit_through(self, gen: int, on_fail: Callable[[], None] | None = None) -> None:
        """Group commit: one manifest write covers every change up to the newest.

        ``on_fail`` runs (under the commit lock, so no other commit can make the
        change durable meanwhile) when the write fails, to take the change back.
        """
        with self._commit_lock:
            if self._committed_gen >= gen:
                return
            with self._lock:
                snap, snap_gen = self._snapshot(), self._gen
                unsynced, self._unsynced = self._unsynced, set()
            try:
                # every object in the snapshot was written before it was taken: one fdatasync
                # per tier now makes the sync=False puts among them durable before it names them
                for name in sorted(unsynced):
                    self._sync_data_file(name)
                write_json_atomic(self.root / MANIFEST, snap)
            except BaseException:
                with self._lock:
                    self._unsynced |= unsynced
                    if on_fail is not None:
                        on_fail()
                raise
            with self._lock:
                self._committed_gen = snap_gen
                self.counters.commits += 1
                self._free_retired()

    def _next_version(self, key: str) -> int:
        cur = self._objects.get(key)
        v = max(self._issued.get(key, 0), cur.version if cur else 0) + 1
        self._issued[key] = v
        return v

    def _unlink(self, meta: ObjectMeta, superseded: bool = False) -> None:
        """Forget ``meta``'s host copy and extent; call after bumping ``_gen`` for the change,
        so the extent is freed only once a manifest without it is committed. The blocks of a
        version ``superseded`` by a put stay allocated in the data file when it is freed: a key
        that is rewritten (optimizer state, KV blocks) reuses such space at once, and punching
        a hole there costs a syscall per object and a block allocation on the next write."""
        self._drop_host(meta)
        meta.extent.punch = not superseded
        if not meta.extent.external:
            meta.extent.retired_gen = self._gen
            self._retired.append(meta.extent)
            self._tiers[meta.extent.tier].objects -= 1

    def _free_retired(self) -> None:
        keep = []
        for ext in self._retired:
            if ext.readers == 0 and ext.retired_gen <= self._committed_gen:
                self._tiers[ext.tier].release(ext.offset, ext.length, ext.punch)
            else:
                keep.append(ext)
        self._retired = keep
