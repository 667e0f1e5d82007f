"""torch.distributed.checkpoint storage on the tiers, with the LazyCheckpointer's crash safety.

``dcp.save(sd, storage_writer=TieredStorageWriter("run/step-100", config=cfg))`` and
``dcp.async_save(...)`` write each rank's items as raw bytes into one data file per rank
and save (``<save_id>-r<rank>.data``: a new save never overwrites the files of the
committed one), 4 KiB aligned, through the IOEngine with O_DIRECT from a HostArena,
with a crc32 per 8 MiB; each rank fsyncs its file before it reports its results. The
coordinator then commits ``.metadata.json`` (temp -> fsync -> rename -> fsync dir) and
deletes data files the new metadata does not name (older saves, interrupted ones).
A checkpoint is visible only once that file exists. The metadata is JSON, not pickle;
non-tensor values are the bytes DCP's planner produces (``torch.save`` of the object)
and are stored opaque. ``TieredStorageReader`` checks every item's crc32 on load.

A relative ``checkpoint_id`` lives under ``<storage tier path>/dcp/`` of ``config``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import uuid
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta, TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from allocators import HostArena, align_up
from io_engine import IOEngine, gather

from ..atomic import fsync_dir, remove_stale_temps, write_json_atomic
from ..config import load_config
from ..sizes import parse_size
from ._io import read_verified, write_bytes
from .format import SEGMENT, CheckpointError, decode_tree, dtype_from, dtype_name, encode_tree

METADATA = ".metadata.json"
FORMAT = "tiered-dcp"
FORMAT_VERSION = 1
_DATA_RE = re.compile(r"^[0-9a-f]{32}-r\d+\.data$")


def _resolve(checkpoint_id, config, tier: str | None) -> Path:
    if checkpoint_id is None:
        raise CheckpointError("a checkpoint_id (a directory) is needed: pass it to the storage writer/reader "
                              "or to dcp.save/dcp.load")
    p = Path(checkpoint_id).expanduser()
    if p.is_absolute():
        return p
    cfg = load_config(config)
    tiers = cfg.storage_tiers
    spec = tiers[0] if tier is None else next((t for t in tiers if t.name == tier), None)
    if spec is None:
        raise CheckpointError(f"tier={tier!r}: no storage tier of that name in {cfg.source}; "
                              f"known: {', '.join(t.name for t in tiers)}")
    return Path(spec.path) / "dcp" / p


class _Engine:
    """An IOEngine and a HostArena for the duration of one write_data/read_data call."""

    def __init__(self, config, host_buffer: int) -> None:
        e = load_config(config).engine if config is not None else None
        self.engine = IOEngine(e.backend if e else "threads", workers=e.workers if e else 4,
                               chunk=e.chunk if e else 8 << 20, direct=e.direct if e else True)
        self.arena = HostArena(host_buffer, name="dcp host buffer")

    def __enter__(self) -> "_Engine":
        self.arena.open()
        try:
            self.engine.open()
        except BaseException:
            self.arena.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.engine.close()
        finally:
            self.arena.close()


def _init_common(obj, checkpoint_id, config: Any, tier: str | None, host_buffer: int | str, wait: float) -> None:
    """What the writer and the reader share: where the checkpoint lives and the staging budget."""
    obj.config, obj.tier = config, tier
    obj.path = None if checkpoint_id is None else _resolve(checkpoint_id, config, tier)
    obj.host_buffer = parse_size(host_buffer, where="host_buffer")
    if obj.host_buffer < SEGMENT:
        raise CheckpointError(f"host_buffer = {host_buffer!r}: must hold at least one {SEGMENT}-byte segment")
    obj.wait = wait


class TieredStorageWriter(StorageWriter):
    """DCP StorageWriter on a storage tier (see the module docstring). ``host_buffer``: host
    memory each rank stages writes through; ``config``/``tier``: where relative ids live."""

    def __init__(self, checkpoint_id: str | os.PathLike | None = None, *, config: Any = None,
                 tier: str | None = None, host_buffer: int | str = "256MiB", wait: float = 120.0) -> None:
        super().__init__()
        _init_common(self, checkpoint_id, config, tier, host_buffer, wait)
        self.save_id = uuid.uuid4().hex
        self.is_coordinator = True

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.path = _resolve(checkpoint_id, self.config, self.tier)
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self._path()), save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def _path(self) -> Path:
        if self.path is None:
            raise CheckpointError("TieredStorageWriter has no checkpoint_id: pass one to it or to dcp.save")
        return self.path

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self._path().mkdir(parents=True, exist_ok=True, mode=0o700)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [dataclasses.replace(p, storage_data=f"r{i}") for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        name = f"{self.save_id}-{plan.storage_data or 'r0'}.data"
        path = str(self._path() / name)
        results, futs, offset = [], [], 0
        with _Engine(self.config, self.host_buffer) as io_:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            try:
                for item in plan.items:
                    data = planner.resolve_data(item)
                    if item.type == WriteItemType.BYTE_IO:
                        raw = data.getbuffer() if isinstance(data, io.BytesIO) else data
                        info = {"kind": "bytes"}
                        src = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if len(raw) else torch.empty(0, dtype=torch.uint8)
                    else:
                        t = data.detach()
                        if t.device.type != "cpu":
                            t = t.cpu()
                        t = t.contiguous()
                        info = {"kind": "tensor", "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
                        src = t.reshape(-1).view(torch.uint8) if t.dtype != torch.uint8 else t.reshape(-1)
                    n = src.numel()
                    fs, crcs = write_bytes(io_.engine, io_.arena, path, offset, src, SEGMENT, self.wait)
                    futs.extend(fs)
                    info.update(file=name, offset=offset, length=n, crc32=crcs)
                    results.append(WriteResult(index=item.index, size_in_bytes=n, storage_data=info))
                    offset += align_up(max(n, 1))
                gather(futs).result()
                io_.engine.fsync(path)  # durable before the coordinator can name it
            except BaseException:
                gather(futs).exception()  # let in-flight writes finish before the buffers go
                raise
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Commit the checkpoint (coordinator only), then delete files it does not name."""
        path = self._path()
        metadata.storage_data = {wr.index: wr.storage_data for rs in results for wr in rs}
        metadata.storage_meta = self.storage_meta()
        write_json_atomic(path / METADATA, metadata_to_json(metadata))
        keep = {info["file"] for info in metadata.storage_data.values()}
        removed = remove_stale_temps(path)
        for name in os.listdir(path):
            if _DATA_RE.match(name) and name not in keep:
                (path / name).unlink()
                removed += 1
        if removed:
            fsync_dir(path)


