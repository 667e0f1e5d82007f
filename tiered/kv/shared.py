"""The shared tier: KV prefix blocks on a Redis-protocol server (Redis, Valkey), for every process.

Why. A prefix block is named by a chained hash of the tokens before it and the model that
computed it (:mod:`tiered.kv.prefix`), so a block computed by one process is valid for any other
process running the same model. Each process keeps its own local store; this tier lets them find
each other's blocks: a block one computes is published here, and a lookup that misses locally
pulls the block from here into its local store.

Entries. One value per block part, key ``tiered:<local key>``: ``b"TKV1"``, the length of a JSON
header (4 bytes, little endian), the header (format, key, full model identity, dtype, shape,
nbytes, crc32 of the payload), then the raw K/V bytes. No pickle. A value is written by one SET,
so a reader never sees half of it; a value that fails any check (magic, header, key, identity,
length, crc32) is deleted and read as a miss: the block is recomputed, never used.

Capacity. ``capacity`` is the bytes of entry values (headers included) that every process
using the server keeps there together, enforced by the writers: each put runs one server-side
script that evicts the least recently used entries until the new one fits, then writes it
(atomic on the server, so concurrent writers cannot overshoot). The figure is recorded on the
server by the first process to open it, and a process configured with another is refused: one
capacity per server database. Not counted: the server's own per-key overhead (~100 bytes per
key, small beside blocks of ~1 MB) and the index (~100 bytes per entry). The server's
``maxmemory`` must leave room for that (a warning at open says where it is below the capacity;
a write the server refuses for memory pauses publishing for ``retry_after`` seconds); a server that evicts our keys by itself (a
``maxmemory-policy`` other than ``noeviction``) only causes misses, and the index is repaired
when they are seen. A standalone server (not Redis Cluster): the script touches the keys it evicts.

Failures. The store never places or moves objects here (:attr:`SharedTier.external`). An
unreachable server at open is an error naming the URL when the tier is ``required``, else a
warning. Later, any connection error or timeout (or a call slower than ``timeout`` in all) marks
the tier down for ``retry_after`` seconds: lookups miss and publishes are skipped (prefixes are
recomputed), then it is tried again. URLs are shown without their password (``redact_url``).
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from collections.abc import Sequence

import torch

from ..checksums import crc32
from ..config import redact_url
from ..dtypes import dtype_from, dtype_name
from ..store import StoreError

log = logging.getLogger("tiered.kv")

FORMAT = "tiered-shared-kv"
VERSION = 1
MAGIC = b"TKV1"
PREFIX = "tiered:"
META, INDEX, SIZES, USED, CLOCK = (PREFIX + k for k in ("meta", "index", "sizes", "bytes", "clock"))
_HEADER_MAX = 1 << 16

# KEYS: entry, index, sizes, used, clock, meta. ARGV: value, capacity, meta record (set where missing:
# a server restarted empty still records the capacity its writers enforce).
# Returns {status, evicted}: 1 written, 0 already there (its recency refreshed), -1 larger than the
# capacity, -2 the server records another capacity (a writer opened while the server was down).
_PUT = """
redis.call('SET', KEYS[6], ARGV[3], 'NX')
if redis.call('GET', KEYS[6]) ~= ARGV[3] then return {-2, 0} end
local clock = redis.call('INCR', KEYS[5])
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('ZADD', KEYS[2], 'XX', clock, KEYS[1])
  return {0, 0}
end
local used = tonumber(redis.call('GET', KEYS[4]) or '0')
local stale = redis.call('HGET', KEYS[3], KEYS[1])
if stale then  -- indexed but gone (deleted outside this script): forget its size first
  used = used - tonumber(stale)
  redis.call('ZREM', KEYS[2], KEYS[1])
  redis.call('HDEL', KEYS[3], KEYS[1])
  redis.call('SET', KEYS[4], used)
end
local size = string.len(ARGV[1])
local cap = tonumber(ARGV[2])
if size > cap then return {-1, 0} end
local evicted = 0
while used + size > cap do
  local victim = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #victim == 0 then used = 0 break end
  used = used - tonumber(redis.call('HGET', KEYS[3], victim[1]) or '0')
  redis.call('DEL', victim[1])
  redis.call('ZREM', KEYS[2], victim[1])
  redis.call('HDEL', KEYS[3], victim[1])
  evicted = evicted + 1
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], clock, KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], size)
redis.call('SET', KEYS[4], used + size)
return {1, evicted}
"""

# KEYS: entry, index, sizes, used. Deletes the entry and its accounting (a bad or vanished entry).
_FORGET = """
local n = redis.call('HGET', KEYS[3], KEYS[1])
redis.call('DEL', KEYS[1])
if n then
  redis.call('ZREM', KEYS[2], KEYS[1])
  redis.call('HDEL', KEYS[3], KEYS[1])
  redis.call('DECRBY', KEYS[4], tonumber(n))
