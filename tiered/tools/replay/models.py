"""The tiers a replay runs against: cost models from the config, ``tiered probe`` or typical figures,
and whether arrivals follow the trace's clock."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

from policies import TierModel

from ...config import Config
from ..args import UsageError

_SPEED = {  # latency s, read B/s, write B/s: typical figures when the config says nothing
    "device": (2e-6, 2e11, 2e11),
    "host": (1e-6, 1e10, 1e10),
    "storage": (80e-6, 3e9, 2e9),
}


def measured_bandwidths(probe_json: str | os.PathLike) -> dict[str, tuple[float | None, float | None]]:
    """Storage tier name -> (read, write) bytes/s from a ``tiered probe --json`` output file."""
    data = json.loads(Path(probe_json).read_text())
    out = {}
    for t in data.get("storage", []):
        r, w = t.get("read_gbps"), t.get("write_gbps")
        out[t["name"]] = (r * 1e9 if r else None, w * 1e9 if w else None)
    return out


def tier_models(cfg: Config | None, footprint: int, fast_fraction: float = 0.08,
                use_config_capacity: bool = False,
                measured: dict[str, tuple[float | None, float | None]] | None = None) -> tuple[TierModel, ...]:
    """Tier models fastest first, the last storage tier as the backing tier.

    Cache tiers get ``fast_fraction`` of ``footprint`` (each slower cache tier
    four times the one above), unless ``use_config_capacity``. Bandwidths:
    ``measured`` (from ``tiered probe``) over the config's throttles over typical figures.
    """
    if not 0 < fast_fraction <= 1:
        raise UsageError(f"fast fraction must be in (0, 1], got {fast_fraction}")
    if cfg is None:
        specs = [("host", "host", None, None, None), ("nvme", "storage", None, None, None)]
    else:
        specs = [(t.name, t.kind, t.capacity, t.read_bandwidth, t.write_bandwidth) for t in cfg.tiers]
    out = []
    cap = max(1, int(footprint * fast_fraction))
    for i, (name, kind, capacity, rbw, wbw) in enumerate(specs):
        lat, r, w = _SPEED[kind]
        mr, mw = (measured or {}).get(name, (None, None))
        rbw, wbw = mr or rbw, mw or wbw
        last = i == len(specs) - 1
        c = math.inf if last else (capacity if use_config_capacity and capacity else cap)
        out.append(TierModel(name, c, lat, float(rbw or r), float(wbw or w)))
        if not last and not use_config_capacity:
            cap *= 4
    if len(out) < 2:
        raise UsageError("replay needs at least two tiers (a cache tier and a backing tier)")
    return tuple(out)


def choose_loop(trace, tiers: Sequence[TierModel]) -> tuple[bool, str]:
    """Closed loop for untimed traces and for traces whose offered load exceeds the backing tier.

    Replaying open-loop a trace recorded on a bigger system (Mooncake's is a
    production cluster's: ~5 GB/s of KV blocks) against one node's backing
    tier only measures a queue that grows without bound.
    """
    if not trace.timed:
        return True, "closed loop (the trace has no timestamps)"
    span = float(trace.time[-1] - trace.time[0]) if len(trace) > 1 else 0.0
    offered = float(trace.size.sum()) / span if span > 0 else math.inf
    if offered > tiers[-1].read_bw:
        return True, (f"closed loop (offered load {offered / 1e9:.2f} GB/s exceeds the {tiers[-1].name} "
                      f"tier's {tiers[-1].read_bw / 1e9:.2f} GB/s)")
    return False, f"open loop at trace times (offered load {offered / 1e9:.3f} GB/s)"
