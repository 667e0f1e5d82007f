"""The RL placement/migration agents (policies.rl) and the gymnasium env (policies.gym_env)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tiered.policies import create_policy  # noqa: E402
from tiered.policies.base import Observation, TierModel  # noqa: E402
from tiered.policies.rl import HarmoniaAgents, make_policy  # noqa: E402
from tiered.policies.rl.features import FEATURE_NAMES, N_FEATURES  # noqa: E402
from tiered.policies.sim import prepare, simulate  # noqa: E402


def make_trace(keys, sizes=None, ops=None):
    keys = np.asarray(keys, np.int64)
    n = len(keys)
    sizes = np.full(n, 4096) if sizes is None else np.asarray(sizes)
    ops = np.zeros(n, np.uint8) if ops is None else np.asarray(ops, np.uint8)
    return prepare(np.arange(n, dtype=np.float64), keys, sizes, ops, np.full(n, 5, np.uint8))


def tiers(cap):
    return (TierModel("fast", cap, 1e-6, 1e10, 1e10), TierModel("slow", math.inf, 80e-6, 3e9, 2e9))


def scan_plus_hot(n=24_000, hot=100, seed=0):
    """Half the accesses go to a hot set of ``hot`` objects, half to a scan of new ones."""
    rng = np.random.default_rng(seed)
    is_hot = rng.random(n) < 0.5
    keys = np.where(is_hot, rng.integers(0, hot, n), hot + np.cumsum(~is_hot))
    return make_trace(keys)


def test_registry_factory_and_options():
    pol = create_policy("rl", candidates=8, seed=3)
    assert isinstance(pol, HarmoniaAgents) and pol.opt.candidates == 8 and pol.training
    # learning needs no outcomes (hindsight labels come from the access stream): a live
    # governor, which reports none, may run the agents
    assert not pol.learns
    with pytest.raises(ValueError, match="unknown RL option.*'bogus'"):
        make_policy(bogus=1)
    with pytest.raises(ValueError, match="'migration_penalty' must be a finite number"):
        make_policy(migration_penalty="x")
    with pytest.raises(ValueError, match="'batch' must be a positive integer"):
        make_policy(batch=0)


def test_decisions_respect_capacity_in_simulator():
    """Variable sizes, writes, a tiny fast tier: the simulator refuses any overfilling move."""
    rng = np.random.default_rng(1)
    n = 4000
    keys = rng.zipf(1.2, n) % 400
    sizes = (rng.integers(1, 16, 400) * 512)[keys]
    ops = (rng.random(n) < 0.3).astype(np.uint8)
    cap = 40_000
    pol = make_policy(warmup_steps=5, train_every=8, train_batch=64)
    r = simulate(make_trace(keys, sizes, ops), tiers(cap), pol)  # PolicyError on any bad move
    assert r.peak_used[0] <= cap
    assert r.served.max() <= 1 and (r.served == 0).any()
    c = pol.cost_report()
    assert c["train_steps"] > 0 and c["us_per_decision"] > 0 and c["train_us_per_event"] > 0


def test_learns_scan_resistance_beats_lru():
    """Hot set + scan: LRU is flushed by the scan; the agents, learning online from cold
    with a fixed seed, learn to bypass scan objects and keep the hot set."""
    tr = scan_plus_hot()
    t = tiers(60 * 4096)
    lru = simulate(tr, t, create_policy("lru"))
    rl = simulate(tr, t, make_policy(seed=0))
    start = tr.n // 2  # after learning
    lru_hit = lru.summary(start)["hit_ratio"]["fast"]
    rl_hit = rl.summary(start)["hit_ratio"]["fast"]
    assert rl_hit > lru_hit + 0.05, (rl_hit, lru_hit)
    assert rl.summary(start)["mean_latency_us"] < lru.summary(start)["mean_latency_us"]


def test_save_load_round_trip_identical_decisions(tmp_path):
    tr = scan_plus_hot(n=6000)
    t = tiers(60 * 4096)
    pol = make_policy(warmup_steps=10)
    simulate(tr, t, pol)
    pol.save(tmp_path / "agents")
    meta = json.loads((tmp_path / "agents.json").read_text())
    assert meta["format"] == "tiered-rl-agents" and meta["features"] == list(FEATURE_NAMES)
    assert (tmp_path / "agents.safetensors").stat().st_size > 0
    loaded = HarmoniaAgents.load(tmp_path / "agents", learn=False)
    assert [ag.steps for ag in loaded.agents] == [ag.steps for ag in pol.agents] and pol.agents[1].steps > 0
    pol.save(tmp_path / "agents.v2")  # a dot in the name stays part of it
    assert (tmp_path / "agents.v2.json").exists() and (tmp_path / "agents.v2.safetensors").exists()
    x = np.random.default_rng(0).random((64, N_FEATURES), dtype=np.float32)
    for a in range(2):
        assert np.array_equal(pol.agents[a].value(x), loaded.agents[a].value(x))
    assert loaded.ready == pol.ready
    # the same frozen agents twice, and the trained original frozen: identical decisions
    pol.training = False
    runs = [simulate(tr, t, p) for p in (pol, loaded, HarmoniaAgents.load(tmp_path / "agents", learn=False))]
    for r in runs[1:]:
        assert np.array_equal(r.served, runs[0].served)
        assert r.bytes_migrated == runs[0].bytes_migrated


def test_load_rejects_bad_files(tmp_path):
    pol = make_policy()
    pol.save(tmp_path / "a")
    meta = json.loads((tmp_path / "a.json").read_text())
    (tmp_path / "a.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(ValueError, match=r"a\.json: format is 'other'"):
        HarmoniaAgents.load(tmp_path / "a")
    (tmp_path / "a.json").write_text(json.dumps({**meta, "features": ["x"]}))
    with pytest.raises(ValueError, match="features"):
        HarmoniaAgents.load(tmp_path / "a")
    (tmp_path / "a.json").write_text(json.dumps({**meta, "options": {**meta["options"], "hidden": 32}}))
    with pytest.raises(ValueError, match="shape"):
        HarmoniaAgents.load(tmp_path / "a")
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"a\.json: not valid JSON"):
        HarmoniaAgents.load(tmp_path / "a")


def test_batched_decisions_one_network_call_per_agent(monkeypatch):
    """One network call per agent per decide() for the batch's candidates, and one for a ranking of
    sampled residents: never one per access."""
    pol = make_policy(batch=16, warmup_steps=1, experts=False, victim_share=1)
    pol.reset(tiers(8 * 4096))
    pol.ready = [True, True]
    calls = []
    for ag in pol.agents:
        orig = ag.net.forward

        def fwd(x, orig=orig):
            calls.append(x.shape[0])
            return orig(x)
        monkeypatch.setattr(ag.net, "forward", fwd)
    # fill the fast tier, then a batch of 16 misses
    for k in range(8):
        pol.decide([Observation(k, 4096, tier="fast", tier_index=0, count=1)])
    calls.clear()
    batch = [Observation(100 + j, 4096, tier="slow", tier_index=1) for j in range(16)]
    pol.decide(batch)
    assert calls == [16, 8], calls  # the batch's candidates, then one ranking of the residents


def test_network_never_multithreads_blas(monkeypatch):
    """Every product stays below OpenBLAS's one-thread size: on a loaded machine its thread pool
    made a training step ~100x slower (measured)."""
    from tiered.policies.rl import predictor as P

    ag = P.HindsightPredictor(P.PredictorConfig(n_features=N_FEATURES, batch=256))
    seen = []
    real = P.HeadsMLP._forward_backward

    def fb(self, x, y, m, msum):
        seen.append(len(x) * max(w.shape[0] * w.shape[1] for w in self.weights))
        return real(self, x, y, m, msum)
    monkeypatch.setattr(P.HeadsMLP, "_forward_backward", fb)
    x = np.random.default_rng(0).random((300, N_FEATURES), dtype=np.float32)
    y = np.ones((300, 8), np.float32)
    ag.add(x, y, y)
    ag.train_step()
    assert len(seen) == 4 and max(seen) <= P.GEMM_ONE_THREAD


def test_numpy_gradients_match_torch():
    """The hand-written backward pass (chunked) equals autograd's."""
    from tiered.policies.rl.predictor import HeadsMLP, PredictorConfig

    net = HeadsMLP(PredictorConfig(n_features=7, hidden=64), np.random.default_rng(0))
    rng = np.random.default_rng(1)
    x = rng.random((150, 7), dtype=np.float32)  # more rows than one chunk
    y = (rng.random((150, 8)) < 0.5).astype(np.float32)
    m = (rng.random((150, 8)) < 0.7).astype(np.float32)
    assert net.chunk < 150
    loss, grads = net.forward_backward(x, y, m)
    tp = [torch.tensor(p, requires_grad=True) for p in net.params()]
    h = torch.relu(torch.from_numpy(x) @ tp[0] + tp[1])
    h = torch.relu(h @ tp[2] + tp[3])
    z = h @ tp[4] + tp[5]
    mt = torch.from_numpy(m)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(z, torch.from_numpy(y), weight=mt,
                                                               reduction="sum") / mt.sum()
    ref.backward()
    assert abs(loss - float(ref.detach())) < 1e-5
    for g, t in zip(grads, tp):
        np.testing.assert_allclose(g, t.grad.numpy(), atol=2e-6)
    np.testing.assert_allclose(net.forward(x), z.detach().numpy(), atol=1e-5)


