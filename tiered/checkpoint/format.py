"""The on-disk form of a checkpoint: raw tensor bytes in a data file, and a JSON manifest.

A checkpoint directory holds, per committed step, ``step-<step>.json`` (the manifest)
and the data file it names (``step-<step>-<token>.data``). The manifest is the commit
point: it is written (temp -> fsync -> rename -> fsync dir, :mod:`tiered.atomic`) only
after every byte it names is durable, so a directory listing shows a step only when it
is complete. A data file no manifest names is a leftover of an interrupted save and is
deleted at the next start. Nothing is pickled: tensors are raw bytes, the rest of the
state dict (ints, floats, strings, nesting) is JSON in the manifest's ``tree``.

Manifest (``format_version`` 1)::

    {"format": "tiered-checkpoint", "format_version": 1, "step": 42, "segment": 8388608,
     "tensors": [{"name": "model/w", "dtype": "float32", "shape": [4, 4], "nbytes": 64,
                  "file": "step-000000000042-ab12.data", "offset": 0,
                  "crc32": [...one per segment...]}, ...],
     "tree": {"t": "dict", "items": [["model", {"t": "dict", "items": [["w", {"t": "tensor", "i": 0}]]}]]},
     "retain_tag": null}

A tensor held by a :class:`~tiered.TieredStore` is recorded by reference: ``file`` is
the store's absolute data file path, ``ref`` names the key, version and retention tag,
and the store keeps that extent until the checkpoint is retired.
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from pathlib import Path
from typing import Any

import torch

FORMAT = "tiered-checkpoint"
FORMAT_VERSION = 1
SEGMENT = 8 << 20  # bytes per checksum (and per copy piece); equal to the store's segment
MANIFEST_RE = re.compile(r"^step-(\d{12})\.json$")
DATA_RE = re.compile(r"^step-(\d{12})-[0-9a-f]+\.data$")
COLD_RE = re.compile(r"^step-(\d{12})-[0-9a-f]+\.zarr$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or loaded; the message names the step, tensor and file."""


class CheckpointChecksumError(CheckpointError):
    """Bytes read back differ from the crc32 recorded when they were saved."""


def manifest_name(step: int) -> str:
    return f"step-{step:012d}.json"


def data_name(step: int, token: str) -> str:
    return f"step-{step:012d}-{token}.data"


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


def _is_ref(obj: Any) -> bool:
    from .lazy import StoreRef  # circular at import time only

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
    if doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {doc.get('format_version')!r}, this reader "
                              f"understands {FORMAT_VERSION}")
    for field in ("step", "segment", "tensors", "tree"):
        if field not in doc:
            raise CheckpointError(f"{path}: manifest has no {field!r} field")
    for i, t in enumerate(doc["tensors"]):
        missing = [k for k in ("name", "dtype", "shape", "nbytes", "crc32") if k not in t]
        if missing:
            raise CheckpointError(f"{path}: tensor #{i} lacks {', '.join(missing)}: {t!r}")
        dtype = dtype_from(t["dtype"], f"{path}: tensor {t['name']!r}")
        expect = math.prod(t["shape"]) * torch.empty((), dtype=dtype).element_size()
        if expect != t["nbytes"]:
            raise CheckpointError(f"{path}: tensor {t['name']!r}: {t['dtype']}{tuple(t['shape'])} needs "
                                  f"{expect} bytes, manifest says {t['nbytes']}")
    return doc


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


def referenced_files(manifests: dict[int, Path]) -> set[str]:
    """Names of the data files (or zarr directories) the committed manifests use."""
    names = set()
    for p in manifests.values():
        doc = read_manifest(p)
        if doc.get("data_file"):
            names.add(doc["data_file"])
        if doc.get("zarr"):
            names.add(doc["zarr"])
    return names
