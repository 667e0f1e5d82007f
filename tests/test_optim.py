"""``tiered.optim.OffloadedAdamW``: parity with ``torch.optim.AdamW`` and crash consistency.

What is proved here (CPU, fp32 unless said otherwise, state streamed from the
storage tier because the host tier is smaller than it):

- parameters are bitwise equal to ``torch.optim.AdamW``'s after every one of
  many steps, with parameters split across chunks, two param groups, foreach
  off/on and fused, and the state dicts agree;
- ``state_dict``/``load_state_dict`` round-trip with torch's AdamW both ways;
- bf16 parameters keep an fp32 master copy in the store (parameters are the
  master rounded, the master equals fp32 AdamW);
- a run closed and reopened with ``resume=True`` continues bitwise;
- a kill -9 in the middle of ``step()`` (at a chosen chunk, and at random
  times) leaves the last complete step recoverable, equal to the reference at
  that step; a chunk of another step is refused with a clear error, as are
  state left by another run, another layout, a too small host tier.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import owner_figures, store_config
from tiered.optim import OffloadedAdamW, OptimStateError
from tiered.allocators import OutOfBudget
from tiered.store import TieredStore

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_intra_op_thread")]

HERE = Path(__file__).parent
CHUNK = 12 * 4096 * 2  # 8192 elements per chunk: the large layers are split across chunks


def cfg(tmp_path, host="1MiB") -> dict:
    return store_config(tmp_path, host, "256MiB")


def make_model(seed=0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 512), nn.Tanh(), nn.Linear(512, 160), nn.LayerNorm(160),
                         nn.Linear(160, 3)).to(dtype)


def groups(model: nn.Module) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() == 2)]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def batch(step: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(16, 32, generator=torch.Generator().manual_seed(1000 + step)).to(dtype)


def train_step(model, opt, step, dtype=torch.float32) -> None:
    opt.zero_grad()
    model(batch(step, dtype)).float().square().mean().backward()
    opt.step()


def nvme_bytes_read(opt) -> int:
    return opt.store.stats()["tiers"]["nvme"]["bytes_read"]


def host_capacity(store) -> int:
    return store.stats()["tiers"]["host"]["capacity"]


@pytest.mark.parametrize("mode", ["single", "foreach", "fused"])
def test_bitwise_equal_to_torch_adamw_over_many_steps(tmp_path, mode):
    kw = {"single": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(foreach=False, fused=True)}[mode]
    ref, mine = make_model(), make_model()
    o_ref = torch.optim.AdamW(groups(ref), lr=3e-3, betas=(0.8, 0.95), eps=1e-6, **kw)
    with OffloadedAdamW(groups(mine), lr=3e-3, betas=(0.8, 0.95), eps=1e-6, config=cfg(tmp_path),
                        chunk_bytes=CHUNK, lookahead=2, **kw) as opt:
        assert len(opt._chunks) > 4 and any(s.start > 0 for c in opt._chunks for s in c.segments)
        # what the 1 MiB host tier holds beyond the pipeline keeps the last chunks resident
        resident = [c for c in opt._chunks if c.resident is not None]
        assert 0 < len(resident) < len(opt._chunks) // 2 and resident[-1] is opt._chunks[-1]
        written0 = opt.store.stats()["tiers"]["nvme"]["bytes_written"]
        for step in range(8):
            train_step(ref, o_ref, step)
            train_step(mine, opt, step)
            for a, b in zip(ref.parameters(), mine.parameters()):
                assert torch.equal(a, b), f"step {step}"
        opt.flush()
        # fp32 parameters are their own masters: a chunk's read is its moments only (8 bytes per
        # element), the master (4 bytes) is only written
        assert all(c.split for c in opt._chunks)
        streamed = 8 * sum(c.numel for c in opt._chunks if c.resident is None)
        state_bytes = 12 * sum(p.numel() for p in mine.parameters())
        # steps 2..8 read the streamed chunks from storage (never a resident one), but for those the
        # rest of the host tier still caches (written last in a step, updated first in the next):
        # at least what does not fit there; and every step writes all chunks
        cached = host_capacity(opt.store) - sum(c.resident_bytes for c in resident)
        assert 7 * (streamed - cached) <= nvme_bytes_read(opt) <= 7 * streamed
        assert opt.store.stats()["tiers"]["nvme"]["bytes_written"] - written0 >= 8 * state_bytes
        assert opt.store.stats()["tiers"]["host"]["peak"] <= host_capacity(opt.store)
        mine_sd, ref_sd = opt.state_dict(), o_ref.state_dict()
    assert mine_sd["param_groups"][0]["params"] == ref_sd["param_groups"][0]["params"]
    for i, st in ref_sd["state"].items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(st[k], mine_sd["state"][i][k]), (i, k)


def test_state_dict_round_trips_with_torch_adamw(tmp_path):
    ref, mine, back = make_model(), make_model(), make_model()
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for step in range(3):
        train_step(ref, o_ref, step)
    mine.load_state_dict(ref.state_dict())
    with OffloadedAdamW(mine.parameters(), lr=5.0, config=cfg(tmp_path), chunk_bytes=CHUNK) as opt:
        opt.load_state_dict(o_ref.state_dict())  # also takes the lr back
        assert opt.param_groups[0]["lr"] == 1e-2
        for step in range(3, 6):
            train_step(ref, o_ref, step)
            train_step(mine, opt, step)
        for a, b in zip(ref.parameters(), mine.parameters()):
            assert torch.equal(a, b)
        sd = opt.state_dict()
    back.load_state_dict(mine.state_dict())
    o_back = torch.optim.AdamW(back.parameters(), lr=1e-2)
    o_back.load_state_dict({"state": sd["state"], "param_groups": sd["param_groups"]})
    for step in range(6, 8):
        train_step(ref, o_ref, step)
        train_step(back, o_back, step)
    for a, b in zip(ref.parameters(), back.parameters()):
        assert torch.equal(a, b)


def test_load_state_dict_errors_name_what_is_wrong(tmp_path):
    m = make_model()
    with OffloadedAdamW(m.parameters(), config=cfg(tmp_path)) as opt:
        with pytest.raises(ValueError, match="param_groups"):
            opt.load_state_dict({"state": {}, "param_groups": []})
        sd = torch.optim.AdamW(make_model().parameters()).state_dict()
        sd["state"] = {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}}
        with pytest.raises(ValueError, match=r"state\[0\]\['exp_avg'\] must be a tensor of shape \(512, 32\)"):
            opt.load_state_dict(sd)


def test_bf16_parameters_keep_an_fp32_master_in_the_store(tmp_path):
    master = make_model(dtype=torch.bfloat16).float()  # the master starts as the bf16 weights
    mine = make_model(dtype=torch.bfloat16)
    o_ref = torch.optim.AdamW(master.parameters(), lr=1e-2)
    with OffloadedAdamW(mine.parameters(), lr=1e-2, config=cfg(tmp_path), chunk_bytes=CHUNK) as opt:
        assert not any(c.split for c in opt._chunks)  # [master | moments] objects, read every step
        for step in range(5):
            o_ref.zero_grad()
            opt.zero_grad()
            mine(batch(step, torch.bfloat16)).float().square().mean().backward()
            for a, b in zip(master.parameters(), mine.parameters()):
                a.grad = b.grad.float()  # the reference sees the same (bf16) gradients
            o_ref.step()
            opt.step()
            for a, b in zip(master.parameters(), mine.parameters()):
                assert torch.equal(a.to(torch.bfloat16), b)
        sd = opt.state_dict()
    for i, a in enumerate(master.parameters()):
        assert torch.equal(sd["state"][i]["master"], a)


def test_close_and_resume_continues_bitwise(tmp_path):
    ref, mine = make_model(), make_model()
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    with OffloadedAdamW(mine.parameters(), lr=1e-2, config=cfg(tmp_path), chunk_bytes=CHUNK) as opt:
        for step in range(3):
            train_step(ref, o_ref, step)
            train_step(mine, opt, step)
    fresh = make_model(seed=7)  # other weights: resume puts the stored masters back
    with OffloadedAdamW(fresh.parameters(), lr=1e-2, config=cfg(tmp_path), chunk_bytes=CHUNK, resume=True) as opt:
        assert opt._step == 3
        for a, b in zip(ref.parameters(), fresh.parameters()):
            assert torch.equal(a, b)
        for step in range(3, 6):
            train_step(ref, o_ref, step)
            train_step(fresh, opt, step)
        for a, b in zip(ref.parameters(), fresh.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("sync", [False, True])
def test_a_step_failing_part_way_cannot_be_retried_and_resume_recovers(tmp_path, sync):
    """A streamed chunk fails after the resident chunks (and the parameters, their own masters)
    were updated: retrying would apply Adam twice or commit a step some chunk never reached
    (found by review). The optimizer refuses further steps; resume=True continues bitwise."""
    from tiered.optim.layout import drop as _drop

    class Failing(OffloadedAdamW):
        fail = None

        def _update(self, c, s, lease_f, deferred=None):
            if (s, c.index) == self.fail:
                self.fail = None
                _drop(lease_f)
                raise OSError(5, "injected read failure")
            return super()._update(c, s, lease_f, deferred)

    ref, mine = make_model(), make_model()
    o_ref = torch.optim.AdamW(groups(ref), lr=3e-3)
    opt = Failing(groups(mine), lr=3e-3, config=cfg(tmp_path), chunk_bytes=CHUNK, sync=sync).open()
    try:
        assert any(c.resident is not None for c in opt._chunks)
        streamed = [c.index for c in opt._chunks if c.resident is None]
        for step in range(2):
            train_step(ref, o_ref, step)
            train_step(mine, opt, step)
        opt.fail = (3, streamed[1])
        with pytest.raises(OSError, match="injected"):
            train_step(mine, opt, 2)
        with pytest.raises(OptimStateError, match="resume=True"):
            opt.step()
    finally:
        opt.close()
    fresh = make_model(seed=9)
    with OffloadedAdamW(groups(fresh), lr=3e-3, config=cfg(tmp_path), chunk_bytes=CHUNK, resume=True) as opt:
        assert opt._step == 2
        assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), fresh.parameters()))
        for step in range(2, 5):
            train_step(ref, o_ref, step)
            train_step(fresh, opt, step)
        assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), fresh.parameters()))


def test_existing_state_without_resume_and_other_layouts_are_refused(tmp_path):
    m = make_model()
    with OffloadedAdamW(m.parameters(), config=cfg(tmp_path), chunk_bytes=CHUNK) as opt:
        train_step(m, opt, 0)
    with pytest.raises(OptimStateError, match=r"already holds optimizer state 'adamw' at step 1.*resume=True"):
        OffloadedAdamW(m.parameters(), config=cfg(tmp_path), chunk_bytes=CHUNK).open()
    with pytest.raises(OptimStateError, match="other chunk_bytes"):
        OffloadedAdamW(m.parameters(), config=cfg(tmp_path), chunk_bytes=2 * CHUNK, resume=True).open()
    with OffloadedAdamW(m.parameters(), config=cfg(tmp_path), name="other") as opt:  # another name is free
        train_step(m, opt, 0)


def test_a_chunk_of_another_step_is_refused(tmp_path):
    m = make_model()
    with OffloadedAdamW(m.parameters(), config=cfg(tmp_path), chunk_bytes=CHUNK) as opt:
        for step in range(2):
            train_step(m, opt, step)
        # step 3 reads step 2's chunks; put step 1's copy of chunk 1 in its place (mixed steps)
        key = opt._chunk_key(opt._chunks[1], 2)
        stale = opt.store.get(opt._chunk_key(opt._chunks[1], 1)).result(timeout=30)
        opt.store.put(key, stale).result(timeout=30)
        with pytest.raises(OptimStateError, match=rf"object '{key}' holds state of step 1, expected 2"):
            train_step(m, opt, 2)


# --------------------------------------------------------------------------- owners


def assert_same(ref: nn.Module, mine: nn.Module, step) -> None:
    for a, b in zip(ref.parameters(), mine.parameters()):
        assert torch.equal(a, b), f"step {step}"


def test_memory_and_objects_are_charged_to_the_optimizer_owner(tmp_path):
    m = make_model()
    with OffloadedAdamW(m.parameters(), config=cfg(tmp_path), chunk_bytes=CHUNK, name="run1") as opt:
        assert opt.owner == "optim/run1"
        for step in range(3):
            train_step(m, opt, step)
        opt.flush()
        host = owner_figures(opt.store, "optim/run1")
        assert host["held"] >= sum(c.resident_bytes for c in opt._chunks) > 0
        assert host["peak"] >= host["held"]
        # pipeline buffers, reads and the resident chunks: nothing of it is anyone else's
        assert owner_figures(opt.store, "default")["peak"] == 0
        # two steps' state (12 bytes per parameter each) and the marker: the optimizer's extents
        state_bytes = 12 * sum(p.numel() for p in m.parameters())
        assert owner_figures(opt.store, "optim/run1", "nvme")["held"] >= 2 * state_bytes
        assert owner_figures(opt.store, "default", "nvme")["held"] == 0


def test_a_step_next_to_another_owner_on_a_small_host_tier(tmp_path):
    """Another owner holds part of a 1 MiB host tier and later asks for more: the optimizer
    (elastic, resident chunks in what was free) gives resident chunks back, the other owner gets
    its memory, and every step stays bitwise equal to torch's AdamW."""
    ref, mine = make_model(), make_model()
    o_ref = torch.optim.AdamW(groups(ref), lr=3e-3)
    with TieredStore(cfg(tmp_path)) as store:
        cap = host_capacity(store)
        other = [store.alloc_host(256 << 10, wait=0, owner="kv/other")]
        with OffloadedAdamW(groups(mine), lr=3e-3, store=store, chunk_bytes=12 * 4096, lookahead=0,
                            resident_bytes=cap) as opt:
            resident = opt.resident_chunks
            assert resident > 0
            for step in range(3):
                train_step(ref, o_ref, step)
                train_step(mine, opt, step)
                assert_same(ref, mine, step)
            opt.flush()
            # the other owner wants memory the resident chunks hold (leaving the pipeline its room)
            want = cap - (256 << 10) - opt._pipeline_bytes() - (16 << 10)
            assert want > cap - (256 << 10) - sum(c.resident_bytes for c in opt._chunks)
            other.append(store.alloc_host(want, wait=5.0, owner="kv/other"))
            assert opt.resident_chunks < resident
            figs = store.owners()
            assert sum(f["host"]["held"] for f in figs.values() if "host" in f) <= cap
            for step in range(3, 6):
                train_step(ref, o_ref, step)
                train_step(mine, opt, step)
                assert_same(ref, mine, step)
            assert store.stats()["tiers"]["host"]["peak"] <= cap
        for b in other:
            b.release()


