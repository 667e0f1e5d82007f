"""The gather side of a TieredCache: a layer's stored blocks come back with one batched range read
per layer and step, copied into its slot with a few copies (not one per block), planned once per
step, and the tokens stay DynamicCache's."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from transformers import DynamicCache

import helpers
import tiered
from tiered.kv import KVStore, TieredCache, kv_geometry
from tiered.kv import reads as kv_reads
from tiered.kv.plan import checksum_block

CACHE = ("cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters
         else "past_key_values")
BS = 16  # 16 tokens x 64 dims x 4 bytes: one head's rows of a block are 4 KiB (whole checksum blocks)
LAYERS = 4

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def make_model(layers: int = LAYERS):
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def prompt(n: int) -> torch.Tensor:
    return torch.randint(1, 300, (1, n), generator=torch.Generator().manual_seed(1))


def budget(model, tokens: int, lookahead: int = 0, resident: int = 2) -> int:
    """Device bytes for ``lookahead + 1`` slots of ``tokens`` (and a block of headroom), the tails
    and ``resident`` blocks: the rest of the context is spilled."""
    layers, heads, dim = kv_geometry(model.config)
    per_layer = 2 * heads * dim * 4  # bytes of a token's K and V in one layer
    return ((lookahead + 1) * (tokens + BS) + layers * BS + resident * layers * BS) * per_layer


class Calls:
    """Counts a store's calls of ``names`` (wrapping the bound methods on the instance)."""

    def __init__(self, store, *names: str) -> None:
        self.counts = dict.fromkeys(names, 0)
        self.args: dict[str, list] = {n: [] for n in names}
        for name in names:
            setattr(store, name, self._wrap(name, getattr(store, name)))

    def _wrap(self, name, fn):
        def call(*args, **kwargs):
            self.counts[name] += 1
            self.args[name].append(args)
            return fn(*args, **kwargs)
        return call

    def reset(self) -> None:
        for n in self.counts:
            self.counts[n] = 0
            self.args[n].clear()


def prefill(model, cache, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **{CACHE: cache}, use_cache=True).logits[:, -1:].argmax(-1)


def steps(model, cache, tok, n: int, on_step=None) -> list[torch.Tensor]:
    """``n`` greedy decode steps from ``tok``: their logits; ``on_step(i)`` after each."""
    out = []
    with torch.no_grad():
        for i in range(n):
            logits = model(tok, **{CACHE: cache}, use_cache=True).logits[:, -1]
            out.append(logits)
            tok = logits.argmax(-1, keepdim=True)
            if on_step is not None:
                on_step(i)
    return out


def reference(model, ids, n: int) -> list[torch.Tensor]:
    cache = DynamicCache()
    return steps(model, cache, prefill(model, cache, ids), n)


def stored_store(tmp_path, host: str = "1MiB"):
    """A store whose puts keep no host copy, its host tier smaller than the test's KV (1.2 MiB):
    the cache keeps what half of it holds in host, the other spilled parts are read from storage."""
    return tiered.TieredStore(helpers.store_config(tmp_path, host), cache_on_put=False)


def assert_equal(want, got) -> None:
    assert len(want) == len(got) and all(torch.equal(a, b) for a, b in zip(want, got))


@pytest.mark.parametrize("lookahead", [0, 1])
def test_one_range_read_per_layer_and_step_and_tokens_equal_dynamic_cache(tmp_path, lookahead):
    model = make_model()
    ids, n = prompt(300), 8
    want = reference(model, ids, n)
    per_step = []
    with stored_store(tmp_path) as store:
        calls = Calls(store, "read_range_arrays", "acquire", "get", "prefetch")
        with TieredCache(model.config, KVStore(store, block_size=BS, layers_per_object=1),
                         device_budget=budget(model, 320, lookahead), lookahead=lookahead) as cache:
            tok = prefill(model, cache, ids)
            calls.reset()
            copies = [cache.stats().get("gather_copies", 0)]

            def count(_i):
                per_step.append(dict(calls.counts))
                copies.append(cache.stats().get("gather_copies", 0))
                calls.reset()

            got = steps(model, cache, tok, n, count)
            st = cache.stats()
    assert st["spilled_blocks"] >= 3 and st["resident_blocks"] < st["blocks"] // 2, st
    for counts in per_step:  # none fetched or prefetched one by one
        assert counts["get"] == counts["prefetch"] == 0, per_step
    # the parts kept in host: acquired (as many each step); the others read by range
    acquires = [c["acquire"] for c in per_step]
    assert 0 < sum(acquires) < n * st["blocks"] * LAYERS, per_step
    reads = [c["read_range_arrays"] for c in per_step]
    if lookahead == 0:
        assert len(set(acquires[1:])) == 1, per_step
        # every layer's stored blocks in one batched call
        assert reads == [LAYERS] * n, per_step
        # per layer: one cat per K and V of the host copies, one copy per K and V of the read blocks,
        # one cat per K and V of the resident blocks and the tail
        assert [b - a for a, b in zip(copies, copies[1:])] == [6 * LAYERS] * n, copies
    else:  # the gather thread runs a layer or two into the next step: count the whole run
        assert LAYERS * (n - 1) <= sum(reads) <= LAYERS * (n + 1), per_step
        assert 6 * LAYERS * (n - 1) <= copies[-1] - copies[0] <= 6 * LAYERS * (n + 1), copies
    assert_equal(want, got)


