"""Global commit records of a :class:`~.distributed.DistributedCheckpointer`: DCP metadata.

A step is globally committed when rank 0 has written ``<global directory>/step-<step>/.metadata.json``
(temp -> fsync -> rename -> fsync dir). That file is the metadata of a ``torch.distributed.checkpoint``
checkpoint (the JSON form :class:`~.dcp.TieredStorageReader` reads): every rank's tensors are
chunks of the global tensors (a DTensor's shard at its global offset, a plain tensor whole at
offset 0), each naming the retained store extents that hold it on that rank's storage tier;
non-tensor leaves are JSON trees. So a step saved at one world size loads at another through
DCP's resharding planner, without an export. Its ``global`` field records the step, the world
size, every rank's retention tag and a ``commit_seq`` (the order of commits).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..atomic import fsync_dir, remove_stale_temps, write_json_atomic
from .dcp_meta import METADATA
from .format import CheckpointError, dtype_from, encode_tree

STEP_RE = re.compile(r"^step-(\d{12})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:012d}"


def is_dtensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and isinstance(getattr(t, "_local_tensor", None), torch.Tensor)


def localize(obj: Any) -> Any:
    """The state dict with every DTensor replaced by its local shard (same storage, same order)."""
    if is_dtensor(obj):
        return obj.to_local()
    if isinstance(obj, dict):
        return {k: localize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [localize(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(localize(v) for v in obj)
    return obj


def describe_state(state_dict: Any) -> dict:
    """What the DCP view needs of one rank's state dict, taken at ``save``: per tensor (by its
    checkpoint name, the ``/``-joined path) its DCP key (fqn), global size and local chunk; per
    non-tensor leaf its JSON tree; and DCP's flattening map (fqn -> path)."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.planner_helpers import _create_chunk_from_dtensor

    if not isinstance(state_dict, dict):
        raise CheckpointError(f"a distributed checkpoint saves a dict state dict, got {type(state_dict).__name__}")
    try:
        flat, mapping = flatten_state_dict(state_dict)
    except ValueError as e:
        raise CheckpointError(f"state dict cannot be flattened into DCP keys: {e}") from e
    tensors, values = {}, {}
    for fqn, v in flat.items():
        path = mapping[fqn]
        if isinstance(v, torch.Tensor):
            if is_dtensor(v):
                chunk = _create_chunk_from_dtensor(v)
                offsets, sizes = list(chunk.offsets), list(chunk.sizes)
            else:
                offsets, sizes = [0] * v.dim(), list(v.shape)
            tensors["/".join(map(str, path))] = {"fqn": fqn, "size": list(v.shape), "offsets": offsets,
                                                 "sizes": sizes, "requires_grad": bool(v.requires_grad)}
            continue
        inner: list = []
        tree = encode_tree(v, inner, fqn)
        if inner:
            raise CheckpointError(f"state dict value {fqn!r} holds tensors inside a {type(v).__name__}: DCP keeps "
                                  "such a value as one opaque item; put the tensors in a dict or a list")
        values[fqn] = tree
    return {"tensors": tensors, "values": values, "mapping": {k: list(p) for k, p in mapping.items()}}


def rank_items(desc: dict, doc: dict, paths: dict) -> dict:
    """One rank's part of the global record: its committed manifest ``doc`` (tensor bytes as
    retained store extents, ``paths``: (key, version) -> data file) joined with ``desc``."""
    items = []
    for t in doc["tensors"]:
        c = desc["tensors"].get(t["name"])
        if c is None or list(t["shape"]) != c["sizes"]:
            raise CheckpointError(f"step {doc['step']}: tensor {t['name']!r} of the manifest does not match the "
                                  "state dict described at save")
        parts = [{k: part[k] for k in ("key", "version", "tier", "offset", "nbytes", "crc32")}
                 | {"path": paths[(part["key"], part["version"])]} for part in t["parts"]]
        items.append(c | {"dtype": t["dtype"], "info": {"kind": "tensor", "dtype": t["dtype"], "shape": c["sizes"],
                                                        "length": t["nbytes"], "parts": parts,
                                                        "retain_tag": doc["retain_tag"]}})
    return {"tensors": items, "values": desc["values"], "mapping": desc["mapping"], "retain_tag": doc["retain_tag"]}


