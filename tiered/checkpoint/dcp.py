"""torch.distributed.checkpoint storage on the tiers, written through a TieredStore.

``dcp.save(sd, storage_writer=TieredStorageWriter("run/step-100", config=cfg))`` and
``dcp.async_save(...)``: each rank writes its items as objects of a
:class:`~tiered.TieredStore` (owner ``dcp``, staged through at most ``host_buffer`` bytes of
its host tier, pieces of up to 8 MiB with a crc32 each and a table of one per ``block`` bytes
(64 KiB), no fsync per piece), then one
``store.retain`` makes them durable together and keeps those versions for the save (the
bytes count in the storage tier's capacity), and the keys are deleted. The coordinator then
commits ``.metadata.json`` (temp -> fsync -> rename -> fsync dir), naming every part's data
file, offset, size and crc32: a checkpoint is visible only once that file exists. The
metadata is JSON, not pickle; non-tensor values are the bytes DCP's planner produces and are
stored opaque. ``TieredStorageReader`` reads through its store's engine and checks every
segment's crc32; a request for part of a tensor (a load at another world size) reads only the
blocks holding it, each checked against its crc32 (:mod:`.dcp_ranges`).

The store: ``store=`` (an open TieredStore, left open), else ``TieredStore.shared(config)``
for the duration of each call, else (neither given) a store of one storage tier inside the
checkpoint directory, one per rank (``.store-r<rank>``). A relative ``checkpoint_id`` lives
under ``<storage tier path>/dcp/`` of the config. A save's retention is released once a later
save of the same checkpoint directory is committed: by the coordinator for its own store at
commit, by the other ranks when they next write there (a rank keeps at most the committed save
and one older one). Retentions of saves that never committed are released then too.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import shutil
import uuid
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from tiered.io_engine import gather

from ..atomic import fsync_dir, remove_stale_temps, write_json_atomic
from ..config import load_config
from ..sizes import parse_size
from ._io import read_parts
from .commit import part_record
from .dcp_meta import METADATA, metadata_from_json, metadata_to_json, refuse_foreign_format
from .dcp_ranges import (BLOCK, block_record, check_block, item_parts, parts_with_blocks, piece_bytes, read_hypercube,
                         table_bytes, wants_part)
from .format import SEGMENT, CheckpointError, decode_tree, dtype_from, dtype_name
from .host import CheckpointHost

OWNER = "dcp"
_DATA_RE = re.compile(r"^[0-9a-f]{32}-r\d+\.data$")  # format 1: a rank's own data file


def _resolve(checkpoint_id, config, tier: str | None, store) -> Path:
    if checkpoint_id is None:
        raise CheckpointError("a checkpoint_id (a directory) is needed: pass it to the storage writer/reader "
                              "or to dcp.save/dcp.load")
    p = Path(checkpoint_id).expanduser()
    if p.is_absolute():
        return p
    cfg = store.config if store is not None else load_config(config)
    tiers = cfg.storage_tiers
    spec = tiers[0] if tier is None else next((t for t in tiers if t.name == tier), None)
    if spec is None:
        raise CheckpointError(f"tier={tier!r}: no storage tier of that name in {cfg.source}; "
                              f"known: {', '.join(t.name for t in tiers)}")
    return Path(spec.path) / "dcp" / p


def _room(path: Path) -> int:
    """What a store of its own in ``path`` may hold: the free disk space plus what its files take
    already, rounded down (to GiB above 2 GiB) so that it does not change with every write."""
    held = sum(e.stat().st_blocks * 512 for e in os.scandir(path) if e.is_file(follow_symlinks=False))
    room = shutil.disk_usage(path).free + held
    unit = 1 << 30 if room >= 2 << 30 else 1 << 20
    return max(unit, room // unit * unit)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _Common:
    """What the writer and the reader share: where the checkpoint lives, the store, the staging budget."""

    _check_layout = True  # whether a per-rank store must have been written by this rank and world size

    def _init_common(self, checkpoint_id, store, config: Any, tier: str | None, host_buffer: int | str,
                     wait: float) -> None:
        if store is not None and config is not None:
            raise CheckpointError("give store= or config=, not both")
        self.store, self.config, self.tier = store, config, tier
        self.path = None if checkpoint_id is None else _resolve(checkpoint_id, config, tier, store)
        self.host_buffer = parse_size(host_buffer, where="host_buffer")
        if self.host_buffer < SEGMENT:
            raise CheckpointError(f"host_buffer = {host_buffer!r}: must hold at least one {SEGMENT}-byte segment")
        self.wait = wait

    def _set_path(self, checkpoint_id) -> None:
        if checkpoint_id is not None:
            self.path = _resolve(checkpoint_id, self.config, self.tier, self.store)

    def _path(self) -> Path:
        if self.path is None:
            raise CheckpointError(f"{type(self).__name__} has no checkpoint_id: pass one to it or to dcp.save/load")
        return self.path

    def _path_id(self) -> str:
        return f"{zlib.crc32(str(self._path().resolve()).encode()):08x}"

    @contextmanager
    def _open_store(self) -> Iterator[Any]:
        """The store given, else this process's shared store for the config (closed after)."""
        if self.store is not None:
            yield self.store
            return
        from ..store import TieredStore

        store = TieredStore.shared(self.config if self.config is not None else self._own_config(),
                                   check_layout=self._check_layout)
        try:
            yield store
        finally:
            store.close()

    def _own_config(self) -> dict:
        """Neither store nor config: a store of one tier in the checkpoint directory, per rank."""
        path = self._path() / f".store-r{_rank()}"
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return {"tiers": {"host": {"capacity": self.host_buffer},
                          "dcp": {"path": str(path), "capacity": _room(path)}}}

    @contextmanager
    def _host(self, store) -> Iterator[CheckpointHost]:
        host = CheckpointHost(store, self.host_buffer, OWNER, reserve=False)
        try:
            yield host
        finally:
            host.close()