def test_gym_env_check_env_and_semantics():
    gym = pytest.importorskip("gymnasium")
    from gymnasium.utils.env_checker import check_env

    from tiered.policies.gym_env import TieredCacheEnv

    rng = np.random.default_rng(0)
    keys = rng.zipf(1.3, 3000) % 300
    env = TieredCacheEnv(keys, np.full(3000, 4096), fast_fraction=0.1, candidates=4)
    check_env(env, skip_render_check=True)
    assert isinstance(env.action_space, gym.spaces.Discrete) and env.action_space.n == 5

    def episode(policy):
        obs, _ = env.reset(seed=1)
        total, done, steps = 0.0, False, 0
        while not done:
            assert env.observation_space.contains(obs)
            obs, r, done, trunc, info = env.step(policy(obs))
            assert r <= 0 and not trunc and info["fill"] <= 1.0
            total += r
            steps += 1
        return total, steps

    always, steps = episode(lambda o: 1)
    never, n_miss = episode(lambda o: 0)
    assert n_miss == 3000  # bypassing everything: every access is a miss, one step each
    assert always > never  # caching pays on a skewed trace
    with pytest.raises(ValueError, match="size"):
        TieredCacheEnv(keys, np.full(5, 4096))


def test_hindsight_labels_each_horizon_once_and_correct():
    """Every sampled (state, horizon) pair is labelled exactly once: 1 if the object came back
    within the horizon, 0 when the horizon passed without it (no guessing, no double counting)."""
    from tiered.policies.rl.predictor import HORIZONS

    cap = 64 * 4096
    pol = make_policy(batch=1, warmup_steps=10_000, pending=4096)
    pol.reset(tiers(cap))
    got = []
    for ag in pol.agents:
        orig = ag.add

        def add(s, y, m, orig=orig):
            got.append((y.copy(), m.copy()))
            orig(s, y, m)
        ag.add = add
    # key 0 every 32 accesses (a gap of half a capacity), the rest never again
    n, nxt = 3000, 10**6
    for t in range(n):
        k = 0 if t % 32 == 0 else nxt + t
        pol.decide([Observation(k, 4096, tier="slow", tier_index=1, time=float(t), index=t)])
    y = np.concatenate([g[0] for g in got])
    m = np.concatenate([g[1] for g in got])
    assert set(np.unique(m)) <= {0.0, 1.0} and set(np.unique(y)) <= {0.0, 1.0}
    assert (y <= m).all()  # a label only where the mask is on
    H = np.asarray(HORIZONS)
    # the hot key's samples (access-time and idle ones): it always came back within its gap
    # (0.5 capacity), so positive for every longer horizon; and a label never goes from
    # "came back within h" to "not within a longer h"
    pos = y.sum(axis=1) > 0
    assert pos.any()
    assert np.all(y[pos][:, H > 0.5] == m[pos][:, H > 0.5])
    full = m.sum(axis=1) == len(H)
    assert full.any() and np.all(np.diff(y[full], axis=1) >= 0)
    # ... and samples never seen again get one negative row per horizon, each horizon once
    neg_rows = m[~pos]
    assert (neg_rows.sum(axis=1) == 1).all()
    per_head = neg_rows.sum(axis=0)
    assert per_head[0] >= per_head[-1] > 0  # short horizons expire first
    assert pol.cost_report()["labels"] == len(y)