def test_another_owner_takes_resident_memory_while_steps_run(tmp_path):
    """The other owner allocates and frees from its own thread while the optimizer steps: the
    resident chunks it needs are given back between their updates, and the steps stay bitwise."""
    import threading

    ref, mine = make_model(), make_model()
    o_ref = torch.optim.AdamW(groups(ref), lr=3e-3)
    with TieredStore(cfg(tmp_path)) as store:
        cap = host_capacity(store)
        base = store.alloc_host(256 << 10, wait=0, owner="kv/other")
        with OffloadedAdamW(groups(mine), lr=3e-3, store=store, chunk_bytes=12 * 4096, lookahead=0,
                            resident_bytes=cap) as opt:
            resident = opt.resident_chunks
            want = cap - (256 << 10) - opt._pipeline_bytes() - (16 << 10)
            stop, got, errors = threading.Event(), [], []

            def other_owner() -> None:
                try:
                    while not stop.is_set():
                        buf = store.alloc_host(want, wait=30.0, owner="kv/other")
                        got.append(buf.reserved)
                        time.sleep(0.005)
                        buf.release()
                        time.sleep(0.005)
                except BaseException as e:  # noqa: BLE001 - reported by the test
                    errors.append(e)

            t = threading.Thread(target=other_owner)
            t.start()
            try:
                for step in range(4):
                    train_step(ref, o_ref, step)
                    train_step(mine, opt, step)
                    assert_same(ref, mine, step)
            finally:
                stop.set()
                t.join(timeout=60)
            assert not errors and got
            assert opt.resident_chunks < resident
        base.release()