class TieredStorageWriter(_Common, StorageWriter):
    """DCP StorageWriter through a TieredStore (see the module docstring). ``host_buffer``: host
    memory each rank stages writes through; ``tier``: the storage tier holding the bytes (and
    relative ids); ``block``: bytes per crc32 of the block tables that let a load read part of
    an item (0: none, loads then read items whole)."""

    def __init__(self, checkpoint_id: str | os.PathLike | None = None, *, store: Any = None, config: Any = None,
                 tier: str | None = None, host_buffer: int | str = "256MiB", wait: float = 120.0,
                 block: int | str = BLOCK) -> None:
        super().__init__()
        self._init_common(checkpoint_id, store, config, tier, host_buffer, wait)
        self.block = check_block(parse_size(block, where="block"))
        self.save_id = uuid.uuid4().hex
        self.is_coordinator = True

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self._set_path(checkpoint_id)
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self._path()), save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self._path().mkdir(parents=True, exist_ok=True, mode=0o700)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [dataclasses.replace(p, storage_data=f"r{i}") for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        rank = plan.storage_data or "r0"
        tag = f"dcp:{self._path_id()}:{self.save_id}:{rank}"
        prefix = f"dcp/{self._path_id()}/{self.save_id}-{rank}/"
        with self._open_store() as store, self._host(store) as host:
            self._release_stale(store, keep=_committed_tags(self._path()))
            try:
                results = self._write_items(store, host, plan, planner, prefix, tag)
            except BaseException:
                store.delete_prefix(prefix)
                store.release(tag)
                raise
            store.delete_prefix(prefix)  # one store commit; the retention keeps the bytes
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _write_items(self, store, host: CheckpointHost, plan: SavePlan, planner: SavePlanner, prefix: str,
                     tag: str) -> list[WriteResult]:
        """Put every item's bytes as store objects of up to ``SEGMENT`` bytes, then retain them all
        (one commit: durable before the coordinator can name them)."""
        items, futs, keys = [], [], []
        piece = piece_bytes(self.block)
        try:
            for item in plan.items:
                info, src = _item_bytes(item, planner.resolve_data(item))
                item_keys = []
                for lo in range(0, src.numel(), piece):
                    key = f"{prefix}{len(keys)}"
                    futs.append(_put_piece(store, host, key, src[lo:lo + piece], self.tier, self.wait, self.block))
                    keys.append(key)
                    item_keys.append(key)
                items.append((item, info, src.numel(), item_keys))
        finally:
            gather(futs).exception()  # in-flight puts end before a failure is raised
        put = dict(zip(keys, gather(futs).result()))
        located = {r["key"]: r for r in (store.retain(tag, keys) if keys else [])}
        results = []
        for item, info, n, item_keys in items:
            parts = [part_record(located[k]) | {"path": self._recorded_path(located[k]["path"])}
                     | block_record(put[k], located[k]) for k in item_keys]
            info.update(length=n, parts=parts, retain_tag=tag)
            results.append(WriteResult(index=item.index, size_in_bytes=n, storage_data=info))
        return results

    def _recorded_path(self, data_file: str) -> str:
        """A data file inside the checkpoint directory (its own per-rank store) is named relative to
        it, so the directory can be moved as a whole; any other one absolutely."""
        base = self._path().resolve()
        p = Path(data_file).resolve()
        return str(p.relative_to(base)) if p.is_relative_to(base) else str(p)

    def _release_stale(self, store, keep: set[str]) -> None:
        """Release this store's retentions of saves of this directory that no committed metadata
        names (older saves, interrupted ones), and forget keys of interrupted puts."""
        pid = self._path_id()
        for t in store.retained(f"dcp:{pid}:"):
            if t not in keep:
                store.release(t)
        store.delete_prefix(f"dcp/{pid}/")

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Commit the checkpoint (coordinator only), then release what the new metadata does not name."""
        path = self._path()
        metadata.storage_data = {wr.index: wr.storage_data for rs in results for wr in rs}
        metadata.storage_meta = self.storage_meta()
        write_json_atomic(path / METADATA, metadata_to_json(metadata))
        keep = {info["retain_tag"] for info in metadata.storage_data.values() if info.get("retain_tag")}
        removed = remove_stale_temps(path)
        for name in os.listdir(path):
            if _DATA_RE.match(name):  # format 1 data files: the new metadata names none
                (path / name).unlink()
                removed += 1
        if removed:
            fsync_dir(path)
        with self._open_store() as store:
            pid = self._path_id()
            for t in store.retained(f"dcp:{pid}:"):
                if t not in keep:
                    store.release(t)


def _item_bytes(item, data) -> tuple[dict, torch.Tensor]:
    """The manifest info and the flat uint8 bytes of one write item."""
    if item.type == WriteItemType.BYTE_IO:
        raw = data.getbuffer() if isinstance(data, io.BytesIO) else data
        src = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if len(raw) else torch.empty(0, dtype=torch.uint8)
        return {"kind": "bytes"}, src
    t = data.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    info = {"kind": "tensor", "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
    return info, (t.reshape(-1).view(torch.uint8) if t.dtype != torch.uint8 else t.reshape(-1))


def _put_piece(store, host: CheckpointHost, key: str, src: torch.Tensor, tier: str | None, wait: float,
               block: int):
    """Copy ``src`` into a host buffer and hand it to the store (written, durable at the retain).
    The budget also holds the bytes the store takes for the piece's block table meanwhile."""
    n = src.numel()
    table = table_bytes(n, block)
    host.budget.reserve(table, wait)
    try:
        buf = host.alloc(n, timeout=wait)
    except BaseException:
        host.budget.release(table)
        raise
    try:
        torch.from_numpy(buf.array).copy_(src)
    except BaseException:
        host.free(buf)
        host.budget.release(table)
        raise
    try:
        fut = store.put_buffer(key, buf, torch.uint8, (n,), kind="dcp", tier=tier, give=True, sync=False,
                               commit=False, cache=False, owner=OWNER, block=block)
    except BaseException:
        host.returned(n)  # the store released the buffer it was given
        host.budget.release(table)
        raise
    fut.add_done_callback(lambda _f: (host.returned(n), host.budget.release(table)))
    return fut


def _committed_tags(path: Path) -> set[str]:
    """Retention tags the committed metadata of ``path`` names (none when there is none)."""
    import json

    try:
        doc = json.loads((path / METADATA).read_bytes())
    except (FileNotFoundError, ValueError):
        return set()
    return {info.get("retain_tag") for *_i, info in doc.get("storage_data", []) if isinstance(info, dict)} - {None}


class TieredStorageReader(_Common, StorageReader):
    """DCP StorageReader for checkpoints written by :class:`TieredStorageWriter`; every item
    is read through the store's engine and checked against its crc32."""

    # A load at another world size (resharding) opens its rank's store of the same per-rank config
    # only as staging: the shard is not this layout's to check, and keeps the layout recorded in it.
    _check_layout = False

    def __init__(self, checkpoint_id: str | os.PathLike | None = None, *, store: Any = None, config: Any = None,
                 tier: str | None = None, host_buffer: int | str = "256MiB", wait: float = 120.0) -> None:
        super().__init__()
        self._init_common(checkpoint_id, store, config, tier, host_buffer, wait)
        self.storage_data: dict = {}

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self.storage_data = {}
        self._set_path(checkpoint_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        mpath = self._path() / METADATA
        if not mpath.exists():
            refuse_foreign_format(self.path)
            raise CheckpointError(f"no committed checkpoint at {self.path} ({METADATA} missing: never saved, "
                                  "or the save did not finish)")
        import json

        try:
            doc = json.loads(mpath.read_bytes())
        except ValueError as e:
            raise CheckpointError(f"{mpath}: not valid JSON ({e})") from e
        return metadata_from_json(doc, str(mpath))

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        with self._open_store() as store, self._host(store) as host:
            for req in plan.items:
                info = self.storage_data.get(req.storage_index)
                if info is None:
                    raise CheckpointError(f"{self.path}: no stored item {req.storage_index} in {METADATA}")
                if info.get("kind") == "value":  # a JSON value (DistributedCheckpointer's global records)
                    planner.load_bytes(req, _value_bytes(info, f"{self.path}: item {req.storage_index.fqn!r}"))
                    continue
                where = f"{self.path}: item {req.storage_index.fqn!r}"
                if req.type == LoadItemType.TENSOR and self._read_part(store, host, planner, req, info, where):
                    continue
                raw = self._read_item(store, host, info, where)
                if req.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(req, io.BytesIO(raw.numpy().tobytes()))
                    continue
                _load_tensor(planner, req, raw, info, self.path)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read_part(self, store, host: CheckpointHost, planner: LoadPlanner, req, info: dict, where: str) -> bool:
        """Load a request for part of a stored tensor from just the blocks holding it; False
        (nothing read) when it wants the whole tensor or the item has no block tables."""
        if info.get("kind") != "tensor" or "parts" not in info or not wants_part(info["shape"], req.storage_offsets,
                                                                                 req.lengths):
            return False
        parts = item_parts(info["parts"], self._part_path)
        if not parts_with_blocks(parts):
            return False
        dtype = dtype_from(info["dtype"], where)
        tensor = read_hypercube(store.engine, host.loans(), parts, dtype, info["shape"], list(req.storage_offsets),
                                list(req.lengths), where, self.wait)
        _copy_into(planner, req, tensor, where)
        return True

    def _part_path(self, part: dict) -> str:
        return part["path"] if os.path.isabs(part["path"]) else str(self._path() / part["path"])

    def _read_item(self, store, host: CheckpointHost, info: dict, where: str) -> torch.Tensor:
        raw = torch.empty(info["length"], dtype=torch.uint8)
        flat = raw.numpy()

        def put(lo: int, data) -> None:
            flat[lo:lo + len(data)] = data

        if "parts" in info:
            parts, start = [], 0
            for part in info["parts"]:
                parts.append((self._part_path(part), part["offset"], part["nbytes"], part["crc32"], start))
                start += part["nbytes"]
        else:  # format 1: the rank's own data file in the checkpoint directory
            parts = [(str(self._path() / info["file"]), info["offset"], info["length"], info["crc32"], 0)]
        read_parts(store.engine, host.loans(), parts, SEGMENT, put, where, self.wait)
        return raw


def _value_bytes(info: dict, where: str) -> io.BytesIO:
    """A value kept as JSON, in the form DCP's planners read bytes items (``torch.load``): made in
    memory for the planner, never stored."""
    buf = io.BytesIO()
    torch.save(decode_tree(info["tree"], [], where), buf)
    buf.seek(0)
    return buf


def _load_tensor(planner: LoadPlanner, req, raw: torch.Tensor, info: dict, path: Path) -> None:
    where = f"{path}: item {req.storage_index.fqn!r}"
    dtype = dtype_from(info["dtype"], where)
    tensor = raw.view(dtype).view(info["shape"]) if raw.numel() else torch.empty(info["shape"], dtype=dtype)
    for dim, (start, length) in enumerate(zip(req.storage_offsets, req.lengths)):
        tensor = tensor.narrow(dim, start, length)
    _copy_into(planner, req, tensor, where)


def _copy_into(planner: LoadPlanner, req, tensor: torch.Tensor, where: str) -> None:
    target = planner.resolve_tensor(req).detach()
    if target.size() != tensor.size():
        raise CheckpointError(f"{where} has size {tuple(tensor.size())}, the destination {tuple(target.size())}")
    target.copy_(tensor)
    planner.commit_tensor(req, target)


__all__ = ["TieredStorageReader", "TieredStorageWriter", "metadata_from_json", "metadata_to_json"]
