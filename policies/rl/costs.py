"""Costs in seconds, from the tier models and the devices' measured load: what a fast-tier hit
saves, what a fill or a write-back costs, what absorbing a write gains; and the load estimates
and fill-burst batch size updated after each decision."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..base import TierModel

#: speeds assumed for a tier model that has none (latency 0, unbounded bandwidth: what a live
#: governor passes): host RAM for the cache tiers, NVMe for the backing tier (datasheet figures,
#: as policies.sim.default_tiers)
TYPICAL_CACHE = (1e-6, 10e9, 10e9)
TYPICAL_BACKING = (80e-6, 3e9, 2e9)


def _with_speeds(tiers: Sequence[TierModel]) -> tuple[TierModel, ...]:
    """``tiers`` with typical speeds for those whose model gives none (values would all be 0)."""
    out = []
    for i, t in enumerate(tiers):
        if t.latency_s == 0 and math.isinf(t.read_bw) and math.isinf(t.write_bw):
            lat, r, w = TYPICAL_BACKING if i == len(tiers) - 1 else TYPICAL_CACHE
            t = TierModel(t.name, t.capacity, lat, r, w)
        out.append(t)
    return tuple(out)


class DeviceCosts:
    """Mixin of :class:`~.agents.HarmoniaAgents`: costs from ``tiers``, ``busy_ewma``,
    ``elapsed_ewma``, ``mean_size`` and ``new_write_bytes`` (set by ``reset``)."""

    def _read_cost(self, t: int, nbytes: np.ndarray | float) -> np.ndarray | float:
        m = self.tiers[t]
        return m.latency_s + nbytes / m.read_bw

    def _benefit(self, nbytes):
        """Latency a fast-tier hit saves over a backing-tier read."""
        return np.maximum(self._read_cost(self.back, nbytes) - self._read_cost(0, nbytes), 0.0)

    def _promote_cost(self, nbytes):
        """A fill's transfer time, weighted by how busy the fast device is (the delay it
        imposes on the accesses queued behind it)."""
        m = self.tiers[0]
        return self.opt.migration_penalty * (m.latency_s + nbytes / m.write_bw) * self._load(0)

    def _writeback_cost(self, nbytes):
        m = self.tiers[self.back]
        return self.opt.migration_penalty * (m.latency_s + nbytes / m.write_bw)

    # -- write-back caching and device load ----------------------------------------
    def _reserve(self) -> float:
        """Free fast-tier bytes to keep for new objects' writes (~2 batches' worth)."""
        return 2.0 * self.new_write_bytes if self.opt.write_reserve else 0.0

    def _load(self, t: int) -> float:
        return min(1.0, self.busy_ewma[t] / max(self.elapsed_ewma, 1e-12))

    def _write_gain(self, nbytes: float) -> float:
        """Latency saved by absorbing a write on the fast tier instead of the backing tier; its
        write-back is deferred, not avoided, so a saturated backing device gains nothing."""
        fb, ft = self.tiers[self.back], self.tiers[0]
        wb = fb.latency_s + nbytes / fb.write_bw
        return max(0.0, wb * (1.0 - self._load(self.back)) - (ft.latency_s + nbytes / ft.write_bw))

    def _adapt(self, t1: float) -> None:
        """Update the device-load estimates and the batch size after a decision."""
        # device load: work seen over elapsed time, both decayed (~50 batches)
        if self.last_time is not None:
            self.busy_ewma = 0.98 * self.busy_ewma + self.busy
            self.elapsed_ewma = 0.98 * self.elapsed_ewma + max(t1 - self.last_time, 0.0)
        self.last_time = t1
        self.busy[:] = 0.0
        # the fills a batch decides reach the fast device together: keep that burst within
        # one backing-tier access latency, so it does not hold up the hits queued behind it
        fill = self.mean_size / self.tiers[0].write_bw
        burst = int(max(1, min(self.opt.batch, self.tiers[self.back].latency_s // max(fill, 1e-12))))
        if self.opt.adapt_batch:
            self.batch = burst
        else:  # decide on whole batches, but promote at most a burst's worth per decision
            self.burst = burst
