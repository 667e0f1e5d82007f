"""The offload config's schema: the specs a validated config is made of, and the names it accepts.

Kept apart from validation (:mod:`tiered.config_validate`) and loading (:mod:`tiered.config`) so
code that only reads a config imports the shapes without the validator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .sizes import format_rate, format_size

TIER_KINDS = ("device", "host", "storage", "shared")
def backend_choices() -> tuple[str, ...]:
    """Names ``[engine] backend`` accepts: the engine's backend registry, read at validation
    time (a backend registered later is accepted), plus ``auto``."""
    from tiered.io_engine import backend_names

    return (*backend_names(), "auto")


BACKENDS = backend_choices()  # those registered when this module was imported
# Names accepted by ``[policy] eviction`` besides those in the policies
# registry (``policies.eviction_policy_names()``, read at validation time, so
# a policy registered by a workload package is accepted once it is imported).
KNOWN_EVICTION_POLICIES: tuple[str, ...] = ("lru",)
# ``[policy] placement``: where a new object put without a named tier goes.
PLACEMENTS = ("auto", "first-fit")

MiB = 1 << 20
GiB = 1 << 30
_ALIGN = 4096
_TIER_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_DEVICE_RE = re.compile(r"^[a-z]+(:\d+)?$")
_TOP_KEYS = ("tiers", "engine", "policy", "offload", "owners")
_OWNER_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_TIER_KEYS = {
    "device": ("kind", "capacity", "device"),
    "host": ("kind", "capacity"),
    "storage": ("kind", "capacity", "path", "read_bandwidth", "write_bandwidth"),
    "shared": ("kind", "capacity", "url", "required", "timeout"),
}
_SHARED_SCHEMES = ("redis", "rediss", "unix")
_ALL_TIER_KEYS = tuple(dict.fromkeys(k for keys in _TIER_KEYS.values() for k in keys))
_ENGINE_KEYS = ("backend", "workers", "queue_depth", "chunk", "direct")
_POLICY_KEYS = ("placement", "eviction", "migration", "fallback", "migration_bandwidth", "migration_batch")
# Migration policies a live store cannot run, and why (they run in ``tiered bench replay``).
NOT_LIVE = {"belady": "it needs the future of the accesses, which a live store does not know",
            "rl": ("its decisions cost 44-66 us of CPU per access, bookkeeping and training included "
                   "(a live store's budget is 10 us), and on traces it was not tuned on it is not reliably "
                   "better than arc or s3fifo")}
_OFFLOAD_KEYS = ("lookahead", "resident", "layout", "device_cache", "experts", "activations")
#: where the tensors autograd saves in an offloaded model's forward stay: "keep" (where autograd put
#: them) or "host" (moved into the store until backward: see tiered.offload.activations)
OFFLOAD_ACTIVATIONS = ("keep", "host")


class ConfigError(ValueError):
    """An offload config that cannot be used; the message says where and why."""


_URL_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^?#]*)@")
_URL_PASSWORD_ARG = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def redact_url(url: object) -> object:
    """``url`` as it may be shown (logs, errors, printed configs): its password replaced by ``***``,
    in the user info (``redis://user:***@host``, or ``***`` where it is one word) and in a
    ``password=`` argument. Anything not a string is returned as is."""
    if not isinstance(url, str):
        return url

    def userinfo(m: re.Match) -> str:
        user, colon, _ = m.group(2).partition(":")
        return f"{m.group(1)}{user}:***@" if colon else f"{m.group(1)}***@"

    return _URL_PASSWORD_ARG.sub(r"\1***", _URL_USERINFO.sub(userinfo, url, count=1))


@dataclass(frozen=True)
class TierSpec:
    """One tier's budget. Device tiers hold GPU memory, host pinned RAM, storage files; a shared
    tier is a key-value server other processes and hosts use too (``external``: the store never
    places or moves objects there; the KV prefix store reads and writes it itself)."""

    name: str
    kind: str  # "device" | "host" | "storage"
    capacity: int  # bytes
    path: Path | None = None  # storage tiers only (absolute, resolved)
    path_template: str | None = None  # the path as written, where it holds {rank}/{local_rank}: a per-rank shard
    read_bandwidth: int | None = None  # bytes/s throttle (storage tiers)
    write_bandwidth: int | None = None
    device: str | None = None  # device tiers, e.g. "cuda:0"
    url: str | None = None  # shared tiers: redis://HOST:PORT/DB
    required: bool = True  # shared tiers: an unreachable server fails the open (else: run without it)
    timeout: float = 2.0  # shared tiers: seconds a connect or a request may take

    def __repr__(self) -> str:  # the url without its password
        shown = ", ".join(f"{f.name}={redact_url(getattr(self, f.name))!r}" if f.name == "url"
                          else f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"TierSpec({shown})"

    @property
    def external(self) -> bool:
        """A tier outside the store (shared with other processes): never a placement or migration target."""
        return self.kind == "shared"


@dataclass(frozen=True)
class EngineSpec:
    """How bytes move between host and storage."""

    backend: str = "threads"  # threads | native | aio | aiofiles | kvikio | auto
    workers: int = 8  # threads with a read in flight: 8 keep this virtio disk busy, 4 do not
    queue_depth: int = 32
    chunk: int = 8 * MiB  # positive multiple of 4096, at most 1 GiB
    direct: bool = True  # O_DIRECT where buffers and offsets are aligned


@dataclass(frozen=True)
class PolicySpec:
    """Which policies decide what lives where.

    ``placement``: where a new object put without a named tier goes ("auto", the default: the
    tier the migration policy picks when it places objects, else the first with room;
    "first-fit": always the first storage tier with room).
    ``eviction``: the host tier's ranking of cached copies (which is evicted first; declared
    plans come first, see the store).
    ``migration``: the policy the store's governor asks, from the store's own accesses, which
    storage tier each object lives on ("auto", the default: ``schedule`` -- exact decisions over
    the declared plans -- with ``fallback`` beyond them; "none": objects stay where they were
    put). The governor acts only where there are two or more storage tiers, and never moves an
    object whose put or migrate named its tier.
    ``fallback``: the eviction ranking ``schedule`` uses where no plan says what is next.
    ``migration_bandwidth``: bytes/s the governor's moves may use; ``migration_batch``: accesses
    per decision round.
    """

    placement: str = "auto"
    eviction: str = "lru"
    migration: str = "auto"
    fallback: str = "lru"
    migration_bandwidth: int = 128_000_000
    migration_batch: int = 64


@dataclass(frozen=True)
class OffloadSpec:
    """How the module wrapper streams weights.

    ``lookahead``: how many units ahead of the running one are read (None: as
    many as the compute budget holds, at most 2: reading further ahead only takes budget
    from resident units). ``resident``: keep units
    that fit in the budget left over by the streaming window permanently
    loaded, instead of re-reading every weight on every forward.
    ``device_cache``: on CUDA, place weights on the GPU through a
    :class:`~tiered.DeviceCache` (one pre-reserved region; prefetches copied
    to the device ahead of use on a side stream) instead of per-tensor
    allocations filled when a unit starts (None: on whenever the compute
    device is CUDA).
    """

    lookahead: int | None = None
    resident: bool = True
    layout: str = "packed"  # or "bundled": FFN neurons' up/gate rows and down column together
    device_cache: bool | None = None
    #: mixture-of-experts blocks: each expert its own object, only routed experts read (None: on
    #: for every recognised MoE block)
    experts: bool | None = None
    #: "host": the large tensors autograd saves in a forward wait in the store for backward
    activations: str = "keep"


@dataclass(frozen=True)
class OwnerShare:
    """``[owners.NAME] TIER = SIZE``: bytes of a tier guaranteed to one workload (an owner)."""

    owner: str
    tier: str
    nbytes: int


@dataclass(frozen=True)
class Config:
    """A validated config: tiers ordered fastest first (device, host, storage in file order).

    ``shared_tiers``: the ``kind = "shared"`` tiers, kept apart from ``tiers`` because the store
    does not manage them (see :attr:`TierSpec.external`)."""

    tiers: tuple[TierSpec, ...]
    engine: EngineSpec = field(default_factory=EngineSpec)
    policy: PolicySpec = field(default_factory=PolicySpec)
    source: str = "<dict>"
    offload: OffloadSpec = field(default_factory=OffloadSpec)
    owners: tuple[OwnerShare, ...] = ()
    shared_tiers: tuple[TierSpec, ...] = ()

    def share(self, owner: str, tier: str) -> int | None:
        """The share ``[owners.<owner>]`` gives ``owner`` of ``tier`` (None: not configured).
        An owner named ``kind/instance`` (``offload/llama``) falls back to its kind's table."""
        for name in (owner, owner.split("/", 1)[0]):
            for s in self.owners:
                if s.owner == name and s.tier == tier:
                    return s.nbytes
        return None

    def tier(self, name: str) -> TierSpec:
        for t in self.tiers:
            if t.name == name:
                return t
        known = ", ".join(repr(t.name) for t in self.tiers) or "none"
        raise KeyError(f"no tier named {name!r} in {self.source}; known tiers: {known}")

    @property
    def device_tiers(self) -> tuple[TierSpec, ...]:
        return tuple(t for t in self.tiers if t.kind == "device")

    @property
    def host_tier(self) -> TierSpec | None:
        return next((t for t in self.tiers if t.kind == "host"), None)

    @property
    def storage_tiers(self) -> tuple[TierSpec, ...]:
        return tuple(t for t in self.tiers if t.kind == "storage")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able resolved form for printing: sizes as ints plus ``*_human`` strings."""
        tiers: dict[str, Any] = {}
        for t in (*self.tiers, *self.shared_tiers):
            d: dict[str, Any] = {
                "kind": t.kind,
                "capacity": t.capacity,
                "capacity_human": format_size(t.capacity),
            }
            if t.device is not None:
                d["device"] = t.device
            if t.path is not None:
                d["path"] = str(t.path)
            if t.path_template is not None:
                d["path_template"] = t.path_template
            if t.url is not None:
                d.update(url=redact_url(t.url), required=t.required, timeout=t.timeout)
            for key in ("read_bandwidth", "write_bandwidth"):
                rate = getattr(t, key)
                if rate is not None:
                    d[key] = rate
                    d[key + "_human"] = format_rate(rate)
            tiers[t.name] = d
        e = self.engine
        return {
            "source": self.source,
            "tiers": tiers,
            "engine": {
                "backend": e.backend,
                "workers": e.workers,
                "queue_depth": e.queue_depth,
                "chunk": e.chunk,
                "chunk_human": format_size(e.chunk),
                "direct": e.direct,
            },
            "policy": {"placement": self.policy.placement, "eviction": self.policy.eviction,
                       "migration": self.policy.migration,
                       "fallback": self.policy.fallback,
                       "migration_bandwidth": self.policy.migration_bandwidth,
                       "migration_bandwidth_human": format_rate(self.policy.migration_bandwidth),
                       "migration_batch": self.policy.migration_batch},
            "offload": {"lookahead": self.offload.lookahead if self.offload.lookahead is not None else "auto",
                        "resident": self.offload.resident, "layout": self.offload.layout,
                        "device_cache": "auto" if self.offload.device_cache is None else self.offload.device_cache,
                        "experts": "auto" if self.offload.experts is None else self.offload.experts,
                        "activations": self.offload.activations},
            "owners": {o: {s.tier: s.nbytes for s in self.owners if s.owner == o}
                       for o in dict.fromkeys(s.owner for s in self.owners)},
        }