def test_explicit_host_share_is_honoured(tmp_path):
    """host_share= reserves host memory for the optimizer: the chunk size and the resident
    chunks come from the share, not from the whole tier, and another owner cannot take it."""
    ref, mine = make_model(), make_model()
    o_ref = torch.optim.AdamW(groups(ref), lr=3e-3)
    share = 512 << 10
    with TieredStore(cfg(tmp_path)) as store:
        with OffloadedAdamW(groups(mine), lr=3e-3, store=store, host_share="512KiB", lookahead=2) as opt:
            assert owner_figures(store, opt.owner)["reserved"] == share
            biggest = max(c.host_bytes for c in opt._chunks)
            assert 5 * biggest <= share < 5 * 2 * biggest  # chunks sized from the share
            resident = sum(c.resident_bytes for c in opt._chunks)
            assert 0 < resident <= share - 5 * biggest  # what the share holds beyond the pipeline
            # the rest of the tier is the others': they cannot take the share
            with pytest.raises(OutOfBudget, match="kv/other"):
                store.alloc_host(host_capacity(store) - share + (64 << 10), wait=0, owner="kv/other")
            for step in range(4):
                train_step(ref, o_ref, step)
                train_step(mine, opt, step)
                assert_same(ref, mine, step)
        assert owner_figures(store, "optim/adamw")["reserved"] == 0  # given back by close()
        assert owner_figures(store, "optim/adamw")["held"] == 0


