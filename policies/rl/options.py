"""The agents' hyperparameters (:class:`AgentOptions`) and their validation."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class AgentOptions:
    """Hyperparameters: one set for every trace (nothing here is per-trace)."""

    batch: int = 32  # accesses per decide() call
    candidates: int = 128  # fast-tier residents sampled per ranking (see victim_share)
    migration_penalty: float = 1.0  # weight of migration transfer time in the reward
    train_every: int = 32  # accesses between gradient steps (per agent)
    warmup_steps: int = 50  # gradient steps before an agent's values are trusted
    pending: int = 262144  # sampled states awaiting their labels
    writeback_cost: bool = False  # charge a dirty victim its write-back (sunk: due whenever it leaves)
    experts: bool = True  # mix the learned eviction with LRU/LFU/LRU-2 by regret (LeCaR-style)
    regret_rate: float = 0.45  # LeCaR's learning rate
    blend: bool = False  # rank victims by the weighted blend of the experts' rankings (False: sample one)
    admission_experts: bool = True  # bypass by regret-weighted admission experts (False: by the eviction expert)
    write_reserve: bool = True  # keep room for new objects' writes (write-back caching)
    rank_logit: bool = False  # victims by mean logit (resolves far-away objects) instead of value
    idle_samples: int = 4  # idle residents' states sampled per ranking (besides the victims)
    victim_share: int = 4  # a ranking of ``candidates`` residents yields its first 1/victim_share as victims
    adapt_batch: bool = True  # shrink the batch to one burst of fills (False: cap the fills per batch)
    max_refreshes: int = 8  # rankings per decision at most (a big candidate may need many victims)
    queue_age: float = 0.02  # fast-tier capacities of traffic after which the victim queue is re-ranked
    hidden: int = 64
    lr: float = 2e-3
    train_batch: int = 64
    replay: int = 65536
    learn: bool = True  # False: frozen (pre-trained) agents, no training
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict, source: str = "options") -> "AgentOptions":
        known = {f.name: f for f in fields(cls)}
        bad = sorted(set(d) - set(known))
        if bad:
            raise ValueError(f"{source}: unknown RL option(s) {bad}; known: {sorted(known)}")
        out = {}
        for k, v in d.items():
            typ = type(getattr(cls(), k))
            if typ is bool:
                if not isinstance(v, bool):
                    raise ValueError(f"{source}: option {k!r} must be true/false, got {v!r}")
            elif typ is int:
                if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k in ("seed", "idle_samples") else 1):
                    raise ValueError(f"{source}: option {k!r} must be a positive integer, got {v!r}")
            elif typ is float:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
                    raise ValueError(f"{source}: option {k!r} must be a finite number >= 0, got {v!r}")
                v = float(v)
            out[k] = v
        return cls(**out)
