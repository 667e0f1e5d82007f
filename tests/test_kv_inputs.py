"""What a TieredCache learns of its tokens from the forwards that feed it: ids count only when they
alone decide the K/V (no mask zeros, default positions, no token types or other inputs), a failed
forward's ids are never taken by the next one, the log stops at the declared prompt, and the hooks
let an unclosed cache be freed."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import tiered
from tiered.kv import KVStore, TieredCache, model_identity
from tiered.kv.tokens import fed_ids

from test_kv_parity import generate, make_model, prompt, store_config
from test_kv_prefix_keys import BS, assert_prefix_sound, seed_prefix, stored_prefix_blocks


def test_ids_of_a_failed_forward_are_not_taken_by_an_unwatched_one(tmp_path):
    """A watched forward fails before the first layer; a forward of the inner decoder (which the
    cache does not watch) then feeds other tokens: they must not be saved under the first's ids."""
    model = make_model("llama")
    a, b = prompt(35, seed=1), prompt(35, seed=2)

    def fail(*_):
        raise RuntimeError("failed before the first layer")

    with tiered.TieredStore(store_config(tmp_path)) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        with TieredCache(model.config, kv, model=model) as cache, torch.no_grad():
            cache.load_prefix(a)
            handle = model.model.embed_tokens.register_forward_pre_hook(fail)
            try:
                with pytest.raises(RuntimeError, match="failed before"):
                    model(input_ids=a, cache=cache, use_cache=True)
            finally:
                handle.remove()
            model.model(input_ids=b, cache=cache, use_cache=True)
        assert stored_prefix_blocks(store) == set()
        seed_prefix(model, kv, a)
        assert_prefix_sound(model, kv, a, blocks=4)


def _mask_with_zeros(ids):
    mask = torch.ones_like(ids)
    mask[:, :4] = 0
    return {"attention_mask": mask}


@pytest.mark.parametrize("arch,extra", [
    ("gpt2", lambda ids: {"token_type_ids": torch.full_like(ids, 5)}),
    ("llama", _mask_with_zeros),
    ("llama", lambda ids: {"position_ids": torch.arange(3, 3 + ids.shape[1])[None]}),
], ids=["token_type_ids", "attention_mask_zeros", "position_ids_shifted"])
def test_inputs_other_than_the_ids_stop_saving(tmp_path, arch, extra):
    """K/V that depend on more than the ids are not saved under the ids' hashes."""
    model = make_model(arch)
    a = prompt(35, seed=1)
    with tiered.TieredStore(store_config(tmp_path)) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        with TieredCache(model.config, kv, model=model) as cache, torch.no_grad():
            cache.load_prefix(a)
            model(input_ids=a, cache=cache, use_cache=True, **extra(a))
        assert stored_prefix_blocks(store) == set()
        seed_prefix(model, kv, a)
        assert_prefix_sound(model, kv, a, blocks=4)


def test_default_mask_and_positions_still_save(tmp_path):
    """An all-ones mask and the default positions are what the model uses anyway: blocks are saved."""
    model = make_model("llama")
    a = prompt(35, seed=1)
    with tiered.TieredStore(store_config(tmp_path)) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        with TieredCache(model.config, kv, model=model) as cache, torch.no_grad():
            cache.load_prefix(a)
            model(input_ids=a, attention_mask=torch.ones_like(a), position_ids=torch.arange(35)[None],
                  cache=cache, use_cache=True)
        assert len(stored_prefix_blocks(store)) == 4
        assert_prefix_sound(model, kv, a, blocks=4)


def test_fed_ids_allow_only_inputs_that_do_not_change_kv():
    ids = torch.tensor([[5, 6, 7]])
    assert fed_ids((ids,), {"use_cache": True, "logits_to_keep": 1, "inputs_embeds": None}, 0) is ids
    assert fed_ids((), {"input_ids": ids, "cache_position": torch.arange(4, 7)}, 4) is ids
    for kwargs in ({"pixel_values": torch.zeros(1, 3, 4, 4)}, {"input_features": torch.zeros(1, 2)},
                   {"attention_mask": torch.ones(1, 3, 3, 3)}, {"position_ids": torch.arange(3)[None]},
                   {"image_sizes": [(4, 4)]}, {"inputs_embeds": torch.zeros(1, 3, 8)}):
        assert fed_ids((ids,), kwargs, 4) is None, kwargs
    assert fed_ids((ids, torch.ones_like(ids)), {}, 0) is None  # a mask passed by position
    assert fed_ids((), {"inputs_embeds": torch.zeros(1, 3, 8)}, 0) is None


def test_token_log_stops_at_the_declared_prompt(tmp_path):
    """A long decode does not grow the log: ids are kept up to the declared prompt's end only."""
    model = make_model("llama")
    a = prompt(35, seed=1)
    with TieredCache(model.config, block_size=BS, model=model) as cache:
        generate(model, prompt(10), cache, n=60)  # no prompt declared: nothing to record
        assert sum(c.numel() for c in cache._tokens._chunks) == 0
    with tiered.TieredStore(store_config(tmp_path)) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        with TieredCache(model.config, kv, model=model) as cache:
            cache.load_prefix(a)
            generate(model, a, cache, n=60)
            assert sum(c.numel() for c in cache._tokens._chunks) == 35
        assert len(stored_prefix_blocks(store)) == 4


@pytest.mark.parametrize("lookahead", [0, 1])
def test_an_unclosed_cache_is_freed_and_unhooks_the_model(lookahead):
    model = make_model("llama")
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    cache = TieredCache(model.config, block_size=BS, model=model, lookahead=lookahead).open()
    generate(model, prompt(10), cache, n=2)
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == (hooks[0] + 1, hooks[1] + 1)
    ref = weakref.ref(cache)
    del cache
    gc.collect()
    assert ref() is None
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
