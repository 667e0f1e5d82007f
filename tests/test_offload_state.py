"""What the plain-module API gives for an offloaded model: ``state_dict`` / ``save_pretrained``
return the real weights (read from the store), conversions and copies that would act on
placeholders are refused with an error that says to detach first."""

from __future__ import annotations

import copy
import gc
import threading
import weakref

import pytest
import torch

import tiered
from helpers import TINY_MODEL_MARKS, offload_config, tiny_gpt2, tiny_llama
from tiered import OffloadError, offload_state

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(60), *TINY_MODEL_MARKS, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

KiB = 1 << 10


BUILDERS = {"llama": (tiny_llama, transformers.LlamaForCausalLM), "gpt2": (tiny_gpt2, transformers.GPT2LMHeadModel)}
IDS = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(1))
# a budget below the model: some units resident, the others streamed
HOST = {"llama": 600 * KiB, "gpt2": 1000 * KiB}


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), f"{k}: offloaded state_dict differs from the in-memory model's"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_state_dict_of_offloaded_model_is_the_real_weights(tmp_path, arch):
    build, _cls = BUILDERS[arch]
    model = build()
    want = _state(model)
    with torch.no_grad():
        ref = model(IDS).logits
    tiered.offload(model, offload_config(tmp_path, HOST[arch]))
    try:
        rt = model._tiered
        assert any(u.resident for u in rt.units) and not all(u.resident for u in rt.units)
        _assert_same_state(model.state_dict(), want)
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref)  # state_dict leaves the forward intact
        _assert_same_state(model.state_dict(), want)  # also after a forward (prefetches held)
        first = next(n for n, _m in model.named_modules() if n.endswith("h.0") or n.endswith("layers.0"))
        sub = model.get_submodule(first).state_dict()
        _assert_same_state(sub, {k[len(first) + 1:]: v for k, v in want.items() if k.startswith(first + ".")})
        with pytest.raises(OffloadError, match=r"keep_vars=True\) would return the placeholder"):
            model.state_dict(keep_vars=True)  # the parameters themselves are placeholders
    finally:
        tiered.detach(model)


def test_state_dict_of_bundled_layout(tmp_path):
    model = tiny_llama()
    want = _state(model)
    tiered.offload(model, offload_config(tmp_path, HOST["llama"]), layout="bundled")
    try:
        assert any(s.bundle for u in model._tiered.units for s in u.slots)
        _assert_same_state(model.state_dict(), want)
    finally:
        tiered.detach(model)


def test_tied_weights_share_one_tensor_in_the_state_dict(tmp_path):
    model = tiny_gpt2()
    tiered.offload(model, offload_config(tmp_path, HOST["gpt2"]))
    try:
        sd = model.state_dict()
        assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    finally:
        tiered.detach(model)


def test_state_dict_of_a_module_inside_a_unit_is_the_real_weights(tmp_path):
    model = tiny_llama()
    want = _state(model)
    tiered.offload(model, offload_config(tmp_path, HOST["llama"], resident=False))
    try:
        for name in ("model.layers.0.self_attn", "model.layers.1.mlp.up_proj", "model.layers.2.input_layernorm"):
            sub = model.get_submodule(name).state_dict()
            _assert_same_state(sub, {k[len(name) + 1:]: v for k, v in want.items() if k.startswith(name + ".")})
    finally:
        tiered.detach(model)


def test_state_dict_into_a_plain_dict_keeps_no_copy_afterwards(tmp_path):
    model = tiny_llama()
    want = _state(model)
    tiered.offload(model, offload_config(tmp_path, HOST["llama"]))
    try:
        sd = model.state_dict(destination={})
        _assert_same_state(sd, want)
        gone = weakref.ref(sd["model.layers.0.mlp.up_proj.weight"])
        del sd
        gc.collect()
        assert gone() is None, "a copy of the weights outlived the state dict"
    finally:
        tiered.detach(model)


def test_concurrent_state_dicts_each_keep_tied_weights_one_tensor(tmp_path, monkeypatch):
    model = tiny_gpt2()
    want = _state(model)
    tiered.offload(model, offload_config(tmp_path, HOST["gpt2"]))
    both_inside = threading.Barrier(2, timeout=20)
    met = threading.local()
    acquire = offload_state._acquire

    def meet_then_acquire(rt, key):  # both calls are in the middle of filling their dicts at once
        if not getattr(met, "done", False):
            met.done = True
            both_inside.wait()
        return acquire(rt, key)

    monkeypatch.setattr(offload_state, "_acquire", meet_then_acquire)
    got: list = [None, None]

    def run(i):
        got[i] = model.state_dict()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        for sd in got:
            assert sd is not None
            _assert_same_state(sd, want)
            assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    finally:
        tiered.detach(model)


def test_torch_save_of_state_dict(tmp_path):
    model = tiny_llama()
    want = _state(model)
    tiered.offload(model, offload_config(tmp_path, HOST["llama"]))
    try:
        torch.save(model.state_dict(), tmp_path / "sd.pt")
    finally:
        tiered.detach(model)
    _assert_same_state(torch.load(tmp_path / "sd.pt", weights_only=True), want)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_pretrained_then_plain_from_pretrained_gives_identical_logits(tmp_path, arch):
    build, cls = BUILDERS[arch]
    model = build()
    with torch.no_grad():
        ref = model(IDS).logits
    tiered.offload(model, offload_config(tmp_path, HOST[arch]))
    try:
        model.save_pretrained(tmp_path / "saved")
    finally:
        tiered.detach(model)
    plain = cls.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        assert torch.equal(plain(IDS).logits, ref)


def test_state_dict_of_model_read_in_place_from_its_checkpoint(tmp_path):
    model = tiny_gpt2()
    want = _state(model)
    model.save_pretrained(tmp_path / "ckpt")
    served = tiered.from_pretrained(tmp_path / "ckpt", offload_config(tmp_path, HOST["gpt2"]))
    try:
        got = served.state_dict()
        _assert_same_state({k: got[k] for k in want}, want)
    finally:
        tiered.detach(served)


def test_conversions_that_would_act_on_placeholders_are_refused(tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        ref = model(IDS).logits
    tiered.offload(model, offload_config(tmp_path, HOST["llama"]))
    try:
        for convert in (lambda m: m.to(torch.float16), lambda m: m.half(), lambda m: m.model.layers[1].double(),
                        lambda m: m.to("meta")):
            with pytest.raises(OffloadError, match="detach"):
                convert(model)
        assert model.to("cpu") is model and model.float() is model  # no change: allowed
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref)
        with pytest.raises(OffloadError, match="detach"):
            copy.deepcopy(model)
        with pytest.raises(OffloadError, match="detach"):
            copy.deepcopy(model.model.layers[0])
        with pytest.raises(OffloadError, match="detach"):
            torch.save(model, tmp_path / "model.pt")
        with pytest.raises(OffloadError, match="detach"):
            model.load_state_dict(tiny_llama().state_dict(), assign=True)
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref)  # nothing was changed by the refused calls
    finally:
        tiered.detach(model)
    # an ordinary module again: conversions and copies work
    half = copy.deepcopy(model).to(torch.float16)
    assert next(half.parameters()).dtype == torch.float16
    assert "_apply" not in vars(model) and "__deepcopy__" not in vars(model.model.layers[0])
    torch.save(model, tmp_path / "model.pt")