def test_a_part_of_several_layers_is_read_one_layer_at_a_time(tmp_path):
    model = make_model()
    ids, n = prompt(300), 4
    want = reference(model, ids, n)
    layer_bytes = 2 * 2 * BS * 64 * 4  # K and V, 2 heads, 16 tokens, 64 dims
    with stored_store(tmp_path) as store:
        calls = Calls(store, "read_range_arrays", "acquire")
        with TieredCache(model.config, KVStore(store, block_size=BS, layers_per_object=2),
                         device_budget=budget(model, 320), lookahead=0) as cache:
            tok = prefill(model, cache, ids)
            calls.reset()
            got = steps(model, cache, tok, n)
    assert calls.counts["read_range_arrays"] == LAYERS * n, calls.counts
    for keys, which, offsets, lengths, *_rest in calls.args["read_range_arrays"]:
        # that layer's bytes of each block (the first or the second layer of its part), not the part's
        assert len(keys) > 0 and set(lengths.tolist()) == {layer_bytes}, lengths
        assert len(set(offsets.tolist())) == 1 and offsets[0] in (0, layer_bytes), offsets
    assert_equal(want, got)


def test_the_plan_is_computed_once_per_step(tmp_path, monkeypatch):
    model = make_model()
    ids, n = prompt(300), 6
    built = []
    real = kv_reads.build_plan
    monkeypatch.setattr(kv_reads, "build_plan", lambda *a, **k: built.append(1) or real(*a, **k))
    with stored_store(tmp_path) as store, \
            TieredCache(model.config, KVStore(store, block_size=BS, layers_per_object=1),
                        device_budget=budget(model, 320), lookahead=0) as cache:
        tok = prefill(model, cache, ids)
        built.clear()
        steps(model, cache, tok, n)
    assert 1 <= len(built) <= n, built  # not per layer (or block): once per step at most


def test_crop_between_steps_drops_reads_in_flight_and_stays_exact(tmp_path):
    model = make_model()
    ids = prompt(300)
    with torch.no_grad():
        ref = DynamicCache()
        tok = prefill(model, ref, ids)
        want = steps(model, ref, tok, 3)
        ref.crop(-20)  # back across a block boundary
        want += steps(model, ref, want[0].argmax(-1, keepdim=True), 4)
    with stored_store(tmp_path) as store, \
            TieredCache(model.config, KVStore(store, block_size=BS, layers_per_object=1),
                        device_budget=budget(model, 320), lookahead=0) as cache:
        tok = prefill(model, cache, ids)
        got = steps(model, cache, tok, 3)
        reads = cache.stats()["range_reads"]
        cache.crop(-20)
        assert cache._plan is None and cache._landing_idle == []  # plan and read buffers let go
        got += steps(model, cache, got[0].argmax(-1, keepdim=True), 4)
        assert reads > 0 and cache.stats()["range_reads"] > reads
    assert_equal(want, got)


def test_checksum_block_divides_a_heads_rows():
    assert checksum_block((1, 2, 1, 2, 16, 64), torch.float32) == 4096
    assert checksum_block((16, 2, 1, 2, 512, 64), torch.float32) == 128 * 1024
    assert checksum_block((1, 2, 1, 8, 256, 128), torch.float16) == 64 * 1024
    assert checksum_block((1, 2, 1, 2, 4096, 128), torch.float32) == 1 << 20  # at most 1 MiB
    assert checksum_block((1, 2, 1, 2, 16, 16), torch.float32) == 0  # 1 KiB rows: no block checksums


def test_a_host_tier_with_room_keeps_the_stored_parts_after_the_first_step(tmp_path):
    model = make_model()
    ids, n = prompt(300), 4
    want = reference(model, ids, n)
    with stored_store(tmp_path, host="16MiB") as store:
        calls = Calls(store, "read_range_arrays", "acquire")
        with TieredCache(model.config, KVStore(store, block_size=BS, layers_per_object=1),
                         device_budget=budget(model, 320), lookahead=0) as cache:
            tok = prefill(model, cache, ids)
            got = steps(model, cache, tok, 1)
            misses, calls_after_one = store.stats()["misses"], dict(calls.counts)
            calls.reset()
            got += steps(model, cache, got[0].argmax(-1, keepdim=True), n - 1)
            st = cache.stats()
    assert st["spilled_blocks"] >= 3 and calls_after_one["acquire"] > 0, (st, calls_after_one)
    # loaded into the host tier at the first step; later steps read nothing from storage
    assert calls.counts["read_range_arrays"] == 0 and store.stats()["misses"] == misses, calls.counts
    assert_equal(want, got)


def test_host_pressure_lets_go_of_the_idle_read_buffers(tmp_path):
    model = make_model()
    ids = prompt(300)
    with stored_store(tmp_path) as store, \
            TieredCache(model.config, KVStore(store, block_size=BS, layers_per_object=1),
                        device_budget=budget(model, 320), lookahead=0) as cache:
        steps(model, cache, prefill(model, cache, ids), 2)
        held = store.owners()[cache.owner]["host"]["held"]
        assert cache._landing_idle and held > 0
        freed = cache._host_pressure(1)  # what the store calls when another owner needs room
        assert freed > 0 and cache._landing_idle == []
        assert store.owners()[cache.owner]["host"]["held"] <= held - freed
