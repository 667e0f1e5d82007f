"""LazyCheckpointer safety: a checkpoint directory is one checkpointer's (in this process and
across processes), a load or cold copy keeps the bytes it reads until it is done, commit order
does not follow the wall clock, a full host tier does not stall the optimizer step, prefault
stays within the checkpointer's share, the manifest rename is the commit point, and leftovers of
earlier formats are cleaned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from tiered.checkpoint import CheckpointError, LazyCheckpointer
from tiered.store import TieredStore

T = 30.0
MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)


def cfg(tmp_path: Path, name: str = "nvme", *, host: str = "32MiB", flash: bool = False) -> dict:
    tiers = {"host": {"capacity": host}, "nvme": {"path": str(tmp_path / name), "capacity": "64MiB"}}
    if flash:
        tiers["flash"] = {"path": str(tmp_path / "flash"), "capacity": "64MiB"}
    return {"tiers": tiers, "engine": {"workers": 2, "chunk": "1MiB"}}


_CHILD = """
import json, sys, torch
from tiered.checkpoint import LazyCheckpointer, CheckpointError
cfg, kw = json.loads(sys.argv[1]), json.loads(sys.argv[2])
try:
    with LazyCheckpointer(cfg, prefault=False, keep_last=1, **kw) as ck:
        ck.save({"x": torch.zeros(4)}, 50).wait(30)
        print("OPENED", ck.steps())
except CheckpointError as e:
    print("REFUSED", e)
"""


def run_child(c: dict, **kw) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(c), json.dumps(kw)], capture_output=True,
                       text=True, timeout=90, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.parametrize("role", ["directory", "cold_directory"])
def test_another_process_with_its_own_store_is_refused_the_directory(tmp_path, role):
    d = tmp_path / "shared-ckpt"
    kw = {"directory": str(d)} if role == "directory" else {"cold_directory": str(d)}
    with LazyCheckpointer(cfg(tmp_path, "a"), prefault=False, keep_last=1, **kw) as ck:
        ck.save({"x": torch.ones(4)}, 7).wait(T)
        out = run_child(cfg(tmp_path, "b"), **kw)
        assert out.startswith("REFUSED") and "another process" in out and str(d) in out, out
        assert ck.steps() == {7: "storage"} and torch.equal(ck.load()["x"], torch.ones(4))
    assert run_child(cfg(tmp_path, "b"), **kw).startswith("OPENED")  # released on close


def test_a_cold_directory_that_is_another_checkpointers_directory_is_refused(tmp_path):
    with TieredStore(cfg(tmp_path, flash=True)) as s:
        a = LazyCheckpointer(store=s, cold_tier="flash", keep_last=1, prefault=False).open()
        try:
            b = LazyCheckpointer(store=s, tier="flash", keep_last=1, prefault=False)
            with pytest.raises(CheckpointError, match=r"directory=.*already in use in this process as the "
                                                      r"cold_directory"):
                b.open()
            nested = LazyCheckpointer(store=s, name="other", directory=a.directory / "sub", prefault=False)
            with pytest.raises(CheckpointError, match="already in use"):
                nested.open()
        finally:
            a.close()
        with pytest.raises(CheckpointError, match="overlap"):
            LazyCheckpointer(store=s, directory=tmp_path / "d", cold_directory=tmp_path / "d", prefault=False).open()
        LazyCheckpointer(store=s, tier="flash", prefault=False).open().close()  # free again
