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

Decisions (batched: one network call per agent for the batch's candidates, numpy, on the
calling thread): after each batch of accesses, every accessed object not on the fast tier is a
promotion candidate. The fast tier's victims come from a *victim queue*: ``candidates``
residents sampled at random (LRB-style sampled eviction) are ranked once by one expert, and the
first ``1 / victim_share`` of them are evicted over the next decisions (entries accessed since,
or gone, are skipped; the queue is re-ranked after ``queue_age`` capacities of traffic).

* **Eviction** follows one of four experts per ranking, drawn by their
  weights (LeCaR-style, Vietri et al. HotStorage'18; CACHEUS, Rodriguez et
  al. FAST'21): the learned value per byte (farthest predicted next access
  first), LRU, a decayed LFU and LRU-2. An expert's weight drops when an
  object it evicted comes back soon after (regret, discounted by the traffic
  since), so the agents lean away from the predictor while it is worse than a
  heuristic and on it where it is better (no guarantee: the mix is learned
  too). ``blend=True`` ranks by the weighted blend of all four rankings instead.
* **Admission** (bypass): a candidate is promoted when its value exceeds its
  fill cost (transfer time weighted by the fast device's measured load). When
  it does not beat the learned values of the victims it would displace
  (Belady's bypass rule with predicted next accesses), "admit all" and
  "learned bypass" are weighed by their own regret (``admission_experts``,
  the default: a bypassed object that comes back soon costs the bypass; an
  admitted one evicted unused costs the admission); with
  ``admission_experts=False`` the bypass follows the ranking's expert.
* **Placement / write-back caching**: new objects fill free fast-tier space;
  the placement agent keeps room for the new objects' writes expected in the
  next two batches (measured rate), evicting only victims worth less than
  absorbing a write -- which gains nothing when the backing device is
  saturated (its measured load), as the write-back is deferred, not avoided.
* **Fill bursts**: the fills one decision makes reach the fast device together,
  so a batch is kept to at most one backing-tier access latency of fills (32
  accesses of small blocks, 1 of 64 MiB ones: a decision per access, whose cost
  is then small beside the access's own ~25 ms). ``adapt_batch=False`` keeps
  the batch whole and caps the fills per decision instead: ~10x cheaper per
  access on Mooncake, but it promotes too little there (measured: mean latency
  26,964 us vs 25,834 us adaptive, ARC 25,753 us; bench/rl_agents.py).
* **Learning** needs no outcomes: the labels come from the access stream, and
  training runs inside ``decide`` every ``train_every`` accesses (so
  ``learns`` is False: a live governor, which reports no outcomes, can run
  the agents; ``training`` says whether they learn). ``locate``/``forget``
  follow a live store's placements and deletions.
* **Cost**: per-batch bookkeeping is vectorised (:meth:`.ObjectTable.record_batch`,
  :mod:`.labels`); ``cost_report()["split_us_per_access"]`` says where the
  time goes (this thread's CPU time).

Until an agent has trained ``warmup_steps`` steps its values are a recency
prior (LRU order).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import numpy as np

from ..base import MigrationPolicy, Move, Observation, PlacementPolicy, TierModel
from .features import _KIND_INDEX, FEATURE_NAMES, N_FEATURES, ObjectTable
from .labels import PendingLabels
from .predictor import HORIZONS, HindsightPredictor, PredictorConfig
from .qnet import load_safetensors_json, save_safetensors_json

FORMAT = "tiered-rl-agents"
FORMAT_VERSION = 2
PLACEMENT, MIGRATION = 0, 1
LEARNED, LRU, LFU, LRU2 = 0, 1, 2, 3  # eviction experts
N_EXPERTS = 4
AGENT_NAMES = ("placement", "migration")
_H = np.asarray(HORIZONS)
#: the decision-cost clock: this thread's CPU time, so the cost split measures the agents'
#: own work even on a machine shared with other jobs (wall time also counts waiting for a core)
_cpu = time.thread_time
K = len(HORIZONS)


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


_BLOB = _KIND_INDEX["blob"]  # unknown kinds count as blobs (features.kind_index)
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


class HarmoniaAgents(MigrationPolicy, PlacementPolicy):
    """Placement + migration agents behind the :class:`MigrationPolicy` interface."""

    name = "rl"
    #: the agents learn from the access stream itself (hindsight labels), never from the
    #: outcomes the simulator reports: ``observe`` is not needed, so a live governor, which
    #: reports none, can run them; ``training`` says whether they learn
    learns = False

    def __init__(self, options: AgentOptions | None = None, **kw) -> None:
        if options is not None and kw:
            raise TypeError("pass either options= or keyword options, not both")
        self.opt = options if options is not None else AgentOptions.from_dict(kw)
        self.batch = self.opt.batch
        self.training = self.opt.learn
        self.agents = [
            HindsightPredictor(PredictorConfig(
                n_features=N_FEATURES, hidden=self.opt.hidden, lr=self.opt.lr, batch=self.opt.train_batch,
                replay=self.opt.replay, seed=self.opt.seed + 17 * a))
            for a in (PLACEMENT, MIGRATION)
        ]
        self.ready = [False, False]
        self.stats = {"decide_calls": 0, "decisions": 0, "decide_s": 0.0, "train_steps": 0,
                      "train_s": 0.0, "events": 0, "promotions": 0, "bypasses": 0,
                      "evictions": 0, "labels": 0, "reserve_evictions": 0, "refreshes": 0,
                      # where decide() spends its time (seconds): bookkeeping, features, labels, network
                      "record_s": 0.0, "features_s": 0.0, "labels_s": 0.0, "network_s": 0.0}
        self.reset((TierModel("fast", 1 << 30), TierModel("backing", math.inf)))

    # -- episode state --------------------------------------------------------------
    def reset(self, tiers: Sequence[TierModel]) -> None:
        """Empty tiers; the networks (learned or loaded) are kept."""
        super().reset(tiers)
        self.batch = self.opt.batch
        if len(self.tiers) < 2:
            raise ValueError(f"need at least two tiers, got {len(self.tiers)}")
        self.tiers = _with_speeds(self.tiers)
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
        self.used = [0.0] * len(self.tiers)  # bytes per tier, as this policy placed/saw them
        self.nres = [0] * len(self.tiers)  # objects per tier
        self._fast_ids = np.zeros(0, np.int64)  # a snapshot of the fast tier's ids (sampling)
        self._fast_age = 0  # samples drawn from the snapshot
        self.clock = 0.0
        self.mean_size = 0.0
        self.episode_events = 0  # mean_size is this episode's (stats["events"] counts every episode)
        self.since_train = 0
        self.pending = PendingLabels(self.opt.pending, N_FEATURES)
        self.burst = self.opt.batch  # promotions per decision at most (adapt_batch=False)
        self.since_expire = 0
        # device seconds per byte, per tier and op (read, write)
        self._spb = np.asarray([[1.0 / t.read_bw, 1.0 / t.write_bw] for t in self.tiers], np.float64)
        self.feat_s = 0.0  # this decision's time in features / network calls beyond decide's own
        self.net_s = 0.0
        self.w = np.ones(N_EXPERTS) / N_EXPERTS  # eviction expert weights
        self.aw = np.ones(2) * 0.5  # admission expert weights: admit all, learned bypass
        self.bhist: dict[int, float] = {}  # bypassed against "admit all": id -> byte clock
        self.ahist: dict[int, float] = {}  # admitted against "learned bypass": id -> byte clock
        self.hist: dict[int, tuple[int, float]] = {}  # evicted id -> (expert, byte clock)
        self.vq_ids: list[int] = []  # the victim queue (see _refresh), evict-first order
        self.vq_val = np.zeros(0)
        self.vq_valued = False
        self.vq_size: list[float] = []
        self.vq_feats = self.vq_blame = None
        self.vq_expert, self.vq_pos, self.vq_end, self.vq_clock = LEARNED, 0, 0, 0.0
        self._refreshes = 0
        self._taken: list[tuple] = []
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
        fill = self.used[0] / self.cap[0] if self.cap[0] else 1.0
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
                t0 = _cpu()
                q[sel], rank[sel] = self.agents[a].value_and_rank(feats[sel])
                self.net_s += _cpu() - t0
            else:  # cold agent: recency prior (LRU order) until it has trained a little
                age = (self.clock - self.table.last[ids[sel]]) / self.unit
                q[sel] = (age[:, None] < _H[None, :]).mean(axis=1) * (1.0 - 1e-3 * age / (1.0 + age))
                rank[sel] = -np.log1p(age)
        return q, rank

    # -- what the caller knows better -------------------------------------------------
    def locate(self, key, tier: int, nbytes: int) -> None:
        """``key`` is on ``tier`` (a live store's objects at start, or after a refused move):
        follow it without counting an access."""
        if not 0 <= int(tier) < len(self.tiers):
            raise ValueError(f"policy 'rl': locate({key!r}): tier {tier!r} is not one of 0..{len(self.tiers) - 1}")
        (i,), _ = self.table.ids_for((key,))
        self._ensure(i + 1)
        was, old = int(self.loc[i]), float(self.table.nbytes[i])
        if was >= 0:
            self.used[was] -= old
            self.nres[was] -= 1
        self.table.nbytes[i] = nbytes
        self.used[int(tier)] += nbytes
        self.nres[int(tier)] += 1
        self.loc[i] = int(tier)
        if int(tier) == self.back:
            self.dirty[i] = False

    def forget(self, key) -> None:
        """``key`` was deleted: its room is free, its history and pending labels dropped."""
        i = self.table.id_of(key)
        if i is None:
            return
        was = int(self.loc[i])
        if was >= 0:
            self.used[was] -= float(self.table.nbytes[i])
            self.nres[was] -= 1
        self.loc[i] = -1
        self.dirty[i] = False
        for h in (self.hist, self.bhist, self.ahist):
            h.pop(i, None)
        self.pending.drop(i)
        self.table.forget(key)

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
        t0 = _cpu()
        ids, clocks, first_pos = self._record(batch)
        t1 = _cpu()
        uids = ids[first_pos]
        feats = self._features(uids)
        t2 = _cpu()
        if self.training:
            self._labels(uids, clocks[first_pos])
        t3 = _cpu()
        self.net_s = 0.0
        moves = self._promote(uids, feats)
        if self.training:
            self._sample(uids, feats)
        self._adapt(batch[-1].time)
        t4 = _cpu()
        if self.training:
            self._train(len(batch))
        st = self.stats
        st["decide_calls"] += 1
        st["decisions"] += len(batch)
        st["decide_s"] += t4 - t0
        st["record_s"] += t1 - t0
        st["features_s"] += t2 - t1 + self.feat_s
        st["labels_s"] += t3 - t2
        st["network_s"] += self.net_s
        self.feat_s = 0.0
        return moves

    def _record(self, batch: Sequence[Observation]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Account the batch's accesses (vectorised); returns (ids per access, byte clock per
        access, positions of each id's first access in the batch, in stream order)."""
        cols = tuple(zip(*batch))  # one C-level pass: the Observation fields as columns
        n = len(batch)
        keys = cols[0]
        idl, _ = self.table.ids_for(keys)
        ids = np.asarray(idl, np.int64)
        nb = np.asarray(cols[1], np.float64)
        write = np.asarray([o == "write" for o in cols[3]], bool)
        ti = np.asarray(cols[10], np.int64)
        t = np.where(ti >= 0, ti, self.back)
        clocks = self.clock + np.cumsum(nb) - nb
        ki = _KIND_INDEX
        kinds = np.asarray([ki.get(k, _BLOB) for k in cols[2]], np.int16)
        old_nb = self.table.nbytes[ids]
        new = self.table.record_batch(ids, nb, kinds, write, clocks, self.unit)
        self.clock = float(clocks[-1] + nb[-1])
        self._ensure(len(self.table))
        # regret: objects evicted or bypassed by an expert that came back
        touched = set(idl)
        for i in touched & self.hist.keys():
            self._regret(i)
        for i in touched & self.bhist.keys():  # a bypassed object came back: "learned bypass" pays
            self._admission_regret(1, self.bhist.pop(i))
        for i in touched & self.ahist.keys():  # an admitted object was used: that admission paid off
            del self.ahist[i]
        # device work seen (per tier), new objects' writes, the episode's mean object size
        self.busy += np.bincount(t, weights=nb * self._spb[t, write.view(np.int8)], minlength=len(self.tiers))
        self.new_write_bytes += 0.1 * (float(nb[new & write].sum()) - self.new_write_bytes)
        self.episode_events += n
        self.mean_size += (float(nb.sum()) - n * self.mean_size) / self.episode_events
        self.stats["events"] += n
        # follow the caller's truth about where each object is (and how big it is there)
        here = self.loc[ids]
        resized = (here == t) & (old_nb != nb) & ~new
        for j in np.flatnonzero(resized).tolist():
            self.used[int(t[j])] += nb[j] - old_nb[j]
        for j in np.flatnonzero(here != t).tolist():
            i, tj = idl[j], int(t[j])
            was = int(self.loc[i])
            if was != tj:
                if was >= 0:
                    self.used[was] -= old_nb[j]
                    self.nres[was] -= 1
                self.used[tj] += nb[j]
                self.nres[tj] += 1
                self.loc[i] = tj
        if write.any():
            self.dirty[ids[write]] = t[write] != self.back
        if n == 1:
            return ids, clocks, np.zeros(1, np.int64)
        _, first = np.unique(ids, return_index=True)
        first.sort()
        return ids, clocks, first

    def _labels(self, uids: np.ndarray, clocks: np.ndarray) -> None:
        """Label the pending states of the accessed objects, and (every few batches) the
        horizons that expired; hand the rows to the agents in one add each."""
        parts = [self.pending.resolve(uids, clocks, self.unit)]
        self.since_expire += 1
        if self.since_expire >= 4:
            self.since_expire = 0
            parts.append(self.pending.expire(self.clock, self.unit))
        parts = [x for x in parts if x is not None]
        if not parts:
            return
        if len(parts) == 1:
            slots, y, m = parts[0]
        else:
            slots, y, m = (np.concatenate(z) for z in zip(*parts))
        self._emit(slots, y, m)

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

    def _promote(self, ids: np.ndarray, feats: np.ndarray) -> list[Move]:
        """Promotions of the batch's off-fast objects worth their fill and their victims, then
        evictions that keep room for new objects' writes."""
        off = self.loc[ids] != 0
        cand = ids[off]
        reserve = self._reserve()
        free = self.cap[0] - self.used[0]
        if len(cand) == 0 and free >= reserve:
            return []
        self._refreshes = 0
        self._taken: list[tuple] = []  # (id, features) of the victims evicted this decision
        inbatch = set(ids.tolist())
        moves: list[Move] = []
        if len(cand):
            q, _ = self._values(cand, feats[off])
            csize = self.table.nbytes[cand]
            gains = q * self._benefit(csize) - self._promote_cost(csize)
            order = np.argsort(-(gains / np.maximum(csize, 1.0)), kind="stable")
            cap0 = self.cap[0]
            budget = len(cand) if self.opt.adapt_batch else self.burst
            for i, sz, gain in zip(cand[order].tolist(), csize[order].tolist(), gains[order].tolist()):
                if budget <= 0:
                    self.stats["bypasses"] += 1
                    continue
                if sz > cap0 or gain <= 0.0:
                    self.stats["bypasses"] += 1
                    continue
                found = self._victims_for(sz - free, inbatch)
                if found is None:
                    self.stats["bypasses"] += 1
                    continue
                victims, lost = found
                if gain <= lost and self._bypass(i):
                    continue
                free += self._take(victims, moves)
                self.hist.pop(i, None)
                moves.append(Move(self.table.keys[i], 0))
                self._move(i, 0)
                self.busy[0] += sz / self.tiers[0].write_bw
                free -= sz
                budget -= 1
                self.stats["promotions"] += 1
                self.stats["evictions"] += len(victims)
        if free < reserve:
            # room for the new objects' writes expected next (write-back caching), paid with
            # victims worth less than absorbing a write
            wgain = self._write_gain(self.mean_size)
            while free < reserve:
                found = self._victims_for(1.0, inbatch)
                if found is None or found[1] >= wgain:
                    break
                free += self._take(found[0], moves)
                self.stats["reserve_evictions"] += 1
        self._flush_taken()
        return moves

    def _flush_taken(self) -> None:
        """The victims' states are the decision boundary: always learned from (one add)."""
        if self._taken and self.training:
            ids = np.fromiter((v for v, _ in self._taken), np.int64, len(self._taken))
            self._add_pending(ids, np.stack([f for _, f in self._taken]))
        self._taken = []

    def _bypass(self, i: int) -> bool:
        """The candidate does not beat its victims by the learned values (Belady's bypass rule):
        whether "learned bypass" (True) or "admit all" makes this decision."""
        if self.opt.admission_experts:  # follow one by their own regret weights (LeCaR-style)
            if self.rng.random() < self.aw[1] / self.aw.sum():
                self._remember(self.bhist, i)
                self.stats["bypasses"] += 1
                return True
            self._remember(self.ahist, i)
            return False
        e = self.vq_expert
        if e == LEARNED or (e < 0 and self.rng.random() < self.w[LEARNED]):
            self.stats["bypasses"] += 1  # the learned expert bypasses; heuristics admit all
            return True
        return False

    # -- the victim queue: residents ranked once, consumed over several decisions ----------
    def _victims_for(self, need: float, inbatch: set) -> tuple[list[tuple], float] | None:
        """The next victims freeing ``need`` bytes (none when ``need`` <= 0) as (id, value,
        size, expert or blame, features or None), and their summed value; None when the fast
        tier cannot make room. Skips queue entries no longer valid (gone from the fast tier,
        accessed since ranked, or in this batch); ranks a fresh sample when the queue runs out
        (at most ``max_refreshes`` times a decision)."""
        got: list[tuple] = []
        lost = 0.0
        taken = set()
        loc, last = self.loc, self.table.last
        if need > 0 and self.clock - self.vq_clock > self.opt.queue_age * self.unit and self._refreshes == 0:
            self._refresh(inbatch)  # the ranking's values age: a queue ranked long ago is redone
        while need > 0:
            ids, k, since = self.vq_ids, self.vq_pos, self.vq_clock
            while k < self.vq_end and not (loc[ids[k]] == 0 and last[ids[k]] <= since):
                k += 1
            self.vq_pos = k  # leading entries already gone: skipped for good
            while need > 0 and k < self.vq_end:
                v = ids[k]
                if loc[v] == 0 and last[v] <= since and v not in inbatch and v not in taken:
                    taken.add(v)
                    got.append((v, float(self.vq_val[k]), self.vq_size[k],
                                self.vq_expert if self.vq_blame is None else self.vq_blame[:, k],
                                None if self.vq_feats is None else self.vq_feats[k]))
                    lost += float(self.vq_val[k])
                    need -= self.vq_size[k]
                k += 1
            if need > 0 and (self._refreshes >= self.opt.max_refreshes or not self._refresh(inbatch | taken)):
                return None
        return got, lost

    def _take(self, victims: list[tuple], moves: list[Move]) -> float:
        """Evict ``victims`` (from :meth:`_victims_for`); the bytes freed."""
        freed = 0.0
        for v, _val, size, expert, feats in victims:
            moves.append(self._evict(v, expert))
            freed += size
            if feats is not None:
                self._taken.append((v, feats))
        return freed

    def _refresh(self, inbatch: set) -> bool:
        """Rank a fresh sample of ``candidates`` fast-tier residents by one expert's order (the
        learned one: one feature pass and one network call per agent); its first
        ``1 / victim_share`` become the victim queue, consumed over the next decisions."""
        self._refreshes += 1
        self.stats["refreshes"] += 1
        pool = self._sample_fast(self.opt.candidates)
        if inbatch and len(pool):
            pool = np.asarray([v for v in pool.tolist() if v not in inbatch], np.int64)
        if len(pool) == 0:
            return False
        e = self._pick_expert() if self.opt.experts and not self.opt.blend else (-1 if self.opt.experts else LEARNED)
        size = self.table.nbytes[pool]
        psize = np.maximum(size, 1.0)
        # the learned values are needed to rank (learned expert), to bypass (its decisions, or
        # admission experts), and to keep the write reserve (victims worth less than a write)
        valued = e <= LEARNED or self.opt.admission_experts or self.opt.writeback_cost or self._reserve() > 0
        pf = None
        if valued:
            pf = self._timed_features(pool)
            q, rank = self._values(pool, pf)
            val = q * self._benefit(size)  # seconds of latency saved, expected
            if self.opt.writeback_cost:
                val += np.where(self.dirty[pool], self._writeback_cost(size), 0.0)
        else:
            val = np.zeros(len(pool))
        blame = None
        if e < 0:  # blend: the experts' rankings blended by their weights (0 = evict first)
            m = max(len(pool) - 1, 1)
            r = np.stack([np.argsort(np.argsort(self._expert_key(x, pool, psize, val, rank), kind="stable"),
                                     kind="stable") / m for x in range(N_EXPERTS)])
            order = np.argsort(self.w @ r, kind="stable")
        else:
            order = np.argsort(self._expert_key(e, pool, psize, val, rank if valued else None), kind="stable")
        order = order[: max(1, len(order) // self.opt.victim_share)]
        if e < 0:
            blame = (1.0 - r)[:, order]  # per expert and victim: how much it wanted the object out
        self.vq_ids = pool[order].tolist()
        self.vq_val = val[order]
        self.vq_valued = valued
        self.vq_size = size[order].tolist()
        self.vq_feats = None
        if self.training:
            self.vq_feats = pf[order] if pf is not None else self._timed_features(pool[order])
            if self.opt.idle_samples:
                # idle residents' states are what eviction compares: learn about a few of them
                # too (the victims taken are always sampled, in _take)
                chosen = np.zeros(len(pool), bool)
                chosen[order] = True
                rest = np.flatnonzero(~chosen)
                pick = rest[self.rng.random(len(rest)) < self.opt.idle_samples / max(len(rest), 1)]
                pick = pick[self.rng.random(len(pick)) < self._sample_prob()]
                if len(pick):
                    self._add_pending(pool[pick], pf[pick] if pf is not None else self._timed_features(pool[pick]))
        self.vq_blame = blame
        self.vq_expert = e
        self.vq_pos, self.vq_end = 0, len(self.vq_ids)
        self.vq_clock = self.clock
        return True

    def _expert_key(self, e: int, pool: np.ndarray, psize: np.ndarray, val: np.ndarray, rank) -> np.ndarray:
        """Expert ``e``'s eviction key over ``pool``: lowest first out."""
        if e == LEARNED:  # farthest predicted next access (lowest value) per byte first
            return rank - np.log(psize) if self.opt.rank_logit else val / psize
        if e == LRU:  # least recently used first
            return self.table.last[pool]
        if e == LFU:  # fewest accesses per byte, decayed (4 capacities half-life)
            return self.table.decayed_freq(pool, self.clock, self.unit, 3) / psize
        # LRU-2 (O'Neil et al.): oldest second-to-last access first, one-timers before all
        return np.where(self.table.ngaps[pool] > 0, self.table.last[pool] - self.table.gaps[pool, 0], -1.0)

    def _timed_features(self, ids: np.ndarray) -> np.ndarray:
        t0 = _cpu()
        f = self._features(ids)
        self.feat_s += _cpu() - t0
        return f

    # -- experts (LeCaR-style regret weighting) ---------------------------------------
    def _pick_expert(self) -> int:
        if not self.opt.experts:
            return LEARNED
        w = self.w.tolist()  # (rng.choice with p= costs ~10x this for four experts)
        r = self.rng.random() * sum(w)
        for e, x in enumerate(w):
            r -= x
            if r < 0.0:
                return e
        return len(w) - 1

    def _remember(self, h: dict, i: int) -> None:
        h.pop(i, None)
        h[i] = self.clock
        limit = max(64, self.nres[0])
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
            limit = max(64, self.nres[0])
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
        nb = float(self.table.nbytes[i])
        if src >= 0:
            self.used[src] -= nb
            self.nres[src] -= 1
        self.used[dst] += nb
        self.nres[dst] += 1
        self.loc[i] = dst
        if dst == self.back:
            self.dirty[i] = False

    def _sample_fast(self, n: int) -> np.ndarray:
        """Up to ``n`` distinct fast-tier residents at random, drawn from a snapshot of the
        tier's ids (rebuilt every 8 draws, or when a third of a draw has left the tier), so
        drawing costs O(n), not a pass over every object."""
        for attempt in (0, 1):
            ids = self._fast_ids
            if attempt or self._fast_age >= 8 or len(ids) == 0:
                ids = self._fast_ids = np.flatnonzero(self.loc[: len(self.table)] == 0)
                self._fast_age = 0
            if len(ids) == 0:
                return ids
            self._fast_age += 1
            pick = ids if len(ids) <= n else np.unique(ids[self.rng.integers(0, len(ids), size=n)])
            pick = pick[self.loc[pick] == 0]
            if attempt or 3 * len(pick) >= 2 * min(n, len(ids)):
                return pick
        return pick

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
        self.pending.add(ids, feats, self._route(ids), self.clock)

    def _emit(self, slots: np.ndarray, y: np.ndarray, m: np.ndarray) -> None:
        agent = self.pending.agent[slots]
        for a in (PLACEMENT, MIGRATION):
            sel = agent == a
            if sel.any():
                self.agents[a].add(self.pending.s[slots[sel]], y[sel], m[sel])
        self.stats["labels"] += len(slots)

    def _train(self, n: int) -> None:
        """Train each agent every ``train_every`` accesses (on labels the decisions produced)."""
        t0 = _cpu()
        self.since_train += n
        while self.since_train >= self.opt.train_every:
            self.since_train -= self.opt.train_every
            for a, ag in enumerate(self.agents):
                if ag.replay.size >= ag.cfg.batch:
                    ag.train_step()
                    self.stats["train_steps"] += 1
                    if ag.steps >= self.opt.warmup_steps:
                        self.ready[a] = True
        self.stats["train_s"] += _cpu() - t0

    # -- reporting and persistence ----------------------------------------------------
    def cost_report(self) -> dict:
        s = self.stats
        return {
            "us_per_decision": 1e6 * s["decide_s"] / max(1, s["decisions"]),
            "us_per_decide_call": 1e6 * s["decide_s"] / max(1, s["decide_calls"]),
            "train_us_per_event": 1e6 * s["train_s"] / max(1, s["events"]),
            # per access, where decide() spends its time: bookkeeping (history, residents,
            # regret, device load), feature rows, hindsight labels, network calls, and the
            # decision logic itself (eviction ranking, admission)
            "split_us_per_access": {
                "bookkeeping": 1e6 * s["record_s"] / max(1, s["events"]),
                "features": 1e6 * s["features_s"] / max(1, s["events"]),
                "labels": 1e6 * s["labels_s"] / max(1, s["events"]),
                "network": 1e6 * s["network_s"] / max(1, s["events"]),
                "decision": 1e6 * (s["decide_s"] - s["record_s"] - s["features_s"] - s["labels_s"]
                                   - s["network_s"]) / max(1, s["events"]),
                "training": 1e6 * s["train_s"] / max(1, s["events"]),
            },
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