def test_config_share_of_the_optim_owner_kind(tmp_path):
    m = make_model()
    conf = dict(cfg(tmp_path), owners={"optim": {"host": "50%"}})
    with OffloadedAdamW(m.parameters(), config=conf, name="x") as opt:
        assert owner_figures(opt.store, "optim/x")["reserved"] == host_capacity(opt.store) // 2
        assert 5 * max(c.host_bytes for c in opt._chunks) <= host_capacity(opt.store) // 2
        train_step(m, opt, 0)
    with pytest.raises(OptimStateError, match=r"host share of 'optim/adamw' of \d+ bytes cannot hold 5 state"):
        OffloadedAdamW(m.parameters(), config=cfg(tmp_path / "b"), host_share="128KiB", chunk_bytes=CHUNK).open()


def test_usage_errors(tmp_path):
    m = make_model()
    opt = OffloadedAdamW(m.parameters(), config=cfg(tmp_path))
    with pytest.raises(OptimStateError, match="not open"):
        opt.step()
    with pytest.raises(OptimStateError, match="host tier of .* cannot hold 5 state chunks"):
        OffloadedAdamW(m.parameters(), config=cfg(tmp_path, host="256KiB"), chunk_bytes=1 << 20).open()
    with pytest.raises(ValueError, match="lr must be >= 0"):
        OffloadedAdamW(m.parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="is not wrapped by tiered.offload"):
        OffloadedAdamW(m.parameters(), model=m)


