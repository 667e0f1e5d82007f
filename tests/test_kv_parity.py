"""TieredCache against transformers' DynamicCache(config=...) -- the cache ``generate`` builds by
default -- on tiny decoders of several architectures: sliding-window layers, KV-shared layers,
K/V handed to attention that stay valid, and the cache operations generation strategies call."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from transformers import DynamicCache

import helpers
import tiered
from helpers import kv_bytes
from tiered.kv import KVCacheError, KVStore, TieredCache, kv_geometry
from tiered.kv.layers import plan_layers

BS = 8
VOCAB = 300

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
               max_position_embeddings=512, num_attention_heads=4, num_key_value_heads=2)


def _gemma3n():
    cfg = transformers.Gemma3nTextConfig(
        **{**_COMMON, "num_hidden_layers": 4}, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8,
        head_dim=16, sliding_window=6, num_kv_shared_layers=2, layer_types=["sliding_attention", "full_attention"] * 2,
        laurel_rank=4, altup_num_inputs=2, activation_sparsity_pattern=[0.0] * 4)
    return transformers.Gemma3nForCausalLM(cfg)


ARCHS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_COMMON)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_COMMON)),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**_COMMON, head_dim=16,
                                                                               sliding_window=6)),
    "mistral-sliding": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**_COMMON,
                                                                                          sliding_window=6)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=4,
                                                                         n_head=4, n_positions=512,
                                                                         bos_token_id=1, eos_token_id=2)),
    "gemma3n-kv-shared": _gemma3n,
}


@functools.lru_cache(maxsize=None)
def make_model(arch: str):
    torch.manual_seed(0)
    return ARCHS[arch]().eval()


def prompt(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, n), generator=g)


def store_config(tmp_path) -> dict:
    return helpers.store_config(tmp_path, "8MiB")


def generate(model, ids, cache, n=10, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, cache=cache, output_scores=True,
                              return_dict_in_generate=True, pad_token_id=0, **kw)


def reference(model):
    return DynamicCache(config=model.config)


def assert_bitwise(want, got):
    assert torch.equal(want.sequences, got.sequences), (want.sequences, got.sequences)
    assert len(want.scores) == len(got.scores)
    assert all(torch.equal(a, b) for a, b in zip(want.scores, got.scores))


# --------------------------------------------------------------------------- parity per architecture


@pytest.mark.parametrize("lookahead", [0, 1])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_generate_bitwise_equal_to_default_cache(tmp_path, arch, lookahead):
    """Blocks spilled and gathered back; sliding layers see only their window (as the default
    cache's sliding layers), KV-shared layers read the K/V their producer layer was handed."""
    model = make_model(arch)
    ids = prompt(37)
    want = generate(model, ids, reference(model))
    slot = kv_bytes(model, 56) // kv_geometry(model.config)[0]  # one layer's staging for 47 tokens
    budget = kv_bytes(model, 24) + (lookahead + 1) * slot  # room for 3 of the 5 blocks
    with tiered.TieredStore(store_config(tmp_path)) as store, \
            TieredCache(model.config, KVStore(store, block_size=BS), device_budget=budget,
                        lookahead=lookahead) as cache:
        got = generate(model, ids, cache)
        assert cache.stats()["spilled_blocks"] >= 1
    assert_bitwise(want, got)


@pytest.mark.parametrize("arch", ["gemma2", "mistral-sliding"])
def test_manual_decode_logits_and_mask_sizes_match_sliding_layers(arch):
    model = make_model(arch)
    ids = prompt(20)
    ref, cache = reference(model), TieredCache(model.config, block_size=BS).open()
    with torch.no_grad():
        for step in range(8):
            x = ids if step == 0 else tok
            a = model(x, cache=ref, use_cache=True).logits
            b = model(x, cache=cache, use_cache=True).logits
            assert torch.equal(a, b), step
            for i in range(len(ref.layers)):
                assert cache.get_mask_sizes(3, i) == ref.get_mask_sizes(3, i)
                assert cache.is_sliding[i] == ref.is_sliding[i]
            tok = a[:, -1:].argmax(-1)
    cache.close()


# --------------------------------------------------------------------------- returned K/V stay valid


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3n-kv-shared"])
def test_returned_kv_stays_valid_while_transformers_reads_it(arch):
    """A layer's returned K/V is read by its attention before the next layer's update; a KV-sharing
    source layer's ("store" in kv_sharing_modes) is read by later layers and returned by the model,
    so it stays valid after the step's last update and through the next step. Both equal
    DynamicCache(config=...)'s (its sliding layers return their window)."""
    model = make_model(arch)
    plan = plan_layers(model.config)
    heads, dim = plan.kv_heads, plan.head_dim
    for lookahead in (0, 1, 2):
        with TieredCache(model.config, block_size=4, lookahead=lookahead) as cache:
            ref = reference(model)
            kept = []
            for step, n in enumerate((9, 1, 1, 3, 1, 8, 1)):
                for l in plan.rows:
                    g = torch.Generator().manual_seed(100 * step + l)
                    k, v = torch.randn(1, heads, n, dim, generator=g), torch.randn(1, heads, n, dim, generator=g)
                    got = cache.update(k, v, l)
                    want = tuple(t.clone() for t in ref.update(k, v, l))
                    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
                    if l in plan.shared:
                        kept.append((got, want))
                for (gk, gv), (wk, wv) in kept[-2 * len(plan.shared):]:  # this step's and the last step's
                    assert torch.equal(gk, wk) and torch.equal(gv, wv)
                assert [cache.get_seq_length(l) for l in plan.rows] == [ref.get_seq_length(l) for l in plan.rows]
    assert plan.shared or arch != "gemma3n-kv-shared"


class _CountingSlots(list):
    """The cache's slot list, recording every new tensor put into a slot."""

    class _Pair(list):
        def __init__(self, pair, log):
            super().__init__(pair)
            self.log = log

        def __setitem__(self, i, value):
            if value is not None:
                self.log.append(i)
            super().__setitem__(i, value)

    def __init__(self, slots, log):
        super().__init__(self._Pair(p, log) for p in slots)
        self.log = log

    def __setitem__(self, i, pair):
        super().__setitem__(i, self._Pair(pair, self.log))


def test_decode_reuses_the_staging_slots(monkeypatch):
    """A decode step allocates no new slot per layer: a slot grows (by a block of headroom) only
    when the context outgrows it."""
    model = make_model("llama")
    allocations = []
    geometry = TieredCache._init_geometry

    def counting(self, k, v):  # counts each slot tensor the cache makes, from its first update on
        geometry(self, k, v)
        self._slots = _CountingSlots(self._slots, allocations)

    monkeypatch.setattr(TieredCache, "_init_geometry", counting)
    with TieredCache(model.config, block_size=BS, model=model, lookahead=0) as cache:
        want = generate(model, prompt(10), reference(model), n=50)
        assert_bitwise(want, generate(model, prompt(10), cache, n=50))
    # K and V, once per block of growth (and the first), not 4 layers x 2 per step
    assert 0 < len(allocations) <= 2 * (60 // BS + 2)


def test_per_layer_head_dim_is_refused_naming_the_setting():
    cfg = transformers.Gemma4TextConfig(**{**_COMMON, "num_hidden_layers": 4}, head_dim=16, global_head_dim=32,
                                        sliding_window=6)
    with pytest.raises(KVCacheError, match="per-layer KV geometry.*global_head_dim"):
        TieredCache(cfg)


def test_sliding_layers_read_only_the_blocks_their_window_reaches(tmp_path):
    model = make_model("mistral-sliding")  # every layer slides over 6 tokens
    ids, steps = prompt(60), 10
    want = generate(model, ids, reference(model), n=steps)
    layers = kv_geometry(model.config)[0]
    slot = kv_bytes(model, 80) // layers
    with tiered.TieredStore(store_config(tmp_path)) as store, \
            TieredCache(model.config, KVStore(store, block_size=BS, layers_per_object=1),
                        device_budget=kv_bytes(model, 8) + slot,
                        lookahead=0) as cache:
        got = generate(model, ids, cache, n=steps)
        st = cache.stats()
    assert st["spilled_blocks"] >= 6, st
    # a window of 5 cached tokens spans at most 2 blocks: per layer and step, at most 2 reads
    assert st["store_reads"] <= 2 * layers * steps, st
    assert_bitwise(want, got)


def test_sliding_layers_stage_only_their_window(tmp_path):
    """A sliding-only model's staging slots hold a layer's window (and a block of slack), not the
    whole context: a budget of a few blocks serves a context many times longer."""
    model = make_model("mistral-sliding")  # every layer slides over 6 tokens
    ids, steps = prompt(10), 150
    layers = kv_geometry(model.config)[0]
    window_slot = kv_bytes(model, 6 + 3 * BS) // layers  # window, the block it starts in, headroom
    want = generate(model, ids, reference(model), n=steps)
    with tiered.TieredStore(store_config(tmp_path)) as store, \
            TieredCache(model.config, KVStore(store, block_size=BS), lookahead=0,
                        device_budget=kv_bytes(model, 2 * BS) + window_slot) as cache:
        got = generate(model, ids, cache, n=steps)
        assert cache.device_bytes()["staging"] <= window_slot
        assert cache.device_bytes()["total"] <= cache.device_budget
    assert_bitwise(want, got)


def test_unsupported_layer_types_are_refused_naming_them():
    cfg = transformers.LlamaConfig(**_COMMON)
    cfg.layer_types = ["full_attention", "chunked_attention", "full_attention", "linear_attention"]
    cfg.attention_chunk_size = 4  # as Llama4 configs carry
    with pytest.raises(KVCacheError, match=r"layer_types \['chunked_attention', 'linear_attention'\]"):
        TieredCache(cfg)
