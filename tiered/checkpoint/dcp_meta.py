"""The JSON form of DCP metadata (no pickle), and recognising torch's own FileSystemWriter format."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta, TensorProperties,
    TensorStorageMetadata,
)

from .format import CheckpointError, decode_tree, dtype_from, dtype_name, encode_tree

METADATA = ".metadata.json"
FORMAT = "tiered-dcp"
FORMAT_VERSION = 2  # 2: items are retained store objects ("parts"); 1: each rank's own data file
READ_VERSIONS = (1, 2)

# --------------------------------------------------------------------------- metadata as JSON

_MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
                   "preserve": torch.preserve_format}


_DCP_FS_DATA_RE = re.compile(r"^__\d+_\d+\.distcp$")


def refuse_foreign_format(path: Path) -> None:
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
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("format_version") not in READ_VERSIONS:
        raise CheckpointError(f"{where}: not a {FORMAT} metadata file of version "
                              f"{' or '.join(map(str, READ_VERSIONS))}")
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