end
return n and 1 or 0
"""

# KEYS: index, sizes, used, entries...: entries a read found missing (evicted by the server, deleted by an
# operator); those still missing and still indexed leave the index and the accounting.
_FORGET_MISSING = """
local n = 0
for i = 4, #KEYS do
  local size = redis.call('HGET', KEYS[2], KEYS[i])
  if size and redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('ZREM', KEYS[1], KEYS[i])
    redis.call('HDEL', KEYS[2], KEYS[i])
    redis.call('DECRBY', KEYS[3], tonumber(size))
    n = n + 1
  end
end
return n
"""

# KEYS: index, clock, entries...: the entries were just used (least recently used goes first).
_TOUCH = """
for i = 3, #KEYS do
  redis.call('ZADD', KEYS[1], 'XX', redis.call('INCR', KEYS[2]), KEYS[i])
end
return #KEYS - 2
"""


class SharedTierError(StoreError):
    """The shared tier cannot be used as configured (unreachable when required, another capacity...)."""


class BadEntry(ValueError):
    """A stored value that is not a valid entry for the key asked (the reason says why)."""


def encode(key: str, identity: str, payload, dtype: torch.dtype, shape: Sequence[int]) -> bytes:
    """One entry's value: magic, header length, JSON header, raw bytes (``payload``: a buffer)."""
    data = memoryview(payload).cast("B")
    header = json.dumps({"format": FORMAT, "version": VERSION, "key": key, "identity": identity,
                         "dtype": dtype_name(dtype), "shape": [int(d) for d in shape], "nbytes": data.nbytes,
                         "crc32": crc32(data)}, sort_keys=True).encode()
    return b"".join((MAGIC, struct.pack("<I", len(header)), header, data))


def decode(key: str, identity: str, value: bytes) -> torch.Tensor:
    """The tensor an entry holds, checked against ``key`` and ``identity``; BadEntry otherwise."""
    if len(value) < 8 or value[:4] != MAGIC:
        raise BadEntry(f"{len(value)} bytes not starting with {MAGIC!r}")
    (hlen,) = struct.unpack_from("<I", value, 4)
    if hlen > _HEADER_MAX or 8 + hlen > len(value):
        raise BadEntry(f"header length {hlen} does not fit the {len(value)}-byte value")
    try:
        h = json.loads(value[8:8 + hlen])
        dtype = dtype_from(h["dtype"], error=BadEntry, where="header")
        if not isinstance(h["shape"], list):
            raise ValueError(f"shape {h['shape']!r} is not a list")
        shape = tuple(_count(d, "shape") for d in h["shape"])
        nbytes, crc = _count(h["nbytes"], "nbytes"), _count(h["crc32"], "crc32")
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise BadEntry(f"malformed header ({e!r})") from None
    if h.get("format") != FORMAT or h.get("version") != VERSION:
        raise BadEntry(f"format {h.get('format')!r} v{h.get('version')!r}, expected {FORMAT} v{VERSION}")
    if h.get("key") != key or h.get("identity") != identity:
        raise BadEntry(f"header names key {h.get('key')!r} of model {h.get('identity')!r}")
    payload = memoryview(value)[8 + hlen:]
    elements = 1
    for d in shape:
        elements *= d
    if nbytes != payload.nbytes or nbytes != elements * torch.empty((), dtype=dtype).element_size():
        raise BadEntry(f"{payload.nbytes} payload bytes, header says {nbytes} of {dtype_name(dtype)}{list(shape)}")
    if crc32(payload) != crc:
        raise BadEntry("payload crc32 differs from the header's")
    try:
        if not nbytes:  # frombuffer refuses an empty buffer
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).reshape(shape)
    except (RuntimeError, OverflowError, ValueError, TypeError) as e:  # e.g. a dimension beyond int64
        raise BadEntry(f"shape {list(shape)} cannot be made a tensor ({type(e).__name__})") from None


