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

This module holds the episode state and the decision step; the class takes its other parts
from mixins, one job each: :mod:`.learning` (features, values, labels, training),
:mod:`.victims` (the victim queue), :mod:`.experts` (regret-weighted eviction and admission
experts), :mod:`.costs` (costs from the tier models and the devices' load) and
:mod:`.persistence` (save/load); :mod:`.options` holds :class:`AgentOptions`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..base import MigrationPolicy, Move, Observation, PlacementPolicy, TierModel
from .costs import TYPICAL_BACKING, TYPICAL_CACHE, DeviceCosts, _with_speeds
from .experts import LEARNED, LFU, LRU, LRU2, N_EXPERTS, Experts
from .features import _KIND_INDEX, N_FEATURES, ObjectTable
from .labels import PendingLabels
from .learning import K, MIGRATION, PLACEMENT, Learning, _cpu
from .options import AgentOptions
from .persistence import AGENT_NAMES, FORMAT, FORMAT_VERSION, Persistence
from .predictor import HindsightPredictor, PredictorConfig
from .victims import VictimQueue

_BLOB = _KIND_INDEX["blob"]  # unknown kinds count as blobs (features.kind_index)

__all__ = ["AGENT_NAMES", "FORMAT", "FORMAT_VERSION", "K", "LEARNED", "LFU", "LRU", "LRU2", "MIGRATION",
           "N_EXPERTS", "PLACEMENT", "TYPICAL_BACKING", "TYPICAL_CACHE", "AgentOptions", "HarmoniaAgents"]


class HarmoniaAgents(Learning, VictimQueue, Experts, DeviceCosts, Persistence, MigrationPolicy, PlacementPolicy):
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
        self._follow(ids, idl, t, nb, old_nb, new, write)
        if n == 1:
            return ids, clocks, np.zeros(1, np.int64)
        _, first = np.unique(ids, return_index=True)
        first.sort()
        return ids, clocks, first

    def _follow(self, ids: np.ndarray, idl: list, t: np.ndarray, nb: np.ndarray, old_nb: np.ndarray,
                new: np.ndarray, write: np.ndarray) -> None:
        """Follow the caller's truth about where each accessed object is (tier ``t``), how big it
        is there (``nb``; ``old_nb`` before the batch) and whether a write left it dirty."""
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
            self._keep_reserve(free, reserve, inbatch, moves)
        self._flush_taken()
        return moves

    def _keep_reserve(self, free: float, reserve: float, inbatch: set, moves: list[Move]) -> None:
        """Room for the new objects' writes expected next (write-back caching), paid with
        victims worth less than absorbing a write."""
        wgain = self._write_gain(self.mean_size)
        while free < reserve:
            found = self._victims_for(1.0, inbatch)
            if found is None or found[1] >= wgain:
                break
            free += self._take(found[0], moves)
            self.stats["reserve_evictions"] += 1

    # -- reporting --------------------------------------------------------------------
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
