"""The cache operations transformers' generation strategies call, against DynamicCache(config=...):
beam search (reorder_cache), prompt-lookup decoding (crop), num_return_sequences on a prefilled
cache (batch_repeat_interleave), batch_select_indices, and copy.deepcopy of a filled cache --
with blocks spilled to the store and loaded prefixes."""

from __future__ import annotations

import copy

import pytest
import torch

import tiered
from tiered.kv import KVCacheError, KVStore, TieredCache, model_identity

from test_kv_parity import assert_bitwise, make_model, prompt, reference, store_config

BS = 8
ARCHS = ["llama", "gemma2", "gpt2"]


def gen(model, ids, cache, n=8, **kw):
    kw.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, cache=cache, output_scores=True,
                              return_dict_in_generate=True, pad_token_id=0, **kw)


def tiered_cache(store, model, budget="96KiB", **kw):
    kv = KVStore(store, model_identity(model), block_size=BS)
    return TieredCache(model.config, kv, model=model, device_budget=budget, **kw)


def repetitive(n=40, seed=1) -> torch.Tensor:
    base = prompt(7, seed)
    return base.repeat(1, n // 7 + 1)[:, :n]


@pytest.mark.parametrize("arch", ARCHS)
def test_beam_search_bitwise(tmp_path, arch):
    model = make_model(arch)
    ids = prompt(30)
    want = gen(model, ids, reference(model), num_beams=2)
    with tiered.TieredStore(store_config(tmp_path)) as store, tiered_cache(store, model) as cache:
        got = gen(model, ids, cache, num_beams=2)
        assert cache.stats()["spilled_blocks"] > 0
    assert_bitwise(want, got)


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_lookup_decoding_bitwise(tmp_path, arch):
    model = make_model(arch)
    ids = repetitive()
    want = gen(model, ids, reference(model), n=12, prompt_lookup_num_tokens=3)
    with tiered.TieredStore(store_config(tmp_path)) as store, tiered_cache(store, model) as cache:
        got = gen(model, ids, cache, n=12, prompt_lookup_num_tokens=3)
    assert torch.equal(want.sequences, got.sequences)


def _prefilled(model, cache, ids):
    with torch.no_grad():
        model(ids[:, :-1], cache=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("arch", ARCHS)
def test_deepcopy_of_a_filled_cache_then_continue_both(tmp_path, arch):
    model = make_model(arch)
    ids = prompt(30)
    ref = _prefilled(model, reference(model), ids)
    ref2 = copy.deepcopy(ref)
    a, b = torch.cat([ids, prompt(5, 2)], 1), torch.cat([ids, prompt(9, 3)], 1)
    want_a, want_b = gen(model, a, ref), gen(model, b, ref2)
    with tiered.TieredStore(store_config(tmp_path)) as store, tiered_cache(store, model) as cache:
        _prefilled(model, cache, ids)
        with copy.deepcopy(cache) as twin:
            assert twin is not cache and twin.get_seq_length() == cache.get_seq_length()
            got_a, got_b = gen(model, a, cache), gen(model, b, twin)
    assert_bitwise(want_a, got_a)
    assert_bitwise(want_b, got_b)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_deepcopy_of_a_loaded_prefix_shares_its_blocks(tmp_path, arch):
    model = make_model(arch)
    ids = prompt(30)
    with tiered.TieredStore(store_config(tmp_path)) as store:
        with tiered_cache(store, model) as cache:
            cache.load_prefix(ids)
            first = gen(model, ids, cache)
        with tiered_cache(store, model) as cache:
            assert cache.load_prefix(ids) == 24
            twin = copy.deepcopy(cache)
            got1, got2 = gen(model, ids, cache), gen(model, ids, twin)
            twin.close()
    assert_bitwise(got1, got2)
    assert torch.equal(first.sequences, got1.sequences)


@pytest.mark.parametrize("arch", ARCHS)
def test_num_return_sequences_after_a_prefill(tmp_path, arch):
    """A prefilled one-row cache repeated for num_return_sequences=2 (as DynamicCache needs too),
    sampled with the same seed; a cache of the wrong batch is a clear error."""
    model = make_model(arch)
    ids = prompt(30)
    outs = []
    with tiered.TieredStore(store_config(tmp_path)) as store, tiered_cache(store, model, "256KiB") as cache:
        for c in (reference(model), cache):
            _prefilled(model, c, ids)
            c.batch_repeat_interleave(2)
            torch.manual_seed(0)
            outs.append(gen(model, ids, c, do_sample=True, num_return_sequences=2))
        cache.reset()
        _prefilled(model, cache, ids)
        with pytest.raises(KVCacheError, match="batch_repeat_interleave"):
            gen(model, ids, cache, do_sample=True, num_return_sequences=2)
    assert_bitwise(*outs)


@pytest.mark.parametrize("arch", ARCHS)
def test_num_return_sequences_and_batch_ops_on_a_prefilled_cache(tmp_path, arch):
    """batch_repeat_interleave (what num_return_sequences needs of a prefilled cache), then
    batch_select_indices, decoding between them; logits bitwise."""
    model = make_model(arch)
    ids = prompt(30)
    with tiered.TieredStore(store_config(tmp_path)) as store, tiered_cache(store, model, "256KiB") as cache:
        ref = reference(model)
        outs = []
        with torch.no_grad():
            for c in (ref, cache):
                logits = [model(ids, cache=c, use_cache=True).logits]
                c.batch_repeat_interleave(3)
                tok = torch.tensor([[5], [6], [7]])
                for step in range(12):
                    logits.append(model(tok, cache=c, use_cache=True).logits)
                    if step == 5:
                        c.batch_select_indices(torch.tensor([2, 0]))
                        tok = tok[[2, 0]]
                    if step == 8:
                        c.reorder_cache(torch.tensor([1, 1]))
                        tok = tok[[1, 1]]
                    tok = (tok + 1) % 300
                outs.append(logits)
        assert cache.stats()["spilled_blocks"] > 0
    assert all(torch.equal(x, y) for x, y in zip(*outs))


@pytest.mark.parametrize("arch,cuts,lengths", [
    ("llama", ((-2, 3), (-5, 4), (-20, 6), (0, 1)), [43, 41, 25, 31]),
    ("gpt2", ((-2, 3), (-5, 4), (-20, 6), (0, 1)), [43, 41, 25, 31]),
    # DynamicCache's sliding layers (recording their past) can only undo the last forward's tokens
    ("gemma2", ((-2, 3), (-3, 4), (-4, 6), (0, 1)), [43, 43, 43, 49]),
])
def test_crop_then_continue_bitwise(tmp_path, arch, cuts, lengths):
    """crop inside the tail, across a block boundary, and into a spilled block."""
    model = make_model(arch)
    ids = prompt(45)
    with tiered.TieredStore(store_config(tmp_path)) as store, tiered_cache(store, model) as cache:
        ref = reference(model)
        if arch == "gemma2":
            ref.activate_past_recording()
        outs, seen_all = [], []
        with torch.no_grad():
            for c in (ref, cache):
                logits, seen = [model(ids, cache=c, use_cache=True).logits], []
                for cut, more in cuts:
                    c.crop(cut)
                    seen.append(c.get_seq_length())
                    logits.append(model(prompt(more, 7 - cut), cache=c, use_cache=True).logits)
                outs.append(logits)
                seen_all.append(seen)
    assert seen_all[0] == seen_all[1] == lengths
    assert all(torch.equal(x, y) for x, y in zip(*outs))


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_assisted_decoding_with_an_assistant_model_bitwise(tmp_path, arch):
    model, assistant = make_model(arch), make_model("qwen2")
    ids = repetitive(35)
    want = gen(model, ids, reference(model), n=12, assistant_model=assistant)
    with tiered.TieredStore(store_config(tmp_path)) as store, tiered_cache(store, model) as cache:
        got = gen(model, ids, cache, n=12, assistant_model=assistant)
    assert torch.equal(want.sequences, got.sequences)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_bitwise(tmp_path, arch):
    model = make_model(arch)
    ids = torch.cat([prompt(30, 1), prompt(30, 2)])
    mask = torch.ones_like(ids)
    ids[0, :7], mask[0, :7] = 0, 0  # the first prompt is 7 tokens shorter, padded on the left
    outs = []
    with tiered.TieredStore(store_config(tmp_path)) as store, tiered_cache(store, model, "256KiB") as cache:
        for c in (reference(model), cache):
            outs.append(gen(model, ids, c, attention_mask=mask))
        assert cache.stats()["spilled_blocks"] > 0
    assert_bitwise(*outs)


# --------------------------------------------------------------------------- several rows on a loaded prefix


def _seeded(store, model, ids):
    """A KVStore holding ``ids``' full blocks (but the last token's)."""
    from test_kv_prefix_keys import seed_prefix

    kv = KVStore(store, model_identity(model), block_size=BS)
    seed_prefix(model, kv, ids)
    return kv


@pytest.mark.parametrize("lookahead", [0, 1])
def test_beam_search_and_num_return_sequences_after_load_prefix(tmp_path, lookahead):
    """generate feeds the prompt in 2 rows onto a prefix loaded for one: the prefix is repeated to
    them, and the result is DynamicCache's over the whole prompt (repeatedly: no stale memory)."""
    model = make_model("llama")
    ids = prompt(35)
    want_beam = gen(model, ids, reference(model), n=4, num_beams=2)
    torch.manual_seed(0)
    want_nrs = gen(model, ids, reference(model), n=4, do_sample=True, num_return_sequences=2)
    with tiered.TieredStore(store_config(tmp_path)) as store:
        kv = _seeded(store, model, ids)
        for budget in (None, "96KiB", None):
            with TieredCache(model.config, kv, model=model, device_budget=budget, lookahead=lookahead) as cache:
                assert cache.load_prefix(ids) == 32
                assert_bitwise(want_beam, gen(model, ids, cache, n=4, num_beams=2))
                cache.reset()
                assert cache.load_prefix(ids) == 32
                torch.manual_seed(0)
                assert_bitwise(want_nrs, gen(model, ids, cache, n=4, do_sample=True, num_return_sequences=2))


def test_batch_repeat_interleave_right_after_load_prefix(tmp_path):
    """Repeating a loaded prefix before the first step continues it in every row (as a prefilled
    DynamicCache repeated the same way); rows that are not the prompt need it, else a clear error."""
    model = make_model("llama")
    a, b = prompt(35, seed=1), prompt(35, seed=2)
    rows = torch.cat([a[:, 32:], b[:, 32:]])
    with tiered.TieredStore(store_config(tmp_path)) as store:
        kv = _seeded(store, model, a)
        ref = reference(model)
        with torch.no_grad():
            model(a[:, :32], cache=ref, use_cache=True)
            ref.batch_repeat_interleave(2)
            want = model(rows, cache=ref, use_cache=True).logits
        with TieredCache(model.config, kv, model=model) as cache, torch.no_grad():
            assert cache.load_prefix(a) == 32
            cache.batch_repeat_interleave(2)
            got = model(rows, cache=cache, use_cache=True).logits
            assert torch.allclose(want, got, atol=1e-5, rtol=0)
            cache.reset()
            assert cache.load_prefix(a) == 32
            with pytest.raises(KVCacheError, match="batch_repeat_interleave"):
                model(rows, cache=cache, use_cache=True)  # row 1 is not the prompt
            cache.batch_repeat_interleave(2)  # as the error says
            assert torch.allclose(want, model(rows, cache=cache, use_cache=True).logits, atol=1e-5, rtol=0)
        with TieredCache(model.config, kv) as cache:  # no model watched: the rows' tokens are unknown
            assert cache.load_prefix(a) == 32
            with pytest.raises(KVCacheError, match="batch_repeat_interleave"):
                gen(model, a, cache, n=2, num_beams=2)


def test_a_gather_that_does_not_fill_its_slot_is_refused():
    from tiered.kv.blocks import cat_into as _cat_into

    out = torch.empty(1, 2, 8, 4)
    with pytest.raises(KVCacheError, match="do not match"):
        _cat_into([torch.zeros(2, 2, 8, 4)], out[:, :, :8])
    with pytest.raises(KVCacheError, match="do not match"):
        _cat_into([torch.zeros(1, 2, 4, 4)], out[:, :, :8])
    _cat_into([torch.ones(1, 2, 3, 4), torch.ones(1, 2, 5, 4)], out)
    assert torch.equal(out, torch.ones(1, 2, 8, 4))


def test_batch_edits_keep_the_device_budget(tmp_path, monkeypatch):
    """Repeating the rows of a cache whose blocks are all resident spills the blocks that no longer
    fit as it goes: the device never holds more than the budget."""
    from tiered.kv import edit

    model = make_model("llama")
    peak = [0]
    replace = edit.replace

    def measured(cache, blk, data, resident):
        replace(cache, blk, data, resident)
        peak[0] = max(peak[0], cache.device_bytes()["total"])

    monkeypatch.setattr(edit, "replace", measured)
    with tiered.TieredStore(store_config(tmp_path)) as store, \
            tiered_cache(store, model, "160KiB", lookahead=0) as cache:
        ref = reference(model)
        assert_bitwise(gen(model, prompt(4), ref, n=100), gen(model, prompt(4), cache, n=100))
        assert len(cache._blocks) > 10 and all(b.data is not None for b in cache._blocks)
        for c in (ref, cache):
            c.batch_repeat_interleave(4)
        assert peak[0] <= cache.device_budget
        tok = torch.tensor([[5], [6], [7], [8]])
        with torch.no_grad():
            assert torch.equal(model(tok, cache=ref, use_cache=True).logits,
                               model(tok, cache=cache, use_cache=True).logits)
