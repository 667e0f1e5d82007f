"""Crash consistency of OffloadedAdamW across the ranks of an FSDP2 (``fully_shard``) model.

A step is complete only once every rank's marker is durable: one rank is killed (``os._exit``
or SIGKILL) after its own marker of step *s* and before the other rank's, or the other rank
goes on alone; both are then reopened with ``resume=True`` and must agree on one step, roll
back to it, and from there train bitwise as an uninterrupted FSDP2 + ``torch.optim.AdamW`` run.
gloo on CPU, world 2, a small model whose shards take several state chunks per rank.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from helpers import rank_exit_codes

pytestmark = pytest.mark.timeout(60)

WORLD = 2
STEPS = 5
CHUNK = 12 * 4096  # 4096 elements a chunk: each rank's shards take 4 chunks
KILLED = 17  # exit code of a rank that killed itself with os._exit


def _model(mesh) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 16))
    for layer in m:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(m, mesh=mesh)


def _config(root: str) -> dict:
    return {"tiers": {"host": {"capacity": "4MiB"}, "nvme": {"path": root + "/r{rank}", "capacity": "64MiB"}},
            "engine": {"workers": 2, "chunk": "1MiB"}}


def _train_step(model, opt, step: int, rank: int) -> None:
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(100 * step + rank))
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _init(rank: int, init: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=10))


def _arm(opt, kill_step: int, action: str | None) -> None:
    """Kill this rank around the put of its marker of ``kill_step`` (the marker's first element
    is the step it names): before it (the marker is never written) or once it is durable."""
    if action is None:
        return
    put = opt.store.put

    def put_or_die(key, value, *args, **kwargs):
        if key != opt._marker_key or int(value[0]) != kill_step:
            return put(key, value, *args, **kwargs)
        if action == "exit-before-marker":
            os._exit(KILLED)
        if action == "sigkill-before-marker":
            os.kill(os.getpid(), signal.SIGKILL)
        f = put(key, value, *args, **kwargs)
        f.result(timeout=30)
        os._exit(KILLED)  # "exit-after-marker": durable on this rank only

    opt.store.put = put_or_die


def _crashing_run(rank: int, root: str, init: str, kill_step: int, actions: dict, sync: bool) -> None:
    """Train STEPS steps; the rank named in ``actions`` dies at its marker of ``kill_step``, the
    other one fails when it next needs its peer (a collective)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tiered.optim import OffloadedAdamW

    _init(rank, init)
    model = _model(init_device_mesh("cpu", (WORLD,)))
    with OffloadedAdamW(model.parameters(), lr=0.05, weight_decay=0.1, config=_config(root), chunk_bytes=CHUNK,
                        sync=sync) as opt:
        assert opt.chunks >= 2
        _arm(opt, kill_step, actions.get(rank))
        for step in range(STEPS):
            _train_step(model, opt, step, rank)
    dist.barrier()
    dist.destroy_process_group()


