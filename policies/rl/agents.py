"""Two cooperating learning agents in the style of Harmonia: placement and migration.

Both agents estimate the same quantity, so their answers are comparable:
Q(s), the discounted nearness of an object's next access (gamma^d, d the
byte-clock distance in fast-tier capacities, gamma halving every
``half_life`` capacities; with ``bootstrap=True`` the discounted count of all
future accesses), learned online by TD with experience replay and a target
network (:mod:`.qnet`). Multiplied by the latency a fast-tier hit saves
(from the tier models), Q is the expected reward -- access latency avoided
-- of keeping the object fast; promotions are charged their transfer time
(``migration_penalty``) and dirty victims their write-back.

* The **placement agent** values objects with no history (first access, or
  a new object's home): its network sees size, kind, op and tier fill only.
* The **migration agent** values objects with history (counts, recency,
  the last inter-access gaps, their moving average, decayed counts).

Decisions (batched, one network call per agent per batch, under
``torch.inference_mode``): after each batch of accesses, every accessed
object not on the fast tier is a promotion candidate; the fast tier's
victims are the lowest-value-per-byte objects among ``candidates`` residents
sampled at random (LRB-style sampled eviction). A promotion happens only
when the candidate's value exceeds the value of the victims it displaces
plus the migration traffic it costs -- so the agents learn admission
(bypass) as well as eviction, and pay for migrations in the same currency.

Learning needs no exploration: the future accesses of an object are
observed whether or not it was kept, so every decision state sampled gets
its label (the discount to its next access; 0 when none came within
``horizon`` half-lives) regardless of what the agents did.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import numpy as np

from ..base import MigrationPolicy, Move, Observation, Outcome, PlacementPolicy, TierModel
from .features import FEATURE_NAMES, N_FEATURES, ObjectTable, discount
from .qnet import LearnerConfig, ValueLearner, load_safetensors_json, save_safetensors_json

FORMAT = "tiered-rl-agents"
FORMAT_VERSION = 1
PLACEMENT, MIGRATION = 0, 1
AGENT_NAMES = ("placement", "migration")


@dataclass(frozen=True)
class AgentOptions:
    """Hyperparameters: one set for every trace (nothing here is per-trace)."""

    batch: int = 16  # accesses per decide() call
    candidates: int = 32  # fast-tier residents sampled per eviction decision
    half_life: float = 4.0  # discount half-life, in fast-tier capacities of traffic
    horizon: float = 8.0  # half-lives after which an unanswered sample bootstraps from its idle state
    migration_penalty: float = 1.0  # weight of migration transfer time in the reward
    train_every: int = 32  # accesses between gradient steps (per agent)
    warmup_steps: int = 100  # gradient steps before an agent's values are trusted
    pending: int = 262144  # decision states awaiting their label
    hidden: int = 64
    lr: float = 1e-3
    train_batch: int = 256
    replay: int = 65536
    target_every: int = 250
    bootstrap: bool = False  # True: value = all discounted future hits; False: the next one
    censor_bootstrap: bool = False  # True: idle-at-horizon samples bootstrap from their idle state; False: target 0
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
                if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "seed" else 1):
                    raise ValueError(f"{source}: option {k!r} must be a positive integer, got {v!r}")
            elif typ is float:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
                    raise ValueError(f"{source}: option {k!r} must be a finite number >= 0, got {v!r}")
                v = float(v)
            out[k] = v
        return cls(**out)


class _Residents:
    """The objects on one tier: O(1) add/remove and uniform sampling."""

    def __init__(self) -> None:
        self.items: list[int] = []
        self.pos: dict[int, int] = {}
        self.used = 0

    def add(self, i: int, nbytes: int) -> None:
        if i not in self.pos:
            self.pos[i] = len(self.items)
            self.items.append(i)
            self.used += nbytes

    def remove(self, i: int, nbytes: int) -> None:
        p = self.pos.pop(i, None)
        if p is None:
            return
        last = self.items.pop()
        if last != i:
            self.items[p] = last
            self.pos[last] = p
        self.used -= nbytes

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        m = len(self.items)
        if m <= n:
            return np.asarray(self.items, np.int64)
        if m < 4 * n:
            return np.asarray(self.items, np.int64)[rng.choice(m, size=n, replace=False)]
        return np.unique(np.asarray([self.items[j] for j in rng.integers(0, m, size=n)], np.int64))


class HarmoniaAgents(MigrationPolicy, PlacementPolicy):
    """Placement + migration agents behind the :class:`MigrationPolicy` interface."""

    name = "rl"
    learns = True

    def __init__(self, options: AgentOptions | None = None, **kw) -> None:
        if options is not None and kw:
            raise TypeError("pass either options= or keyword options, not both")
        self.opt = options if options is not None else AgentOptions.from_dict(kw)
        self.batch = self.opt.batch
        self.learns = self.opt.learn
        self.agents = [
            ValueLearner(LearnerConfig(
                n_features=N_FEATURES, hidden=self.opt.hidden, lr=self.opt.lr, batch=self.opt.train_batch,
                replay=self.opt.replay, target_every=self.opt.target_every,
                seed=self.opt.seed + 17 * a))
            for a in (PLACEMENT, MIGRATION)
        ]
        self.ready = [False, False]
        self.stats = {"decide_calls": 0, "decisions": 0, "decide_s": 0.0, "train_steps": 0,
                      "train_s": 0.0, "observe_s": 0.0, "events": 0, "promotions": 0, "bypasses": 0,
                      "evictions": 0}
        self.reset((TierModel("fast", 1 << 30), TierModel("backing", math.inf)))

    # -- episode state --------------------------------------------------------------
    def reset(self, tiers: Sequence[TierModel]) -> None:
        """Empty tiers; the networks (learned or loaded) are kept."""
        super().reset(tiers)
        if len(self.tiers) < 2:
            raise ValueError(f"need at least two tiers, got {len(self.tiers)}")
        self.back = len(self.tiers) - 1
        cap0 = float(self.tiers[0].capacity)
        if not (0 < cap0 < math.inf):
            raise ValueError(f"tier {self.tiers[0].name!r}: the fast tier needs a finite capacity > 0, got {cap0}")
        self.cap = [float(t.capacity) for t in self.tiers]
        self.unit = cap0  # byte-clock unit
        self.rng = np.random.default_rng(self.opt.seed)
        self.table = ObjectTable()
        self.loc = np.full(1024, -1, np.int16)
        self.dirty = np.zeros(1024, bool)
        self.res = [_Residents() for _ in self.tiers]
        self.clock = 0.0
        self.mean_size = 0.0
        self.since_train = 0
        P = self.opt.pending
        self.p_s = np.zeros((P, N_FEATURES), np.float32)
        self.p_clock = np.zeros(P)
        self.p_id = np.full(P, -1, np.int64)
        self.p_agent = np.zeros(P, np.int8)
        self.p_head = 0  # next slot to write
        self.p_tail = 0  # oldest possibly-alive slot
        self.p_live = 0
        self.p_of: dict[int, list[int]] = {}

    def _ensure(self, n: int) -> None:
        if n > len(self.loc):
            m = max(n, 2 * len(self.loc))
            loc = np.full(m, -1, np.int16)
            loc[: len(self.loc)] = self.loc
            dirty = np.zeros(m, bool)
            dirty[: len(self.dirty)] = self.dirty
            self.loc, self.dirty = loc, dirty

    # -- costs (seconds) ------------------------------------------------------------
    def _read_cost(self, t: int, nbytes: np.ndarray | float) -> np.ndarray | float:
        m = self.tiers[t]
        return m.latency_s + nbytes / m.read_bw

    def _benefit(self, nbytes):
        """Latency a fast-tier hit saves over a backing-tier read."""
        return np.maximum(self._read_cost(self.back, nbytes) - self._read_cost(0, nbytes), 0.0)

    def _promote_cost(self, nbytes):
        m = self.tiers[0]
        return self.opt.migration_penalty * (m.latency_s + nbytes / m.write_bw)

    def _writeback_cost(self, nbytes):
        m = self.tiers[self.back]
        return self.opt.migration_penalty * (m.latency_s + nbytes / m.write_bw)

    # -- values ---------------------------------------------------------------------
    def _features(self, ids: np.ndarray) -> np.ndarray:
        fill = self.res[0].used / self.cap[0]
        resident = (self.loc[ids] == 0).astype(np.float32)
        return self.table.features(ids, self.clock, self.unit, fill, resident)

    def _route(self, ids: np.ndarray) -> np.ndarray:
        return np.where(self.table.count[ids] <= 1, PLACEMENT, MIGRATION).astype(np.int8)

    def _values(self, ids: np.ndarray, feats: np.ndarray) -> np.ndarray:
        """Expected discounted future hits Q per id: one batched call per agent."""
        q = np.empty(len(ids))
        route = self._route(ids)
        for a in (PLACEMENT, MIGRATION):
            sel = route == a
            if not sel.any():
                continue
            if self.ready[a]:
                q[sel] = self.agents[a].value(feats[sel])
            else:  # cold agent: recency prior (LRU order) until it has trained a little
                age = (self.clock - self.table.last[ids[sel]]) / self.unit
                q[sel] = discount(age, self.opt.half_life)
        return q

    # -- placement ------------------------------------------------------------------
    def place(self, obs: Observation, tiers) -> str | None:
        """A new object fills free fast-tier space (displacing nothing costs nothing but the
        fill); otherwise it starts on the backing tier and the placement agent decides, in
        the next decision step, whether it is worth evicting for."""
        tiers = list(tiers)
        if len(tiers) > 1:
            name, _cap, free = tiers[0]
            if free >= obs.nbytes:
                return name
        return tiers[-1][0] if tiers else None

    # -- the decision step ----------------------------------------------------------
    def decide(self, batch: Sequence[Observation]) -> list[Move]:
        t0 = time.perf_counter()
        uniq: dict[int, None] = {}
        for obs in batch:
            i, new = self.table.record(obs.key, obs.nbytes, obs.kind, obs.op == "write", self.clock, self.unit)
            self.clock += obs.nbytes
            self.mean_size += (obs.nbytes - self.mean_size) / (self.stats["events"] + 1)
            self.stats["events"] += 1
            self._ensure(i + 1)
            t = obs.tier_index if obs.tier_index >= 0 else self.back
            was = int(self.loc[i])
            if was != t:
                if was >= 0:
                    self.res[was].remove(i, int(self.table.nbytes[i]))
                self.res[t].add(i, obs.nbytes)
                self.loc[i] = t
            if obs.op == "write":
                self.dirty[i] = t != self.back
            uniq[i] = None
        ids = np.fromiter(uniq, np.int64, len(uniq))
        feats = self._features(ids)
        if self.learns:
            self._resolve(ids, feats)
        moves = self._promote(ids, feats)
        if self.learns:
            self._expire()
            self._sample(ids, feats)
        self.stats["decide_calls"] += 1
        self.stats["decisions"] += len(batch)
        self.stats["decide_s"] += time.perf_counter() - t0
        return moves

    def _promote(self, ids: np.ndarray, feats: np.ndarray) -> list[Move]:
        cand = ids[self.loc[ids] != 0]
        if len(cand) == 0:
            return []
        cfeats = feats[self.loc[ids] != 0]
        fast = self.res[0]
        pool = fast.sample(self.opt.candidates, self.rng)
        pool = pool[~np.isin(pool, ids)]
        allids = np.concatenate([cand, pool])
        allf = np.concatenate([cfeats, self._features(pool)]) if len(pool) else cfeats
        q = self._values(allids, allf)
        size = self.table.nbytes[allids]
        val = q * self._benefit(size)  # seconds of latency saved, expected
        val[len(cand):] += np.where(self.dirty[pool], self._writeback_cost(size[len(cand):]), 0.0)
        cval, csize = val[: len(cand)], size[: len(cand)]
        vorder = np.argsort(val[len(cand):] / np.maximum(size[len(cand):], 1.0)) + len(cand)
        vp = 0  # next victim in vorder
        free = self.cap[0] - fast.used
        moves: list[Move] = []
        chosen_victims = []
        for j in np.argsort(-cval / np.maximum(csize, 1.0)):
            sz = csize[j]
            if sz > self.cap[0]:
                continue
            gain = cval[j] - self._promote_cost(sz)
            need = sz - free
            victims, lost, k = [], 0.0, vp
            while need > 0 and k < len(vorder):
                v = vorder[k]
                victims.append(v)
                lost += val[v]
                need -= size[v]
                k += 1
            if need > 0 or gain <= lost:
                self.stats["bypasses"] += 1
                continue
            vp = k
            for v in victims:
                vid = int(allids[v])
                moves.append(Move(self.table.keys[vid], self.back))
                self._move(vid, self.back)
                chosen_victims.append(v)
                free += size[v]
            i = int(cand[j])
            moves.append(Move(self.table.keys[i], 0))
            self._move(i, 0)
            free -= sz
            self.stats["promotions"] += 1
            self.stats["evictions"] += len(victims)
        if self.learns and len(pool):
            # idle residents' states are what eviction compares: learn about them too,
            # the chosen victims (the decision boundary) always, a few others at random
            # (at the same rate as access states, so they cannot crowd out the pending ring)
            p = self._sample_prob()
            keep = np.zeros(len(allids), bool)
            keep[np.asarray(chosen_victims, np.int64)] = True
            others = np.arange(len(cand), len(allids))
            keep[others[self.rng.random(len(others)) < 4.0 / len(others)]] = True
            keep &= self.rng.random(len(allids)) < p
            keep[: len(cand)] = False
            if keep.any():
                self._add_pending(allids[keep], allf[keep])
        return moves

    def _move(self, i: int, dst: int) -> None:
        src = int(self.loc[i])
        nb = int(self.table.nbytes[i])
        self.res[src].remove(i, nb)
        self.res[dst].add(i, nb)
        self.loc[i] = dst
        if dst == self.back:
            self.dirty[i] = False

    # -- learning -------------------------------------------------------------------
    def _sample_prob(self) -> float:
        """Sampled fraction of accesses, so the pending states fit in ``pending`` slots."""
        per_horizon = self.opt.horizon * self.opt.half_life * self.unit / max(self.mean_size, 1.0)
        return min(1.0, 0.5 * self.opt.pending / max(per_horizon, 1.0))

    def _sample(self, ids: np.ndarray, feats: np.ndarray) -> None:
        p = self._sample_prob()
        keep = self.rng.random(len(ids)) < p if p < 1.0 else np.ones(len(ids), bool)
        if keep.any():
            self._add_pending(ids[keep], feats[keep])

    def _add_pending(self, ids: np.ndarray, feats: np.ndarray) -> None:
        P = self.opt.pending
        route = self._route(ids)
        for r in range(len(ids)):
            h = self.p_head
            if self.p_id[h] >= 0:  # ring full: drop the new sample rather than mislabel an old one
                return
            i = int(ids[r])
            self.p_s[h] = feats[r]
            self.p_clock[h] = self.clock
            self.p_id[h] = i
            self.p_agent[h] = route[r]
            self.p_of.setdefault(i, []).append(h)
            self.p_head = (h + 1) % P
            self.p_live += 1

    def _resolve(self, ids: np.ndarray, feats: np.ndarray) -> None:
        """States of the accessed objects waiting for their next access get their label now."""
        slots, rows = [], []
        for r, i in enumerate(ids.tolist()):
            lst = self.p_of.pop(i, None)
            if lst:
                slots.extend(lst)
                rows.extend([r] * len(lst))
        if not slots:
            return
        slots = np.asarray(slots, np.int64)
        rows = np.asarray(rows, np.int64)
        # the clock has advanced by this batch; the distance is to the batch's accesses
        d = (self.clock - self.p_clock[slots]) / self.unit
        disc = discount(d, self.opt.half_life).astype(np.float32)
        one = np.ones(len(slots), np.float32)
        self._learn_from(slots, disc, one, feats[rows], one if self.opt.bootstrap else 0.0 * one)

    def _expire(self) -> None:
        """Samples whose object was not accessed within the horizon are labelled 0."""
        P = self.opt.pending
        limit = self.clock - self.opt.horizon * self.opt.half_life * self.unit
        slots = []
        self._expired_ids = []
        while self.p_live > 0:
            t = self.p_tail
            i = self.p_id[t]
            if i < 0:  # resolved earlier
                self.p_tail = (t + 1) % P
                if self.p_tail == self.p_head:
                    break
                continue
            if self.p_clock[t] > limit:
                break
            lst = self.p_of.get(int(i))
            if lst is not None:
                lst.remove(t)
                if not lst:
                    del self.p_of[int(i)]
            slots.append(t)
            self._expired_ids.append(int(i))
            self.p_id[t] = -1
            self.p_live -= 1
            self.p_tail = (t + 1) % P
        if slots:
            slots = np.asarray(slots, np.int64)
            ids = self._expired_ids
            d = (self.clock - self.p_clock[slots]) / self.unit
            disc = discount(d, self.opt.half_life).astype(np.float32)
            s2 = self._features(np.asarray(ids, np.int64))
            z = np.zeros(len(slots), np.float32)
            self._learn_from(slots, disc, z, s2, z + 1.0 if self.opt.censor_bootstrap else z,
                             already_freed=True)

    def _learn_from(self, slots: np.ndarray, disc: np.ndarray, hit: np.ndarray, s2: np.ndarray,
                    has_next: np.ndarray, already_freed: bool = False) -> None:
        agent = self.p_agent[slots]
        for a in (PLACEMENT, MIGRATION):
            sel = agent == a
            if sel.any():
                self.agents[a].add(self.p_s[slots[sel]], disc[sel], hit[sel], s2[sel], has_next[sel])
        if not already_freed:
            self.p_id[slots] = -1
            self.p_live -= len(slots)

    def observe(self, outcomes: Sequence[Outcome]) -> None:
        """Train each agent every ``train_every`` accesses (the labels came from decide)."""
        if not self.learns:
            return
        t0 = time.perf_counter()
        self.since_train += len(outcomes)
        while self.since_train >= self.opt.train_every:
            self.since_train -= self.opt.train_every
            for a, ag in enumerate(self.agents):
                if ag.replay.size >= ag.cfg.batch:
                    ag.train_step()
                    self.stats["train_steps"] += 1
                    if ag.steps >= self.opt.warmup_steps:
                        self.ready[a] = True
        dt = time.perf_counter() - t0
        self.stats["train_s"] += dt
        self.stats["observe_s"] += dt

    # -- reporting and persistence ----------------------------------------------------
    def cost_report(self) -> dict:
        s = self.stats
        return {
            "us_per_decision": 1e6 * s["decide_s"] / max(1, s["decisions"]),
            "us_per_decide_call": 1e6 * s["decide_s"] / max(1, s["decide_calls"]),
            "train_us_per_event": 1e6 * s["train_s"] / max(1, s["events"]),
            "train_steps": s["train_steps"],
            "promotions": s["promotions"],
            "bypasses": s["bypasses"],
            "evictions": s["evictions"],
        }

    def save(self, path) -> None:
        """``path``.safetensors (both networks) + ``path``.json (options, features, format)."""
        tensors = {}
        for a, name in enumerate(AGENT_NAMES):
            tensors.update(self.agents[a].tensors(name))
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "options": asdict(self.opt),
            "features": list(FEATURE_NAMES), "ready": list(self.ready),
            "train_steps": [ag.steps for ag in self.agents],
        }
        save_safetensors_json(path, tensors, meta)

    @classmethod
    def load(cls, path, **overrides) -> "HarmoniaAgents":
        """Agents saved by :meth:`save`; ``overrides`` replace saved options (e.g. ``learn=False``)."""
        tensors, meta = load_safetensors_json(path)
        src = str(path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{src}.json: format is {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{src}.json: version {meta.get('version')!r}, this code reads {FORMAT_VERSION}")
        if meta.get("features") != list(FEATURE_NAMES):
            raise ValueError(f"{src}.json: features {meta.get('features')!r} differ from {list(FEATURE_NAMES)}")
        opts = dict(meta.get("options", {}))
        opts.update(overrides)
        self = cls(AgentOptions.from_dict(opts, f"{src}.json options"))
        for a, name in enumerate(AGENT_NAMES):
            self.agents[a].load_tensors(tensors, name, f"{src}.safetensors")
        ready = meta.get("ready", [True, True])
        self.ready = [bool(r) for r in ready]
        return self
