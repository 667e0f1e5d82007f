"""The offload config: a TOML file naming the tiers, the I/O engine and the policy.

Validation is strict on purpose. A misspelled key silently ignored would
leave a tier without its budget or throttle and only show up as a slow or
crashed training run hours later, so every problem is a :class:`ConfigError`
naming the file, the dotted key, the bad value and what was expected.

With no file at all, :func:`default_config` sizes the tiers from the machine
so the tool works out of the box.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tomllib

from tiered.policies import eviction_policy_names

from .config_schema import (BACKENDS, KNOWN_EVICTION_POLICIES, NOT_LIVE, PLACEMENTS, TIER_KINDS, Config,
                            ConfigError, EngineSpec, GiB, MiB, OffloadSpec, OwnerShare, PolicySpec, TierSpec,
                            backend_choices, redact_url)
from .config_validate import _Validator
from .sizes import format_size

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
    "NOT_LIVE",
    "PLACEMENTS",
    "GiB",
    "MiB",
    "backend_choices",
    "redact_url",
]


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
