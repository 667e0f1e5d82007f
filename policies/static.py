"""Static hot/cold split, FlexGen-style: fixed percentages of each tier per data kind, never migrated.

FlexGen places fixed fractions of weights, KV cache and activations on GPU,
CPU and disk, chosen once. Here ``shares[kind][i]`` is the fraction of cache
tier ``i``'s capacity that objects of that kind may take; a new object goes
to the fastest tier whose share for its kind still has room, else to the
backing tier, and stays there. The default (every kind may use every tier
fully) is first-come placement: what a runtime without a cache policy does.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from .base import MigrationPolicy, Move, Observation, PlacementPolicy, TierModel


class StaticSplit(MigrationPolicy, PlacementPolicy):
    name = "static"

    def __init__(self, shares: Mapping[str, Sequence[float]] | None = None) -> None:
        for kind, fr in (shares or {}).items():
            if any(not 0.0 <= f <= 1.0 for f in fr):
                raise ValueError(f"static split: shares for kind {kind!r} must be fractions in [0, 1], got {list(fr)}")
        self.shares = {k: tuple(v) for k, v in (shares or {}).items()}
        self.used: dict[tuple[str, int], int] = {}

    def reset(self, tiers: Sequence[TierModel]) -> None:
        super().reset(tiers)
        self.used = {}

    def place(self, obs: Observation, tiers: Iterable[tuple[str, int, int]]) -> str | None:
        tiers = list(tiers)
        share = self.shares.get(obs.kind)
        for i, (name, capacity, free) in enumerate(tiers[:-1]):
            frac = share[i] if share is not None and i < len(share) else (1.0 if share is None else 0.0)
            used = self.used.get((obs.kind, i), 0)
            if free >= obs.nbytes and used + obs.nbytes <= frac * capacity:
                self.used[(obs.kind, i)] = used + obs.nbytes
                return name
        return tiers[-1][0] if tiers else None

    def decide(self, batch: Sequence[Observation]) -> list[Move]:
        return []
