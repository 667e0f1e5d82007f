"""Load: read a committed step back, every byte checked against the crc32 recorded for it.

A storage-level step is read from the extents its store retention keeps (where the store
says they are now: ``TieredStore.retained``), through the store's engine into buffers of
its host tier; a cold-level step from its zarr group.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import torch

from ._io import read_parts, read_verified
from .format import (
    SEGMENT, CheckpointChecksumError, CheckpointError, decode_tree, dtype_from, dtype_name, encode_tree,
    manifest_name, read_manifest,
)


class Loading:
    """The load half of :class:`~.lazy.LazyCheckpointer`."""

    def load(self, step: int | None = None, *, into: Any = None) -> Any:
        """The state dict saved as ``step`` (default: the latest), every byte checked against its
        crc32. With ``into`` (a state dict of the same keys), tensors are filled in place as they
        verify: after an error ``into`` may hold some tensors of this step and some old ones, so load
        without ``into`` (then copy) where a failed load must leave the live state untouched."""
        self._check_open()
        with self._retire_lock:  # the manifest read and the pin together: no retire in between
            step, directory, doc = self._visible(step)
            pin = self._pin(directory, doc)
        try:
            return self._load_doc(step, directory, doc, into)
        finally:
            self._unpin(pin)

    def _visible(self, step: int | None) -> tuple[int, Path, dict]:
        """The committed manifest of ``step`` (default: the latest) and the directory holding it."""
        steps = self.steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no committed checkpoint in {self.directory}"
                                      + (f" or {self.cold_directory}" if self.cold_directory else ""))
            step = self.latest()
        if step not in steps:
            raise CheckpointError(f"no committed checkpoint of step {step} in {self.directory}; "
                                  f"committed: {sorted(steps) or 'none'}")
        directory = self.directory if steps[step] == "storage" else self.cold_directory
        return step, directory, read_manifest(directory / manifest_name(step))

    def _load_doc(self, step: int, directory: Path, doc: dict, into: Any) -> Any:
        mpath = directory / manifest_name(step)
        targets = _targets(into, doc, step, mpath)
        if doc.get("zarr"):
            import zarr

            zpath = directory / doc["zarr"]
            group = zarr.open_group(store=zarr.storage.LocalStore(str(zpath), read_only=True), mode="r")

            def read(t, put, where):
                _read_cold(group[t["array"]], t, put, where, zpath)
        elif doc["format_version"] == 1:  # the checkpoint's own data file
            def read(t, put, where):
                path = t["file"] if os.path.isabs(t["file"]) else str(directory / t["file"])
                read_verified(self.store.engine, self.host.loans(), path, t["offset"], t["nbytes"], t["crc32"],
                              t.get("segment", doc["segment"]), put, where, self.host_wait)
        else:
            paths = self._retained_paths(doc, mpath)

            def read(t, put, where):
                self._read_parts(t, paths, put, where)

        out = [_load_tensor(t, targets, into is not None, step, mpath, read) for t in doc["tensors"]]
        return decode_tree(doc["tree"], out, str(mpath))

    def _retained_paths(self, doc: dict, mpath: Path) -> dict[tuple[str, int], str]:
        """(key, version) -> data file, for the parts the manifest names, as the store keeps them;
        a part the store does not keep at the recorded place is an error naming it."""
        tag = doc.get("retain_tag")
        held = self.store.retained(tag).get(tag, []) if tag else []
        where = {(r["key"], r["version"]): r for r in held}
        paths = {}
        for t in doc["tensors"]:
            for part in t["parts"]:
                r = where.get((part["key"], part["version"]))
                if r is None or (r["tier"], r["offset"], r["nbytes"]) != (part["tier"], part["offset"], part["nbytes"]):
                    raise CheckpointError(
                        f"{mpath}: tensor {t['name']!r}: the store at {self.store.root} does not retain "
                        f"{part['key']!r} version {part['version']} at {part['tier']}:{part['offset']} for tag {tag!r}")
                paths[(part["key"], part["version"])] = r["path"]
        return paths

    def _read_parts(self, t: dict, paths: dict, put, where: str) -> None:
        parts, start = [], 0
        for part in t["parts"]:
            parts.append((paths[(part["key"], part["version"])], part["offset"], part["nbytes"], part["crc32"], start))
            start += part["nbytes"]
        read_parts(self.store.engine, self.host.loans(), parts, SEGMENT, put, where, self.host_wait)


def _targets(into: Any, doc: dict, step: int, mpath: Path) -> dict[str, torch.Tensor]:
    if into is None:
        return {}
    pairs: list = []
    encode_tree(into, pairs)
    targets = {name: t for name, t in pairs if isinstance(t, torch.Tensor)}
    extra = sorted(set(targets) - {t["name"] for t in doc["tensors"]})
    if extra:
        raise CheckpointError(f"load(step={step}): into has tensors {extra[:5]} that {mpath} does not hold")
    return targets


def _load_tensor(t: dict, targets: dict, has_into: bool, step: int, mpath: Path, read) -> torch.Tensor:
    """One tensor of the manifest: read into its ``into`` target (in place when it is a contiguous
    CPU tensor) or a new CPU tensor."""
    dtype = dtype_from(t["dtype"], f"{mpath}: tensor {t['name']!r}")
    shape = tuple(t["shape"])
    target = targets.get(t["name"])
    if target is not None and (target.dtype != dtype or tuple(target.shape) != shape):
        raise CheckpointError(f"load(step={step}): {t['name']!r} is {t['dtype']}{shape} in {mpath}, "
                              f"but into has {dtype_name(target.dtype)}{tuple(target.shape)}")
    if has_into and target is None:
        raise CheckpointError(f"load(step={step}): {t['name']!r} is in {mpath} but not in into")
    direct = target is not None and target.device.type == "cpu" and target.is_contiguous()
    dest = target.detach() if direct else torch.empty(shape, dtype=dtype)
    flat = dest.reshape(-1).view(torch.uint8) if dest.dtype != torch.uint8 else dest.reshape(-1)

    def put(lo: int, data) -> None:
        flat[lo:lo + len(data)].numpy()[:] = data

    read(t, put, f"step {step} tensor {t['name']!r}")
    if target is None:
        return dest
    if not direct:
        with torch.no_grad():
            target.copy_(dest)
    return target


def _read_cold(arr, t: dict, put, where: str, zpath: Path) -> None:
    n, crcs, segment = t["nbytes"], t["crc32"], t["segment"]
    if arr.shape != (n,):
        raise CheckpointError(f"{where}: zarr array {zpath}/{t['array']} has shape {arr.shape}, expected ({n},)")
    for k, lo in enumerate(range(0, n, segment)):
        data = arr[lo:min(n, lo + segment)]
        got = zlib.crc32(data)
        if got != crcs[k]:
            raise CheckpointChecksumError(f"{where}: segment {k} of {zpath}/{t['array']} has crc32 {got:#010x}, "
                                          f"recorded {crcs[k]:#010x}")
        put(lo, data)
