"""A TieredCache's batched reads stay safe at the edges: the host room a prefill keeps for the
checksum tables of its puts, errors of reads started ahead, reads that end after a reset or close,
read buffers as the context grows, and stored parts of another shape."""

from __future__ import annotations

import threading

import pytest
import torch
import transformers
from transformers import DynamicCache

import helpers
import tiered
from test_kv_gather import BS, assert_equal, budget, make_model, prefill, prompt, reference, steps, stored_store
from tiered.io_engine import IOFuture
from tiered.kv import KVCacheError, KVStore, TieredCache
from tiered.kv import plan
from tiered.kv.prefix import model_identity

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def next_token(logits: list) -> torch.Tensor:
    return logits[-1].argmax(-1, keepdim=True)


def test_checksum_table_bytes_is_a_crc32_per_block_in_whole_pages():
    checksum_table_bytes = plan.checksum_table_bytes
    assert checksum_table_bytes((1, 2, 1, 2, 16, 64), torch.float32) == 4096  # 2 blocks of 4 KiB
    # Llama-3-8B at batch 4: 32 layers x 2 x 4 x 8 heads x 256 tokens x 128 dims x 2 bytes, 64 KiB blocks
    assert checksum_table_bytes((32, 2, 4, 8, 256, 128), torch.bfloat16) == 8192
    assert checksum_table_bytes((1, 2, 1, 2, 16, 16), torch.float32) == 0  # put without block checksums


def test_a_prefill_keeps_host_room_for_checksum_tables_larger_than_a_page(tmp_path):
    """72 rows: a block's part is 4.5 MiB in 4 KiB checksum blocks, its table 4.5 KiB (two pages).
    The host tier holds the two blocks' parts and a page each for their tables, not two pages each:
    a prefill that kept one page per table would fail its put with OutOfBudget; the cache instead
    takes host buffers for one block and spills the other from the device."""
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 300, (72, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids, cache=DynamicCache(config=model.config), use_cache=True).logits
    with tiered.TieredStore(helpers.store_config(tmp_path, "9224KiB", "256MiB"), cache_on_put=False,
                            host_wait=0.5) as store, \
            TieredCache(model.config, KVStore(store, block_size=BS), device_budget=8 << 20, lookahead=0) as cache:
        with torch.no_grad():
            got = model(ids, cache=cache, use_cache=True).logits
        st = cache.stats()
    assert st["blocks"] == 2 and st["host_blocks_refused"] >= 1, st
    assert torch.equal(want, got)


def test_an_error_of_a_read_started_ahead_is_raised_by_the_layer_that_needs_it(tmp_path):
    """The next step's first read starts right after a step's last layer: when it fails, that step
    still succeeds (its token is committed); the next forward raises at its first gather, before
    it changes anything, and runs exactly once the store reads again."""
    model = make_model()
    ids = prompt(300)
    want = reference(model, ids, 4)
    failing = [False]
    with stored_store(tmp_path) as store:
        real = store.read_range_arrays

        def read(*args, **kwargs):
            if failing[0]:
                raise OSError("engine queue full")
            return real(*args, **kwargs)

        store.read_range_arrays = read
        with TieredCache(model.config, KVStore(store, block_size=BS, layers_per_object=1),
                         device_budget=budget(model, 320), lookahead=0) as cache:
            got = steps(model, cache, prefill(model, cache, ids), 1)
            # the last layer's read was started ahead; the reads started after it fail
            hook = model.model.layers[-1].register_forward_pre_hook(lambda *_a: failing.__setitem__(0, True))
            try:
                got += steps(model, cache, next_token(got), 1)
            finally:
                hook.remove()
            assert cache.stats()["reads_ahead_failed"] >= 1
            tokens = cache.get_seq_length()
            with pytest.raises(OSError, match="engine queue full"):
                steps(model, cache, next_token(got), 1)
            assert cache.get_seq_length() == tokens
            failing[0] = False
            got += steps(model, cache, next_token(got), 2)
    assert_equal(want, got)


@pytest.mark.parametrize("lookahead", [0, 1])
def test_a_read_started_ahead_that_fails_once_is_read_again_by_its_layer(tmp_path, lookahead):
    """A layer's gather starts the next layers' reads; the first read of layer 2 fails: the
    gather that started it goes on, and layer 2's own gather reads again (tokens exact)."""
    model = make_model()
    ids = prompt(300)
    want = reference(model, ids, 3)
    failures = []
    with stored_store(tmp_path) as store:
        real = store.read_range_arrays

        def read(keys, *args, **kwargs):
            if not failures and all(k.endswith("/L2-3") for k in keys):
                failures.append(keys[0])
                raise OSError("engine queue full")
            return real(keys, *args, **kwargs)

        store.read_range_arrays = read
        with TieredCache(model.config, KVStore(store, block_size=BS, layers_per_object=1),
                         device_budget=budget(model, 320, lookahead), lookahead=lookahead) as cache:
            got = steps(model, cache, prefill(model, cache, ids), 3)
            st = cache.stats()
    assert failures and st["reads_ahead_failed"] == 1, (failures, st)
    assert_equal(want, got)


