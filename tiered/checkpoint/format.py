"""The on-disk form of a checkpoint: tensor bytes kept by the store, and a JSON manifest.

A checkpoint's tensor bytes are objects of the :class:`~tiered.TieredStore` (on one of
its storage tiers, within its capacity), kept by a retention tag
(``TieredStore.retain``) after their keys are deleted. The checkpoint directory holds,
per committed step, ``step-<step>.json`` (the manifest): written (temp -> fsync ->
rename -> fsync dir, :mod:`tiered.atomic`) only after the store has made every byte it
names durable and retained, so a directory listing shows a step only when it is
complete. A retention tag no manifest names is a leftover of an interrupted save and is
released at the next start. Nothing is pickled: tensors are raw bytes, the rest of the
state dict (ints, floats, strings, nesting) is JSON in the manifest's ``tree``.

Storage manifest (``format_version`` 2); a tensor is the concatenation of its ``parts``,
each one retained version of a store object (pieces of at most ``segment`` bytes, or
the whole object a :class:`StoreRef` names), with the crc32 of each ``segment`` bytes::

    {"format": "tiered-checkpoint", "format_version": 2, "step": 42, "segment": 8388608,
     "retain_tag": "ckpt:1a2b3c4d:42:ab12cd34", "created": 1700000000.0, "commit_seq": 17,
     "tensors": [{"name": "model/w", "dtype": "float32", "shape": [4, 4], "nbytes": 64,
                  "parts": [{"key": "ckpt/default/1a2b3c4d/42-ab12cd34/0", "version": 1,
                             "tier": "nvme", "offset": 8192, "nbytes": 64, "crc32": [...]}]}, ...],
     "tree": {"t": "dict", "items": [["model", {"t": "dict", "items": [["w", {"t": "tensor", "i": 0}]]}]]}}

``commit_seq`` counts the commits of the checkpointer's directories (keep-last ranks by it, not
by the wall clock ``created``; manifests without it rank first, by ``created``).

Cold manifest (same fields, ``zarr`` names the step's zarr group, no ``retain_tag``):
each tensor has ``array`` (a uint8 zarr array in that group), ``crc32`` (one per
``segment``) and ``segment``.
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT = "tiered-checkpoint"
FORMAT_VERSION = 2  # 2: tensor bytes are retained store objects ("parts")
#: 1: tensor bytes in the checkpoint's own data file (``data_file``; each tensor names ``file``
#: and ``offset``): still loaded and retired, no longer written
READ_VERSIONS = (1, 2)
SEGMENT = 8 << 20  # bytes per checksum (and per copy piece); equal to the store's segment
MANIFEST_RE = re.compile(r"^step-(\d{12})\.json$")
COLD_RE = re.compile(r"^step-(\d{12})-[0-9a-f]+\.zarr$")
DATA_RE = re.compile(r"^step-(\d{12})-[0-9a-f]+\.data$")  # format 1: a save's own data file


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or loaded; the message names the step, tensor and file."""


class CheckpointChecksumError(CheckpointError):
    """Bytes read back differ from the crc32 recorded when they were saved."""


def manifest_name(step: int) -> str:
    return f"step-{step:012d}.json"


def cold_name(step: int, token: str) -> str:
    return f"step-{step:012d}-{token}.zarr"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from(name: str, where: str) -> torch.dtype:
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise CheckpointError(f"{where}: unknown dtype {name!r}")
    return dt


def segment_crcs(data) -> list[int]:
    """crc32 of each SEGMENT of ``data`` (a buffer); one entry for empty data."""
    n = len(data)
    if n == 0:
        return [zlib.crc32(b"")]
    return [zlib.crc32(data[i:i + SEGMENT]) for i in range(0, n, SEGMENT)]


# --------------------------------------------------------------------------- state-dict trees


def encode_tree(obj: Any, tensors: list, path: str = "") -> Any:
    """JSON form of a state dict; tensors are appended to ``tensors`` as (name, tensor)
    and replaced by their index. Anything that is not a tensor, a container or a JSON
    scalar is refused (naming the key) rather than pickled."""
    if isinstance(obj, torch.Tensor) or _is_ref(obj):
        tensors.append((path or "<root>", obj))
        return {"t": "tensor", "i": len(tensors) - 1}
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise CheckpointError(f"state dict key {k!r} at {path or '<root>'!r}: only str and int keys "
                                      f"can be saved, got {type(k).__name__}")
            items.append([k, encode_tree(v, tensors, f"{path}/{k}" if path else str(k))])
        return {"t": "dict", "items": items}
    if isinstance(obj, (list, tuple)):
        kind = "list" if isinstance(obj, list) else "tuple"
        return {"t": kind, "items": [encode_tree(v, tensors, f"{path}/{i}" if path else str(i))
                                     for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, str)):
        return {"t": "v", "v": obj}
    if isinstance(obj, float):
        if math.isfinite(obj):
            return {"t": "v", "v": obj}
        return {"t": "float", "v": repr(obj)}  # inf / nan: not JSON numbers
    raise CheckpointError(f"state dict value at {path or '<root>'!r} is a {type(obj).__name__}; expected "
                          "tensors, dicts, lists, tuples, str, int, float, bool or None (no pickling)")


