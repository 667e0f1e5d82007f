"""Validation of the offload config: a parsed TOML mapping to a :class:`~tiered.config.Config`.

Strict on purpose: every problem is a :class:`ConfigError` naming the file, the dotted key, the
bad value and what was expected (see :mod:`tiered.config`).
"""

from __future__ import annotations

import difflib
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tiered.policies import eviction_policy_names, policy_names

from . import ranks
from .config_schema import (_ALIGN, _ALL_TIER_KEYS, _DEVICE_RE, _ENGINE_KEYS, _OFFLOAD_KEYS, _OWNER_RE,
                            _POLICY_KEYS, _SHARED_SCHEMES, _TIER_KEYS, _TIER_NAME_RE, _TOP_KEYS, NOT_LIVE,
                            PLACEMENTS, TIER_KINDS, Config, ConfigError, EngineSpec, GiB, OffloadSpec,
                            OwnerShare, PolicySpec, TierSpec, backend_choices, redact_url)
from .config_schema import OFFLOAD_ACTIVATIONS
from .sizes import SizeError, format_size, parse_rate, parse_share, parse_size



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
        if "activations" in table:
            fields["activations"] = self.choice(table["activations"], "offload.activations", OFFLOAD_ACTIVATIONS)
        return OffloadSpec(**fields)