class HeldReads:
    """Range reads of ``store`` that end only once ``release()`` is called (after ``hold()``)."""

    def __init__(self, store) -> None:
        self.gate = threading.Event()
        self.holding = False
        self.threads: list[threading.Thread] = []
        real = store.read_range_arrays

        def read(*args, **kwargs):
            fut = real(*args, **kwargs)
            if not self.holding:
                return fut
            out = IOFuture("held range read")

            def later() -> None:
                self.gate.wait(30)
                try:
                    out.set_result(fut.result(timeout=30))
                except BaseException as e:  # noqa: BLE001 - handed to the future's waiter
                    out.set_exception(e)

            thread = threading.Thread(target=later, daemon=True)
            thread.start()
            self.threads.append(thread)
            return out

        store.read_range_arrays = read

    def release(self) -> None:
        """Let the held reads end; returns once their done-callbacks ran."""
        self.holding = False
        self.gate.set()
        for thread in self.threads:
            thread.join(timeout=30)
            assert not thread.is_alive()


def start_held_read(model, cache, held: HeldReads) -> None:
    """Decode one step whose last layer holds the next step's first read (started ahead)."""
    tok = prefill(model, cache, prompt(300))
    hook = model.model.layers[-1].register_forward_pre_hook(lambda *_a: setattr(held, "holding", True))
    try:
        steps(model, cache, tok, 1)
    finally:
        hook.remove()
    assert held.threads, "no read was started ahead"


@pytest.mark.parametrize("end", ["reset", "close"])
def test_a_read_that_ends_after_a_reset_or_close_gives_its_buffer_back(tmp_path, end):
    model = make_model()
    with stored_store(tmp_path) as store:
        held = HeldReads(store)
        cache = TieredCache(model.config, KVStore(store, block_size=BS, layers_per_object=1),
                            device_budget=budget(model, 320), lookahead=0).open()
        try:
            start_held_read(model, cache, held)
            cache.io_timeout = 0.2  # how long the reset or close waits for the held read
            getattr(cache, end)()
            held.release()
            assert cache._landing_idle == [] and cache._landing_bytes == 0
            assert store.owners().get(cache.owner, {}).get("host", {}).get("held", 0) == 0
            if end == "reset":  # the cache goes on with accounts that add up
                cache.io_timeout = 30.0
                steps(model, cache, prefill(model, cache, prompt(300)), 2)
                in_flight = [read.buf for read in cache._plan.reads.values() if read is not None]
                assert cache._landing_bytes == sum(buf.nbytes for buf in cache._landing_idle + in_flight) > 0
        finally:
            held.release()
            cache.close()


def test_idle_read_buffers_too_small_for_a_read_go_back_to_the_store(tmp_path):
    model = make_model()
    with stored_store(tmp_path) as store, \
            TieredCache(model.config, KVStore(store, block_size=BS, layers_per_object=1),
                        device_budget=budget(model, 320), lookahead=0) as cache:
        steps(model, cache, prefill(model, cache, prompt(300)), 1)
        cache._drop_reads(wait=True)  # no read buffer held
        small = [cache._landing_buffer(4096, 0.0) for _ in range(3)]
        for buf in small:
            cache._idle(buf, cache._reads_gen)
        held = store.owners()[cache.owner]["host"]["held"]
        big = cache._landing_buffer(max(buf.nbytes for buf in small) + 1, 0.0)
        assert big is not None and cache._landing_idle == []
        assert cache._landing_bytes == big.nbytes
        assert store.owners()[cache.owner]["host"]["held"] == held - sum(buf.nbytes for buf in small) + big.nbytes
        cache._idle(big, cache._reads_gen)


def test_a_stored_part_of_another_shape_is_a_clear_error_naming_its_key(tmp_path):
    """Parts stored for one row, read by a cache that holds two (cropped to nothing, its rows
    kept): the plan checks each stored part's shape before reading any of its bytes."""
    model = make_model()
    ids = prompt(300)
    with stored_store(tmp_path) as store:
        kv = KVStore(store, model_identity(model), block_size=BS, layers_per_object=4)
        with TieredCache(model.config, kv, model=model, device_budget=budget(model, 320), lookahead=0) as cache:
            cache.load_prefix(ids)
            prefill(model, cache, ids)
        with TieredCache(model.config, kv, model=model, device_budget=2 * budget(model, 320),
                         lookahead=0) as cache:
            prefill(model, cache, ids[:, :40].repeat(2, 1))
            cache.crop(-cache.get_seq_length())
            n = cache.load_prefix(ids)
            assert n > 0
            with pytest.raises(KVCacheError, match=r"stored block part 'kv/.*' is float32\(4, 2, 1,.*"
                                                   r"expects float32\(4, 2, 2,"):
                prefill(model, cache, ids[:, n:].repeat(2, 1))
