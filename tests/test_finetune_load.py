"""``load_state_dict`` into a model wrapped by ``tiered.offload`` (what a Trainer resume does):
the values go into the store objects, every copy of a tied weight included; a value of the
wrong shape is reported by torch; nothing loaded is reported missing."""

from __future__ import annotations

import pytest
import torch

import tiered
from helpers import TINY_MODEL_MARKS, offload_config, tiny_gpt2, tiny_llama

pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(60), *TINY_MODEL_MARKS]

IDS = torch.randint(3, 200, (1, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_load_state_dict_writes_the_store(tmp_path, make):
    other = make(seed=1)
    model = tiered.offload(make(seed=0), offload_config(tmp_path, "1MiB", nvme="128MiB", resident=False))
    try:
        sd = other.state_dict()
        result = model.load_state_dict(sd)
        assert not result.missing_keys and not result.unexpected_keys
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, other(IDS).logits)
        mine = model.state_dict()
        for k, v in sd.items():
            assert torch.equal(v, mine[k]), k
        # only one name of a tied weight in the dict (as safetensors saves it): both copies change
        third = make(seed=2).state_dict()
        if other.config.tie_word_embeddings:
            del third["lm_head.weight"]
        model.load_state_dict(third, strict=False)
        with torch.no_grad():
            ref = make(seed=2)
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
    finally:
        tiered.detach(model)


def test_load_state_dict_of_the_wrong_shape_is_reported(tmp_path):
    model = tiered.offload(tiny_llama(), offload_config(tmp_path, "1MiB", nvme="128MiB", resident=False))
    try:
        sd = tiny_llama(seed=1).state_dict()
        sd["model.norm.weight"] = torch.ones(3)
        with pytest.raises(RuntimeError, match=r"size mismatch for model.norm.weight"):
            model.load_state_dict(sd)
    finally:
        tiered.detach(model)