class TieredStorageReader(StorageReader):
    """DCP StorageReader for checkpoints written by :class:`TieredStorageWriter`; every item
    is checked against its crc32."""

    def __init__(self, checkpoint_id: str | os.PathLike | None = None, *, config: Any = None,
                 tier: str | None = None, host_buffer: int | str = "256MiB", wait: float = 120.0) -> None:
        super().__init__()
        _init_common(self, checkpoint_id, config, tier, host_buffer, wait)
        self.storage_data: dict = {}

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self.storage_data = {}
        if checkpoint_id is not None:
            self.path = _resolve(checkpoint_id, self.config, self.tier)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self.path is None:
            raise CheckpointError("TieredStorageReader has no checkpoint_id: pass one to it or to dcp.load")
        mpath = self.path / METADATA
        if not mpath.exists():
            _refuse_foreign_format(self.path)
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
        with _Engine(self.config, self.host_buffer) as io_:
            for req in plan.items:
                info = self.storage_data.get(req.storage_index)
                if info is None:
                    raise CheckpointError(f"{self.path}: no stored item {req.storage_index} in {METADATA}")
                raw = torch.empty(info["length"], dtype=torch.uint8)
                flat = raw.numpy()

                def put(lo: int, data, flat=flat) -> None:
                    flat[lo:lo + len(data)] = data

                read_verified(io_.engine, io_.arena, str(self.path / info["file"]), info["offset"], info["length"],
                              info["crc32"], SEGMENT, put, f"{self.path}: item {req.storage_index.fqn!r}", self.wait)
                if req.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(req, io.BytesIO(raw.numpy().tobytes()))
                    continue
                dtype = dtype_from(info["dtype"], f"{self.path}: item {req.storage_index.fqn!r}")
                tensor = raw.view(dtype).view(info["shape"]) if raw.numel() else torch.empty(info["shape"], dtype=dtype)
                for dim, (start, length) in enumerate(zip(req.storage_offsets, req.lengths)):
                    tensor = tensor.narrow(dim, start, length)
                target = planner.resolve_tensor(req).detach()
                if target.size() != tensor.size():
                    raise CheckpointError(f"{self.path}: item {req.storage_index.fqn!r} has size {tuple(tensor.size())}, "
                                          f"the destination {tuple(target.size())}")
                target.copy_(tensor)
                planner.commit_tensor(req, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut


# --------------------------------------------------------------------------- metadata as JSON

_MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
                   "preserve": torch.preserve_format}