def _count(v: object, what: str) -> int:
    """A header's non-negative integer (JSON also gives floats, Infinity, NaN, booleans: ValueError)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{what} {v!r} is not a non-negative integer")
    return v


class SharedTier:
    """A client of the shared tier (see the module docstring). ``open()`` before use, ``close()`` after.

    ``url``, ``capacity`` (bytes), ``required``, ``timeout`` (seconds per connect or request): as
    in ``[tiers.NAME] kind = "shared"``; :meth:`from_spec` takes that TierSpec. ``retry_after``:
    seconds a failed server is left alone before it is tried again.
    """

    external = True  # outside the store: never a placement or migration target

    def __init__(self, url: str, capacity: int, *, required: bool = True, timeout: float = 2.0,
                 retry_after: float = 10.0, name: str = "shared") -> None:
        if not isinstance(capacity, int) or capacity <= 0:
            raise SharedTierError(f"shared tier {redact_url(url)}: capacity must be a positive number of bytes, got {capacity!r}")
        self.url, self.capacity, self.required, self.name = url, capacity, required, name
        self.shown_url = redact_url(url)  # for logs and errors: without its password
        self.timeout, self.retry_after = timeout, retry_after
        self._client = None
        self._scripts: dict = {}
        self._lock = threading.Lock()
        self._down_until = 0.0  # monotonic time before which the server is not tried
        self._full_until = 0.0  # monotonic time before which nothing is published (the server was out of memory)
        self.stats = {"hits": 0, "misses": 0, "corrupt": 0, "published": 0, "evicted": 0, "too_large": 0,
                      "refused": 0, "errors": 0, "skipped_down": 0,
                      "skipped_full": 0}

    @classmethod
    def from_spec(cls, spec, **kwargs) -> "SharedTier":
        return cls(spec.url, spec.capacity, required=spec.required, timeout=spec.timeout, name=spec.name, **kwargs)

    # -- lifecycle -------------------------------------------------------------------------
    def open(self) -> "SharedTier":
        try:
            import redis
        except ImportError:
            raise SharedTierError(f"shared tier {self.name!r} ({self.shown_url}) needs the redis client: "
                                  "pip install 'tiered[shared]'") from None
        self._client = redis.Redis.from_url(self.url, socket_timeout=self.timeout,
                                            socket_connect_timeout=self.timeout, retry_on_timeout=False)
        self._scripts = {n: self._client.register_script(s) for n, s in
                         (("put", _PUT), ("forget", _FORGET), ("forget_missing", _FORGET_MISSING),
                                                      ("touch", _TOUCH))}
        try:
            self._client.ping()
            self._check_meta()
            self._check_maxmemory()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            if self.required:
                self.close()
                raise SharedTierError(f"shared tier {self.name!r}: cannot reach the key-value server at "
                                      f"{self.shown_url} ({self._scrub(e)}); start it, fix the url, or set required = false "
                                      "to run without it") from None
            self._mark_down(e)
        except BaseException:
            self.close()
            raise
        return self

    def _check_meta(self) -> None:
        """Record this tier's format and capacity on the server, or check those recorded there."""
        self._client.set(META, self._meta(), nx=True)
        raw = self._client.get(META)
        try:
            theirs = json.loads(raw)
        except (TypeError, ValueError):
            theirs = None
        if not isinstance(theirs, dict) or (theirs.get("format"), theirs.get("version")) != (FORMAT, VERSION):
            raise SharedTierError(f"shared tier {self.shown_url}: key {META!r} holds {raw!r}, not a {FORMAT} v{VERSION} "
                                  "record: the database is used by something else; choose another database")
        if theirs.get("capacity") != self.capacity:
            raise SharedTierError(
                f"shared tier {self.shown_url}: its capacity is recorded as {theirs.get('capacity')} bytes, and this "
                f"config says {self.capacity}: every process using one server database must give the same "
                f"capacity (to change it, stop them all and delete the key {META!r})")

    def _check_maxmemory(self) -> None:
        """Warn where the server may hold less than the capacity: it would refuse writes (OOM) or
        evict entries itself before the tier is full. Best effort: CONFIG may be disabled."""
        import redis

        try:
            limit = int(self._client.config_get("maxmemory").get("maxmemory", 0))
        except (redis.ResponseError, ValueError):
            return
        if 0 < limit < self.capacity:
            log.warning("shared tier %s: capacity %d bytes is more than the server's maxmemory %d: it will "
                        "refuse or evict entries before the tier is full; lower the capacity or raise maxmemory",
                        self.shown_url, self.capacity, limit)

    def _meta(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, "capacity": self.capacity}, sort_keys=True)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> "SharedTier":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- availability ----------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """False while the server is left alone after a failure (or the tier is closed)."""
        return self._client is not None and time.monotonic() >= self._down_until

    def _scrub(self, err: BaseException) -> str:
        """An error's text with the url (should the client quote it) shown without its password."""
        return str(err).replace(self.url, self.shown_url)

    def _mark_down(self, err: BaseException) -> None:
        with self._lock:
            self.stats["errors"] += 1
            self._down_until = time.monotonic() + self.retry_after
        log.warning("shared tier %s unreachable (%s): prefixes are recomputed, not shared, for the next %.0f s",
                    self.shown_url, self._scrub(err), self.retry_after)

    def _run(self, what: str, fn):
        """``fn()``, or None when the server is down or fails (then it is marked down). A call that
        took longer than ``timeout`` in all (each recv in time, the whole late: a slow link) keeps
        its answer but marks the server down, so lookups are not held up call after call."""
        import redis

        if not self.available:
            with self._lock:
                self.stats["skipped_down"] += 1
            return None
        start = time.monotonic()
        try:
            got = fn()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            self._mark_down(e)
            return None
        except redis.ResponseError as e:  # e.g. OOM: the server's maxmemory is reached
            oom = isinstance(e, redis.exceptions.OutOfMemoryError) or "maxmemory" in str(e)
            with self._lock:
                self.stats["refused"] += 1
                if oom:
                    self._full_until = time.monotonic() + self.retry_after
            log.warning("shared tier %s refused a %s: %s%s", self.shown_url, what, self._scrub(e),
                        f"; nothing is published for the next {self.retry_after:.0f} s" if oom else "")
            return None
        elapsed = time.monotonic() - start
        if elapsed > self.timeout:
            self._mark_down(redis.TimeoutError(f"a {what} took {elapsed:.1f} s, more than the timeout of "
                                               f"{self.timeout:g} s"))
        return got

    # -- entries ---------------------------------------------------------------------------
    def put(self, key: str, identity: str, payload, dtype: torch.dtype, shape: Sequence[int]) -> bool:
        """Publish one block part (``payload``: its raw bytes); False when it was not written
        (already there, larger than the capacity, server down or refusing)."""
        if time.monotonic() < self._full_until:
            with self._lock:
                self.stats["skipped_full"] += 1
            return False
        value = encode(key, identity, payload, dtype, shape)
        got = self._run(f"put of {key}", lambda: self._scripts["put"](
            keys=[PREFIX + key, INDEX, SIZES, USED, CLOCK, META], args=[value, self.capacity, self._meta()]))
        if got is None:
            return False
        status, evicted = int(got[0]), int(got[1])
        with self._lock:
            self.stats["evicted"] += evicted
            self.stats["published"] += status == 1
            self.stats["too_large"] += status == -1
        if status == -2:
            with self._lock:
                self.stats["refused"] += 1
            log.warning("shared tier %s records another capacity or format than this process's (%d bytes): "
                        "nothing is published; give every process the same capacity", self.shown_url, self.capacity)
        if status == -1:
            log.warning("shared tier %s: entry %s (%d bytes) is larger than the tier's capacity %d",
                        self.shown_url, key, len(value), self.capacity)
        return status == 1

    def get_many(self, keys: Sequence[str], identity: str) -> list[torch.Tensor | None]:
        """The tensors of ``keys``, None for each that is missing or fails its checks (it is then
        deleted); all None when the server is down."""
        values = self._run("read", lambda: self._client.mget([PREFIX + k for k in keys]))
        if values is None:
            return [None] * len(keys)
        out: list[torch.Tensor | None] = []
        for key, value in zip(keys, values):
            out.append(None if value is None else self._checked(key, identity, value))
        hits = [PREFIX + k for k, t in zip(keys, out) if t is not None]
        with self._lock:
            self.stats["hits"] += len(hits)
            self.stats["misses"] += len(keys) - len(hits)
        if hits:
            self._run("touch", lambda: self._scripts["touch"](keys=[INDEX, CLOCK, *hits]))
        missing = [PREFIX + k for k, v in zip(keys, values) if v is None]
        if missing:
            self._run("index repair", lambda: self._scripts["forget_missing"](keys=[INDEX, SIZES, USED, *missing]))
        return out

    def _checked(self, key: str, identity: str, value: bytes) -> torch.Tensor | None:
        try:
            return decode(key, identity, value)
        except BadEntry as e:
            log.warning("shared tier %s: entry %s is bad (%s): deleted, the block is recomputed", self.shown_url, key, e)
            with self._lock:
                self.stats["corrupt"] += 1
            self.forget(key)
            return None

    def forget(self, key: str) -> None:
        """Delete an entry and its accounting."""
        self._run(f"delete of {key}", lambda: self._scripts["forget"](keys=[PREFIX + key, INDEX, SIZES, USED]))

    def contains(self, key: str) -> bool:
        return bool(self._run("lookup", lambda: self._client.exists(PREFIX + key)))

    def used_bytes(self) -> int | None:
        """Bytes of entries on the server (every process's), None when it cannot be asked."""
        raw = self._run("read", lambda: self._client.get(USED))
        return None if raw is None and not self.available else int(raw or 0)