def test_regret_moves_weight_off_the_expert_that_erred():
    pol = make_policy()
    pol.reset(tiers(8 * 4096))
    for k in range(3):
        pol.decide([Observation(k, 4096, tier="fast", tier_index=0, count=1)])
    i = pol.table.id_of(1)
    pol.hist[i] = (2, pol.clock)  # the LFU expert evicted key 1 just now
    w = pol.w.copy()
    pol.decide([Observation(1, 4096, tier="slow", tier_index=1, count=2)])  # and it came back
    assert pol.w[2] < w[2] and i not in pol.hist
    assert abs(pol.w.sum() - 1.0) < 0.05


def test_write_reserve_absorbs_new_writes_open_loop():
    """New objects written at a steady rate (open loop, idle backing device): the agents keep
    room on the fast tier so writes land there (write-back caching), never overfilling it."""
    rng = np.random.default_rng(0)
    n = 6000
    keys = np.arange(n)  # every access a new object
    ops = (rng.random(n) < 0.5).astype(np.uint8)
    tr = prepare(np.arange(n) * 1e-4, keys, np.full(n, 4096), ops, np.full(n, 5, np.uint8))
    t = tiers(64 * 4096)
    lru = simulate(tr, t, create_policy("lru"))
    pol = make_policy(seed=0)
    rl = simulate(tr, t, pol)
    w = tr.op == 1
    rl_w = (rl.served[w] == 0).mean()
    assert rl_w > 0.5 > (lru.served[w][n // 2:] == 0).mean(), rl_w
    assert rl.peak_used[0] <= 64 * 4096
    assert rl.summary()["mean_latency_us"] < lru.summary()["mean_latency_us"]
    off = simulate(tr, t, make_policy(seed=0, write_reserve=False))
    assert (off.served[w][n // 2:] == 0).mean() < 0.1  # without the reserve: no room, no absorption


def test_batch_adapts_to_object_size():
    """adapt_batch: huge objects, one access per decision (a batch's fills would queue ahead of hits)."""
    pol = make_policy(batch=16)
    big = (TierModel("fast", 1e12, 1e-6, 1e10, 1e10), TierModel("slow", math.inf, 80e-6, 3e9, 2e9))
    pol.reset(big)
    pol.decide([Observation(0, 64 << 20, tier="slow", tier_index=1)])
    assert pol.batch == 1
    pol.reset(tiers(8 * 4096))
    pol.decide([Observation(0, 4096, tier="slow", tier_index=1)])
    assert pol.batch == 16
    # a long episode of small objects, then big ones after a reset: the size mean is the episode's
    for k in range(2000):
        pol.decide([Observation(k, 4096, tier="slow", tier_index=1)])
    pol.reset(big)
    pol.decide([Observation(0, 64 << 20, tier="slow", tier_index=1)])
    assert pol.batch == 1  # (a lifetime mean stayed near 4 KiB: found by review)


def test_fixed_batch_caps_fills_per_decision():
    """adapt_batch=False: the batch stays whole (one decision amortised over it) and huge objects
    are promoted at most one burst's worth (one backing-tier latency of fills) per decision."""
    pol = make_policy(batch=16, seed=0, adapt_batch=False)
    big = (TierModel("fast", 1e12, 1e-6, 1e10, 1e10), TierModel("slow", math.inf, 80e-6, 3e9, 2e9))
    pol.reset(big)
    size = 64 << 20
    for r in range(10):
        moves = pol.decide([Observation(r * 16 + j, size, tier="slow", tier_index=1) for j in range(16)])
        assert pol.batch == 16
        assert sum(m.dst == 0 for m in moves) <= (1 if r else 16), (r, moves)


def test_reads_leave_the_write_reserve_to_writes():
    """The room kept for new objects' writes is not taken by new reads (a scan would fill it
    and push residents out to restore it: found by review)."""
    pol = make_policy()
    pol.reset(tiers(8 * 4096))
    pol.new_write_bytes = 2 * 4096  # a reserve of 4 objects
    free = [("fast", 8 * 4096, 3 * 4096), ("slow", math.inf, math.inf)]
    assert pol.place(Observation(1, 4096, op="read"), free) == "slow"
    assert pol.place(Observation(2, 4096, op="write"), free) == "fast"
    roomy = [("fast", 8 * 4096, 8 * 4096), ("slow", math.inf, math.inf)]
    assert pol.place(Observation(3, 4096, op="read"), roomy) == "fast"


def test_admission_regret_both_ways():
    pol = make_policy(admission_experts=True)
    pol.reset(tiers(8 * 4096))
    for k in range(3):
        pol.decide([Observation(k, 4096, tier="fast", tier_index=0, count=1)])
    i = pol.table.id_of(2)
    a0 = pol.aw.copy()
    pol.bhist[i] = pol.clock  # bypassed just now ...
    pol.decide([Observation(2, 4096, tier="slow", tier_index=1, count=2)])  # ... and back at once
    assert pol.aw[1] < a0[1] and i not in pol.bhist
    j = pol.table.id_of(0)
    a1 = pol.aw.copy()
    pol.ahist[j] = pol.clock  # admitted against the learned bypass, then evicted unused
    pol._evict(j, 1)
    assert pol.aw[0] < a1[0] and j not in pol.ahist


def test_forget_frees_room_and_never_moves_a_deleted_object():
    """A live store deletes objects: the agents drop them (their room is free), never name them
    in a move (a store refuses those), and a later key may reuse the id with a fresh history."""
    pol = make_policy(batch=4, seed=0)
    pol.reset(tiers(4 * 4096))
    for k in range(4):
        pol.decide([Observation(k, 4096, tier="fast", tier_index=0, count=1)])
    for k in range(4):
        pol.forget(k)
    pol.forget("never seen")  # unknown keys are ignored
    named = set()
    for r in range(50):
        batch = [Observation(100 + (r * 4 + j) % 12, 4096, tier="slow", tier_index=1) for j in range(4)]
        named |= {m.key for m in pol.decide(batch)}
    assert not named & {0, 1, 2, 3}, named
    i = pol.table.id_of(100)
    assert pol.table.count[i] >= 1 and pol.used[0] <= 4 * 4096


def test_locate_counts_placed_objects_as_residents():
    """At start a live store tells where its objects already are: the agents count them, so
    promotions evict first instead of overfilling the fast tier (checked like a store would)."""
    pol = make_policy(batch=4, seed=0)
    pol.reset(tiers(4 * 4096))
    truth = {k: 0 for k in range(4)}  # the store: key -> tier
    for k in truth:
        pol.locate(k, 0, 4096)
    for r in range(30):
        keys = [100 + (r * 4 + j) % 10 for j in range(4)]
        obs = [Observation(k, 4096, tier="fast" if truth.get(k, 1) == 0 else "slow", tier_index=truth.get(k, 1))
               for k in keys]
        for k in keys:
            truth.setdefault(k, 1)
        for key, dst in pol.decide(obs):
            truth[key] = dst
            assert sum(t == 0 for t in truth.values()) <= 4, (r, truth)
    assert pol.used[0] <= 4 * 4096 and pol.table.count[pol.table.id_of(0)] <= 1  # locate is not an access
    with pytest.raises(ValueError, match="tier 7"):
        pol.locate(1, 7, 4096)


def test_record_batch_equals_sequential_record():
    """The vectorised history update is the per-access one (distinct keys in a batch; repeated
    keys in rounds), except the stream context, read at the batch's end."""
    from tiered.policies.rl.features import ObjectTable

    rng = np.random.default_rng(3)
    a, b = ObjectTable(), ObjectTable()
    clock = 0.0
    for _ in range(200):
        n = int(rng.integers(1, 20))
        keys = [int(k) for k in rng.zipf(1.5, n) % 50]
        sizes = rng.integers(1, 9, n) * 512.0
        writes = rng.random(n) < 0.3
        clocks = clock + np.cumsum(sizes) - sizes
        for k, s, w, c in zip(keys, sizes, writes, clocks):
            a.record(k, int(s), "kv", bool(w), float(c), 10_000.0)
        ids, _ = b.ids_for(keys)
        b.record_batch(np.asarray(ids, np.int64), sizes, np.full(n, 2, np.int16), writes, clocks, 10_000.0)
        clock = float(clocks[-1] + sizes[-1])
    assert a.ids == b.ids
    m = len(a)
    for name in ("nbytes", "count", "last", "first", "gaps", "ngaps", "ewma", "write", "freq", "kind"):
        np.testing.assert_allclose(getattr(a, name)[:m], getattr(b, name)[:m], rtol=1e-12, err_msg=name)
    ids = np.arange(m)
    np.testing.assert_array_equal(a.features(ids, clock, 10_000.0, 0.5, np.zeros(m)),
                                  a.features_reference(ids, clock, 10_000.0, 0.5, np.zeros(m)))


def test_pending_labels_chain_and_drop():
    """Pending states chain per object: an access labels all of them, a dropped object none."""
    from tiered.policies.rl.labels import PendingLabels

    p = PendingLabels(64, 3)
    f = np.zeros((2, 3), np.float32)
    p.add(np.array([1, 2]), f, np.zeros(2, np.int8), 0.0)
    p.add(np.array([1, 3]), f, np.zeros(2, np.int8), 10.0)
    slots, y, m = p.resolve(np.array([1]), np.array([20.0]), unit=100.0)
    assert sorted(slots.tolist()) == [0, 2] and (m == 1).all()
    assert p.resolve(np.array([1]), np.array([30.0]), unit=100.0) is None  # labelled once
    p.drop(2)
    assert p.resolve(np.array([2]), np.array([40.0]), unit=100.0) is None


def test_promotes_on_tier_models_without_speeds():
    """A live governor's tier models carry capacities only (latency 0, unbounded bandwidth):
    the agents then assume typical speeds (RAM over NVMe) rather than valuing every hit at 0
    and promoting nothing."""
    pol = make_policy(batch=8, seed=0, warmup_steps=10_000)
    pol.reset((TierModel("host", 16 * 4096), TierModel("disk", math.inf)))
    ups = 0
    for r in range(40):
        ups += sum(m.dst == 0 for m in pol.decide(
            [Observation(k, 4096, tier="disk", tier_index=1 if pol.loc[pol.table.id_of(k)] != 0 else 0)
             if pol.table.id_of(k) is not None else Observation(k, 4096, tier="disk", tier_index=1)
             for k in range(8)]))
    assert ups > 0