def _resumed_run(rank: int, root: str, init: str, out: str) -> None:
    """Reopen with resume=True; compare with an uninterrupted FSDP2 + torch AdamW run from the
    step resumed at; write what was found to ``out``/r<rank>.json."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tiered.optim import OffloadedAdamW

    _init(rank, init)
    mesh = init_device_mesh("cpu", (WORLD,))
    ref = _model(mesh)
    o_ref = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.1)
    snaps = [[p.to_local().detach().clone() for p in ref.parameters()]]
    for step in range(STEPS):
        _train_step(ref, o_ref, step, rank)
        snaps.append([p.to_local().detach().clone() for p in ref.parameters()])
    ours = _model(mesh)  # the initial weights: what a resume at step 0 starts from
    found: dict = {}
    with OffloadedAdamW(ours.parameters(), lr=0.05, weight_decay=0.1, config=_config(root), chunk_bytes=CHUNK,
                        resume=True) as opt:
        s = found["step"] = opt._step
        found["marker"] = int(opt._read_marker()[0]) if opt._marker_key in opt.store else None
        found["restored"] = all(torch.equal(a, b.to_local()) for a, b in zip(snaps[s], ours.parameters()))
        for step in range(s, STEPS):
            _train_step(ours, opt, step, rank)
        found["final"] = all(torch.equal(a, b.to_local()) for a, b in zip(snaps[STEPS], ours.parameters()))
    Path(out, f"r{rank}.json").write_text(json.dumps(found))
    dist.barrier()
    dist.destroy_process_group()


def _run(target, args_of, timeout: float = 40.0) -> list[int]:
    """``target(rank, *args_of(rank))`` in one forked process per rank; their exit codes."""
    return rank_exit_codes(target, WORLD, lambda r: (r, *args_of(r)), timeout=timeout)


CASES = {
    # rank 0's marker of step 3 is durable, rank 1 is killed before writing its own: step 3 is
    # not complete, rank 0 must roll back to step 2 (its step-2 state must still be there)
    "r0-marker-then-exit,r1-sigkill-before-marker": (3, {0: "exit-after-marker", 1: "sigkill-before-marker"}, False, 2),
    # the same with the commit inside step() (sync=True)
    "sync,r0-marker-then-exit,r1-exit-before-marker": (3, {0: "exit-after-marker", 1: "exit-before-marker"}, True, 2),
    # rank 1 dies before its marker; rank 0 commits step 3 and carries on as far as it can
    # without its peer: it must not write over the step-2 state it has to roll back to
    "r0-goes-on,r1-exit-before-marker": (3, {1: "exit-before-marker"}, False, 2),
    "sync,r0-goes-on,r1-sigkill-before-marker": (3, {1: "sigkill-before-marker"}, True, 2),
    # the first step: rank 0 rolls back to no state at all (the weights it is given)
    "step1,r0-marker-then-exit,r1-exit-before-marker": (1, {0: "exit-after-marker", 1: "exit-before-marker"}, False, 0),
    # both markers durable, then rank 1 dies: step 3 is complete, nobody rolls back
    "r1-marker-then-exit,r0-goes-on": (3, {1: "exit-after-marker"}, False, 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_rank_killed_between_the_ranks_markers_resumes_every_rank_from_one_step(tmp_path, case):
    kill_step, actions, sync, expected = CASES[case]
    root, out = str(tmp_path / "store"), tmp_path / "out"
    out.mkdir()
    codes = _run(_crashing_run, lambda r: (root, str(tmp_path / "init1"), kill_step, actions, sync))
    for r, action in actions.items():  # the armed ranks died where they were told to
        assert codes[r] == (-signal.SIGKILL if action.startswith("sigkill") else KILLED), codes
    assert all(c is not None for c in codes), f"a rank was still running: {codes}"
    codes = _run(_resumed_run, lambda r: (root, str(tmp_path / "init2"), str(out)))
    found = [json.loads((out / f"r{r}.json").read_text()) for r in range(WORLD) if (out / f"r{r}.json").exists()]
    assert codes == [0] * WORLD and len(found) == WORLD, f"resumed ranks exited {codes}, found {found}"
    assert [f["step"] for f in found] == [expected] * WORLD, found
    assert all(f["restored"] and f["final"] for f in found), found
    # a rank that rolled back names the step it rolled back to (read right after open): a later
    # crash cannot resume it from the step it is about to write over
    assert all(f["marker"] in (expected, None if expected == 0 else expected) for f in found), found


def _train(rank: int, init: str, runs: list) -> None:
    """Train one run per (store root, steps) of ``runs``; rank 0 then deletes its chunk 1 of
    the last step of a run whose root ends with "-lose"."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tiered.optim import OffloadedAdamW

    _init(rank, init)
    for root, steps in runs:
        model = _model(init_device_mesh("cpu", (WORLD,)))
        with OffloadedAdamW(model.parameters(), lr=0.05, config=_config(root), chunk_bytes=CHUNK) as opt:
            for step in range(steps):
                _train_step(model, opt, step, rank)
            opt.flush()
            if rank == 0 and root.endswith("-lose"):
                opt.store.delete(opt._chunk_key(opt._chunks[1], steps))
    dist.barrier()
    dist.destroy_process_group()


