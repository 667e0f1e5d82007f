"""Two cooperating learning agents in the style of Harmonia: placement and migration.

Both agents learn the same quantity, so their answers are comparable: the
*nearness* of an object's next access, V(s) in [0, 1] -- the mean over
horizons h_k (1/8 .. 16 fast-tier capacities of traffic, log-spaced) of
P(the object is accessed again within h_k) (:mod:`.predictor`). It is
learned online from hindsight: every sampled state's labels become known
when the object is accessed again or when a horizon passes without an access
(LRB's "relaxed Belady" labels, Song et al., NSDI'20), so learning needs no
exploration -- the future accesses of an object are observed whether or not
it was kept. Multiplied by the latency a fast-tier hit saves (from the tier
models), V is the expected reward -- access latency avoided -- of keeping
the object fast; promotions are charged their transfer time
(``migration_penalty``, weighted by the fast device's measured load); a dirty
victim's write-back is due whenever it leaves, so it is not charged by default
(``writeback_cost``).

* The **placement agent** values objects with no history (first access, or
  a new object's home): its network sees size, kind, op and tier fill only;
  it decides admission (bypass) of new objects.
* The **migration agent** values objects with history: LRB-style features
  (the last 8 inter-access gaps, exponentially decayed counts at five time
  scales, age, count, size, kind, and the stream context of its last access;
  :mod:`.features`).

Decisions (batched, one network call per agent per batch, under
``torch.inference_mode``): after each batch of accesses, every accessed
object not on the fast tier is a promotion candidate; the fast tier's
victims come from ``candidates`` residents sampled at random (LRB-style
sampled eviction).

* **Eviction** follows one of four experts per decision, drawn by their
  weights (LeCaR-style, Vietri et al. HotStorage'18; CACHEUS, Rodriguez et
  al. FAST'21): the learned value per byte (farthest predicted next access
  first), LRU, a decayed LFU and LRU-2. An expert's weight drops when an
  object it evicted comes back soon after (regret, discounted by the traffic
  since), so the agents lean away from the predictor while it is worse than a
  heuristic and on it where it is better (no guarantee: the mix is learned
  too). ``blend=True`` ranks by the weighted blend of all four rankings
  instead (measured: better on ARC OLTP, worse on Mooncake).
* **Admission** (bypass): a candidate is promoted when its value exceeds its
  fill cost (transfer time weighted by the fast device's measured load). When
  it does not beat the learned values of the victims it would displace
  (Belady's bypass rule with predicted next accesses) it is bypassed if the
  learned expert makes the decision; the heuristic experts admit all.
  ``admission_experts=True`` instead weighs "admit all" against "learned
  bypass" by their own regret (a bypassed object that comes back soon costs
  the bypass; an admitted one evicted unused costs the admission).
* **Placement / write-back caching**: new objects fill free fast-tier space;
  the placement agent keeps room for the new objects' writes expected in the
  next two batches (measured rate), evicting only victims worth less than
  absorbing a write -- which gains nothing when the backing device is
  saturated (its measured load), as the write-back is deferred, not avoided.
* **Batch size** adapts to the objects: the fills one batch decides reach the
  fast device together, so a batch is kept to at most one backing-tier
  access latency of fills (16 accesses of small blocks, 1 of 64 MiB ones).

Until an agent has trained ``warmup_steps`` steps its values are a recency
prior (LRU order).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import numpy as np

from ..base import MigrationPolicy, Move, Observation, Outcome, PlacementPolicy, TierModel
from .features import FEATURE_NAMES, N_FEATURES, ObjectTable
from .predictor import HORIZONS, HindsightPredictor, PredictorConfig
from .qnet import load_safetensors_json, save_safetensors_json

FORMAT = "tiered-rl-agents"
FORMAT_VERSION = 2
PLACEMENT, MIGRATION = 0, 1
LEARNED, LRU, LFU, LRU2 = 0, 1, 2, 3  # eviction experts
N_EXPERTS = 4
AGENT_NAMES = ("placement", "migration")
_H = np.asarray(HORIZONS)
K = len(HORIZONS)


@dataclass(frozen=True)
class AgentOptions:
    """Hyperparameters: one set for every trace (nothing here is per-trace)."""

    batch: int = 16  # accesses per decide() call
    candidates: int = 64  # fast-tier residents sampled per eviction decision
    migration_penalty: float = 1.0  # weight of migration transfer time in the reward
    train_every: int = 32  # accesses between gradient steps (per agent)
    warmup_steps: int = 100  # gradient steps before an agent's values are trusted
    pending: int = 262144  # sampled states awaiting their labels
    writeback_cost: bool = False  # charge a dirty victim its write-back (sunk: due whenever it leaves)
    experts: bool = True  # mix the learned eviction with LRU/LFU/LRU-2 by regret (LeCaR-style)
    regret_rate: float = 0.45  # LeCaR's learning rate
    blend: bool = False  # rank victims by the weighted blend of the experts' rankings (False: sample one)
    admission_experts: bool = False  # bypass by regret-weighted admission experts (False: by the eviction expert)
    write_reserve: bool = True  # keep room for new objects' writes (write-back caching)
    rank_logit: bool = False  # victims by mean logit (resolves far-away objects) instead of value
    idle_samples: int = 4  # idle residents' states sampled per decision (besides the victims)
    hidden: int = 64
    lr: float = 2e-3
    train_batch: int = 256
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
            HindsightPredictor(PredictorConfig(
                n_features=N_FEATURES, hidden=self.opt.hidden, lr=self.opt.lr, batch=self.opt.train_batch,
                replay=self.opt.replay, seed=self.opt.seed + 17 * a))
            for a in (PLACEMENT, MIGRATION)
        ]
        self.ready = [False, False]
        self.stats = {"decide_calls": 0, "decisions": 0, "decide_s": 0.0, "train_steps": 0,
                      "train_s": 0.0, "observe_s": 0.0, "events": 0, "promotions": 0, "bypasses": 0,
                      "evictions": 0, "labels": 0,
                      "reserve_evictions": 0}
        self.reset((TierModel("fast", 1 << 30), TierModel("backing", math.inf)))

    # -- episode state --------------------------------------------------------------
    def reset(self, tiers: Sequence[TierModel]) -> None:
        """Empty tiers; the networks (learned or loaded) are kept."""
        super().reset(tiers)
        self.batch = self.opt.batch
        if len(self.tiers) < 2:
            raise ValueError(f"need at least two tiers, got {len(self.tiers)}")
        self.back = len(self.tiers) - 1
        cap0 = float(self.tiers[0].capacity)
        if not (0 <= cap0 < math.inf):
            raise ValueError(f"tier {self.tiers[0].name!r}: the fast tier needs a finite capacity, got {cap0}")
        self.cap = [float(t.capacity) for t in self.tiers]
        self.unit = cap0 or 1.0  # byte-clock unit (an empty fast tier holds nothing: any unit will do)
        self.rng = np.random.default_rng(self.opt.seed)
        self.table = ObjectTable()
        self.loc = np.full(1024, -1, np.int16)
        self.dirty = np.zeros(1024, bool)
        self.res = [_Residents() for _ in self.tiers]
        self.clock = 0.0
        self.mean_size = 0.0
        self.episode_events = 0  # mean_size is this episode's (stats["events"] counts every episode)
        self.since_train = 0
        P = self.opt.pending
        self.p_s = np.zeros((P, N_FEATURES), np.float32)
        self.p_clock = np.zeros(P)
        self.p_id = np.full(P, -1, np.int64)
        self.p_agent = np.zeros(P, np.int8)
        self.p_stage = np.zeros(P, np.int8)  # horizons already labelled 0 (expired without access)
        self.p_n = 0  # samples ever added (absolute position of the next one)
        self.p_tail = [0] * K  # per horizon: first absolute position not yet expired
        self.p_of: dict[int, list[int]] = {}
        self.w = np.ones(N_EXPERTS) / N_EXPERTS  # eviction expert weights
        self.aw = np.ones(2) * 0.5  # admission expert weights: admit all, learned bypass
        self.bhist: dict[int, float] = {}  # bypassed against "admit all": id -> byte clock
        self.ahist: dict[int, float] = {}  # admitted against "learned bypass": id -> byte clock
        self.hist: dict[int, tuple[int, float]] = {}  # evicted id -> (expert, byte clock)
        T = len(self.tiers)
        self.busy = np.zeros(T)  # device seconds of work seen this batch, per tier
        self.busy_ewma = np.zeros(T)
        self.elapsed_ewma = 0.0
        self.last_time = None
        self.new_write_bytes = 0.0  # EWMA: bytes of new objects written per batch

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
        """A fill's transfer time, weighted by how busy the fast device is (the delay it
        imposes on the accesses queued behind it)."""
        m = self.tiers[0]
        return self.opt.migration_penalty * (m.latency_s + nbytes / m.write_bw) * self._load(0)

    def _writeback_cost(self, nbytes):
        m = self.tiers[self.back]
        return self.opt.migration_penalty * (m.latency_s + nbytes / m.write_bw)

    # -- values ---------------------------------------------------------------------
    def _features(self, ids: np.ndarray) -> np.ndarray:
        fill = self.res[0].used / self.cap[0] if self.cap[0] else 1.0
        resident = (self.loc[ids] == 0).astype(np.float32)
        return self.table.features(ids, self.clock, self.unit, fill, resident)

    def _route(self, ids: np.ndarray) -> np.ndarray:
        return np.where(self.table.count[ids] <= 1, PLACEMENT, MIGRATION).astype(np.int8)

    def _values(self, ids: np.ndarray, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(nearness of the next access, rank score) per id: one batched call per agent."""
        q = np.empty(len(ids))
        rank = np.empty(len(ids))
        route = self._route(ids)
        for a in (PLACEMENT, MIGRATION):
            sel = route == a
            if not sel.any():
                continue
            if self.ready[a]:
                q[sel], rank[sel] = self.agents[a].value_and_rank(feats[sel])
            else:  # cold agent: recency prior (LRU order) until it has trained a little
                age = (self.clock - self.table.last[ids[sel]]) / self.unit
                q[sel] = (age[:, None] < _H[None, :]).mean(axis=1) * (1.0 - 1e-3 * age / (1.0 + age))
                rank[sel] = -np.log1p(age)
        return q, rank

    # -- placement ------------------------------------------------------------------
    def place(self, obs: Observation, tiers) -> str | None:
        """A new object fills free fast-tier space (displacing nothing costs nothing but the
        fill); otherwise it starts on the backing tier and the placement agent decides, in
        the next decision step, whether it is worth evicting for."""
        tiers = list(tiers)
        if len(tiers) > 1:
            name, _cap, free = tiers[0]
            # the write reserve is room for new objects' writes: a read (a scan, maybe) leaves it
            room = free if obs.op == "write" else free - self._reserve()
            if room >= obs.nbytes:
                return name
        return tiers[-1][0] if tiers else None

    # -- the decision step ----------------------------------------------------------
    def decide(self, batch: Sequence[Observation]) -> list[Move]:
        t0 = time.perf_counter()
        uniq: dict[int, None] = {}
        learns = self.learns
        nw = 0.0
        res_slots: list[int] = []
        res_clock: list[float] = []
        for obs in batch:
            i, new = self.table.record(obs.key, obs.nbytes, obs.kind, obs.op == "write", self.clock, self.unit)
            if learns and not new:
                lst = self.p_of.pop(i, None)
                if lst:
                    res_slots.extend(lst)
                    res_clock.extend([self.clock] * len(lst))
            if i in self.hist:
                self._regret(i)
            if i in self.bhist:  # a bypassed object came back: "learned bypass" pays
                self._admission_regret(1, self.bhist.pop(i))
            self.ahist.pop(i, None)  # an admitted object was used: that admission paid off
            w = obs.op == "write"
            tm = self.tiers[obs.tier_index if obs.tier_index >= 0 else self.back]
            self.busy[obs.tier_index if obs.tier_index >= 0 else self.back] += obs.nbytes / (tm.write_bw if w else tm.read_bw)
            if new and w:
                nw += obs.nbytes
            self.clock += obs.nbytes
            self.episode_events += 1
            self.mean_size += (obs.nbytes - self.mean_size) / self.episode_events
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
        self.new_write_bytes += 0.1 * (nw - self.new_write_bytes)
        ids = np.fromiter(uniq, np.int64, len(uniq))
        feats = self._features(ids)
        if learns:
            if res_slots:
                self._resolve(np.asarray(res_slots, np.int64), np.asarray(res_clock))
            self._expire()
        moves = self._promote(ids, feats)
        if learns:
            self._sample(ids, feats)
        # device load: work seen over elapsed time, both decayed (~50 batches)
        t1 = batch[-1].time
        if self.last_time is not None:
            self.busy_ewma = 0.98 * self.busy_ewma + self.busy
            self.elapsed_ewma = 0.98 * self.elapsed_ewma + max(t1 - self.last_time, 0.0)
        self.last_time = t1
        self.busy[:] = 0.0
        # the fills a batch decides reach the fast device together: keep that burst within
        # one backing-tier access latency, so it does not hold up the hits queued behind it
        fill = self.mean_size / self.tiers[0].write_bw
        self.batch = int(max(1, min(self.opt.batch, self.tiers[self.back].latency_s // max(fill, 1e-12))))
        self.stats["decide_calls"] += 1
        self.stats["decisions"] += len(batch)
        self.stats["decide_s"] += time.perf_counter() - t0
        return moves

    def _promote(self, ids: np.ndarray, feats: np.ndarray) -> list[Move]:
        off = self.loc[ids] != 0
        cand = ids[off]
        fast = self.res[0]
        reserve = self._reserve()
        if len(cand) == 0 and self.cap[0] - fast.used >= reserve:
            return []
        cfeats = feats[off]
        pool = fast.sample(self.opt.candidates, self.rng)
        pool = pool[~np.isin(pool, ids)]
        allids = np.concatenate([cand, pool])
        allf = np.concatenate([cfeats, self._features(pool)]) if len(pool) else cfeats
        q, rank = self._values(allids, allf)
        size = self.table.nbytes[allids]
        val = q * self._benefit(size)  # seconds of latency saved, expected
        nc = len(cand)
        if self.opt.writeback_cost:
            val[nc:] += np.where(self.dirty[pool], self._writeback_cost(size[nc:]), 0.0)
        cval, csize = val[:nc], size[:nc]
        psize = np.maximum(size[nc:], 1.0)
        # learned: farthest predicted next access (lowest value) per byte first
        keys = [rank[nc:] - np.log(psize) if self.opt.rank_logit else val[nc:] / psize]
        if self.opt.experts:
            keys += [self.table.last[pool],  # LRU: least recently used first
                     # LFU: fewest accesses per byte, decayed (4 capacities half-life)
                     self.table.decayed_freq(pool, self.clock, self.unit, 3) / psize,
                     # LRU-2 (O'Neil et al.): oldest second-to-last access first, one-timers before all
                     np.where(self.table.ngaps[pool] > 0, self.table.last[pool] - self.table.gaps[pool, 0], -1.0)]
        if not self.opt.experts:
            e = LEARNED
            vorder = np.argsort(keys[0], kind="stable") + nc
            blame = None
        elif self.opt.blend:
            # the experts' rankings blended by their weights (0 = evict first)
            m = max(len(pool) - 1, 1)
            r = np.stack([np.argsort(np.argsort(k, kind="stable"), kind="stable") / m for k in keys])
            vorder = np.argsort(self.w @ r, kind="stable") + nc
            blame = 1.0 - r  # per expert and pool object: how much it wanted the object out
            e = -1
        else:
            e = self._pick_expert()
            vorder = np.argsort(keys[e], kind="stable") + nc
            blame = None
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
            if need > 0 or gain <= 0.0:
                self.stats["bypasses"] += 1
                continue
            i = int(cand[j])
            if gain <= lost:
                # the candidate does not beat its victims by the learned values (Belady's bypass
                # rule): "admit all" and "learned bypass" disagree
                if self.opt.admission_experts:
                    # follow one by their own regret weights (LeCaR-style)
                    if self.rng.random() < self.aw[1] / self.aw.sum():
                        self._remember(self.bhist, i)
                        self.stats["bypasses"] += 1
                        continue
                    self._remember(self.ahist, i)
                elif e == LEARNED or (e < 0 and self.rng.random() < self.w[LEARNED]):
                    # bypass when the learned expert makes this decision (heuristics admit all)
                    self.stats["bypasses"] += 1
                    continue
            vp = k
            for v in victims:
                moves.append(self._evict(int(allids[v]), e if blame is None else blame[:, v - nc]))
                chosen_victims.append(v)
                free += size[v]
            self.hist.pop(i, None)
            moves.append(Move(self.table.keys[i], 0))
            self._move(i, 0)
            self.busy[0] += sz / self.tiers[0].write_bw
            free -= sz
            self.stats["promotions"] += 1
            self.stats["evictions"] += len(victims)
        if free < reserve and vp < len(vorder):
            # room for the new objects' writes expected next (write-back caching), paid with
            # victims worth less than absorbing a write
            wgain = self._write_gain(self.mean_size)
            while free < reserve and vp < len(vorder):
                v = vorder[vp]
                if val[v] >= wgain:
                    break
                moves.append(self._evict(int(allids[v]), e if blame is None else blame[:, v - nc]))
                chosen_victims.append(v)
                free += size[v]
                vp += 1
                self.stats["reserve_evictions"] += 1
        if self.learns and len(pool):
            # idle residents' states are what eviction compares: learn about them too,
            # the chosen victims (the decision boundary) always, a few others at random
            p = self._sample_prob()
            keep = np.zeros(len(allids), bool)
            keep[np.asarray(chosen_victims, np.int64)] = True
            others = np.arange(nc, len(allids))
            if self.opt.idle_samples:
                keep[others[self.rng.random(len(others)) < self.opt.idle_samples / len(others)]] = True
            keep &= self.rng.random(len(allids)) < p
            keep[:nc] = False
            if keep.any():
                self._add_pending(allids[keep], allf[keep])
        return moves

    # -- experts (LeCaR-style regret weighting) ---------------------------------------
    def _pick_expert(self) -> int:
        if not self.opt.experts:
            return LEARNED
        return int(self.rng.choice(len(self.w), p=self.w / self.w.sum()))

    def _remember(self, h: dict, i: int) -> None:
        h.pop(i, None)
        h[i] = self.clock
        limit = max(64, len(self.res[0].items))
        while len(h) > limit:
            del h[next(iter(h))]

    def _admission_regret(self, expert: int, since: float) -> None:
        r = 0.005 ** ((self.clock - since) / self.unit)
        self.aw[expert] *= math.exp(-self.opt.regret_rate * r)
        self.aw /= self.aw.sum()
        np.maximum(self.aw, 0.01, out=self.aw)

    def _evict(self, vid: int, expert) -> Move:
        """Demote ``vid``; remember who wanted it out (an expert index, or a blame per expert)."""
        if vid in self.ahist:  # admitted against the learned bypass, left unused: "admit all" pays
            self._admission_regret(0, self.ahist.pop(vid))
        if self.dirty[vid]:
            self.busy[self.back] += self.table.nbytes[vid] / self.tiers[self.back].write_bw
        self._move(vid, self.back)
        if self.opt.experts:
            h = self.hist
            h.pop(vid, None)
            h[vid] = (expert, self.clock)
            limit = max(64, len(self.res[0].items))
            while len(h) > limit:
                del h[next(iter(h))]
        return Move(self.table.keys[vid], self.back)

    def _regret(self, i: int) -> None:
        """An object evicted by an expert came back: that expert pays, the sooner the more."""
        e, c = self.hist.pop(i)
        r = 0.005 ** ((self.clock - c) / self.unit)
        if isinstance(e, np.ndarray):
            self.w *= np.exp(-self.opt.regret_rate * r * e)
        else:
            self.w[e] *= math.exp(-self.opt.regret_rate * r)
        self.w /= self.w.sum()
        np.maximum(self.w, 0.01, out=self.w)

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
        per_horizon = HORIZONS[-1] * self.unit / max(self.mean_size, 1.0) * (1.0 + 0.5)
        return min(1.0, 0.5 * self.opt.pending / max(per_horizon, 1.0))

    def _sample(self, ids: np.ndarray, feats: np.ndarray) -> None:
        p = self._sample_prob()
        keep = self.rng.random(len(ids)) < p if p < 1.0 else np.ones(len(ids), bool)
        if keep.any():
            self._add_pending(ids[keep], feats[keep])

    def _add_pending(self, ids: np.ndarray, feats: np.ndarray) -> None:
        P = self.opt.pending
        room = P - (self.p_n - self.p_tail[-1])
        n = min(len(ids), room)  # ring full: drop new samples rather than mislabel old ones
        if n <= 0:
            return
        ids, feats = ids[:n], feats[:n]
        slots = (self.p_n + np.arange(n)) % P
        self.p_s[slots] = feats
        self.p_clock[slots] = self.clock
        self.p_id[slots] = ids
        self.p_agent[slots] = self._route(ids)
        self.p_stage[slots] = 0
        for i, h in zip(ids.tolist(), slots.tolist()):
            self.p_of.setdefault(i, []).append(h)
        self.p_n += n

    def _resolve(self, slots: np.ndarray, clocks: np.ndarray) -> None:
        """Samples of objects accessed again: every horizon not yet labelled gets its label."""
        d = (clocks - self.p_clock[slots]) / self.unit
        y = (d[:, None] < _H[None, :]).astype(np.float32)
        m = (np.arange(K)[None, :] >= self.p_stage[slots][:, None]).astype(np.float32)
        self._emit(slots, y, m)
        self.p_id[slots] = -1

    def _first_after(self, lo: int, hi: int, limit: float) -> int:
        """First absolute position in [lo, hi) whose sample clock is > ``limit`` (clocks ascend)."""
        P = self.opt.pending
        pc = self.p_clock
        while lo < hi:
            mid = (lo + hi) // 2
            if pc[mid % P] <= limit:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _expire(self) -> None:
        """Horizons that passed with no access: label 0 for that horizon (one row each)."""
        P = self.opt.pending
        for k in range(K):
            lo = self.p_tail[k]
            hi = self._first_after(lo, self.p_n, self.clock - HORIZONS[k] * self.unit)
            if hi == lo:
                continue
            self.p_tail[k] = hi
            slots = np.arange(lo, hi) % P
            alive = slots[self.p_id[slots] >= 0]
            if len(alive) == 0:
                continue
            y = np.zeros((len(alive), K), np.float32)
            m = np.zeros((len(alive), K), np.float32)
            m[:, k] = 1.0
            self._emit(alive, y, m)
            self.p_stage[alive] = k + 1
            if k == K - 1:
                for i, h in zip(self.p_id[alive].tolist(), alive.tolist()):
                    lst = self.p_of.get(i)
                    if lst is not None:
                        lst.remove(h)
                        if not lst:
                            del self.p_of[i]
                self.p_id[alive] = -1

    def _emit(self, slots: np.ndarray, y: np.ndarray, m: np.ndarray) -> None:
        agent = self.p_agent[slots]
        for a in (PLACEMENT, MIGRATION):
            sel = agent == a
            if sel.any():
                self.agents[a].add(self.p_s[slots[sel]], y[sel], m[sel])
        self.stats["labels"] += len(slots)

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
            "labels": s["labels"],
            "promotions": s["promotions"],
            "bypasses": s["bypasses"],
            "evictions": s["evictions"],
            "reserve_evictions": s["reserve_evictions"],
            "expert_weights": [float(x) for x in self.w] if self.opt.experts else None,
            "admission_weights": [float(x) for x in self.aw],
        }

    def save(self, path) -> None:
        """``path``.safetensors (both networks) + ``path``.json (options, features, format)."""
        tensors = {}
        for a, name in enumerate(AGENT_NAMES):
            tensors.update(self.agents[a].tensors(name))
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "options": asdict(self.opt),
            "features": list(FEATURE_NAMES), "horizons": list(HORIZONS), "ready": list(self.ready),
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
        if meta.get("horizons") != list(HORIZONS):
            raise ValueError(f"{src}.json: horizons {meta.get('horizons')!r} differ from {list(HORIZONS)}")
        opts = dict(meta.get("options", {}))
        opts.update(overrides)
        self = cls(AgentOptions.from_dict(opts, f"{src}.json options"))
        for a, name in enumerate(AGENT_NAMES):
            self.agents[a].load_tensors(tensors, name, f"{src}.safetensors")
        ready = meta.get("ready", [True, True])
        self.ready = [bool(r) for r in ready]
        for ag, steps in zip(self.agents, meta.get("train_steps", [0, 0])):
            ag.steps = int(steps)  # (the Adam moments are not saved: training resumes with fresh ones)
        return self
