"""Replay a trace once per policy, simulated or with real I/O; one table row per policy."""

from __future__ import annotations

import sys
import time
from typing import Sequence

from tiered.policies import HEURISTICS, PolicyError, TierModel, create_policy, policy_names
from tiered.policies.sim import SimResult, prepare, simulate

from ...config import Config
from ..args import UsageError
from .models import choose_loop
from .real import check_live, run_real

DEFAULT_POLICIES = (*HEURISTICS, "belady")


def rows_for(result: SimResult, *, learns: bool, window: float) -> list[dict]:
    """The table rows of one replay (a second row over the final window for learning policies)."""
    s = result.summary()
    row = {**s, "bytes_migrated": result.bytes_migrated, "migrations": result.migrations,
           "total_time_s": result.total_time_s, "wall_s": result.wall_s}
    rows = [row]
    if window > 0 and result.latency_s.size:
        start = int(result.latency_s.size * (1 - window))
        fw = result.summary(start)
        row["final_window"] = {k: fw[k] for k in ("accesses", "hit_ratio", "mean_latency_us", "p99_latency_us")}
    if learns and window > 0 and result.latency_s.size:
        w = result.summary(start)
        w["policy"] = f"{result.policy} (final {window:.0%})"
        w["window_start"] = start
        w.update(bytes_migrated=None, migrations=None, total_time_s=None, wall_s=None)
        rows.append(w)
    return rows


class _Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal, or forced)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label, self.enabled, self.t0 = label, enabled, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        frac = done / total if total else 1.0
        bar = "#" * int(30 * frac)
        rate = done / max(1e-9, time.perf_counter() - self.t0)
        end = "\n" if done >= total else ""
        print(f"\r{self.label:<12} [{bar:<30}] {frac:6.1%} {rate / 1e3:8.1f}k acc/s", end=end, file=sys.stderr, flush=True)


def _create(name: str, options: dict):
    try:
        return create_policy(name, **options)
    except KeyError as e:  # a policy that cannot be built here (rl without its package)
        raise PolicyError(e.args[0] if e.args else str(e)) from e


def run_replay(trace, policies: Sequence[str], tiers: Sequence[TierModel], *, mode: str = "sim",
               cfg: Config | None = None, closed_loop: bool | None = None, window: float = 0.2,
               progress: bool = False, policy_options: dict[str, dict] | None = None) -> list[dict]:
    """Replay ``trace`` (a :class:`traces.Trace`) once per policy name; the table's rows.

    ``real`` mode runs each policy in a live store's governor, which builds it by name: it takes
    no ``policy_options``, and policies a live store cannot run are refused before any replay.
    The trace's declared plans reach the policies in both modes."""
    if mode not in ("sim", "real"):
        raise ValueError(f"unknown mode {mode!r}; expected sim or real")
    prep = prepare(trace.time, trace.key, trace.size, trace.op, trace.kind, trace.plans)
    closed = choose_loop(trace, tiers)[0] if closed_loop is None else closed_loop
    unknown = [n for n in policies if n not in policy_names()]
    if unknown:
        raise PolicyError(f"unknown policy {unknown[0]!r}; known: {', '.join(policy_names())}")
    if mode == "real":
        _check_real(policies, policy_options or {})
    rows: list[dict] = []
    for name in policies:
        bar = _Progress(name, progress)
        if mode == "real":
            rows += rows_for(run_real(prep, tiers, name, cfg, progress=bar), learns=False, window=window)
            continue
        pol = _create(name, (policy_options or {}).get(name, {}))
        try:
            res = simulate(prep, tiers, pol, closed_loop=closed, progress=bar)
        finally:
            pol.close()
        rows += rows_for(res, learns=pol.learns, window=window)
    return rows


def _check_real(policies: Sequence[str], policy_options: dict[str, dict]) -> None:
    for name in policies:
        check_live(name)
        if policy_options.get(name):
            raise UsageError(f"policy {name!r}: options run in --mode sim only (the store's governor builds "
                             "its policy by name)")
        pol = _create(name, {})
        try:
            check_live(name, pol)
        finally:
            pol.close()