def decode_tree(node: Any, tensors: list, where: str) -> Any:
    try:
        t = node["t"]
        if t == "tensor":
            return tensors[node["i"]]
        if t == "dict":
            return {k: decode_tree(v, tensors, where) for k, v in node["items"]}
        if t == "list":
            return [decode_tree(v, tensors, where) for v in node["items"]]
        if t == "tuple":
            return tuple(decode_tree(v, tensors, where) for v in node["items"])
        if t == "v":
            return node["v"]
        if t == "float":
            return float(node["v"])
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise CheckpointError(f"{where}: malformed tree node {node!r} ({e!r})") from e
    raise CheckpointError(f"{where}: unknown tree node type {t!r}")


@dataclass(frozen=True)
class StoreRef:
    """A state-dict entry whose current version lives in ``store`` under ``key``:
    checkpointed by reference to its extent, never read back."""

    store: Any  # TieredStore
    key: str


def _is_ref(obj: Any) -> bool:
    return isinstance(obj, StoreRef)


# --------------------------------------------------------------------------- manifests


def read_manifest(path: Path) -> dict:
    """A validated manifest; CheckpointError naming the file and field otherwise."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except ValueError as e:
        raise CheckpointError(f"{path}: manifest is not valid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    if doc.get("format_version") not in READ_VERSIONS:
        raise CheckpointError(f"{path}: format_version {doc.get('format_version')!r}, this reader "
                              f"understands {', '.join(map(str, READ_VERSIONS))}")
    for field in ("step", "segment", "tensors", "tree"):
        if field not in doc:
            raise CheckpointError(f"{path}: manifest has no {field!r} field")
    for i, t in enumerate(doc["tensors"]):
        layout = "cold" if doc.get("zarr") else ("file" if doc["format_version"] == 1 else "parts")
        _check_tensor(path, i, t, layout)
    return doc


_LAYOUT_FIELDS = {"cold": ("array", "crc32", "segment"), "file": ("file", "offset", "crc32"), "parts": ("parts",)}


def _check_tensor(path: Path, i: int, t: dict, layout: str) -> None:
    """A tensor record has what loading it needs, and its sizes agree with its dtype and shape."""
    fields = ("name", "dtype", "shape", "nbytes") + _LAYOUT_FIELDS[layout]
    missing = [k for k in fields if k not in t]
    if missing:
        raise CheckpointError(f"{path}: tensor #{i} lacks {', '.join(missing)}: {t!r}")
    dtype = dtype_from(t["dtype"], f"{path}: tensor {t['name']!r}")
    expect = math.prod(t["shape"]) * torch.empty((), dtype=dtype).element_size()
    if expect != t["nbytes"]:
        raise CheckpointError(f"{path}: tensor {t['name']!r}: {t['dtype']}{tuple(t['shape'])} needs "
                              f"{expect} bytes, manifest says {t['nbytes']}")
    if layout != "parts":
        return
    for part in t["parts"]:
        missing = [k for k in ("key", "version", "tier", "offset", "nbytes", "crc32") if k not in part]
        if missing:
            raise CheckpointError(f"{path}: tensor {t['name']!r}: a part lacks {', '.join(missing)}: {part!r}")
    held = sum(part["nbytes"] for part in t["parts"])
    if held != t["nbytes"]:
        raise CheckpointError(f"{path}: tensor {t['name']!r}: its parts hold {held} bytes, it needs {t['nbytes']}")


def tensor_crcs(t: dict) -> list[int]:
    """crc32 of each SEGMENT of a storage tensor: its parts' lists joined (every part but the
    last is a whole number of segments long)."""
    return [c for part in t["parts"] for c in part["crc32"]] or segment_crcs(b"")


def committed_steps(directory: Path) -> dict[int, Path]:
    """step -> manifest path, for every committed checkpoint in ``directory``."""
    out = {}
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return out
    for name in names:
        m = MANIFEST_RE.match(name)
        if m:
            out[int(m.group(1))] = directory / name
    return out


def referenced_zarrs(manifests: dict[int, Path]) -> set[str]:
    """Names of the zarr directories the committed (cold) manifests use."""
    return {doc["zarr"] for doc in map(read_manifest, manifests.values()) if doc.get("zarr")}


def retain_tags(manifests: dict[int, Path]) -> set[str]:
    """The store retention tags the committed (storage) manifests name."""
    return {doc["retain_tag"] for doc in map(read_manifest, manifests.values()) if doc.get("retain_tag")}
