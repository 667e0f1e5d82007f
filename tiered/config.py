"""The offload config: a TOML file naming the tiers, the I/O engine and the policy.

Validation is strict on purpose. A misspelled key silently ignored would
leave a tier without its budget or throttle and only show up as a slow or
crashed training run hours later, so every problem is a :class:`ConfigError`
naming the file, the dotted key, the bad value and what was expected.

With no file at all, :func:`default_config` sizes the tiers from the machine
so the tool works out of the box.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from tiered.policies import eviction_policy_names, policy_names

from . import ranks
from .sizes import SizeError, format_rate, format_size, parse_rate, parse_share, parse_size

__all__ = [
    "BACKENDS",
    "KNOWN_EVICTION_POLICIES",
    "TIER_KINDS",
    "Config",
    "ConfigError",
    "EngineSpec",
    "OffloadSpec",
    "PolicySpec",
    "TierSpec",
    "OwnerShare",
    "check_config",
    "machine_warnings",
    "default_config",
    "load_config",
]

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
_OFFLOAD_KEYS = ("lookahead", "resident", "layout", "device_cache", "experts")


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
                        "experts": "auto" if self.offload.experts is None else self.offload.experts},
            "owners": {o: {s.tier: s.nbytes for s in self.owners if s.owner == o}
                       for o in dict.fromkeys(s.owner for s in self.owners)},
        }


# --------------------------------------------------------------------------- loading


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | Config | None = None,
    *,
    eviction_policies: Iterable[str] | None = None,
) -> Config:
    """A validated :class:`Config` from a TOML file, a mapping, a Config, or None (the default).

    ``eviction_policies`` overrides the names accepted by ``policy.eviction`` (default: the
    policies registry's eviction policies). Storage directories are created (0700) as a side
    effect, so a config that loads is one whose paths are usable.
    """
    if source is None:
        return default_config()
    if isinstance(source, Config):
        return source
    if eviction_policies is None:
        eviction_policies = dict.fromkeys((*KNOWN_EVICTION_POLICIES, *eviction_policy_names()))
    policies = tuple(eviction_policies)
    if isinstance(source, Mapping):
        return _Validator("<dict>", Path.cwd(), policies).config(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"load_config() takes a path, a mapping, a Config or None, not {type(source).__name__}"
        )
    label = os.fspath(source)
    path = Path(label).expanduser()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {label} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {label} is a directory, expected a TOML file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {label}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{label} is not valid TOML: not UTF-8 text ({e.reason})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{label} is not valid TOML: {e}") from None
    base = path.resolve().parent
    return _Validator(label, base, policies, source=str(path.resolve())).config(data)


def check_config(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    eviction_policies: Iterable[str] | None = None,
) -> Config:
    """What ``tiered config check FILE`` runs: load and validate, raising ConfigError."""
    if source is None:
        raise ConfigError("check_config() needs a config file or mapping to check")
    return load_config(source, eviction_policies=eviction_policies)


def machine_warnings(cfg: Config) -> list[str]:
    """Budgets this machine cannot hold: a host tier larger than its RAM, a storage tier larger
    than the space its directory's file system has left (what the store's data file already
    takes counted as available). ``tiered config check`` and ``tiered probe`` print them; the
    store refuses to open on the first kind (:func:`machine_limits`)."""
    return [msg for _key, msg in machine_limits(cfg)]


def machine_limits(cfg: Config) -> list[tuple[str, str]]:
    """(dotted key, message) for each budget larger than this machine's figure."""
    import psutil

    out = []
    host = cfg.host_tier
    ram = psutil.virtual_memory().total
    if host is not None and host.capacity > ram:
        out.append((f"tiers.{host.name}.capacity", f"tiers.{host.name}.capacity = {format_size(host.capacity)} in "
                    f"{cfg.source} is more than this machine's RAM ({format_size(ram)})"))
    for t in cfg.storage_tiers:
        room = _disk_room(t.path)
        if t.capacity > room:
            out.append((f"tiers.{t.name}.capacity", f"tiers.{t.name}.capacity = {format_size(t.capacity)} in "
                        f"{cfg.source} is more than the {format_size(room)} free at {t.path}"))
    return out


def _disk_room(path: Path) -> int:
    """Free bytes at ``path`` plus those a store's data file there already holds."""
    free = shutil.disk_usage(_nearest_existing(path)).free
    data = path / "objects.dat"
    try:
        free += data.stat().st_blocks * 512
    except OSError:
        pass
    return free


# --------------------------------------------------------------------------- default


