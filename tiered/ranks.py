"""Which rank this process is: one config for every rank of a distributed job.

A storage tier path may contain ``{rank}`` and ``{local_rank}`` (``/nvme/tiered/rank{rank}``):
each rank opens its own store shard from the same config file. The figures come from
``torch.distributed`` when a process group is initialised, else from the ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` variables ``torchrun`` sets, else rank 0 of a world of 1.
The store records them in its manifest; a store whose path is such a template (a per-rank shard)
refuses to open where another rank or another world size wrote it (:func:`check_layout`), unless
it holds no objects (then the new layout takes it over) or a checkpoint reader opens it as staging
(a load at another world size). A store at a fixed path is not checked: a process may read what a
job of another layout wrote there; its layout is recorded where the variables can be read.

``torch`` is not imported here: a process that has not imported it cannot have initialised a
process group, and importing the config must stay cheap (and must not initialise CUDA).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

PLACEHOLDERS = ("rank", "local_rank")
_FIELD_RE = re.compile(r"\{([^{}]*)\}")


class RankError(ValueError):
    """A rank figure that cannot be used (a bad environment variable, a shard of another rank)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: global rank, rank on its node, number of ranks."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    def describe(self) -> str:
        return f"rank {self.rank} (local rank {self.local_rank}) of world size {self.world_size}"


def current() -> Ranks:
    """This process's ranks: torch.distributed if initialised, else RANK/LOCAL_RANK/WORLD_SIZE, else 0/0/1."""
    dist = _initialised_dist()
    if dist is not None:
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", None)
        if local is None:
            local = dist.get_node_local_rank(fallback_rank=rank)
        return Ranks(rank, local, world)
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", None)
    if world is None:
        if rank:
            raise RankError(f"RANK={rank} is set but WORLD_SIZE is not: set both (torchrun does)")
        world = 1
    if world < 1 or not 0 <= rank < world:
        raise RankError(f"RANK={rank} and WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return Ranks(rank, _env_int("LOCAL_RANK", rank), world)


def _initialised_dist():
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def _env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise RankError(f"environment variable {name}={raw!r}: expected a non-negative integer") from None
    if value < 0:
        raise RankError(f"environment variable {name}={raw!r}: expected a non-negative integer")
    return value


def is_template(path: object) -> bool:
    """Whether a configured path names a rank (then the store is one rank's shard)."""
    return isinstance(path, str) and any(f in PLACEHOLDERS for f in _FIELD_RE.findall(path))


def expand(template: str, ranks: Ranks | None = None) -> str:
    """``template`` with ``{rank}`` and ``{local_rank}`` replaced; any other ``{...}`` is a RankError
    (a misspelt placeholder must not become a literal directory name)."""
    fields = _FIELD_RE.findall(template)
    unknown = [f for f in fields if f not in PLACEHOLDERS]
    if unknown:
        raise RankError(f"unknown placeholder {{{unknown[0]}}} in {template!r}: "
                        f"expected {{rank}} or {{local_rank}}")
    if not fields:
        return template
    r = current() if ranks is None else ranks
    return _FIELD_RE.sub(lambda m: str(getattr(r, m.group(1))), template)


def layout_record(ranks: Ranks | None = None) -> dict:
    """What a store's manifest records of the process that writes it."""
    r = current() if ranks is None else ranks
    return {"rank": r.rank, "local_rank": r.local_rank, "world_size": r.world_size}


def check_layout(path: object, recorded: object, ranks: Ranks | None = None) -> None:
    """Refuse a per-rank store shard (manifest ``path``) that ``recorded`` says another rank or another
    world size wrote. Nothing recorded (a store from before ranks were recorded): accepted."""
    if recorded is None:
        return
    if not isinstance(recorded, dict) or not all(isinstance(recorded.get(k), int) for k in ("rank", "world_size")):
        raise RankError(f"{path}: malformed rank record {recorded!r}: expected integers 'rank' and 'world_size'")
    r = current() if ranks is None else ranks
    if (recorded["rank"], recorded["world_size"]) != (r.rank, r.world_size):
        raise RankError(
            f"{path}: this store shard was written by rank {recorded['rank']} of world size "
            f"{recorded['world_size']}, and this process is rank {r.rank} of world size {r.world_size}: "
            "a shard belongs to one rank of one job layout (give this layout its own directories, or remove "
            "the old shards; to inspect another rank's shard, set RANK and WORLD_SIZE to its figures)")
