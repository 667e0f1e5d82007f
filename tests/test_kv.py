"""The KV cache tier: TieredCache parity with DynamicCache, durable prefix reuse, corruption,
model identity, the future-aware policy and the Mooncake replay."""

from __future__ import annotations

import functools
import inspect
import os
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import transformers
from transformers import DynamicCache

import helpers
import tiered
from helpers import kv_bytes
from tiered.policies import LRU, Observation
from tiered.policies.prefix_aware import PrefixAware
from tiered.kv import KVCacheError, KVStore, KVStoreError, TieredCache, chain_hashes, model_identity
from tiered.kv.replay import ReplayConfig, replay

ROOT = Path(__file__).resolve().parent.parent
#: recent transformers name the cache argument ``cache``, earlier ones ``past_key_values``
CACHE = ("cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters
         else "past_key_values")
BS = 16  # tokens per block in these tests

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# tiny decoders of several architectures, built from config (no downloads)
ARCHS = {
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_attention_heads=4, num_key_value_heads=1)),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(num_attention_heads=4)),
}


@functools.lru_cache(maxsize=None)
def make_model(arch: str = "llama-gqa", seed: int = 0, layers: int = 8, dtype=torch.float32):
    import transformers

    cfg_name, cls_name, extra = ARCHS[arch]
    cfg = getattr(transformers, cfg_name)(vocab_size=300, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=layers, max_position_embeddings=512, **extra)
    torch.manual_seed(seed)
    return getattr(transformers, cls_name)(cfg).to(dtype).eval()


def store_config(tmp_path: Path, host: str = "8MiB") -> dict:
    return helpers.store_config(tmp_path, host)


def generate(model, ids, cache, n=16):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, **{CACHE: cache}, output_scores=True,
                              return_dict_in_generate=True, pad_token_id=0)


def assert_bitwise(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores))