_DCP_FS_DATA_RE = re.compile(r"^__\d+_\d+\.distcp$")


def _refuse_foreign_format(path: Path) -> None:
    """A directory that torch's own ``FileSystemWriter`` wrote (``.metadata`` plus
    ``__<rank>_<n>.distcp`` files) is a checkpoint in another format: say so. Data files
    without ``.metadata`` are a FileSystemWriter save that never finished: no reader loads it."""
    if not path.is_dir():
        return
    names = [p.name for p in path.iterdir()]
    distcp = sorted(n for n in names if _DCP_FS_DATA_RE.match(n))
    if ".metadata" in names or distcp:
        shown = ([".metadata"] if ".metadata" in names else []) + distcp[:3]
        found = ", ".join(shown) + (", ..." if len(distcp) > 3 else "")
        if ".metadata" not in names:
            raise CheckpointError(
                f"{path} holds an incomplete torch.distributed.checkpoint FileSystemWriter save ({found} but no "
                f".metadata: the save did not finish), and no {METADATA} of a TieredStorageWriter save: "
                "there is no checkpoint to load here")
        raise CheckpointError(
            f"{path} holds a torch.distributed.checkpoint FileSystemWriter checkpoint ({found}), not one written "
            f"by TieredStorageWriter ({METADATA} missing): load it with "
            f"torch.distributed.checkpoint.FileSystemReader({str(path)!r})")


def metadata_to_json(md: Metadata) -> dict:
    sd = {}
    for fqn, m in md.state_dict_metadata.items():
        if isinstance(m, BytesStorageMetadata):
            sd[fqn] = {"kind": "bytes"}
        else:
            p = m.properties
            fmt = next((k for k, v in _MEMORY_FORMATS.items() if v == p.memory_format), None)
            sd[fqn] = {"kind": "tensor", "dtype": dtype_name(p.dtype), "requires_grad": p.requires_grad,
                       "memory_format": fmt, "pin_memory": p.pin_memory, "size": list(m.size),
                       "chunks": [[list(c.offsets), list(c.sizes)] for c in m.chunks]}
            if p.layout != torch.strided:
                raise CheckpointError(f"{fqn}: only strided tensors can be saved, got layout {p.layout}")
    tensors: list = []
    planner = encode_tree(md.planner_data, tensors, "planner_data")
    if tensors:
        raise CheckpointError("DCP planner_data holds tensors; it is expected to hold names only")
    sm = md.storage_meta
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "version": md.version,
        "state_dict_metadata": sd, "planner_data": planner,
        "storage_data": [[idx.fqn, None if idx.offset is None else list(idx.offset), idx.index, info]
                         for idx, info in md.storage_data.items()],
        "storage_meta": None if sm is None else {"checkpoint_id": None if sm.checkpoint_id is None else str(sm.checkpoint_id),
                                                 "save_id": sm.save_id, "modules": list(sm.modules)},
    }


def metadata_from_json(doc: dict, where: str) -> Metadata:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: not a {FORMAT} v{FORMAT_VERSION} metadata file")
    try:
        sd: dict = {}
        for fqn, m in doc["state_dict_metadata"].items():
            if m["kind"] == "bytes":
                sd[fqn] = BytesStorageMetadata()
                continue
            props = TensorProperties(dtype=dtype_from(m["dtype"], f"{where}: {fqn!r}"), layout=torch.strided,
                                     requires_grad=m["requires_grad"],
                                     memory_format=_MEMORY_FORMATS[m["memory_format"]], pin_memory=m["pin_memory"])
            sd[fqn] = TensorStorageMetadata(props, torch.Size(m["size"]),
                                            [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in m["chunks"]])
        storage = {MetadataIndex(fqn, off, idx): info for fqn, off, idx, info in doc["storage_data"]}
        sm = doc.get("storage_meta")
        meta = None if sm is None else StorageMeta(checkpoint_id=sm["checkpoint_id"], save_id=sm["save_id"],
                                                   modules=list(sm["modules"]))
        return Metadata(state_dict_metadata=sd, planner_data=decode_tree(doc["planner_data"], [], where),
                        storage_data=storage, storage_meta=meta, version=doc.get("version"))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: malformed metadata ({e!r})") from e