# --------------------------------------------------------------------------- kill -9


def reference_params(steps: int) -> list[list[torch.Tensor]]:
    """Parameters after each step 0..steps of the child's run, by torch.optim.AdamW."""
    model = make_model()
    opt = torch.optim.AdamW(groups(model), lr=3e-3)
    out = [[p.detach().clone() for p in model.parameters()]]
    for step in range(steps):
        train_step(model, opt, step)
        out.append([p.detach().clone() for p in model.parameters()])
    return out, opt


def run_child(tmp_path, *args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(HERE / "optim_crash_child.py"), str(tmp_path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line
        if not line and proc.poll() is not None:
            raise AssertionError(f"child exited {proc.returncode} before {prefix!r}: {proc.stderr.read()}")
    raise AssertionError(f"child printed no {prefix!r} within {timeout} s")


def recover_and_check(tmp_path, refs, o_ref_steps: int | None = None) -> int:
    model = make_model(seed=9)
    import tests.optim_crash_child as child  # the child's exact configuration
    with OffloadedAdamW(groups(model), lr=3e-3, config=child.config(tmp_path), chunk_bytes=child.CHUNK,
                        resume=True) as opt:
        s = opt._step
        for a, b in zip(refs[s], model.parameters()):
            assert torch.equal(a, b), f"recovered step {s} differs from the reference"
        train_step(model, opt, s)  # and it goes on from there
        for a, b in zip(refs[s + 1], model.parameters()):
            assert torch.equal(a, b)
    return s


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.timeout(240)  # three Python processes importing torch on a shared 2-core machine
def test_kill_9_during_step_recovers_the_last_complete_step(tmp_path):
    """Three children at once (their start-up is most of the time): killed at a random time,
    in the middle of step 3 (chunks 0..3 updated, some of their writes durable, the rest not
    started), and between step 3's last durable chunk and its marker."""
    refs, _ = reference_params(13)
    dirs = {name: tmp_path / name for name in ("random", "mid", "marker")}
    procs = {"random": run_child(dirs["random"], "--steps", "12"),
             "mid": run_child(dirs["mid"], "--steps", "4", "--pause-step", "3", "--pause-chunk", "3"),
             "marker": run_child(dirs["marker"], "--steps", "4", "--pause-step", "3", "--pause-before-marker")}
    delay = float(torch.rand(()) * 0.5)
    try:
        wait_for_line(procs["random"], "STEP 1")
        time.sleep(delay)
        kill(procs["random"])
        wait_for_line(procs["mid"], "PAUSED")
        time.sleep(0.3)  # let some of the step's writes become durable
        kill(procs["mid"])
        wait_for_line(procs["marker"], "PAUSED")
        kill(procs["marker"])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    assert 1 <= recover_and_check(dirs["random"], refs) <= 12, f"killed {delay:.2f} s after step 1"
    assert recover_and_check(dirs["mid"], refs) == 2
    assert recover_and_check(dirs["marker"], refs) == 2
