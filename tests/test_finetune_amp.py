"""Loss scaling (``torch.amp.GradScaler``) with ``OffloadedAdamW`` over an offloaded model.

With ``grads="keep"`` the scaler unscales and checks ``.grad`` as it does in memory: skipped
steps on inf/nan, the scale backed off and grown, all bitwise equal to in-memory AdamW. Where
the unit gradients are not in ``.grad`` (``"park"``, ``"stream"``) stepping through a scaler
is refused with a clear error instead of updating with scaled gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tiered
from helpers import (TINY_MODEL_MARKS, offload_config, finetune_llama as build, finetune_config as cfg,
                     finetune_batch as batch)
from tiered.optim import LossScale, OffloadedAdamW, OptimStateError

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(120), *TINY_MODEL_MARKS]


def scaled_step(model, opt, scaler, step):
    x = batch(step)
    loss = model(input_ids=x, labels=x).loss
    if step == 1:
        loss = loss * float("inf")  # an overflow: the step is skipped, the scale backs off
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    return scaler.get_scale()


def test_grad_scaler_with_kept_gradients_is_bitwise_in_memory(tmp_path):
    ref = build()
    model = tiered.offload(copy.deepcopy(ref), cfg(tmp_path))
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    s_ref = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    try:
        with OffloadedAdamW(model.parameters(), lr=1e-2, model=model, grads="keep") as opt:
            scales = []
            for step in range(5):
                a = scaled_step(ref, o_ref, s_ref, step)
                b = scaled_step(model, opt, scaler, step)
                assert a == b
                scales.append(b)
            assert scales[1] == scales[0] / 2 and scales[-1] > scales[1]  # backed off, grown again
            assert opt._step == 4  # the overflowing step was skipped
        sd = model.state_dict()
        for n, p in ref.state_dict().items():
            assert torch.equal(p, sd[n]), n
    finally:
        tiered.detach(model)


@pytest.mark.parametrize("grads", ["park", "stream"])
def test_grad_scaler_is_refused_where_gradients_are_not_in_grad(tmp_path, grads):
    model = tiered.offload(build(), cfg(tmp_path))
    scaler = torch.amp.GradScaler("cpu")
    try:
        with OffloadedAdamW(model.parameters(), lr=1e-2, model=model, grads=grads) as opt:
            x = batch(0)
            scaler.scale(model(input_ids=x, labels=x).loss).backward()
            with pytest.raises(OptimStateError, match=rf"stepped by a GradScaler.*grads='{grads}'.*grads='keep'"):
                scaler.step(opt)
            assert not hasattr(opt, "found_inf")
            opt.zero_grad()
    finally:
        tiered.detach(model)


def test_loss_scale_with_parked_gradients_is_bitwise_grad_scaler(tmp_path):
    ref = build()
    model = tiered.offload(copy.deepcopy(ref), cfg(tmp_path))
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    s_ref = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    try:
        with OffloadedAdamW(model.parameters(), lr=1e-2, model=model, max_grad_norm=0.5,
                            loss_scale=LossScale(init_scale=2.0 ** 10, growth_interval=2)) as opt:
            assert opt.grads == "park"
            for step in range(5):
                a = scaled_step(ref, o_ref, s_ref, step)
                x = batch(step)
                loss = model(input_ids=x, labels=x).loss
                if step == 1:
                    loss = loss * float("inf")
                opt.scale_loss(loss).backward()
                assert all(p.grad is None for p in model.parameters())  # parked
                opt.step()
                assert opt.loss_scale.get_scale() == a, step
            assert opt.loss_scale.skipped_steps == 1 and opt._step == 4
            assert not any(k.startswith("adamw/g") for k in opt.store.keys())
        sd = model.state_dict()
        for n, p in ref.state_dict().items():
            assert torch.equal(p, sd[n]), n
    finally:
        tiered.detach(model)


def test_loss_scale_on_in_memory_parameters(tmp_path):
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    mine = copy.deepcopy(ref)
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    s_ref = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=1)
    with OffloadedAdamW(mine.parameters(), lr=1e-2, config=offload_config(tmp_path, "4MiB", nvme="64MiB"),
                        loss_scale=LossScale(init_scale=4.0, growth_interval=1)) as opt:
        for step in range(4):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
            bad = float("nan") if step == 2 else 1.0
            s_ref.scale(ref(x).square().sum() * bad).backward()
            s_ref.step(o_ref)
            s_ref.update()
            o_ref.zero_grad()
            opt.scale_loss(mine(x).square().sum() * bad).backward()
            opt.step()
            opt.zero_grad()
            assert opt.loss_scale.get_scale() == s_ref.get_scale()
    for a, b in zip(ref.parameters(), mine.parameters()):
        assert torch.equal(a, b)


def test_loss_scale_arguments(tmp_path):
    with pytest.raises(ValueError, match="loss_scale must be a tiered.optim.LossScale"):
        OffloadedAdamW([torch.nn.Parameter(torch.zeros(2))], loss_scale=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="backoff_factor must be in"):
        LossScale(backoff_factor=2.0)
    model = tiered.offload(build(), cfg(tmp_path))
    try:
        with pytest.raises(ValueError, match="loss_scale needs every gradient checked"):
            OffloadedAdamW(model.parameters(), model=model, grads="stream", loss_scale=LossScale())
    finally:
        tiered.detach(model)


def test_loss_scale_refuses_fp16_gradients(tmp_path):
    lin = torch.nn.Linear(4, 2).half()
    with OffloadedAdamW(lin.parameters(), config=offload_config(tmp_path, "4MiB", nvme="64MiB"),
                        loss_scale=LossScale()) as opt:
        opt.scale_loss(lin(torch.ones(1, 4, dtype=torch.float16)).float().sum()).backward()
        with pytest.raises(ValueError, match=r"parameter 0 \(shape \(2, 4\)\) has an fp16 gradient"):
            opt.step()
        opt.zero_grad()


def test_loss_scale_loads_a_grad_scaler_state_and_checks_values():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    ls = LossScale()
    ls.load_state_dict(scaler.state_dict())
    assert ls.get_scale() == 1024.0 and ls.growth_interval == 7
    ls.load_state_dict(LossScale(init_scale=8.0).state_dict())
    assert ls.get_scale() == 8.0
    with pytest.raises(ValueError, match=r"missing 'growth_factor', 'backoff_factor', 'growth_interval', "
                                         r"'_growth_tracker' \(expected LossScale.state_dict\(\)"):
        ls.load_state_dict({"scale": 2.0})
    bad = dict(LossScale().state_dict(), scale=float("inf"))
    with pytest.raises(ValueError, match="init_scale must be a finite number > 0, got inf"):
        ls.load_state_dict(bad)
    assert ls.get_scale() == 8.0  # nothing changed by a refused load
