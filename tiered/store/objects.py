"""What the store knows of each object: its key, where its bytes live (an extent), its cached
host copy, and the store's counters."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from tiered.allocators import HostBuffer, align_up
from tiered.io_engine import IOFuture

from ..dtypes import dtype_name
from .errors import StoreError


MANIFEST = "manifest.json"
DATA_FILE = "objects.dat"
LOCK_FILE = ".lock"
FORMAT = "tiered-store"
FORMAT_VERSION = 2  # 2: per-segment crc32 lists
#: who a buffer or an object is charged to when a call names no owner
DEFAULT_OWNER = "default"
_KEY_RE = re.compile(r"^[A-Za-z0-9_.:@+=-][A-Za-z0-9_.:@+=/-]*$")


def check_key(key: str) -> str:
    """Keys are names in the manifest, never paths; still refuse anything path-like."""
    if not isinstance(key, str) or not key or len(key) > 1024 or not _KEY_RE.fullmatch(key):
        raise StoreError(
            f"invalid object key {key!r}: expected 1-1024 characters of letters, digits and "
            "_ . : @ + = - /, not starting with '/'"
        )
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise StoreError(f"invalid object key {key!r}: empty, '.' or '..' path components are not allowed")
    return key


def extent_length(nbytes: int, block: int = 0) -> int:
    """Bytes an object's extent takes: its data padded to 4 KiB, then, for an object with block
    checksums, the table of one crc32 per ``block`` bytes of data (padded to 4 KiB)."""
    data = align_up(max(nbytes, 1))
    return data + (align_up(4 * -(-data // block)) if block else 0)


@dataclass
class Extent:
    """Where one version of an object lives: on a storage tier, or in an external file.

    External extents (e.g. a tensor inside a model's ``.safetensors`` file) are
    read in place, never written or freed, and not recorded in the manifest.
    """

    tier: str
    offset: int
    length: int  # reserved bytes (a multiple of 4 KiB); for external extents the exact size
    readers: int = 0
    retired_gen: int | None = None  # manifest generation that stopped naming it
    path: str | None = None  # set for external extents
    identity: tuple | None = None  # external: (size, mtime_ns, inode) of the file when registered
    punch: bool = True  # give the blocks back to the filesystem when freed (not for a superseded version)

    @property
    def external(self) -> bool:
        return self.path is not None


@dataclass
class HostCopy:
    """A cached copy of one version of an object in the host arena."""

    buffer: HostBuffer | None
    version: int
    pins: int = 0
    ready: bool = False
    detached: bool = False  # no longer the object's current copy; free when unpinned
    loaded: IOFuture | None = None
    start: int = 0  # where the object's bytes begin in the buffer (external, unaligned extents)
    loading: bool = False  # a read is filling the buffer: it must not be freed yet
    prefetchers: int = 0  # prefetch() callers still waiting for this load


@dataclass
class ObjectMeta:
    key: str
    kind: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    version: int
    crc32: list[int] | None  # one per SEGMENT of the buffer; None for external objects
    extent: Extent
    host: HostCopy | None = None
    ephemeral: bool = False  # deleted when the store closes, or by the next open after a crash
    owner: str = DEFAULT_OWNER  # the workload whose storage share holds it
    block: int = 0  # >0: a crc32 per ``block`` bytes, stored after the data (byte-range reads verify them)
    table_crc: int = 0  # crc32 of that table
    block_crcs: object = None  # the table, once read (numpy uint32), for byte-range reads
    placed: bool = False  # its put or migrate named the tier: the governor leaves it there

    def describe(self) -> dict:
        return {
            "key": self.key, "kind": self.kind, "dtype": dtype_name(self.dtype),
            "shape": list(self.shape), "nbytes": self.nbytes, "version": self.version,
            "tier": self.extent.tier, "offset": self.extent.offset,
            "in_host": bool(self.host and self.host.ready), "ephemeral": self.ephemeral, "owner": self.owner,
            "placed": self.placed,
            **({"block": self.block, "table_crc": self.table_crc} if self.block else {}),
        }


@dataclass
class _PendingPut:
    """A version written (or being written) to its extent, not yet current: see ``_install``."""

    key: str
    version: int
    relocate: int | None  # set for a migration: the version it rewrites
    tier: str
    offset: int
    length: int  # the extent's bytes
    nbytes: int
    dtype: torch.dtype
    shape: tuple
    kind: str
    sync: bool
    commit: bool
    ephemeral: bool
    buf: HostBuffer | None = None  # the written bytes (None for a streamed put)
    give: bool = False  # the buffer is the store's: cache or release it
    cache: bool = True
    crc: list[int] | None = None  # computed while streaming; else from ``buf``
    owner: str = DEFAULT_OWNER
    block: int = 0
    table_crc: int = 0
    placed: bool | None = None  # the caller named the tier; None: a governor's move keeps the old flag


def placed_flag(tier: str | None, relocate: int | None, placed: bool | None) -> bool | None:
    """Whether a write pins its object to its tier: a put that names one does; a move keeps the
    object's flag unless it says otherwise (``migrate`` does: its caller chose the tier)."""
    if placed is not None:
        return placed
    return (tier is not None) if relocate is None else None


@dataclass
class StoreCounters:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    bytes_read: dict = field(default_factory=dict)  # tier -> bytes read from it
    bytes_written: dict = field(default_factory=dict)
    evictions: int = 0
    commits: int = 0
