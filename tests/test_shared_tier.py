"""The shared tier: KV prefix blocks on a real Redis-protocol server, reused across processes.

Every test starts its own ``redis-server`` on loopback, on a free port, in a temporary directory
(the ``redis_server`` fixture); .ci/run installs the server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import helpers
import tiered
from helpers import TINY_MODEL_MARKS
from tiered.kv import KVStore, SharedTier, SharedTierError, TieredCache, model_identity
from tiered.config import redact_url
from tiered.kv.shared import INDEX, PREFIX, SIZES, USED

from test_kv_parity import generate, make_model, prompt, reference

pytestmark = TINY_MODEL_MARKS
BS = 8
START_TIMEOUT = 10.0


class RedisServer:
    """A redis-server process of this test: ``url``, ``stop()``, ``start()`` (same port), ``client()``."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary, self.directory = binary, directory
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited with {self.proc.returncode}")
            try:
                if self.client().ping():
                    return
            except Exception:
                time.sleep(0.05)
        raise TimeoutError(f"redis-server on port {self.port} did not answer within {START_TIMEOUT} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=START_TIMEOUT)
        self.proc = None

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_server(tmp_path):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed: `apt-get install -y redis-server` (.ci/run installs it)")
    server = RedisServer(binary, tmp_path / "redis")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def shared_config(tmp_path: Path, url: str, name: str = "a", capacity: str = "64MiB", **shared) -> dict:
    cfg = helpers.store_config(tmp_path / name, "8MiB")
    cfg["tiers"]["shared"] = {"url": url, "capacity": capacity, **shared}
    return cfg


def assert_tokens_equal_default_cache(model, ids, out) -> None:
    want = generate(model, ids, reference(model))
    assert torch.equal(want.sequences, out.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(want.scores, out.scores)) < 1e-4


def compute_prefix(model, cfg: dict, ids, **cache_kw) -> dict:
    """What one process does: load what it can, generate, save its blocks (published)."""
    with tiered.TieredStore(cfg) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        try:
            with TieredCache(model.config, kv, model=model, **cache_kw) as cache:
                loaded = cache.load_prefix(ids)
                out = generate(model, ids, cache)
            return {"loaded": loaded, "out": out, "kv": dict(kv.stats),
                    "shared": dict(kv.shared.stats) if kv.shared else None}
        finally:
            kv.close()


CHILD = """
import json, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_shared_tier import compute_prefix
from test_kv_parity import generate, make_model, prompt, reference
model = make_model("llama")
ids = prompt(43, seed=5)
got = compute_prefix(model, json.loads({cfg!r}), ids)
want = generate(model, ids, reference(model))
print(json.dumps({{"loaded": got["loaded"], "same_tokens": torch.equal(want.sequences, got["out"].sequences),
                  "max_score_diff": max((a - b).abs().max().item() for a, b in zip(want.scores, got["out"].scores)),
                  "shared_hits": got["kv"]["shared_hit_blocks"]}}))
"""


def run_child(cfg: dict) -> dict:
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(tiered.__file__).parent.parent), tests])}
    r = subprocess.run([sys.executable, "-c", CHILD.format(tests=tests, cfg=json.dumps(cfg))], env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_prefix_computed_by_one_process_is_loaded_by_another(tmp_path, redis_server):
    model = make_model("llama")
    ids = prompt(43, seed=5)
    a = compute_prefix(model, shared_config(tmp_path, redis_server.url, "a"), ids)
    assert a["loaded"] == 0 and a["kv"]["shared_published_blocks"] == 5
    b = run_child(shared_config(tmp_path, redis_server.url, "b"))  # its own local store, empty
    assert b["loaded"] == 5 * BS and b["shared_hits"] == 5
    assert b["same_tokens"] and b["max_score_diff"] < 1e-4


def test_blocks_of_a_prefill_under_a_device_budget_are_published(tmp_path, redis_server, monkeypatch):
    """Under a device budget the prompt's blocks go to the store from host block buffers (handed to
    the store's put): they are published from those buffers."""
    model = make_model("llama")
    ids = prompt(43, seed=5)
    kinds = []
    publish = KVStore._publish
    monkeypatch.setattr(KVStore, "_publish", lambda self, key, block: (kinds.append(type(block)),
                                                                       publish(self, key, block)))
    a = compute_prefix(model, shared_config(tmp_path, redis_server.url, "a"), ids,
                       device_budget=helpers.kv_bytes(model, 43) // 2)
    assert a["kv"]["shared_published_blocks"] == 5 and tuple in kinds
    assert_tokens_equal_default_cache(model, ids, a["out"])
    b = compute_prefix(model, shared_config(tmp_path, redis_server.url, "b"), ids)
    assert b["loaded"] == 40 and b["kv"]["shared_hit_blocks"] == 5
    assert_tokens_equal_default_cache(model, ids, b["out"])


def test_blocks_pulled_once_are_then_local(tmp_path, redis_server):
    model = make_model("llama")
    ids = prompt(43, seed=5)
    compute_prefix(model, shared_config(tmp_path, redis_server.url, "a"), ids)
    b_cfg = shared_config(tmp_path, redis_server.url, "b")
    first = compute_prefix(model, b_cfg, ids)
    assert first["loaded"] == 40 and first["kv"]["shared_hit_blocks"] == 5
    redis_server.stop()
    second = compute_prefix(model, {**b_cfg, "tiers": {**b_cfg["tiers"], "shared": {
        **b_cfg["tiers"]["shared"], "required": False}}}, ids)
    assert second["loaded"] == 40 and second["kv"]["shared_hit_blocks"] == 0
    assert_tokens_equal_default_cache(model, ids, second["out"])


def _damage(value: bytes, how: str) -> bytes:
    if how == "payload":
        return value[:-5] + bytes([value[-5] ^ 0x40]) + value[-4:]
    if how == "truncated":
        return value[:len(value) // 2]
    if how == "header":
        return value[:8] + b"[" + value[9:]
    if how == "other-key":
        hlen = int.from_bytes(value[4:8], "little")
        h = json.loads(value[8:8 + hlen])
        h["key"] = h["key"][:-1] + "9"
        raw = json.dumps(h, sort_keys=True).encode()
        return value[:4] + len(raw).to_bytes(4, "little") + raw + value[8 + hlen:]
    raise ValueError(how)


@pytest.mark.parametrize("how", ["payload", "truncated", "header", "other-key"])
def test_a_damaged_entry_is_a_miss_deleted_and_recomputed(tmp_path, redis_server, how):
    model = make_model("llama")
    ids = prompt(43, seed=5)
    compute_prefix(model, shared_config(tmp_path, redis_server.url, "a"), ids)
    r = redis_server.client()
    from tiered.kv import chain_hashes

    third = chain_hashes(ids[0], BS, model_identity(model))[2]
    key = next(k for k in r.keys(PREFIX + "kv/*") if third.encode() in k)
    r.set(key, _damage(r.get(key), how))
    b = compute_prefix(model, shared_config(tmp_path, redis_server.url, "b"), ids)
    assert b["loaded"] == 2 * BS and b["shared"]["corrupt"] == 1
    assert_tokens_equal_default_cache(model, ids, b["out"])
    assert r.get(key) is not None  # b recomputed the block and published it again: a sound copy
    c = compute_prefix(model, shared_config(tmp_path, redis_server.url, "c"), ids)
    assert c["loaded"] == 5 * BS and c["shared"]["corrupt"] == 0


def test_another_models_entry_under_the_same_key_is_not_used(tmp_path, redis_server):
    """The header names the full model identity; the key holds only its first 16 hex digits."""
    tier = SharedTier(redis_server.url, 1 << 20).open()
    try:
        t = torch.arange(12, dtype=torch.float32)
        assert tier.put("kv/x/b/h/L0-1", "model-A", t.numpy(), t.dtype, (3, 4))
        assert tier.get_many(["kv/x/b/h/L0-1"], "model-B") == [None]
        assert tier.stats["corrupt"] == 1 and redis_server.client().get(PREFIX + "kv/x/b/h/L0-1") is None
    finally:
        tier.close()


def test_entries_round_trip_dtype_and_shape(redis_server):
    with SharedTier(redis_server.url, 1 << 20) as tier:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            t = torch.randn(2, 3, 5).to(dtype)
            assert tier.put(f"k/{dtype}", "m", t.reshape(-1).view(torch.uint8).numpy(), dtype, t.shape)
            (got,) = tier.get_many([f"k/{dtype}"], "m")
            assert got.dtype == dtype and torch.equal(got, t)


# --------------------------------------------------------------------------- capacity


def _entry_size(key: str, nbytes: int) -> int:
    """The bytes an entry of ``nbytes`` zeros takes on the server (what the capacity counts)."""
    from tiered.kv.shared import encode

    return len(encode(key, "m", bytes(nbytes), torch.uint8, (nbytes,)))


def test_capacity_evicts_the_least_recently_used_entries(redis_server):
    size = _entry_size("k/00", 1000)
    with SharedTier(redis_server.url, 3 * size) as tier:
        for i in range(3):
            assert tier.put(f"k/{i:02d}", "m", bytes(1000), torch.uint8, (1000,))
        assert tier.get_many(["k/00"], "m")[0] is not None  # k/00 is now the most recently used
        assert tier.put("k/03", "m", bytes(1000), torch.uint8, (1000,))  # evicts k/01, the oldest
        present = [k for k in ("k/00", "k/01", "k/02", "k/03") if tier.contains(k)]
        assert present == ["k/00", "k/02", "k/03"]
        assert tier.used_bytes() == 3 * size and tier.stats["evicted"] == 1
        r = redis_server.client()
        assert r.zcard(INDEX) == 3 and int(r.get(USED)) == sum(r.strlen(PREFIX + k) for k in present)


def test_entries_deleted_outside_the_tier_leave_the_accounting_exact(redis_server):
    """The server evicts an entry by itself, or an operator deletes it; it is then published again."""
    size = _entry_size("k/00", 1000)
    r = redis_server.client()
    with SharedTier(redis_server.url, 4 * size) as tier:
        for i in range(2):
            assert tier.put(f"k/{i:02d}", "m", bytes(1000), torch.uint8, (1000,))
        for _ in range(3):
            r.delete(PREFIX + "k/00")
            assert tier.put("k/00", "m", bytes(1000), torch.uint8, (1000,))  # republished while still indexed
            assert int(r.get(USED)) == 2 * size and r.zcard(INDEX) == 2
        r.delete(PREFIX + "k/00")
        assert tier.get_many(["k/00", "k/01"], "m")[0] is None  # a miss: its index entry goes
        assert int(r.get(USED)) == size and r.zcard(INDEX) == 1 and r.hlen(SIZES) == 1


def test_a_server_slower_than_the_timeout_is_marked_down(redis_server, caplog):
    """Each recv within the timeout, yet the whole answer late (a slow link): later calls skip it."""
    with SharedTier(redis_server.url, 1 << 20, timeout=0.2, retry_after=60) as tier:
        assert tier.put("k/0", "m", bytes(100), torch.uint8, (100,))
        mget, calls = tier._client.mget, []

        def slow_mget(*a, **kw):
            calls.append(a)
            time.sleep(0.3)
            return mget(*a, **kw)

        tier._client.mget = slow_mget
        assert tier.get_many(["k/0"], "m")[0] is not None  # the late answer is still used
        assert not tier.available and tier.stats["errors"] == 1 and "0.2 s" in caplog.text
        assert tier.get_many(["k/0"], "m") == [None] and len(calls) == 1  # not asked again


def test_a_server_out_of_memory_pauses_publishing_and_is_warned_of_at_open(redis_server, caplog):
    r = redis_server.client()
    r.config_set("maxmemory", r.info("memory")["used_memory"] + (2 << 20))
    r.config_set("maxmemory-policy", "noeviction")
    with SharedTier(redis_server.url, 100 << 20, retry_after=60) as tier:
        assert "maxmemory" in caplog.text  # the capacity cannot fit in what the server may hold
        ok = [tier.put(f"k/{i}", "m", bytes(500_000), torch.uint8, (500_000,)) for i in range(10)]
        assert ok[0] and not all(ok) and tier.stats["refused"] == 1  # asked once, then paused
        assert tier.get_many(["k/0"], "m")[0] is not None  # what is there is still read
        assert int(r.get(USED)) == sum(r.strlen(k) for k in r.keys(PREFIX + "k/*"))


def test_an_entry_larger_than_the_capacity_is_not_written(redis_server):
    with SharedTier(redis_server.url, 500) as tier:
        assert not tier.put("k/big", "m", bytes(1000), torch.uint8, (1000,))
        assert tier.stats["too_large"] == 1 and not tier.contains("k/big") and tier.used_bytes() == 0


def test_concurrent_writers_never_exceed_the_capacity(redis_server):
    """Two processes' worth of writers (threads with their own clients) race to fill the tier."""
    from concurrent.futures import ThreadPoolExecutor

    size = _entry_size("k/0-00", 4000)
    tiers = [SharedTier(redis_server.url, 10 * size).open() for _ in range(2)]
    try:
        def fill(w):
            for i in range(40):
                tiers[w].put(f"k/{w}-{i:02d}", "m", bytes(4000), torch.uint8, (4000,))
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(fill, range(2)))
        r = redis_server.client()
        held = sum(r.strlen(k) for k in r.keys(PREFIX + "k/*"))
        assert held == int(r.get(USED)) <= 10 * size and r.zcard(INDEX) == 10
    finally:
        for t in tiers:
            t.close()


def test_a_process_with_another_capacity_is_refused_naming_both(redis_server):
    with SharedTier(redis_server.url, 1 << 20):
        with pytest.raises(SharedTierError, match=rf"{redis_server.url}.*1048576.*2097152"):
            SharedTier(redis_server.url, 2 << 20).open()


def test_a_writer_that_could_not_check_the_capacity_at_open_publishes_nothing_under_another(redis_server):
    """Opened while the server was down (required = false), it learns of the mismatch at its first put."""
    late = SharedTier(redis_server.url, 2 << 20, required=False, retry_after=0.0)
    redis_server.stop()
    late.open()
    redis_server.start()
    with SharedTier(redis_server.url, 1 << 20) as first:
        assert first.put("k/1", "m", bytes(100), torch.uint8, (100,))
        assert not late.put("k/2", "m", bytes(100), torch.uint8, (100,))
        assert late.stats["refused"] == 1 and not first.contains("k/2")
    late.close()


def test_a_database_holding_something_else_is_refused(redis_server):
    redis_server.client().set("tiered:meta", b"not ours")
    with pytest.raises(SharedTierError, match="used by something else"):
        SharedTier(redis_server.url, 1 << 20).open()


# --------------------------------------------------------------------------- server down


def test_an_unreachable_required_server_fails_the_open_naming_the_url(tmp_path):
    url = f"redis://127.0.0.1:{_free_port()}/0"
    model = make_model("llama")
    with tiered.TieredStore(shared_config(tmp_path, url, timeout=1)) as store:
        with pytest.raises(SharedTierError, match=rf"cannot reach the key-value server at {url}"):
            KVStore(store, model_identity(model), block_size=BS)


def test_an_unreachable_optional_server_is_recomputed_without(tmp_path, caplog):
    url = f"redis://user:pw-secret@127.0.0.1:{_free_port()}/0"
    model = make_model("llama")
    ids = prompt(43, seed=5)
    got = compute_prefix(model, shared_config(tmp_path, url, required=False, timeout=1), ids)
    assert got["loaded"] == 0 and got["kv"]["saved_blocks"] == 5
    assert_tokens_equal_default_cache(model, ids, got["out"])
    assert redact_url(url) in caplog.text and "pw-secret" not in caplog.text


def test_server_stopped_while_a_prompt_is_computed(tmp_path, redis_server):
    """The server dies in the middle of a prefill (between two layers, blocks being published):
    the tokens are the default cache's, the blocks are kept locally, and the tier is retried later."""
    model = make_model("llama")
    ids = prompt(43, seed=5)
    calls = []

    def kill_in_layer_2(_module, _args):
        if not calls:
            calls.append(1)
            redis_server.stop()

    handle = model.model.layers[2].register_forward_pre_hook(kill_in_layer_2)
    try:
        a = compute_prefix(model, shared_config(tmp_path, redis_server.url, "a"), ids)
    finally:
        handle.remove()
    assert calls and a["shared"]["errors"] >= 1 and a["kv"]["saved_blocks"] == 5
    assert_tokens_equal_default_cache(model, ids, a["out"])
    b = compute_prefix(model, shared_config(tmp_path, redis_server.url, "b", required=False), ids)
    assert b["loaded"] == 0
    assert_tokens_equal_default_cache(model, ids, b["out"])


def test_server_stopped_between_lookups_then_back(tmp_path, redis_server):
    """Lookups while the server is down miss (recompute); once it is back they hit again."""
    model = make_model("llama")
    ids = prompt(43, seed=5)
    compute_prefix(model, shared_config(tmp_path, redis_server.url, "a"), ids)
    identity = model_identity(model)
    with tiered.TieredStore(shared_config(tmp_path, redis_server.url, "b")) as store:
        tier = SharedTier.from_spec(store.config.shared_tiers[0], retry_after=0.0).open()
        kv = KVStore(store, identity, block_size=BS, shared=tier)
        redis_server.stop()
        with TieredCache(model.config, kv, model=model) as cache:
            assert cache.load_prefix(ids) == 0
            out = generate(model, ids, cache)
        assert_tokens_equal_default_cache(model, ids, out)
        assert tier.stats["errors"] >= 1
        tier.close()
    # the server comes back empty: the blocks are published again by the next computing process
    redis_server.start()
    compute_prefix(model, shared_config(tmp_path, redis_server.url, "c"), ids)
    assert compute_prefix(model, shared_config(tmp_path, redis_server.url, "d"), ids)["loaded"] == 40


def test_a_hung_server_times_out_into_a_recompute(tmp_path, redis_server):
    """A server that stops answering (SIGSTOP) costs at most the timeout, then the prefix is recomputed."""
    import signal

    model = make_model("llama")
    ids = prompt(43, seed=5)
    compute_prefix(model, shared_config(tmp_path, redis_server.url, "a"), ids)
    with tiered.TieredStore(shared_config(tmp_path, redis_server.url, "b")) as store:
        tier = SharedTier(redis_server.url, 64 << 20, timeout=0.5).open()
        kv = KVStore(store, model_identity(model), block_size=BS, shared=tier)
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            with TieredCache(model.config, kv, model=model) as cache:
                t0 = time.monotonic()
                assert cache.load_prefix(ids) == 0
                assert time.monotonic() - t0 < 5
                out = generate(model, ids, cache)
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
            tier.close()
        assert tier.stats["errors"] == 1 and tier.stats["skipped_down"] >= 1  # the publishes did not wait again
    assert_tokens_equal_default_cache(model, ids, out)


def test_a_server_restarted_empty_gets_the_capacity_record_back_with_the_next_put(redis_server):
    with SharedTier(redis_server.url, 1 << 20, retry_after=0.0) as tier:
        redis_server.stop()
        redis_server.start()  # empty: no capacity record
        assert tier.put("k/1", "m", bytes(100), torch.uint8, (100,))
        with pytest.raises(SharedTierError, match="capacity is recorded as 1048576"):
            SharedTier(redis_server.url, 2 << 20).open()


# --------------------------------------------------------------------------- the store never manages it


def test_the_store_never_places_objects_on_the_shared_tier(tmp_path, redis_server):
    cfg = tiered.load_config(shared_config(tmp_path, redis_server.url))
    (spec,) = cfg.shared_tiers
    assert spec.external and SharedTier.external
    assert [t.name for t in cfg.tiers] == ["host", "nvme"]  # what the store and its governor see
    with tiered.TieredStore(cfg) as store:
        with pytest.raises(tiered.StoreError, match="unknown storage tier 'shared'"):
            store.put("x", torch.zeros(4), tier="shared")
        assert "shared" not in {t for o in store.owners().values() for t in o}
