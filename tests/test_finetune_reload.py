"""Weights loaded into a model while its ``OffloadedAdamW`` is open (``model.load_state_dict``:
a rollback, a resume that loads the optimizer first) are what the next step updates, as with
``torch.optim.AdamW`` in memory: the optimizer's fp32 masters of changed parameters are read
again from the weights instead of overwriting them."""

from __future__ import annotations

import copy

import pytest
import torch

import tiered
from helpers import (TINY_MODEL_MARKS, offload_config, finetune_llama as build, finetune_config as cfg,
                     finetune_batch as batch)
from tiered.optim import OffloadedAdamW

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(120), *TINY_MODEL_MARKS]


def train_step(model, opt, step: int) -> None:
    x = batch(step)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()


def assert_same_weights(ref, model):
    sd = model.state_dict()
    for name, a in ref.state_dict().items():
        assert torch.equal(a, sd[name]), name


@pytest.mark.parametrize("grads", ["keep", "stream"])
def test_model_loaded_after_steps_is_what_the_next_step_updates(tmp_path, grads):
    ref = build()
    snap = copy.deepcopy(ref.state_dict())
    model = tiered.offload(copy.deepcopy(ref), cfg(tmp_path))
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    try:
        with OffloadedAdamW(model.parameters(), lr=1e-2, model=model, grads=grads) as opt:
            for step in range(2):
                train_step(ref, o_ref, step)
                train_step(model, opt, step)
            ref.load_state_dict(snap)
            model.load_state_dict(snap)  # back to the first weights; the moments stay
            for step in range(2, 4):
                train_step(ref, o_ref, step)
                train_step(model, opt, step)
            assert_same_weights(ref, model)
    finally:
        tiered.detach(model)


def test_optimizer_loaded_before_the_model(tmp_path):
    ref = build()
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for step in range(2):
        train_step(ref, o_ref, step)
    ckpt = {"model": copy.deepcopy(ref.state_dict()), "opt": copy.deepcopy(o_ref.state_dict())}
    model = tiered.offload(build(), cfg(tmp_path))  # the first weights, not the checkpoint's
    try:
        with OffloadedAdamW(model.parameters(), lr=1e-2, model=model) as opt:
            opt.load_state_dict(ckpt["opt"])
            model.load_state_dict(ckpt["model"])
            train_step(ref, o_ref, 2)
            train_step(model, opt, 2)
            assert_same_weights(ref, model)
    finally:
        tiered.detach(model)


def test_in_memory_low_precision_parameters_loaded_between_steps(tmp_path):
    """bf16 parameters in memory: the fp32 master of the one written to is its new value; the
    other keeps its master. Reference: torch's AdamW on fp32 copies (what the masters are)."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(300).bfloat16()), torch.nn.Parameter(torch.randn(40).bfloat16())]
    first = ps[0].detach().clone()
    ref = [torch.nn.Parameter(p.detach().float()) for p in ps]
    o_ref = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    with OffloadedAdamW(ps, lr=1e-2, config=offload_config(tmp_path, "4MiB", nvme="64MiB")) as opt:
        for step in range(3):
            if step == 2:
                with torch.no_grad():  # what load_state_dict does to an in-memory parameter
                    ps[0].copy_(first)
                    ref[0].copy_(first.float())
            for p, r in zip(ps, ref):
                r.grad = torch.full_like(r, 0.5 + step)
                p.grad = r.grad.bfloat16()
            opt.step()
            o_ref.step()
    for p, r in zip(ps, ref):
        assert torch.equal(p, r.detach().bfloat16())


def test_state_dict_after_a_load_holds_the_loaded_masters(tmp_path):
    """What ``state_dict()`` saves is what the next step would start from: a checkpoint taken
    between ``model.load_state_dict`` and the next step restores the loaded weights."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(300).bfloat16())
    first = p.detach().clone()
    with OffloadedAdamW([p], lr=1e-2, config=offload_config(tmp_path, "4MiB", nvme="64MiB")) as opt:
        p.grad = torch.ones_like(p)
        opt.step()
        with torch.no_grad():
            p.copy_(first)
        assert torch.equal(opt.state_dict()["state"][0]["master"], first.float())
