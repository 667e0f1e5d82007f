"""Which calls of OffloadedAdamW over the ranks of an FSDP2 model are collectives, and that a
rank's failure reaches every rank at once.

Only ``step()``, ``load_state_dict()`` and ``open()`` talk to the other ranks; ``state_dict()``,
``flush()``, ``close()`` and leaving a ``with`` block commit on this rank only, so one rank may
call them alone. A rank that fails in ``open()``, in ``step()`` before its step is committed or
in ``load_state_dict()`` tells the others in the same all-reduce: every rank raises at once
instead of waiting for the process group's timeout. gloo on CPU, world 2, a short timeout so a
rank that waits fails the test fast.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import pytest
import torch

from helpers import rank_exit_codes
from test_fsdp2_crash import _config, _model

pytestmark = pytest.mark.timeout(60)

WORLD = 2
PG_TIMEOUT = 6  # seconds: what a rank left waiting for its peer costs
PROMPT = 3.0  # seconds: a failure that reaches every rank at once does so well within that
CHUNK = 12 * 4096


def _init(rank: int, init: str):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT))
    return _model(init_device_mesh("cpu", (WORLD,)))


def _opt(model, root: str, **kw):
    from tiered.optim import OffloadedAdamW

    return OffloadedAdamW(model.parameters(), lr=0.05, config=_config(root), chunk_bytes=CHUNK, **kw)


def _train_step(model, opt, step: int, rank: int) -> None:
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(100 * step + rank))
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _timed(fn) -> dict:
    """What ``fn()`` raised (type and message, or None) and how long it took."""
    t0 = time.monotonic()
    try:
        fn()
        error = None
    except Exception as e:  # noqa: BLE001 - reported to the test
        error = [type(e).__name__, str(e)]
    return {"error": error, "seconds": time.monotonic() - t0}


def _finish(rank: int, out: str, found: dict) -> None:
    """Write what this rank found, then check the communicator is still in step (no stray
    collective of the optimizer is left on it)."""
    import torch.distributed as dist

    Path(out, f"r{rank}.json").write_text(json.dumps(found))
    dist.barrier()  # a rank whose barrier fails (or hangs) exits non-zero
    dist.destroy_process_group()


def _run(tmp_path, target, *args) -> list[dict]:
    out = tmp_path / "out"
    out.mkdir()
    root, init = str(tmp_path / "store"), str(tmp_path / "init")
    codes = rank_exit_codes(target, WORLD, lambda r: (r, root, init, str(out), *args), timeout=25)
    found = [json.loads((out / f"r{r}.json").read_text()) for r in range(WORLD) if (out / f"r{r}.json").exists()]
    assert codes == [0] * WORLD and len(found) == WORLD, f"ranks exited {codes}, found {found}"
    return found


def _state_dict_on_rank0(rank: int, root: str, init: str, out: str) -> None:
    model = _init(rank, init)
    ref = _init_ref(model)
    found = {}
    with _opt(model, root) as opt:
        _train_step(model, opt, 0, rank)
        _train_step(ref[0], ref[1], 0, rank)
        if rank == 0:  # e.g. to log it: the other rank goes on training
            sd = {}
            found["state_dict"] = _timed(lambda: sd.update(opt.state_dict()))
            found["tiered_step"] = sd.get("tiered_step")
        for step in (1, 2):
            _train_step(model, opt, step, rank)
            _train_step(ref[0], ref[1], step, rank)
    found["equal"] = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(ref[0].parameters(),
                                                                                model.parameters()))
    _finish(rank, out, found)


def _init_ref(model):
    """An in-memory FSDP2 + torch AdamW copy of ``model`` (sharded the same way)."""
    ref = _model(model[0].weight.device_mesh)
    return ref, torch.optim.AdamW(ref.parameters(), lr=0.05)


def test_one_rank_may_take_state_dict_while_the_others_go_on_training(tmp_path):
    r0, r1 = _run(tmp_path, _state_dict_on_rank0)
    assert r0["state_dict"]["error"] is None and r0["state_dict"]["seconds"] < PROMPT, r0
    assert r0["tiered_step"] == 1
    assert r0["equal"] and r1["equal"], (r0, r1)


def _leave_with_on_error(rank: int, root: str, init: str, out: str) -> None:
    left = Path(out, "r0-left")
    found = {}
    if rank == 0:
        model = _init(rank, init)
        opt = _opt(model, root)

        def fail_inside():
            with opt:
                for step in range(2):
                    _train_step(model, opt, step, rank)
                t[0] = time.monotonic()
                raise ValueError("boom")

        t = [0.0]
        found["with"] = _timed(fail_inside)
        found["exit_seconds"] = time.monotonic() - t[0]
        left.write_text("")
        found["marker"] = _marker_step(root, rank)
    else:
        model = _init(rank, init)
        with _opt(model, root) as opt:
            for step in range(2):
                _train_step(model, opt, step, rank)
            deadline = time.monotonic() + 15
            while not left.exists() and time.monotonic() < deadline:  # no collective while rank 0 leaves
                time.sleep(0.05)
            found["saw_rank0_leave"] = left.exists()
    _finish(rank, out, found)


def _marker_step(root: str, rank: int) -> int | None:
    from tiered import TieredStore
    from tiered.config import load_config

    cfg = _config(root)
    with TieredStore(load_config(cfg)).open() as store:
        return int(store.get("adamw/step").result(timeout=30)[0]) if "adamw/step" in store else None


def test_a_rank_leaving_its_with_block_on_an_error_commits_alone_and_waits_for_nobody(tmp_path):
    r0, r1 = _run(tmp_path, _leave_with_on_error)
    assert r0["with"]["error"] == ["ValueError", "boom"], r0
    assert r0["exit_seconds"] < PROMPT, r0
    assert r0["marker"] == 2  # the last step is durable on this rank
    assert r1["saw_rank0_leave"], r1


def _open_fails_on_rank1(rank: int, root: str, init: str, out: str) -> None:
    model = _init(rank, init)
    kw = {"host_share": "64GiB"} if rank == 1 else {}  # more than the host tier: open() fails there
    found = {"open": _timed(lambda: _opt(model, root, **kw).open().close())}
    _finish(rank, out, found)


def test_one_rank_failing_in_open_makes_every_rank_raise_at_once(tmp_path):
    r0, r1 = _run(tmp_path, _open_fails_on_rank1)
    assert r1["open"]["error"] is not None and r1["open"]["seconds"] < PROMPT, r1
    assert r0["open"]["error"][0] == "OptimStateError", r0
    assert "rank 0: another rank of the process group cannot open its optimizer state" in r0["open"]["error"][1]
    assert r0["open"]["seconds"] < PROMPT, r0


def _load_mismatched(rank: int, root: str, init: str, out: str, how: str) -> None:
    model = _init(rank, init)
    found = {}
    with _opt(model, root) as opt:
        _train_step(model, opt, 0, rank)
        sd = opt.state_dict()
        if rank == 1 and how == "step":
            sd["tiered_step"] = 6  # this rank would load step 7, the other step 3
        elif rank == 1:
            sd["param_groups"] = sd["param_groups"] * 2  # refused by this rank only
        else:
            sd["tiered_step"] = 2
        found["load"] = _timed(lambda: opt.load_state_dict(sd))
        found["marker"] = int(opt._read_marker()[0])
    _finish(rank, out, found)


@pytest.mark.parametrize("how", ["step", "invalid"])
def test_ranks_loading_state_dicts_of_different_steps_or_one_refused_all_raise(tmp_path, how):
    r0, r1 = _run(tmp_path, _load_mismatched, how)
    for r in (r0, r1):
        assert r["load"]["error"] is not None and r["load"]["seconds"] < PROMPT, (r0, r1)
        assert r["marker"] == 1, (r0, r1)  # nothing of the loaded state was committed
    if how == "step":
        assert all(r["load"]["error"][0] == "OptimStateError" for r in (r0, r1)), (r0, r1)
        assert "not at one step" in r0["load"]["error"][1], r0
    else:
        assert r1["load"]["error"][0] == "ValueError" and r0["load"]["error"][0] == "OptimStateError", (r0, r1)


def _step_fails_on_rank1(rank: int, root: str, init: str, out: str, sync: bool, where: str) -> None:
    model = _init(rank, init)
    found = {}
    with _opt(model, root, sync=sync) as opt:
        _train_step(model, opt, 0, rank)
        model(torch.randn(4, 32)).square().mean().backward()
        if rank == 1:
            def refuse(*_args):
                raise RuntimeError("refused on this rank")
            setattr(opt, "_check_frozen_grads" if where == "check" else "_run", refuse)
        found["step"] = _timed(opt.step)
        opt.zero_grad()
        model(torch.randn(4, 32)).square().mean().backward()  # the training loop goes on
        found["again"] = _timed(opt.step)  # broken on every rank: refused at once, nobody waits
    _finish(rank, out, found)


@pytest.mark.parametrize("sync", [False, True])
@pytest.mark.parametrize("where", ["check", "run"])
def test_one_rank_failing_in_step_makes_every_rank_raise_at_once(tmp_path, sync, where):
    """Before its commit (checking gradients), every rank raises in that step(); in its update
    (after the agreement of a step with sync=False), in the next step()."""
    r0, r1 = _run(tmp_path, _step_fails_on_rank1, sync, where)
    assert r1["step"]["error"] == ["RuntimeError", "refused on this rank"], r1
    if where == "run" and not sync:
        assert r0["step"]["error"] is None, r0
        assert "rank 0: another rank" in r0["again"]["error"][1], r0
    else:
        assert r0["step"]["error"][0] == "OptimStateError" and "rank 0: another rank" in r0["step"]["error"][1], r0
    for r in (r0, r1):
        assert r["step"]["seconds"] < PROMPT and r["again"]["seconds"] < PROMPT, (r0, r1)
        assert r["again"]["error"][0] == "OptimStateError", (r0, r1)


def test_resuming_at_step_0_in_the_process_whose_step_1_failed_is_refused(tmp_path):
    """Step 0 has no stored weights: the parameters as given are step 0. A failed step 1 has
    changed them in place, so reopening over them at step 0 is refused; new parameters resume."""
    from tiered.optim import OffloadedAdamW, OptimStateError

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 8))

    cfg = {"tiers": {"host": {"capacity": "4MiB"}, "nvme": {"path": str(tmp_path / "nvme"), "capacity": "64MiB"}}}
    m = model()
    opt = OffloadedAdamW(m.parameters(), lr=0.05, config=cfg, chunk_bytes=CHUNK, sync=True).open()
    put = opt.store.put

    def fail_marker(key, *a, **kw):
        if key == opt._marker_key:
            raise OSError("disk full")
        return put(key, *a, **kw)

    opt.store.put = fail_marker
    m(torch.randn(4, 64)).square().mean().backward()
    with pytest.raises(OSError, match="disk full"):
        opt.step()
    opt.close()
    assert not all(torch.equal(a, b) for a, b in zip(m.parameters(), model().parameters()))  # step 1 ran
    with pytest.raises(OptimStateError, match="step 1 .*changed .* in place"):
        OffloadedAdamW(m.parameters(), lr=0.05, config=cfg, chunk_bytes=CHUNK, resume=True).open()
    fresh = model()
    with OffloadedAdamW(fresh.parameters(), lr=0.05, config=cfg, chunk_bytes=CHUNK, resume=True) as opt:
        assert opt._step == 0