def prompt(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 300, (1, n), generator=g)


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("arch", list(ARCHS))
def test_generate_bitwise_equal_to_dynamic_cache_with_spills(tmp_path, arch):
    """Blocks spilled to the store and gathered back give DynamicCache's logits bit for bit."""
    model = make_model(arch)
    ids = prompt(70)
    want = generate(model, ids, DynamicCache())
    with tiered.TieredStore(store_config(tmp_path)) as store:
        kv = KVStore(store, block_size=BS)
        with TieredCache(model.config, kv, model=model, device_budget=kv_bytes(model, 94) // 2, lookahead=1) as cache:
            got = generate(model, ids, cache)
            st = cache.stats()
        assert st["spilled_blocks"] >= 3 and st["resident_blocks"] <= 2 and st["store_reads"] > 0, st
        assert st["gathers_prefetched"] > st["gathers"] // 2, st
        assert [k for k in store.keys() if "/s/" in k] == []  # session blocks deleted on close
    assert_bitwise(want, got)


@pytest.mark.parametrize("lookahead", [0, 2])
def test_lookahead_variants_and_manual_decode_loop(tmp_path, lookahead):
    model = make_model(layers=6)
    ids = prompt(40)
    with torch.no_grad():
        ref = DynamicCache()
        out = model(ids, **{CACHE: ref}, use_cache=True)
        ref_logits = [out.logits[:, -1]]
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(30):
            out = model(tok, **{CACHE: ref}, use_cache=True)
            ref_logits.append(out.logits[:, -1])
            tok = out.logits[:, -1:].argmax(-1)
        with tiered.TieredStore(store_config(tmp_path)) as store, \
                TieredCache(model.config, KVStore(store, block_size=8), device_budget=kv_bytes(model, 71) * 2 // 3,
                            lookahead=lookahead) as cache:
            out = model(ids, **{CACHE: cache}, use_cache=True)
            got = [out.logits[:, -1]]
            tok = out.logits[:, -1:].argmax(-1)
            for _ in range(30):
                out = model(tok, **{CACHE: cache}, use_cache=True)
                got.append(out.logits[:, -1])
                tok = out.logits[:, -1:].argmax(-1)
                assert cache.device_bytes()["total"] <= cache.device_budget
            assert cache.stats()["spilled_blocks"] >= 5
    assert all(torch.equal(a, b) for a, b in zip(ref_logits, got))


@pytest.mark.parametrize("lookahead", [0, 1])
def test_long_prefill_stays_within_the_device_budget(tmp_path, lookahead):
    """A prompt whose KV is 2.5x the budget: each layer's full blocks go to host buffers right after
    its attention, so the device never holds the prompt's KV; tokens and logits stay bitwise."""
    model = make_model(layers=8)
    ids = prompt(200)
    budget = kv_bytes(model, 216) * 3 // 8  # a slot per lookahead slot (1/8 of the KV each) fits; the KV does not
    want = generate(model, ids, DynamicCache(), n=8)
    with tiered.TieredStore(store_config(tmp_path)) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        with TieredCache(model.config, kv, model=model, device_budget=budget, lookahead=lookahead) as cache:
            cache.load_prefix(ids)  # the prompt's hashes are known: staged blocks are saved as its prefix
            got = generate(model, ids, cache, n=8)
            st = cache.stats()
        assert st["device_peak"] <= budget, st
        assert st["spilled_blocks"] >= 200 // BS and st["prefix_blocks_saved"] == 200 // BS, st
        with TieredCache(model.config, kv, model=model, device_budget=budget, lookahead=lookahead) as cache:
            assert cache.load_prefix(ids) == 200 // BS * BS  # what the prefill staged is a usable prefix
            again = generate(model, ids, cache, n=8)
    assert_bitwise(want, got)
    assert_bitwise(want, again)


def test_batch_of_two_equal_to_dynamic_cache(tmp_path):
    model = make_model()
    ids = torch.cat([prompt(50, 1), prompt(50, 2)])
    want = generate(model, ids, DynamicCache(), n=12)
    with tiered.TieredStore(store_config(tmp_path)) as store, \
            TieredCache(model.config, KVStore(store, block_size=BS), device_budget="200KiB") as cache:
        got = generate(model, ids, cache, n=12)
        assert cache.stats()["spilled_blocks"] > 0
    assert_bitwise(want, got)


def test_without_a_store_it_is_an_in_memory_block_cache():
    model = make_model(layers=3)
    ids = prompt(40)
    want = generate(model, ids, DynamicCache())
    with TieredCache(model.config, block_size=8, lookahead=1) as cache:
        got = generate(model, ids, cache)
        assert cache.stats()["blocks"] == (40 + 15) // 8
    assert_bitwise(want, got)


def test_session_blocks_of_dead_processes_are_swept(tmp_path):
    with tiered.TieredStore(store_config(tmp_path)) as store:
        dead, live = "kv/anon/s/999999999-ab/0/L0-8", f"kv/anon/s/{os.getpid()}-cd/0/L0-8"
        for key in (dead, live):
            store.put(key, torch.zeros(16)).result(timeout=30)
        KVStore(store)
        assert dead not in store and live in store  # this process's sessions may be in use


def test_budget_too_small_for_staging_is_a_clear_error(tmp_path):
    model = make_model()
    with tiered.TieredStore(store_config(tmp_path)) as store, \
            TieredCache(model.config, KVStore(store, block_size=BS), device_budget="8KiB") as cache:
        with pytest.raises(KVCacheError, match="device budget 8192 bytes is smaller than the attention staging"):
            generate(model, prompt(70), cache, n=2)
    with pytest.raises(KVCacheError, match="needs a KVStore"):
        TieredCache(model.config, None, device_budget="1MiB")
    with pytest.raises(KVCacheError, match="not open"):
        generate(model, prompt(10), TieredCache(model.config), n=1)


# --------------------------------------------------------------------------- prefix reuse


class LayerZeroTokens:
    """Counts the tokens layer 0 computes (to prove prefill only ran on the suffix)."""

    def __init__(self, model) -> None:
        self.n = 0
        layer0 = model.model.layers[0] if hasattr(model, "model") else model.gpt_neox.layers[0]
        layer0.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, _mod, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        self.n += hs.shape[1]


def test_prefix_reuse_runs_only_the_suffix_and_survives_reopen(tmp_path):
    model = make_model()
    ident = model_identity(model)
    ids = prompt(75)
    want = generate(model, ids, DynamicCache())
    with tiered.TieredStore(store_config(tmp_path)) as store:
        kv = KVStore(store, ident, block_size=BS)
        with TieredCache(model.config, kv, model=model, device_budget="100KiB") as cache:
            assert cache.load_prefix(ids) == 0  # cold: nothing stored
            assert_bitwise(want, generate(model, ids, cache))
            assert cache.stats()["prefix_blocks_saved"] == 4  # 75 tokens: 4 full blocks of 16
    counter = LayerZeroTokens(model)
    with tiered.TieredStore(store_config(tmp_path)) as store:  # reopened: the manifest names the blocks
        kv = KVStore(store, ident, block_size=BS)
        with TieredCache(model.config, kv, model=model, device_budget="100KiB") as cache:
            assert cache.load_prefix(ids) == 64
            got = generate(model, ids, cache)
        assert kv.stats["hit_blocks"] == 4
    assert counter.n == (75 - 64) + 15  # the suffix, then one token per decode step
    assert torch.equal(got.sequences, want.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(got.scores, want.scores)) < 1e-4


@pytest.mark.parametrize("host", ["8MiB", "40KiB"])
def test_blocks_split_by_layers_spill_and_reload(tmp_path, host):
    """layers_per_object=3 on 8 layers: parts 0-3, 3-6, 6-8; spills, saves and reloads stay exact,
    also with a host tier too small for the blocks (parts re-read from storage every step)."""
    model = make_model()
    ids = prompt(75)
    want = generate(model, ids, DynamicCache())
    for attempt in range(2):
        with tiered.TieredStore(store_config(tmp_path, host=host)) as store:
            kv = KVStore(store, model_identity(model), block_size=BS, layers_per_object=3)
            assert kv.parts(8) == [(0, 3), (3, 6), (6, 8)]
            with TieredCache(model.config, kv, model=model, device_budget=kv_bytes(model, 91) // 2) as cache:
                assert cache.load_prefix(ids) == (0 if attempt == 0 else 64)
                got = generate(model, ids, cache)
                st = cache.stats()
            # attempt 1: the 4 loaded blocks are read from the store, never resident
            assert st["spilled_blocks"] >= (2 if attempt == 0 else 0) and st["store_reads"] >= 4 * 8, st
            assert len([k for k in store.keys() if "/b/" in k]) == 4 * 3
            if host == "40KiB":
                assert store.stats()["misses"] > st["store_reads"] // 2  # mostly read from storage
        assert torch.equal(got.sequences, want.sequences)
        if attempt == 0:
            assert_bitwise(want, got)


def test_whole_prompt_stored_still_leaves_one_token_to_compute(tmp_path):
    model = make_model()
    kv_ids = prompt(64)  # exactly 4 blocks
    with tiered.TieredStore(store_config(tmp_path)) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        with TieredCache(model.config, kv, model=model) as cache:
            cache.load_prefix(kv_ids)
            generate(model, kv_ids, cache, n=2)
        with TieredCache(model.config, kv, model=model) as cache:
            assert cache.load_prefix(kv_ids) == 48
            with pytest.raises(KVCacheError, match="already holds tokens"):
                cache.load_prefix(kv_ids)
            want = generate(model, kv_ids, DynamicCache(), n=6)
            got = generate(model, kv_ids, cache, n=6)
            assert torch.equal(want.sequences, got.sequences)
        with TieredCache(model.config, kv, model=model) as cache:
            with pytest.raises(KVCacheError, match=r"shape \(1, n\)"):
                cache.load_prefix(torch.cat([kv_ids, kv_ids]))


def test_prefix_store_durable_across_processes(tmp_path):
    """A separate process computes and saves the prefix; this one loads it after a restart."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from test_kv import make_model, prompt, store_config, generate
        import tiered
        from pathlib import Path
        from tiered.kv import KVStore, TieredCache, model_identity
        torch.set_num_threads(1)
        model = make_model(layers=2)
        with tiered.TieredStore(store_config(Path({str(tmp_path)!r}))) as store:
            kv = KVStore(store, model_identity(model), block_size={BS})
            with TieredCache(model.config, kv, model=model) as cache:
                cache.load_prefix(prompt(40))
                generate(model, prompt(40), cache, n=2)
        print("saved")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and "saved" in r.stdout, r.stderr[-3000:]
    model = make_model(layers=2)
    with tiered.TieredStore(store_config(tmp_path)) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        with TieredCache(model.config, kv, model=model) as cache:
            assert cache.load_prefix(prompt(40)) == 32
            got = generate(model, prompt(40), cache, n=4)
    want = generate(model, prompt(40), DynamicCache(), n=4)
    assert torch.equal(got.sequences, want.sequences)


def _block_offset(store, key) -> tuple[str, int, int]:
    m = store.meta(key)
    return str(store.root / "objects.dat"), m["offset"], m["nbytes"]


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_damaged_block_is_detected_and_recomputed(tmp_path, damage):
    model = make_model()
    ident = model_identity(model)
    ids = prompt(75)
    want = generate(model, ids, DynamicCache())
    with tiered.TieredStore(store_config(tmp_path)) as store:
        kv = KVStore(store, ident, block_size=BS)
        with TieredCache(model.config, kv, model=model) as cache:
            cache.load_prefix(ids)
            generate(model, ids, cache, n=1)
        keys = [kv.block_key(h, (0, 8)) for h in chain_hashes(ids[0], BS, ident)]
        locs = [_block_offset(store, k) for k in keys]
    path, off, n = locs[2]  # damage the third block
    if damage == "corrupt":
        with open(path, "r+b") as f:
            f.seek(off + n // 2)
            b = f.read(1)
            f.seek(off + n // 2)
            f.write(bytes([b[0] ^ 0x40]))
    else:
        last = max(locs, key=lambda t: t[1])
        assert last[1] >= off
        os.truncate(path, last[1] + last[2] // 2)  # the block at the highest offset loses its end
        path, off, n = last
    bad = next(i for i, loc in enumerate(locs) if loc[1] == off)
    with tiered.TieredStore(store_config(tmp_path)) as store:
        kv = KVStore(store, ident, block_size=BS)
        with TieredCache(model.config, kv, model=model) as cache:
            assert cache.load_prefix(ids) == bad * BS  # stops at the damaged block
            got = generate(model, ids, cache)
        assert kv.stats["corrupt_blocks"] == 1
        # recomputed and saved again: the next request loads every block
        with TieredCache(model.config, kv, model=model) as cache:
            assert cache.load_prefix(ids) == 64
            again = generate(model, ids, cache)
    for out in (got, again):
        assert torch.equal(out.sequences, want.sequences)


def test_other_model_is_never_reused(tmp_path):
    a, b = make_model(seed=0), make_model(seed=1)  # same config, other weights
    ids = prompt(70)
    ia, ib = model_identity(a), model_identity(b)
    assert ia != ib
    assert model_identity(a, dtype=torch.float16) != ia  # dtype is part of the identity
    assert model_identity(make_model(layers=7)) != ia  # so is the config
    assert model_identity(a, device_type="cuda") != ia  # and the kind of device computing it
    assert model_identity(make_model(seed=0)) == ia  # while the same model hashes the same

    class Cfg:  # other attention kernels compute other bits of the same KV
        def __init__(self, attn):
            self._attn_implementation = attn

        def to_dict(self):
            return {"hidden_size": 64}

    def ident(attn):
        return model_identity(config=Cfg(attn), dtype=torch.float32, weights="rev1")

    assert ident("sdpa") == ident("sdpa") != ident("eager")
    with tiered.TieredStore(store_config(tmp_path)) as store:
        with TieredCache(a.config, KVStore(store, ia, block_size=BS), model=a) as cache:
            cache.load_prefix(ids)
            generate(a, ids, cache, n=1)
        kv_b = KVStore(store, ib, block_size=BS)
        with TieredCache(b.config, kv_b) as cache:
            assert cache.load_prefix(ids) == 0
            got = generate(b, ids, cache, n=8)
        assert torch.equal(got.sequences, generate(b, ids, DynamicCache(), n=8).sequences)
        forged = ia[:16] + "0" * (len(ia) - 16)  # same key namespace, different identity
        with pytest.raises(KVStoreError, match="blocks of another model are never reused"):
            KVStore(store, forged, block_size=BS)


def test_storage_capacity_evicts_prefix_blocks_through_policy(tmp_path):
    model = make_model()
    with tiered.TieredStore(store_config(tmp_path)) as store:
        block_bytes = 8 * 2 * 2 * BS * 16 * 4  # layers, K/V, kv heads, tokens, head dim, fp32
        kv = KVStore(store, model_identity(model), block_size=BS, capacity=6 * block_bytes, policy="lru")
        for seed in range(4):  # 4 prompts x 3 blocks, room for 6
            with TieredCache(model.config, kv, model=model) as cache:
                cache.load_prefix(prompt(50, seed))
                generate(model, prompt(50, seed), cache, n=1)
        assert kv.used_bytes() <= 6 * block_bytes
        assert kv.stats["evicted_blocks"] == 6
        with TieredCache(model.config, kv, model=model) as cache:
            assert cache.load_prefix(prompt(50, 3)) == 48  # the newest survived
        with TieredCache(model.config, kv, model=model) as cache:
            assert cache.load_prefix(prompt(50, 0)) == 0  # the oldest went first


def test_prefix_aware_store_keeps_blocks_of_queued_prompts(tmp_path):
    """With the queue of pending prompts, the oldest blocks survive if a queued prompt needs them."""
    model = make_model()
    block_bytes = 8 * 2 * 2 * BS * 16 * 4
    with tiered.TieredStore(store_config(tmp_path)) as store:
        kv = KVStore(store, model_identity(model), block_size=BS, capacity=6 * block_bytes, policy="prefix-aware")
        for seed in (0, 1):
            with TieredCache(model.config, kv, model=model) as cache:
                cache.load_prefix(prompt(50, seed))
                generate(model, prompt(50, seed), cache, n=1)
        kv.expect([prompt(50, 0)[0]], layers=8)  # prompt 0 waits in the queue: LRU would drop it first
        with TieredCache(model.config, kv, model=model) as cache:
            cache.load_prefix(prompt(50, 2))
            generate(model, prompt(50, 2), cache, n=1)
        with TieredCache(model.config, kv, model=model) as cache:
            assert cache.load_prefix(prompt(50, 0)) == 48
        with TieredCache(model.config, kv, model=model) as cache:
            assert cache.load_prefix(prompt(50, 1)) == 0


def test_queued_prompts_declare_their_stored_blocks_as_the_kv_stores_plan(tmp_path):
    model = make_model()
    with tiered.TieredStore(store_config(tmp_path)) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        with TieredCache(model.config, kv, model=model) as cache:
            cache.load_prefix(prompt(50, 0))
            generate(model, prompt(50, 0), cache, n=1)
        stored = [k for k in store.keys() if "/b/" in k]
        assert stored
        kv.expect([prompt(50, 1)[0], prompt(50, 0)[0]], layers=8)  # only prompt 0's blocks are stored
        assert store.stats()["plans"]["active"][kv.owner]["keys"] == len(stored)
        kv.expect([], layers=8)
        assert kv.owner not in store.stats()["plans"]["active"]
        kv.expect([prompt(50, 0)[0]], layers=8)
        kv.close()  # withdraws it
        assert kv.owner not in store.stats()["plans"]["active"]


# --------------------------------------------------------------------------- policy


def _fill(policy, keys):
    for k in keys:
        policy.admit(Observation(k, 10, "kv", "write"))


def test_prefix_aware_is_lru_without_a_queue_and_keeps_queued_blocks():
    lru, pa = LRU(), PrefixAware()
    for p in (lru, pa):
        _fill(p, "abcdef")
        p.touch(Observation("a", 10, "kv"))
    ok = lambda k: True  # noqa: E731
    assert pa.victims(30, ok) == lru.victims(30, ok) == ["b", "c", "d"]
    pa.set_queue([["c", "x"], ["b"], ["d", "c"]])
    assert pa.victims(30, ok) == ["e", "f", "a"]  # nobody needs these
    assert pa.victims(50, ok) == ["e", "f", "a", "d", "b"]  # then furthest next use first
    assert pa.victims(20, lambda k: k != "e") == ["f", "a"]
    pa.remove("f")
    assert "f" not in pa and len(pa) == 5


# --------------------------------------------------------------------------- Mooncake replay

Req = namedtuple("Req", "timestamp_ms input_length output_length hash_ids")


def test_replay_counts_hits_per_tier_and_bytes():
    """Worked by hand: host holds 2 blocks, storage 4 (inclusive), LRU on both."""
    reqs = [Req(0, 1024, 10, [1, 2]), Req(1, 1500, 10, [1, 2, 3]), Req(2, 600, 10, [4, 5]),
            Req(3, 1024, 10, [1, 2]), Req(4, 512, 10, [2])]
    cfg = ReplayConfig(bytes_per_token=2, host_bytes=2 * 1024, storage_bytes=4 * 1024, block_tokens=512,
                       policy="lru")
    r = replay(reqs, cfg)
    assert r["requests"] == 5 and r["blocks"] == 10
    # req1 reuses 1, 2 from host; block 3 cannot enter host (1, 2 in use); req2 pushes 1 out of
    # storage; req3 recomputes 1 (miss) and so 2 too (prefix broken); req4 reads 2 from storage
    assert r["hits"] == {"host": 2, "storage": 1} and r["misses"] == 7
    assert r["prefill_tokens_saved"] == 512 + 512 + 512
    assert r["bytes_written"] == 6 * 1024  # 1, 2, 3, 4, 5, then 1 again; 2 was still stored
    assert r["bytes_read"]["storage"] == 1024
    assert r["evictions"]["storage"] == 2


def test_replay_future_aware_beats_lru_on_a_looping_prefix():
    # a shared system prompt (block 0) reused by every 4th request, other traffic in between
    reqs, nxt = [], 100
    for i in range(60):
        if i % 4 == 0:
            reqs.append(Req(i, 1024, 1, [0, 1]))
        else:
            reqs.append(Req(i, 1024, 1, [nxt, nxt + 1]))
            nxt += 2
    base = dict(bytes_per_token=1, host_bytes=3 * 512, storage_bytes=6 * 512, block_tokens=512, queue=8)
    lru = replay(reqs, ReplayConfig(policy="lru", **base))
    pa = replay(reqs, ReplayConfig(policy="prefix-aware", **base))
    assert pa["prefill_tokens_saved"] > lru["prefill_tokens_saved"]


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generate_bitwise_and_prefix_reuse(tmp_path):
    """On the GPU: staging and resident blocks in device memory, spills through the pinned host
    tier, the gather thread (lookahead 'auto' = 1 there); then a prefix loaded from the store."""
    model = make_model().cuda()
    ids = prompt(75).cuda()
    want = generate(model, ids, DynamicCache())
    with tiered.TieredStore(store_config(tmp_path)) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        with TieredCache(model.config, kv, model=model, device_budget=kv_bytes(model, 91) // 2) as cache:
            assert cache.lookahead == 1
            cache.load_prefix(ids)
            got = generate(model, ids, cache)
            st = cache.stats()
        assert st["spilled_blocks"] >= 2 and st["store_reads"] > 0, st
        assert_bitwise(want, got)
        with TieredCache(model.config, kv, model=model, device_budget=kv_bytes(model, 91) // 2) as cache:
            assert cache.load_prefix(ids) == 64
            again = generate(model, ids, cache)
        assert torch.equal(again.sequences, want.sequences)
