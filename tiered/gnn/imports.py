"""Importing attributes: copied into chunk objects, served in place from a ``.npy`` file, or
written to a compressed zarr array (the cold tier).

Chunks copied into the store are put with ``block=checksum_block`` (default 4 KiB): the
store records a crc32 per block, so that every row read (:meth:`TieredStore.read_ranges`) is
verified; reads then start and end on blocks. A larger block costs less CPU to verify per
byte (fewer checksum calls) but makes an isolated row's read that large.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .attrs import FeatureStoreError, _Attr, _label

#: default checksum block of chunk objects: a page, the smallest read the planner makes
BLOCK = 4096


class _Imports:
    """Part of :class:`~tiered.gnn.TieredFeatureStore` (see its docstring)."""

    def import_array(self, source, group_name=None, attr_name: str = "x", *, tier: str = "store",
                     in_place: bool = False, progress: Callable[[int, int], None] | None = None) -> dict:
        """Store a row-major array as attribute (``group_name``, ``attr_name``), one chunk at a time.

        ``source``: a torch tensor, a numpy array or ``np.memmap``, a path to a
        ``.npy`` file (memory-mapped, never read whole), or a zarr array (or the
        path of one). ``tier="store"`` copies rows into store objects on the
        store's storage tier; ``tier="zarr"`` writes a zstd-compressed zarr v3
        array (cold tier); ``in_place=True`` serves a ``.npy``/``np.memmap``
        file where it is (it must then not change). Returns the attribute's
        description.
        """
        self._check_open()
        if tier not in ("store", "zarr"):
            raise FeatureStoreError(f"import_array({_label(group_name, attr_name)}): tier must be 'store' or "
                                    f"'zarr', got {tier!r}")
        arr = _open_source(source)
        if len(arr.shape) < 1:
            raise FeatureStoreError(f"import_array({_label(group_name, attr_name)}): a 0-d array has no rows")
        dtype = _torch_dtype(arr.dtype, _label(group_name, attr_name))
        shape = tuple(int(d) for d in arr.shape)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(arr.dtype).itemsize
        chunk_rows = max(1, self.chunk_bytes // max(row_bytes, 1))
        with self._lock:
            gen = self._next_gen
            self._next_gen += 1
        prefix = self._chunk_prefix(group_name, attr_name, gen)
        n = shape[0]
        starts = list(range(0, n, chunk_rows))
        a = _Attr(group_name, attr_name, dtype, shape, chunk_rows, "store", [], gen,
                  block=self.checksum_block)
        if in_place:
            if tier != "store":
                raise FeatureStoreError(f"import_array({a.label}): in_place works with tier='store' only")
            fname, offset = _memmap_file(arr, a.label)
            a.tier = "external"
            a.external = {"path": fname, "offset": offset}
            a.keys = [f"{prefix}/c{i:06d}" for i in range(len(starts))]
            self._register_external(a, first=True)
        elif tier == "zarr":
            import zarr

            root = Path(self._zarr_dir) if self._zarr_dir else self.store.root / "gnn-zarr"
            path = root / self.namespace / f"{prefix.rsplit('/', 2)[-2]}-g{gen}.zarr"
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            zarr_rows = max(1, (1 << 20) // max(row_bytes, 1))
            z = zarr.create_array(str(path), shape=shape, dtype=arr.dtype, chunks=(zarr_rows, *shape[1:]),
                                  compressors=zarr.codecs.ZstdCodec(level=3), overwrite=False)
            step = max(zarr_rows, chunk_rows // zarr_rows * zarr_rows)
            for lo in range(0, n, step):
                z[lo : lo + step] = np.asarray(arr[lo : lo + step])
                if progress:
                    progress(min(lo + step, n), n)
            a.tier, a.zarr_path = "zarr", str(path)
        else:
            try:
                for i, lo in enumerate(starts):
                    part = np.array(arr[lo : lo + chunk_rows], order="C")  # one chunk in RAM, writable
                    key = f"{prefix}/c{i:06d}"
                    self.store.put(key, torch.from_numpy(part), kind="gnn", owner=self.owner,
                                   block=a.block).result(timeout=self.timeout)
                    a.keys.append(key)
                    self.store.evict(key)  # rows are read from storage; the row cache holds hot ones
                    if progress:
                        progress(min(lo + chunk_rows, n), n)
            except BaseException:
                for key in a.keys:
                    self.store.delete(key)
                raise
        self._install(a)
        return a.describe()

    def _add_block_checksums(self, a: _Attr) -> None:
        """Put again, with a crc32 per block, the chunks of an attribute stored before chunks had
        them (row reads need them). Each put replaces its chunk atomically; the catalog records
        the attribute's ``block`` once all are done (a crash in between redoes it)."""
        for key in a.keys:
            t = self.store.get(key, owner=self.owner).result(timeout=self.timeout)
            self.store.put(key, t, kind="gnn", owner=self.owner, block=self.checksum_block).result(
                timeout=self.timeout)
            self.store.evict(key)
        a.block = self.checksum_block

    def _register_external(self, a: _Attr, first: bool = False) -> None:
        ext = a.external
        path, offset = ext["path"], int(ext["offset"])
        st = os.stat(path)
        ident = [st.st_size, st.st_mtime_ns, st.st_ino]
        if first:
            ext["identity"] = ident
        elif ident != list(ext.get("identity") or []):
            raise FeatureStoreError(f"{a.label}: {path} changed since it was imported in place "
                                    "(size, mtime or inode differ); import it again")
        rb = a.row_bytes
        for i, key in enumerate(a.keys):
            lo = i * a.chunk_rows
            rows = min(a.chunk_rows, a.num_rows - lo)
            self.store.register_external(key, path, offset + lo * rb, rows * rb, a.dtype,
                                         (rows, *a.row_shape), kind="gnn")


# ----------------------------------------------------------------------------- sources


def _torch_dtype(dt, label: str) -> torch.dtype:
    try:
        return torch.from_numpy(np.empty(0, dtype=dt)).dtype
    except TypeError as e:
        raise FeatureStoreError(f"{label}: numpy dtype {dt} has no torch equivalent") from e


def _open_source(source):
    """An array-like with ``shape``/``dtype``/slicing, without reading the data."""
    if isinstance(source, torch.Tensor):
        return source.detach().cpu().contiguous().numpy()
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.suffix == ".npy":
            return np.load(p, mmap_mode="r")
        import zarr

        return zarr.open_array(str(p), mode="r")
    if hasattr(source, "shape") and hasattr(source, "dtype") and hasattr(source, "__getitem__"):
        return source
    raise FeatureStoreError(f"cannot import from {type(source).__name__}: expected a tensor, a numpy array or "
                            "memmap, a .npy path, or a zarr array")


def _memmap_file(arr, label: str) -> tuple[str, int]:
    if not isinstance(arr, np.memmap) or arr.filename is None:
        raise FeatureStoreError(f"import_array({label}, in_place=True): needs a .npy path or an np.memmap of a file, "
                                f"got {type(arr).__name__}")
    if not arr.flags.c_contiguous:
        raise FeatureStoreError(f"import_array({label}, in_place=True): {arr.filename} is not C-contiguous")
    base_off = int(arr.offset)
    # a slice of a memmap keeps the file's offset; find where this view starts in the file
    root = arr
    while isinstance(getattr(root, "base", None), np.memmap):
        root = root.base
    delta = arr.__array_interface__["data"][0] - np.asarray(root).__array_interface__["data"][0] if root is not arr else 0
    return str(os.path.abspath(arr.filename)), base_off + int(delta)