def _open_refused(rank: int, init: str, out: str, cases: list) -> None:
    """Open each of ``cases`` (store root, resume); write the error each raised (None: opened)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tiered.optim import OffloadedAdamW, OptimStateError

    _init(rank, init)
    model = _model(init_device_mesh("cpu", (WORLD,)))
    errors = []
    for root, resume in cases:
        try:
            OffloadedAdamW(model.parameters(), lr=0.05, config=_config(root), chunk_bytes=CHUNK,
                           resume=resume).open().close()
            errors.append(None)
        except OptimStateError as e:
            errors.append(str(e))
    Path(out, f"r{rank}.json").write_text(json.dumps(errors))
    dist.barrier()
    dist.destroy_process_group()


def test_ranks_whose_stores_cannot_meet_at_one_step_all_refuse_to_open(tmp_path):
    """Every rank raises (none waits for the others until a timeout): when one rank's store is
    of another run (its marker more than a step behind), when one rank finds state without
    resume=True while the other finds none, and when one rank's state of the agreed step lacks
    a chunk."""
    import shutil

    one, three = tmp_path / "one", tmp_path / "three-lose"
    assert _run(_train, lambda r: (str(tmp_path / "init1"), [(str(one), 1), (str(three), 3)])) == [0, 0]
    apart, alone = tmp_path / "apart", tmp_path / "alone"
    shutil.copytree(three / "r0", apart / "r0")  # step 3 (and 2 before it)
    shutil.copytree(one / "r1", apart / "r1")  # step 1
    shutil.copytree(one / "r0", alone / "r0")  # rank 1: no state
    out = tmp_path / "out"
    out.mkdir()
    cases = [(str(apart), True), (str(alone), False), (str(three), True)]
    assert _run(_open_refused, lambda r: (str(tmp_path / "init3"), str(out), cases)) == [0, 0]
    (r0_apart, r0_alone, r0_lost), (r1_apart, r1_alone, r1_lost) = (
        json.loads((out / f"r{r}.json").read_text()) for r in range(WORLD))
    assert ("rank 0: the ranks' last common step is 1, but this rank's marker 'adamw/step' names step 3 and 2 "
            "before it") in r0_apart
    assert "rank 1: another rank of the process group cannot return to step 1" in r1_apart
    assert "already holds optimizer state 'adamw' at step 1" in r0_alone
    assert "rank 1: another rank of the process group cannot open its optimizer state" in r1_alone
    assert "object 'adamw/c000001/1' of step 3 is missing" in r0_lost
    assert "rank 1: another rank of the process group cannot return to step 3" in r1_lost


def test_a_marker_written_without_the_step_before_it_still_resumes(tmp_path):
    """Markers of stores written before they named the step before theirs (``[step, chunks,
    elements, counts...]``) are read as they were: one process resumes from them bitwise."""
    from tiered.optim import OffloadedAdamW

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 8))

    def train(m, opt, step):
        x = torch.randn(4, 64, generator=torch.Generator().manual_seed(step))
        m(x).square().mean().backward()
        opt.step()
        opt.zero_grad()

    cfg = {"tiers": {"host": {"capacity": "4MiB"}, "nvme": {"path": str(tmp_path / "nvme"), "capacity": "64MiB"}}}
    ref, ours = model(), model()
    o_ref = torch.optim.AdamW(ref.parameters(), lr=0.05)
    with OffloadedAdamW(ours.parameters(), lr=0.05, config=cfg, chunk_bytes=CHUNK) as opt:
        for step in range(2):
            train(ref, o_ref, step)
            train(ours, opt, step)
        opt.flush()
        marker = opt._read_marker()
        n = len(list(ours.parameters()))
        assert marker.numel() == 4 + 2 * n and int(marker[3 + n]) == 1  # names step 1 before step 2
        opt.store.put(opt._marker_key, marker[:3 + n].clone()).result(timeout=30)
    fresh = model()
    with OffloadedAdamW(fresh.parameters(), lr=0.05, config=cfg, chunk_bytes=CHUNK, resume=True) as opt:
        assert opt._step == 2
        train(ref, o_ref, 2)
        train(fresh, opt, 2)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), fresh.parameters()))