def build_metadata(ranks: list[dict], root: Path, step: int):
    """DCP ``Metadata`` of the step from every rank's items (a chunk several ranks hold, e.g. a
    replicated tensor, is read from the lowest rank's copy)."""
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta, TensorProperties,
        TensorStorageMetadata,
    )

    sd: dict = {}
    storage: dict = {}
    empty: dict = {}  # fqn -> an empty chunk, used only when the tensor has no bytes anywhere
    for r, part in enumerate(ranks):
        for it in part["tensors"]:
            fqn = it["fqn"]
            md = sd.get(fqn)
            if md is None:
                props = TensorProperties(dtype=dtype_from(it["dtype"], fqn), requires_grad=it["requires_grad"])
                md = sd[fqn] = TensorStorageMetadata(props, torch.Size(it["size"]), [])
            elif list(md.size) != it["size"] or str(md.properties.dtype) != f"torch.{it['dtype']}":
                raise CheckpointError(f"step {step}: {fqn!r} is {it['dtype']}{it['size']} on rank {r}, but "
                                      f"{md.properties.dtype}{list(md.size)} on a lower rank: a plain tensor is one "
                                      "replicated tensor to DCP (same dtype and shape on every rank); keep "
                                      "rank-specific state as a DTensor or under a key of each rank's own")
            if not math.prod(it["sizes"]):
                empty.setdefault(fqn, it)
                continue
            idx = MetadataIndex(fqn, torch.Size(it["offsets"]))
            if idx in storage:
                continue
            md.chunks.append(ChunkStorageMetadata(torch.Size(it["offsets"]), torch.Size(it["sizes"])))
            storage[MetadataIndex(fqn, torch.Size(it["offsets"]), len(md.chunks) - 1)] = it["info"]
        for fqn, tree in part["values"].items():
            if fqn not in sd:
                sd[fqn] = BytesStorageMetadata()
                storage[MetadataIndex(fqn)] = {"kind": "value", "tree": tree}
    for fqn, it in empty.items():
        if not sd[fqn].chunks:
            sd[fqn].chunks.append(ChunkStorageMetadata(torch.Size(it["offsets"]), torch.Size(it["sizes"])))
            storage[MetadataIndex(fqn, torch.Size(it["offsets"]), 0)] = it["info"]
    mapping: dict = {}
    for part in ranks:
        mapping.update({k: tuple(v) for k, v in part["mapping"].items() if k not in mapping})
    return Metadata(state_dict_metadata=sd, planner_data=mapping, storage_data=storage,
                    storage_meta=StorageMeta(checkpoint_id=str(step_dir(root, step)), save_id=f"step-{step}"))


def write_record(root: Path, step: int, ranks: list[dict], commit_seq: int) -> Path:
    """Commit ``step`` globally: its DCP metadata, written atomically (the commit point)."""
    from .dcp_meta import metadata_to_json

    doc = metadata_to_json(build_metadata(ranks, root, step))
    doc["global"] = {"step": step, "world_size": len(ranks), "commit_seq": commit_seq,
                     "retain_tags": [p["retain_tag"] for p in ranks]}
    d = step_dir(root, step)
    d.mkdir(exist_ok=True, mode=0o700)
    write_json_atomic(d / METADATA, doc)
    fsync_dir(root)
    return d


def committed(root: Path) -> list[tuple[int, int, int]]:
    """(commit_seq, step, world size) of every globally committed step in ``root``, oldest commit first."""
    out = []
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return out
    for name in names:
        m = STEP_RE.match(name)
        path = root / name / METADATA
        if not m or not path.is_file():
            continue
        rec = _read_json(path).get("global")
        if not isinstance(rec, dict) or rec.get("step") != int(m.group(1)):
            raise CheckpointError(f"{path}: no 'global' record of step {int(m.group(1))}: not written by a "
                                  "DistributedCheckpointer")
        out.append((int(rec["commit_seq"]), rec["step"], int(rec["world_size"])))
    return sorted(out)


def remove_record(root: Path, step: int) -> None:
    """Retire a global step: its metadata goes first (then the directory is fsynced), then the rest."""
    d = step_dir(root, step)
    (d / METADATA).unlink(missing_ok=True)
    fsync_dir(d)
    shutil.rmtree(d)
    fsync_dir(root)


def remove_leftovers(root: Path) -> int:
    """Step directories without metadata (a commit interrupted before its rename) and temp files."""
    removed = remove_stale_temps(root)
    for name in os.listdir(root):
        d = root / name
        if STEP_RE.match(name) and d.is_dir() and not (d / METADATA).is_file():
            shutil.rmtree(d)
            removed += 1
    if removed:
        fsync_dir(root)
    return removed


def latest_step(root: str | os.PathLike) -> int | None:
    """The most recently committed global step in ``root`` (None when none is)."""
    order = committed(Path(root))
    return order[-1][1] if order else None


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_bytes())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return doc