def default_tier_home() -> Path:
    """Where the default storage tier lives.

    $TIERED_HOME, else $XDG_CACHE_HOME/tiered, else ~/.cache/tiered.
    """
    home = os.environ.get("TIERED_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says relative values are invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "tiered"
    return Path("~/.cache/tiered").expanduser()


def default_config() -> Config:
    """A config sized from this machine, so the tool works with no file.

    Host tier: half the available RAM. One storage tier "nvme" at
    :func:`default_tier_home`: half the free disk there. A "gpu" tier with 80%
    of free device memory only when CUDA is available. Budgets are rounded
    down to 1 MiB. The result goes through the same validation as a file.
    """
    import psutil

    home = default_tier_home().resolve()
    # Validation below creates the directory; until then measure the file
    # system of its nearest existing ancestor, which is where it will live.
    disk_free = shutil.disk_usage(_nearest_existing(home)).free
    tiers: dict[str, Any] = {}
    gpu = _default_gpu_tier()
    if gpu is not None:
        tiers["gpu"] = gpu
    tiers["host"] = {"capacity": _round_mib(psutil.virtual_memory().available // 2)}
    tiers["nvme"] = {"path": str(home), "capacity": _round_mib(disk_free // 2)}
    if tiers["nvme"]["capacity"] == 0:
        raise ConfigError(
            f"tiers.nvme.capacity in <default>: no free disk space at {home}; "
            "set TIERED_HOME to a directory with room or pass a config file"
        )
    return _Validator("<default>", Path.cwd(), tuple(KNOWN_EVICTION_POLICIES)).config({"tiers": tiers})


def _default_gpu_tier() -> dict[str, Any] | None:
    try:
        import torch  # lazy: importing the config must not initialise CUDA
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    free, _total = torch.cuda.mem_get_info(index)
    capacity = _round_mib(free * 8 // 10)
    if capacity == 0:
        return None
    return {"kind": "device", "device": f"cuda:{index}", "capacity": capacity}


def _round_mib(n: int) -> int:
    return n // MiB * MiB


def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(path.anchor or "/")


def _ensure_dir(path: Path, file: str, key: str, value: object) -> None:
    """Create ``path`` (and missing parents) with mode 0700 and prove it is writable.

    Writability is tested by creating a file, not with ``os.access``: that is
    the only answer that holds for root, ACLs, read-only mounts and quotas.
    """
    missing = []
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            break
        missing.append(p)
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            pass  # raced with someone else creating it; checked below
        except OSError as e:
            raise ConfigError(
                f"{key} = {value!r} in {file}: cannot create directory {p}: {e.strerror or e}"
            ) from None
        else:
            os.chmod(p, 0o700)  # the umask may have taken bits off
    if not path.is_dir():
        raise ConfigError(f"{key} = {value!r} in {file}: {path} exists but is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".tiered-probe-")
    except OSError as e:
        raise ConfigError(
            f"{key} = {value!r} in {file}: directory {path} is not writable: {e.strerror or e}"
        ) from None
    os.close(fd)
    os.unlink(probe)


# --------------------------------------------------------------------------- validation


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _one_of(choices: Iterable[str]) -> str:
    return "one of " + ", ".join(repr(c) for c in choices)


class _Validator:
    """Turns a parsed mapping into a Config; ``file`` is only used in messages."""

    def __init__(self, file: str, base: Path, policies: tuple[str, ...], source: str | None = None):
        self.file = file
        self.base = base
        self.policies = policies
        self.source = source if source is not None else file

    # -- message helpers

    def bad(self, key: str, value: object, expected: str) -> ConfigError:
        return ConfigError(f"{key} = {value!r} in {self.file}: {expected}")

    def unknown_keys(self, table: Mapping[str, Any], prefix: str, allowed: Iterable[str]) -> None:
        allowed = tuple(allowed)
        for k in table:
            if k not in allowed:
                dotted = f"{prefix}{k}"
                hint = _did_you_mean(str(k), allowed) or f"; expected {_one_of(allowed)}"
                raise ConfigError(f"unknown key {dotted!r} in {self.file}{hint}")

    def table(self, value: object, key: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.bad(key, value, f"expected a table ([{key}])")
        return value

    def integer(self, value: object, key: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.bad(key, value, f"expected an integer from {lo} to {hi}")
        return value

    def size(self, value: object, key: str) -> int:
        try:
            return parse_size(value, where=key)
        except SizeError as e:
            raise self.bad(key, value, e.reason) from None

    def rate(self, value: object, key: str) -> int:
        try:
            return parse_rate(value, where=key)
        except SizeError as e:
            raise self.bad(key, value, e.reason) from None

    def choice(self, value: object, key: str, choices: tuple[str, ...]) -> str:
        if not isinstance(value, str):
            raise self.bad(key, value, f"expected a string, {_one_of(choices)}")
        if value not in choices:
            raise self.bad(key, value, f"expected {_one_of(choices)}{_did_you_mean(value, choices)}")
        return value

    # -- sections

    def config(self, data: Mapping[str, Any]) -> Config:
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{self.file}: expected a table at the top level, got {type(data).__name__}"
            )
        self.unknown_keys(data, "", _TOP_KEYS)
        if "tiers" not in data:
            raise ConfigError(
                f"missing required table 'tiers' in {self.file}: expected at least one storage tier, "
                'e.g. [tiers.nvme] with path = "/mnt/nvme/tiered" and capacity = "200GiB"'
            )
        every_tier = self.tiers(self.table(data["tiers"], "tiers"))
        tiers = tuple(t for t in every_tier if not t.external)
        shared = tuple(t for t in every_tier if t.external)
        engine = self.engine(self.table(data.get("engine", {}), "engine"))
        policy = self.policy(self.table(data.get("policy", {}), "policy"))
        if policy.migration not in ("none", "auto") and sum(t.kind == "storage" for t in tiers) < 2:
            raise self.bad("policy.migration", policy.migration, "a migration policy moves objects between "
                           "storage tiers: configure two or more, or set \"none\"")
        offload = self.offload(self.table(data.get("offload", {}), "offload"))
        owners = self.owners(self.table(data.get("owners", {}), "owners"), tiers)
        return Config(tiers=tiers, engine=engine, policy=policy, source=self.source, offload=offload, owners=owners,
                      shared_tiers=shared)

    def owners(self, table: Mapping[str, Any], tiers: tuple[TierSpec, ...]) -> tuple[OwnerShare, ...]:
        """``[owners.NAME]`` tables: per tier a size or a percentage of the tier's capacity;
        the shares of one tier must fit its capacity together."""
        by_name = {t.name: t for t in tiers}
        shares = []
        for owner, body in table.items():
            if not isinstance(owner, str) or not _OWNER_RE.match(owner):
                raise ConfigError(f"invalid owner name {owner!r} in {self.file}: expected a name matching "
                                  f"{_OWNER_RE.pattern}")
            body = self.table(body, f"owners.{owner}")
            self.unknown_keys(body, f"owners.{owner}.", tuple(by_name))
            for tier, value in body.items():
                key = f"owners.{owner}.{tier}"
                shares.append(OwnerShare(owner, tier, self.share_size(value, key, by_name[tier].capacity)))
        for t in tiers:
            total = sum(s.nbytes for s in shares if s.tier == t.name)
            if total > t.capacity:
                parts = ", ".join(f"{s.owner} {format_size(s.nbytes)}" for s in shares if s.tier == t.name)
                raise ConfigError(f"owners in {self.file}: the shares of tier {t.name!r} ({parts}) add up to "
                                  f"{format_size(total)}, more than its capacity {format_size(t.capacity)}")
        return tuple(shares)

    def share_size(self, value: object, key: str, capacity: int) -> int:
        try:
            return parse_share(value, capacity, where=key)
        except SizeError as e:
            raise self.bad(key, value, e.reason) from None

    def tiers(self, table: Mapping[str, Any]) -> tuple[TierSpec, ...]:
        specs = []
        for name, body in table.items():
            if not isinstance(name, str) or not _TIER_NAME_RE.match(name):
                raise ConfigError(
                    f"invalid tier name {name!r} in {self.file}: expected a name matching "
                    f"{_TIER_NAME_RE.pattern} (a letter, then letters, digits, '_' or '-')"
                )
            specs.append(self.tier(name, self.table(body, f"tiers.{name}")))
        by_kind = {k: [t for t in specs if t.kind == k] for k in TIER_KINDS}
        if len(by_kind["host"]) > 1:
            names = ", ".join(repr(t.name) for t in by_kind["host"])
            raise ConfigError(f"tiers in {self.file}: at most one host tier is allowed, found {names}")
        if len(by_kind["shared"]) > 1:
            names = ", ".join(repr(t.name) for t in by_kind["shared"])
            raise ConfigError(f"tiers in {self.file}: at most one shared tier is allowed, found {names}")
        if not by_kind["storage"]:
            raise ConfigError(
                f"tiers in {self.file}: expected at least one storage tier "
                "(a [tiers.NAME] table with a 'path' key)"
            )
        seen: dict[Path, str] = {}
        for t in by_kind["storage"]:
            assert t.path is not None
            if t.path in seen:
                raise self.bad(
                    f"tiers.{t.name}.path",
                    str(t.path),
                    f"same directory as tiers.{seen[t.path]}.path; each storage tier needs its own",
                )
            seen[t.path] = t.name
        return tuple(t for k in TIER_KINDS for t in by_kind[k])

    def infer_kind(self, name: str, body: Mapping[str, Any], prefix: str) -> str:
        if "kind" in body:
            return self.choice(body["kind"], prefix + "kind", TIER_KINDS)
        if name == "gpu" or "device" in body:
            return "device"
        if name == "host":
            return "host"
        if "path" in body:
            return "storage"
        if "url" in body:
            return "shared"
        # A misspelled 'path' is the likeliest reason; say so before giving up.
        self.unknown_keys(body, prefix, _ALL_TIER_KEYS)
        raise ConfigError(
            f"cannot infer the kind of tier {prefix[:-1]!r} in {self.file}: add kind = "
            f"{_one_of(TIER_KINDS)} (or name it 'gpu'/'host', or give a storage tier a 'path', a shared tier a 'url')"
        )

    def tier(self, name: str, body: Mapping[str, Any]) -> TierSpec:
        prefix = f"tiers.{name}."
        kind = self.infer_kind(name, body, prefix)
        allowed = _TIER_KEYS[kind]
        for k in body:
            if k not in allowed and k in _ALL_TIER_KEYS:
                raise self.bad(
                    prefix + k, body[k], f"not allowed in a {kind} tier; allowed keys: {', '.join(allowed)}"
                )
        self.unknown_keys(body, prefix, allowed)
        if "capacity" not in body:
            raise ConfigError(
                f"missing required key {prefix}capacity in {self.file}: expected a size such as '8GiB'"
            )
        capacity = self.size(body["capacity"], prefix + "capacity")
        if capacity <= 0:
            raise self.bad(prefix + "capacity", body["capacity"], "expected a size greater than zero")
        if kind == "device":
            device = body.get("device", "cuda:0")
            if not isinstance(device, str) or not _DEVICE_RE.match(device):
                raise self.bad(prefix + "device", device, "expected a device string such as 'cuda:0'")
            return TierSpec(name, kind, capacity, device=device)
        if kind == "host":
            return TierSpec(name, kind, capacity)
        if kind == "shared":
            return self.shared_tier(name, body, capacity)
        if "path" not in body:
            raise ConfigError(
                f"missing required key {prefix}path in {self.file}: "
                "expected the directory this storage tier keeps its files in"
            )
        path = self.storage_path(body["path"], prefix + "path")
        rates = {
            k: self.rate(body[k], prefix + k) if k in body else None
            for k in ("read_bandwidth", "write_bandwidth")
        }
        template = body["path"] if ranks.is_template(body["path"]) else None
        return TierSpec(name, kind, capacity, path=path, path_template=template, **rates)

    def shared_tier(self, name: str, body: Mapping[str, Any], capacity: int) -> TierSpec:
        """``url`` (redis://HOST:PORT/DB, rediss://..., unix:///path.sock), ``required``, ``timeout``."""
        prefix = f"tiers.{name}."
        if "url" not in body:
            raise ConfigError(f"missing required key {prefix}url in {self.file}: expected the key-value "
                              "server's address, e.g. 'redis://127.0.0.1:6379/0'")
        url = self.shared_url(body["url"], prefix + "url")
        required = body.get("required", True)
        if not isinstance(required, bool):
            raise self.bad(prefix + "required", required, "expected true or false")
        timeout = body.get("timeout", 2.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 600:
            raise self.bad(prefix + "timeout", timeout, "expected seconds, a number in (0, 600]")
        return TierSpec(name, "shared", capacity, url=url, required=required, timeout=float(timeout))

    def shared_url(self, value: object, key: str) -> str:
        from urllib.parse import urlsplit

        want = "expected a URL such as 'redis://127.0.0.1:6379/0' (schemes: " + ", ".join(_SHARED_SCHEMES) + ")"
        shown = redact_url(value)
        if not isinstance(value, str):
            raise self.bad(key, shown, want)
        try:
            u = urlsplit(value)
            port = u.port  # a non-numeric port raises here
        except ValueError as e:
            raise self.bad(key, shown, f"{want}: {e}") from None
        if u.scheme not in _SHARED_SCHEMES:
            raise self.bad(key, shown, want)
        if u.scheme == "unix":
            if not u.path:
                raise self.bad(key, shown, "expected a socket path, e.g. 'unix:///run/redis.sock'")
            return value
        db = u.path.strip("/")
        if not u.hostname or (port is not None and not 0 < port < 65536) or (db and not db.isdigit()):
            raise self.bad(key, shown, want + ", with a host and an optional numeric port and database")
        return value

    def storage_path(self, value: object, key: str) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise self.bad(key, value, "expected a directory path string")
        try:
            value = ranks.expand(value)
        except ranks.RankError as e:
            raise self.bad(key, value, str(e)) from None
        p = Path(value).expanduser()
        if not p.is_absolute():
            p = self.base / p
        p = p.resolve()
        _ensure_dir(p, self.file, key, value)
        return p

    def engine(self, table: Mapping[str, Any]) -> EngineSpec:
        self.unknown_keys(table, "engine.", _ENGINE_KEYS)
        fields: dict[str, Any] = {}
        if "backend" in table:
            fields["backend"] = self.choice(table["backend"], "engine.backend", backend_choices())
        if "workers" in table:
            fields["workers"] = self.integer(table["workers"], "engine.workers", 1, 256)
        if "queue_depth" in table:
            fields["queue_depth"] = self.integer(table["queue_depth"], "engine.queue_depth", 1, 65536)
        if "chunk" in table:
            chunk = self.size(table["chunk"], "engine.chunk")
            if chunk <= 0 or chunk % _ALIGN or chunk > GiB:
                raise self.bad(
                    "engine.chunk",
                    table["chunk"],
                    "expected a positive multiple of 4096 bytes, at most 1GiB (e.g. '8MiB')",
                )
            fields["chunk"] = chunk
        if "direct" in table:
            if not isinstance(table["direct"], bool):
                raise self.bad("engine.direct", table["direct"], "expected true or false")
            fields["direct"] = table["direct"]
        return EngineSpec(**fields)

    def policy(self, table: Mapping[str, Any]) -> PolicySpec:
        self.unknown_keys(table, "policy.", _POLICY_KEYS)
        fields: dict[str, Any] = {}
        if "placement" in table:
            fields["placement"] = self.placement(table["placement"])
        if "eviction" in table:
            fields["eviction"] = self.choice(table["eviction"], "policy.eviction", self.policies)
        if "migration" in table:
            fields["migration"] = self.migration_policy(table["migration"])
        if "fallback" in table:
            fields["fallback"] = self.choice(table["fallback"], "policy.fallback", tuple(eviction_policy_names()))
        if "migration_bandwidth" in table:
            fields["migration_bandwidth"] = self.rate(table["migration_bandwidth"], "policy.migration_bandwidth")
        if "migration_batch" in table:
            fields["migration_batch"] = self.integer(table["migration_batch"], "policy.migration_batch", 1, 1 << 16)
        return PolicySpec(**fields)

    def placement(self, value: object) -> str:
        if value in self.policies and value not in PLACEMENTS:
            raise self.bad("policy.placement", value, f"{value!r} ranks the host tier's cached copies: set it as "
                           f'[policy] eviction = "{value}"; placement takes ' + " or ".join(map(repr, PLACEMENTS)))
        return self.choice(value, "policy.placement", PLACEMENTS)

    def migration_policy(self, value: object) -> str:
        name = self.choice(value, "policy.migration", ("none", "auto", *policy_names()))
        if name in NOT_LIVE:
            raise self.bad("policy.migration", value, f"a live store cannot run {name!r}: {NOT_LIVE[name]}; "
                           "it runs in `tiered bench replay`")
        return name

    def offload(self, table: Mapping[str, Any]) -> OffloadSpec:
        self.unknown_keys(table, "offload.", _OFFLOAD_KEYS)
        fields: dict[str, Any] = {}
        if "lookahead" in table and table["lookahead"] != "auto":
            fields["lookahead"] = self.integer(table["lookahead"], "offload.lookahead", 0, 64)
        if "resident" in table:
            if not isinstance(table["resident"], bool):
                raise self.bad("offload.resident", table["resident"], "expected true or false")
            fields["resident"] = table["resident"]
        if "layout" in table:
            fields["layout"] = self.choice(table["layout"], "offload.layout", ("packed", "bundled"))
        if "device_cache" in table and table["device_cache"] != "auto":
            if not isinstance(table["device_cache"], bool):
                raise self.bad("offload.device_cache", table["device_cache"], 'expected true, false or "auto"')
            fields["device_cache"] = table["device_cache"]
        if "experts" in table and table["experts"] != "auto":
            if not isinstance(table["experts"], bool):
                raise self.bad("offload.experts", table["experts"], 'expected true, false or "auto"')
            fields["experts"] = table["experts"]
        return OffloadSpec(**fields)
