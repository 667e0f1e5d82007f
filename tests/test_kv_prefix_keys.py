"""Prefix blocks are stored only under the hash of the tokens they hold, whatever a caller does
with a cache between ``load_prefix`` and ``close``: reuse it without ``reset``, continue it, give
it another prompt, feed it through an unwatched module or with ``inputs_embeds``."""

from __future__ import annotations

import pytest
import torch

import tiered
from tiered.kv import KVStore, TieredCache, chain_hashes, model_identity

from test_kv_parity import assert_bitwise, generate, make_model, prompt, reference, store_config

BS = 8
ARCHS = ["llama", "gemma2", "gpt2"]


def stored_prefix_blocks(store) -> set[str]:
    return {k for k in store.keys() if "/b/" in k}


def seed_prefix(model, kv, ids) -> None:
    """Store the first blocks of ``ids`` the normal way."""
    with TieredCache(model.config, kv, model=model) as cache:
        cache.load_prefix(ids)
        generate(model, ids, cache, n=1)


def assert_prefix_sound(model, kv, ids, blocks: int) -> None:
    """``ids`` loads exactly ``blocks`` blocks, and generating from them gives the default cache's tokens
    (and its logits up to the rounding of a prefill split in two)."""
    want = generate(model, ids, reference(model))
    with TieredCache(model.config, kv, model=model) as cache:
        assert cache.load_prefix(ids) == blocks * BS
        got = generate(model, ids, cache)
    assert torch.equal(want.sequences, got.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(want.scores, got.scores)) < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_another_prompt_without_reset_saves_nothing_under_the_first(tmp_path, arch):
    model = make_model(arch)
    a, b = prompt(35, seed=1), prompt(35, seed=2)
    with tiered.TieredStore(store_config(tmp_path)) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        seed_prefix(model, kv, a[:, :20])  # blocks 0, 1 of a
        with TieredCache(model.config, kv, model=model) as cache:
            assert cache.load_prefix(a) == 16
            generate(model, b, cache, n=4)  # b's tokens 16.. computed on a's prefix: not a's blocks 2, 3
        assert len(stored_prefix_blocks(store)) == 2
        assert_prefix_sound(model, kv, a, blocks=2)
        # what that cache held (a[:16] + b[16:]) is computed again here, bitwise as the default cache
        mixed = torch.cat([a[:, :16], b[:, 16:]], dim=1)
        with TieredCache(model.config, kv, model=model) as cache:
            assert cache.load_prefix(mixed) == 16
            assert_bitwise(generate(model, mixed, TieredCache(model.config, block_size=BS).open()),
                           generate(model, mixed, cache))


def test_manual_forward_of_other_tokens_after_load_prefix_saves_nothing(tmp_path):
    model = make_model("llama")
    a, b = prompt(35, seed=1), prompt(35, seed=2)
    with tiered.TieredStore(store_config(tmp_path)) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        seed_prefix(model, kv, a[:, :20])
        with TieredCache(model.config, kv, model=model) as cache, torch.no_grad():
            assert cache.load_prefix(a) == 16
            model(b[:, 16:], cache=cache, use_cache=True)
        assert len(stored_prefix_blocks(store)) == 2
        assert_prefix_sound(model, kv, a, blocks=2)


def test_continuing_a_cache_saves_only_blocks_of_its_real_tokens(tmp_path):
    """generate, then generate again on the same cache with the output and more tokens appended."""
    model = make_model("llama")
    a = prompt(30, seed=1)
    with tiered.TieredStore(store_config(tmp_path)) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        with TieredCache(model.config, kv, model=model) as cache:
            cache.load_prefix(a)
            out = generate(model, a, cache, n=6)
            more = torch.cat([out.sequences, prompt(12, seed=3)], dim=1)
            again = generate(model, more, cache, n=5)
        assert len(stored_prefix_blocks(store)) == 3  # a's full blocks
        ref = reference(model)
        assert torch.equal(generate(model, a, ref, n=6).sequences, out.sequences)
        assert torch.equal(generate(model, more, ref, n=5).sequences, again.sequences)
        assert_prefix_sound(model, kv, a, blocks=3)


def test_unknown_tokens_stop_saving(tmp_path):
    """inputs_embeds, a forward of a module the cache does not watch, or no model at all: the
    tokens behind the K/V are unknown, so no block is saved."""
    model = make_model("llama")
    a = prompt(35, seed=1)
    with tiered.TieredStore(store_config(tmp_path)) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        with TieredCache(model.config, kv, model=model) as cache, torch.no_grad():
            cache.load_prefix(a)
            model(inputs_embeds=model.get_input_embeddings()(a), cache=cache, use_cache=True)
        with TieredCache(model.config, kv, model=model) as cache, torch.no_grad():
            cache.load_prefix(a)
            model.model(a, cache=cache, use_cache=True)  # the decoder, not the watched model
        with TieredCache(model.config, kv) as cache:
            cache.load_prefix(a)
            generate(model, a, cache, n=1)
        assert stored_prefix_blocks(store) == set()
        seed_prefix(model, kv, a)  # watched, ids known: saved
        assert len(stored_prefix_blocks(store)) == 4
        assert_prefix_sound(model, kv, a, blocks=4)


def test_blocks_are_keyed_by_the_chained_hash_of_their_tokens(tmp_path):
    model = make_model("llama")
    a = prompt(35, seed=1)
    ident = model_identity(model)
    with tiered.TieredStore(store_config(tmp_path)) as store:
        kv = KVStore(store, ident, block_size=BS)
        seed_prefix(model, kv, a)
        want = {kv.block_key(h, (0, 4)) for h in chain_hashes(a[0], BS, ident)}
        assert stored_prefix_blocks(store) == want


def test_a_deep_copy_keeps_the_tokens_it_holds_and_saves_only_its_own(tmp_path):
    """Copy a cache holding a's loaded prefix; the copy continues with b, the original with a:
    only a's blocks are stored, each under a's hashes."""
    import copy

    model = make_model("llama")
    a, b = prompt(35, seed=1), prompt(35, seed=2)
    with tiered.TieredStore(store_config(tmp_path)) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        seed_prefix(model, kv, a[:, :20])
        with TieredCache(model.config, kv, model=model) as cache:
            assert cache.load_prefix(a) == 16
            with copy.deepcopy(cache) as twin:
                generate(model, b, twin, n=3)
                assert len(stored_prefix_blocks(store)) == 2
                generate(model, a, cache, n=3)
        want = {kv.block_key(h, (0, 4)) for h in chain_hashes(a[0], BS, model_identity(model))}
        assert stored_prefix_blocks(store) == want
        assert_prefix_sound(model, kv, a, blocks=4)
