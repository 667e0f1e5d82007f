"""The feature store's host memory: one reservation of the host tier under its owner name.

Row caches, victim buffers and gather scratch are buffers of that reservation, so the
store charges them to ``gnn/<namespace>`` and shares the host tier with other owners.
The share is ``host_share`` (or ``cache_bytes``) when given, else the config's
``[owners.gnn]`` entry, else 0 (elastic: the caches take part of what is free when they
are made). When another owner cannot find room, the store calls :meth:`_give_back`,
which drops victim buffers first (their rows are the coldest), then whole row caches;
a dropped cache is made again, smaller, by the next gather of its attribute.
"""

from __future__ import annotations

import numpy as np

from allocators import OutOfBudget

from .attrs import FeatureStoreError, _Attr
from .cache import RowCache


class _Memory:
    """Part of :class:`~tiered.gnn.TieredFeatureStore` (see its docstring)."""

    @property
    def owner(self) -> str:
        """The store owner this feature store's memory and objects are charged to."""
        return f"gnn/{self.namespace}"

    def _reserve_host(self) -> None:
        share = self._host_share if self._host_share is not None else self._cache_bytes
        self._host = self.store.reserve("host", share, owner=self.owner, on_pressure=self._give_back)

    def _cache_budget(self) -> int:
        """Bytes for all row caches together: ``cache_bytes``; else the reserved share less one
        gather's scratch; else (elastic) half of what the host tier has free now."""
        if self._cache_total is None:
            if self._cache_bytes is not None:
                total = self._cache_bytes
            elif self._host.reserved:
                total = max(0, self._host.reserved - self.scratch_bytes)
            else:
                total = max(0, self._free_host() - self.scratch_bytes) // 2
            self._cache_total = total
        return self._cache_total

    def _free_host(self) -> int:
        """Host bytes neither in use nor reserved (and unused) by other owners."""
        host = self.store.stats()["tiers"]["host"]
        unused_shares = sum(max(0, t["reserved"] - t["held"]) for o, tiers in self.store.owners().items()
                            if o != self.owner for name, t in tiers.items() if name == "host")
        return max(0, host["capacity"] - host["used"] - unused_shares)

    def set_static_score(self, group_name, score) -> None:
        """Per-node importance for the hybrid policy (e.g. :func:`sampling_degree`), for every
        attribute of ``group_name``; caches of that group are rebuilt empty."""
        self._check_open()
        s = np.asarray(score.numpy() if hasattr(score, "numpy") else score, dtype=np.float64).reshape(-1)
        for (g, _n), a in self._attrs.items():
            if g == group_name and len(s) != a.num_rows:
                raise FeatureStoreError(f"static score for group {group_name!r} has {len(s)} entries, "
                                        f"attribute {a.label} has {a.num_rows} rows")
        self._static[group_name] = s
        for (g, _n), a in self._attrs.items():
            if g == group_name:
                self._reset_cache(a)

    def set_cache(self, group_name, attr_name: str, nbytes: int) -> None:
        """Give attribute (``group_name``, ``attr_name``) a row cache of ``nbytes`` (slots + victims)."""
        a = self._attr(group_name, attr_name)
        self._cache_plan[(group_name, attr_name)] = int(nbytes)
        self._reset_cache(a)

    def _reset_cache(self, a: _Attr) -> None:
        with a.lock:
            if a.cache is not None:
                a.cache.close()
                a.cache = None

    def _make_cache(self, a: _Attr) -> RowCache:
        """The attribute's row cache, made now (call under ``a.lock``). Its size is the set_cache
        plan, else what pressure left it, else its share of the budget by size; a cache whose
        size was not set explicitly is made smaller (halving) when it does not fit, not failed."""
        planned = self._cache_plan.get((a.group, a.name))
        nbytes = planned if planned is not None else self._shrunk.get((a.group, a.name))
        if nbytes is None:
            budget = self._cache_budget()
            total = sum(x.nbytes for x in self._attrs.values()) or 1
            held = sum(x.cache.nbytes for x in self._attrs.values() if x.cache is not None)
            nbytes = min(int(budget * a.nbytes / total), max(0, budget - held))
        while True:
            try:
                a.cache = self._new_cache(a, nbytes)
                return a.cache
            except OutOfBudget:
                if planned is not None or nbytes < a.row_bytes:
                    raise
                nbytes //= 2

    def _new_cache(self, a: _Attr, nbytes: int) -> RowCache:
        from policies.row_cache import create_row_cache_policy

        rows = min(a.num_rows, nbytes // max(a.row_bytes, 1))
        victims = int(rows * self.victim_fraction)
        kw = {}
        if self.policy == "hybrid" and a.group in self._static:
            kw["static_score"] = self._static[a.group]
        policy = create_row_cache_policy(self.policy, a.num_rows, rows - victims, **kw)
        return RowCache(policy, a.row_bytes, victims).open(lambda n: self._host.alloc(n, 0), a.label)

    def _give_back(self, wanted: int) -> int:
        """The store's ``on_pressure``: release up to ``wanted`` bytes of row caches (victim
        buffers first, then whole caches, largest first); returns the bytes released. An
        attribute whose lock is busy (a gather is using its cache) is skipped, not waited for:
        this runs in another owner's allocation. The budget shrinks by what was given."""
        freed = 0
        attrs = list(self._attrs.values())  # one step: the table may change in another thread
        attrs.sort(key=lambda x: x.cache.nbytes if x.cache else 0, reverse=True)
        for whole in (False, True):
            for a in attrs:
                if freed >= wanted:
                    break
                if not a.lock.acquire(blocking=False):
                    continue
                try:
                    c = a.cache
                    if c is None:
                        continue
                    if not whole:
                        freed += c.drop_victims()
                        continue
                    key = (a.group, a.name)
                    if key in self._cache_plan:
                        self._cache_plan[key] = max(0, c.nbytes - (wanted - freed))
                    else:
                        self._shrunk[key] = max(0, c.nbytes - (wanted - freed))
                    freed += c.nbytes
                    a.cache = None
                    c.close()
                finally:
                    a.lock.release()
        if freed and self._cache_total is not None:
            self._cache_total = max(0, self._cache_total - freed)
        return freed
