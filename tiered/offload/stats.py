"""What an offloaded model reports: bytes read per tier, prefetch hits, stalls, peaks."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OffloadStats:
    forwards: int = 0
    unit_loads: int = 0
    prefetch_hits: int = 0  # unit loads whose bytes were already in memory when needed
    stall_seconds: float = 0.0  # time forwards waited for weights
    bytes_read: dict = field(default_factory=dict)  # tier -> bytes read since offload()
    peak_host_bytes: int = 0
    peak_device_bytes: int = 0  # CUDA: weights bound on the GPU at once (<= the gpu tier)
    resident_bytes: int = 0
    host_resident_bytes: int = 0
    lookahead: int = 0
    prefetch_skipped: int = 0  # prefetches not started because the budget was full
    device_cache: dict = field(default_factory=dict)  # hits/misses/evictions/bytes of the device cache, if used

    @property
    def prefetch_hit_rate(self) -> float:
        return self.prefetch_hits / self.unit_loads if self.unit_loads else 1.0

    def as_dict(self) -> dict:
        return {
            "forwards": self.forwards, "unit_loads": self.unit_loads,
            "prefetch_hit_rate": round(self.prefetch_hit_rate, 4),
            "stall_seconds": round(self.stall_seconds, 4), "bytes_read": dict(self.bytes_read),
            "peak_host_bytes": self.peak_host_bytes, "peak_device_bytes": self.peak_device_bytes,
            "resident_bytes": self.resident_bytes,
            "host_resident_bytes": self.host_resident_bytes,
            "lookahead": self.lookahead, "prefetch_skipped": self.prefetch_skipped,
            **({"device_cache": dict(self.device_cache)} if self.device_cache else {}),
        }



class _Stats:
    """Part of :class:`~tiered.offload.runtime.OffloadedModule`: its report."""

    def report(self) -> dict:
        st = self.store.stats()
        if st["external_bytes_read"] - self._external_base:
            self.stats.bytes_read["checkpoint files"] = st["external_bytes_read"] - self._external_base
        for name, t in st["tiers"].items():
            if t and t["kind"] == "storage":
                self.stats.bytes_read[name] = t["bytes_read"] - self._read_base.get(name, 0)
        if self.host_res is not None:  # this model's own figures, as the store charges them
            self.stats.peak_host_bytes = self.host_res.peak
            if self.compute_res is not self.host_res:
                self.stats.peak_device_bytes = self.compute_res.peak
        if self.dcache is not None:
            c = self.dcache.stats
            self.stats.device_cache = {"hits": c.hits, "misses": c.misses, "evictions": c.evictions,
                                       "bytes_loaded": c.bytes_loaded, "peak": self.dcache.peak}
        out = self.stats.as_dict()
        if self.banks:
            out["experts"] = self.expert_report()
        return out
