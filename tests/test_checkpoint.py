"""Checkpoints (tiered.checkpoint): lazy snapshots that mutations wait for, bitwise round
trips, retention, the cold zarr tier, checksums, leftovers after crashes (SIGKILL of a
saving child at random moments), store retention of offloaded state, failures delivered
through handles. The torch.distributed.checkpoint backend: test_dcp_gloo.py, test_dcp_store.py.
"""

from __future__ import annotations

import errno
import json
import random
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tiered.io_engine.testing import FaultyBackend
from helpers import store_config
from killing import run_and_kill
from tiered.checkpoint import CheckpointChecksumError, CheckpointError, LazyCheckpointer, StoreRef
from tiered.checkpoint.format import SEGMENT, committed_steps, read_manifest
from tiered.store import TieredStore

HERE = Path(__file__).resolve().parent
CHILD = HERE / "checkpoint_crash_child.py"
T = 30.0  # timeout for every wait
pytestmark = pytest.mark.timeout(120)


def cfg(tmp_path: Path, *, flash: bool = True) -> dict:
    return store_config(tmp_path, "32MiB", "256MiB", flash="256MiB" if flash else None)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaNs and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().contiguous().reshape(-1), b.detach().contiguous().reshape(-1)
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def assert_tree_same(got, want, path="") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and same(got, want), path
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), path
        for k in want:
            assert_tree_same(got[k], want[k], f"{path}/{k}")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_tree_same(g, w, f"{path}/{i}")
    elif isinstance(want, float) and want != want:
        assert got != got, path
    else:
        assert got == want and type(got) is type(want), path


def clone_tree(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: clone_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(clone_tree(v) for v in x)
    return x


def block_copier(ck: LazyCheckpointer) -> threading.Event:
    """Hold the background copy thread before it starts on each save, so every tensor of a
    save is still pending when the test mutates it; set the event to let it go on."""
    gate = threading.Event()
    orig = ck._snapshot

    def gated(h):
        assert gate.wait(T)
        return orig(h)

    ck._snapshot = gated
    return gate


def make_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, opt)
    return model, opt


def train_step(model, opt) -> None:
    model(torch.randn(8, 64)).square().mean().backward()
    opt.step()
    opt.zero_grad()


# --------------------------------------------------------------------------- round trips


def test_round_trip_every_dtype_bitwise_new_and_in_place(tmp_path):
    big = torch.randn((2 * SEGMENT + 12345) // 4)  # three checksum segments, unaligned end: more than host_buffer
    sd = {
        "f32": torch.tensor([1.5, float("nan"), -0.0, float("inf")]),
        "bf16": torch.randn(33, 7).to(torch.bfloat16), "f16": torch.randn(5).half(),
        "f64": torch.randn(3, 3, dtype=torch.float64), "i64": torch.arange(-5, 5), "u8": torch.arange(200, dtype=torch.uint8),
        "i8": torch.tensor([-128, 127], dtype=torch.int8), "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(4, dtype=torch.complex64), "scalar": torch.tensor(3.25), "empty": torch.empty(0, 5),
        "strided": torch.randn(16, 16).t(), "slice": torch.arange(100.0)[10:20:3], "big": big,
        "nested": {1: [torch.ones(2), (7, "x", None)], "lr": 0.1, "nan": float("nan"), "flag": True},
    }
    want = clone_tree(sd)
    with LazyCheckpointer(cfg(tmp_path), host_buffer="8MiB") as ck:  # smaller than the state: streams
        h = ck.save(sd, 7)
        info = h.wait(T)
        assert info["step"] == 7 and h.stats["durable_s"] >= h.stats["snapshot_s"] >= 0
        assert_tree_same(ck.load(7), want)
        into = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}
        into["nested"] = {1: [torch.zeros(2), (7, "x", None)], "lr": 0.1, "nan": float("nan"), "flag": True}
        targets = [into["big"], into["strided"]]
        got = ck.load(into=into)  # latest
        assert got["big"] is targets[0] and got["strided"] is targets[1]  # filled in place
        assert_tree_same(got, want)
        assert ck.latest() == 7 and ck.steps() == {7: "storage"}


def test_manifest_names_file_offset_dtype_shape_checksum_step(tmp_path):
    with LazyCheckpointer(cfg(tmp_path)) as ck:
        ck.save({"a": torch.arange(10, dtype=torch.int16), "b": torch.ones(3, 2)}, 3).wait(T)
        doc = read_manifest(ck.directory / "step-000000000003.json")
        kept = {(r["key"], r["version"]): r for r in ck.store.retained(doc["retain_tag"])[doc["retain_tag"]]}
    assert doc["step"] == 3
    a, b = doc["tensors"]
    assert (a["name"], a["dtype"], a["shape"], a["nbytes"]) == ("a", "int16", [10], 20)
    assert (b["name"], b["dtype"], b["shape"], b["nbytes"]) == ("b", "float32", [3, 2], 24)
    for t in (a, b):  # one retained store object each, at the place and with the crc32 the store keeps
        (part,) = t["parts"]
        r = kept[(part["key"], part["version"])]
        assert (part["tier"], part["offset"], part["nbytes"], part["crc32"]) == (r["tier"], r["offset"], t["nbytes"], r["crc32"])
        assert part["offset"] % 4096 == 0 and len(part["crc32"]) == 1


# --------------------------------------------------------------------------- laziness and mutation


@pytest.mark.parametrize("negative_control", [False, True])
def test_optimizer_step_right_after_save_waits_for_the_snapshot(tmp_path, negative_control):
    """The step hook copies what the (held) background thread has not: the checkpoint has
    the pre-step values. Without the hook and with unguarded="trust", the same sequence
    saves post-step values: the check can fail."""
    model, opt = make_model()
    with LazyCheckpointer(cfg(tmp_path), unguarded="trust" if negative_control else "copy") as ck:
        if not negative_control:
            ck.attach(opt)
        gate = block_copier(ck)
        sd = {"model": model.state_dict(), "optim": opt.state_dict()}
        before = clone_tree(sd)
        h = ck.save(sd, 1)
        assert not h.snapshot_done()
        train_step(model, opt)  # mutates parameters and Adam state in place
        after = clone_tree({"model": model.state_dict(), "optim": opt.state_dict()})
        gate.set()
        h.wait(T)
        got = ck.load(1)
    w = "0.weight"
    assert not same(before["model"][w], after["model"][w])
    if negative_control:
        assert same(got["model"][w], after["model"][w])
    else:
        assert_tree_same(got, before)
        assert h.stats["guard_wait_s"] > 0 and h.stats["eager_bytes"] == 0


@pytest.mark.parametrize("host_buffer", ["64MiB", "8MiB"])
def test_step_hook_copies_ahead_of_a_busy_background_thread(tmp_path, host_buffer):
    """The background thread is held inside its first copy (of a tensor the step does not
    touch): the step hook copies the rest
    into free host buffers (or private memory when they are full: 8 MiB for 48 MiB of
    state), and the background thread then writes those pieces too."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.Linear(4096, 1024))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 1024)).square().mean().backward()
    opt.step()
    with LazyCheckpointer(cfg(tmp_path), host_buffer=host_buffer) as ck:
        ck.attach(opt)
        gate, entered = threading.Event(), threading.Event()
        orig = ck._copy

        def held(p, drain):
            if not entered.is_set():
                entered.set()
                assert gate.wait(T)
            return orig(p, drain)

        ck._copy = held
        # the first piece is a tensor no hook guards: the background thread is held copying it
        sd = {"first": torch.arange(10.0), "model": model.state_dict(), "optim": opt.state_dict()}
        before = clone_tree(sd)
        h = ck.save(sd, 1)
        assert entered.wait(T)
        model(torch.randn(4, 1024)).square().mean().backward()
        opt.step()
        assert not same(model[0].weight, before["model"]["0.weight"])
        gate.set()
        h.wait(T)
        assert_tree_same(ck.load(1), before)
        assert h.stats["guard_wait_s"] > 0


def test_unguarded_tensors_are_copied_in_save(tmp_path):
    t = torch.arange(1000.0)
    with LazyCheckpointer(cfg(tmp_path)) as ck:
        gate = block_copier(ck)
        h = ck.save({"t": t}, 1)
        t.add_(1)  # nobody guards it: save() must have copied it already
        gate.set()
        h.wait(T)
        assert same(ck.load(1)["t"], torch.arange(1000.0))
        assert h.stats["eager_bytes"] == 4000


def test_module_buffers_are_guarded_before_forward(tmp_path):
    bn = torch.nn.BatchNorm1d(8)
    bn(torch.randn(16, 8))
    before = clone_tree(bn.state_dict())
    with LazyCheckpointer(cfg(tmp_path)) as ck:
        ck.attach(bn)
        gate = block_copier(ck)
        h = ck.save(bn.state_dict(), 1)
        assert h.stats["eager_bytes"] == bn.weight.numel() * 8  # weight and bias: no optimizer attached
        bn(torch.randn(16, 8) + 5)  # updates running_mean / running_var in place
        gate.set()
        h.wait(T)
        assert_tree_same(ck.load(1), before)


def test_buffers_of_a_submodule_called_on_its_own_are_guarded(tmp_path):
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 8))
    model(torch.randn(16, 8))
    before = clone_tree(model.state_dict())
    with LazyCheckpointer(cfg(tmp_path)) as ck:
        ck.attach(model)
        gate = block_copier(ck)
        h = ck.save(model.state_dict(), 1)
        model[0](torch.randn(16, 8) + 5)  # the submodule alone: the root's hook does not run
        gate.set()
        h.wait(T)
        assert_tree_same(ck.load(1), before)


def test_training_loop_every_checkpoint_matches_its_step(tmp_path):
    model, opt = make_model()
    want = {}
    with LazyCheckpointer(cfg(tmp_path), keep_last=10, host_buffer="8MiB") as ck:
        ck.attach(opt)
        handles = []
        for step in range(6):
            sd = {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}
            want[step] = clone_tree(sd)
            handles.append(ck.save(sd, step))
            train_step(model, opt)
        ck.wait_all(T)
        assert all(h.done() for h in handles)
        for step in range(6):
            assert_tree_same(ck.load(step), want[step])
        model2, opt2 = make_model()
        got = ck.load(3)
        model2.load_state_dict(got["model"])
        opt2.load_state_dict(got["optim"])
        for p, q in zip(model2.parameters(), want[3]["model"].values()):
            assert same(p, q)


# --------------------------------------------------------------------------- retention, levels


def test_retention_keeps_last_n_and_resaving_a_step_replaces_it(tmp_path):
    with LazyCheckpointer(cfg(tmp_path, flash=False), keep_last=2) as ck:
        for s in range(5):
            ck.save({"x": torch.full((100,), float(s))}, s)
        ck.wait_all(T)
        assert ck.steps() == {3: "storage", 4: "storage"}
        ck.save({"x": torch.full((100,), 40.0)}, 4).wait(T)
        assert same(ck.load(4)["x"], torch.full((100,), 40.0))
        assert len(ck.store.retained(ck._tag_prefix)) == 2  # the replaced step 4's bytes were released
        ck.delete(3)
        assert ck.steps() == {4: "storage"}
        with pytest.raises(CheckpointError, match="no committed checkpoint of step 3"):
            ck.load(3)


def test_retention_after_a_rollback_keeps_the_new_save_and_latest_is_the_newest_commit(tmp_path):
    """A run that rolls back (step 200 -> 150) and saves again must keep that save: ranking
    by step number would delete it and resume from the abandoned branch."""
    with LazyCheckpointer(cfg(tmp_path, flash=False), keep_last=1) as ck:
        ck.save({"x": torch.full((10,), 200.0)}, 200).wait(T)
        info = ck.save({"x": torch.full((10,), 150.0)}, 150).wait(T)
        assert Path(info["manifest"]).exists()
        assert ck.steps() == {150: "storage"} and ck.latest() == 150
        assert same(ck.load()["x"], torch.full((10,), 150.0))
    with LazyCheckpointer(cfg(tmp_path, flash=False), keep_last=2) as ck:
        ck.save({"x": torch.full((10,), 160.0)}, 160).wait(T)
        assert ck.steps() == {150: "storage", 160: "storage"} and ck.latest() == 160


def test_cold_tier_is_compressed_zarr_and_serves_retired_steps(tmp_path):
    with LazyCheckpointer(cfg(tmp_path), keep_last=1, cold_tier="flash", cold_keep_last=3) as ck:
        states = {s: {"z": torch.zeros(1 << 18), "r": torch.randn(1000), "s": s} for s in range(4)}
        for s, sd in states.items():
            ck.save(sd, s)
        ck.wait_all(T)
        assert ck.steps() == {1: "cold", 2: "cold", 3: "storage"}
        for s in (1, 2, 3):
            assert_tree_same(ck.load(s), states[s])
        zarrs = sorted(ck.cold_directory.glob("*.zarr"))
        assert len(zarrs) == 3
        meta = json.loads((zarrs[0] / "t0" / "zarr.json").read_text())
        assert any(c["name"] == "zstd" for c in meta["codecs"])
        chunk_bytes = sum(f.stat().st_size for f in (zarrs[0] / "t0").rglob("*") if f.is_file())
        assert chunk_bytes < (1 << 20) // 20  # 1 MiB of zeros compresses


# --------------------------------------------------------------------------- checksums, bad input


def test_corrupted_storage_and_cold_bytes_are_detected(tmp_path):
    with LazyCheckpointer(cfg(tmp_path), cold_tier="flash") as ck:
        ck.save({"a": torch.zeros(5000), "b": torch.ones(10)}, 1)
        ck.wait_all(T)
        doc = read_manifest(ck.directory / "step-000000000001.json")
        (part,) = doc["tensors"][1]["parts"]  # "b"
        (rec,) = [r for r in ck.store.retained(doc["retain_tag"])[doc["retain_tag"]] if r["key"] == part["key"]]
        with open(rec["path"], "r+b") as f:
            f.seek(part["offset"] + 3)
            f.write(b"\x01")
        with pytest.raises(CheckpointChecksumError, match=r"step 1 tensor 'b'.*segment 0"):
            ck.load(1)
        ck.delete(1)  # storage copy gone: the cold copy serves the step
        assert same(ck.load(1)["b"], torch.ones(10))
        chunk = next(p for p in (next(ck.cold_directory.glob("*.zarr")) / "t1").rglob("*") if p.is_file() and p.name != "zarr.json")
        raw = bytearray(chunk.read_bytes())
        zstandard = pytest.importorskip("zstandard")  # to forge a corrupted chunk that still decompresses

        plain = bytearray(zstandard.ZstdDecompressor().decompress(bytes(raw)))
        plain[0] ^= 0xFF
        chunk.write_bytes(zstandard.ZstdCompressor().compress(bytes(plain)))
        with pytest.raises(CheckpointChecksumError, match=r"tensor 'b'"):
            ck.load(1)


def test_bad_input_errors_name_the_key(tmp_path):
    with LazyCheckpointer(cfg(tmp_path)) as ck:
        with pytest.raises(CheckpointError, match=r"'opt/fn'.*function"):
            ck.save({"opt": {"fn": len}}, 1)
        with pytest.raises(CheckpointError, match="step"):
            ck.save({}, -1)
        ck.save({"w": torch.ones(3, 4)}, 2).wait(T)
        with pytest.raises(CheckpointError, match=r"'w' is float32\(3, 4\).*into has float32\(4, 3\)"):
            ck.load(2, into={"w": torch.ones(4, 3)})
        with pytest.raises(CheckpointError, match="no committed checkpoint of step 9"):
            ck.load(9)
    with pytest.raises(CheckpointError, match="not open"):
        ck.save({}, 1)


def test_a_second_checkpointer_on_the_directory_is_refused(tmp_path):
    c = cfg(tmp_path)
    with LazyCheckpointer(c):  # in this process; another process: test_lazy_safety.py
        with pytest.raises(CheckpointError, match="already in use in this process"):
            LazyCheckpointer(c).open()
    LazyCheckpointer(c).open().close()  # released on close


# --------------------------------------------------------------------------- failures


def test_write_failure_fails_the_handle_and_leaves_no_visible_checkpoint(tmp_path):
    fb = FaultyBackend()
    with LazyCheckpointer(cfg(tmp_path), backend=fb) as ck:
        ck.save({"x": torch.ones(100)}, 1).wait(T)
        rule = fb.fail("write", errno.EIO, path="objects.dat", times=1)
        h = ck.save({"x": torch.zeros(100)}, 2)
        with pytest.raises(OSError, match="Input/output error"):
            h.wait(T)
        assert rule.hits == 1
        assert ck.steps() == {1: "storage"}
        assert len(ck.store.retained(ck._tag_prefix)) == 1 and ck.store.keys() == []  # the failed save's bytes are gone
        h3 = ck.save({"x": torch.zeros(100)}, 3)
        h3.wait(T)
        assert ck.latest() == 3


def test_unobserved_background_failure_is_raised_by_the_next_save(tmp_path):
    fb = FaultyBackend()
    with LazyCheckpointer(cfg(tmp_path), backend=fb) as ck:
        fb.fail("fsync", errno.ENOSPC, times=1)
        h = ck.save({"x": torch.ones(10)}, 1)
        deadline = time.monotonic() + T
        while not h.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(CheckpointError, match="step 1 failed in the background"):
            ck.save({"x": torch.ones(10)}, 2)
        assert ck.steps() == {}


# --------------------------------------------------------------------------- crashes


def test_leftovers_of_an_interrupted_save_are_removed_on_open(tmp_path):
    c = cfg(tmp_path)
    with LazyCheckpointer(c, cold_tier="flash") as ck:
        ck.save({"x": torch.ones(10)}, 1)
        ck.wait_all(T)
        d, cd = ck.directory, ck.cold_directory
        key = ck._key_prefix + "2-deadbeef/0"  # a piece of a save that never committed, and its retention
        ck.store.put(key, torch.ones(10)).result(T)
        ck.store.retain(ck._tag_prefix + "2:deadbeef", [key])
    (d / ".tmp-abc").write_bytes(b"{")  # a manifest temp file
    (cd / "step-000000000002-deadbeef.zarr").mkdir()
    with LazyCheckpointer(c, cold_tier="flash") as ck:
        assert sorted(p.name for p in d.iterdir()) == [".lock", "step-000000000001.json"]
        assert ck.store.keys() == [] and len(ck.store.retained(ck._tag_prefix)) == 1
        assert len(list(cd.glob("*.zarr"))) == 1
        assert same(ck.load(1)["x"], torch.ones(10))


def test_sigkill_at_random_moments_leaves_the_last_committed_step_loadable(tmp_path):
    """Kill a saving child (snapshot, writes, fsync, manifest, retention, cold copy all in
    flight) at random moments, several times; each time the last step it reported
    committed (or a later one) loads bitwise, and no partial checkpoint is visible."""
    sys.path.insert(0, str(HERE))
    from checkpoint_crash_child import state

    c = cfg(tmp_path)
    rng = random.Random(1234)
    step, kills = 0, 0
    for _round in range(5):
        lines = run_and_kill([sys.executable, str(CHILD), json.dumps(c), str(step)], rng.uniform(0.02, 0.6),
                             cwd=HERE.parent)
        kills += 1
        committed = [int(x.split()[1]) for x in lines if x.startswith("committed")]
        with LazyCheckpointer(c, cold_tier="flash", keep_last=2, cold_keep_last=2) as ck:
            latest = ck.latest()
            if committed:
                assert latest is not None and latest >= committed[-1]
            for s, level in ck.steps().items():  # every visible step is complete and intact
                assert_tree_same(ck.load(s), state(s))
            referenced = {read_manifest(p)["retain_tag"] for p in committed_steps(ck.directory).values()}
            assert set(ck.store.retained(ck._tag_prefix)) == referenced and ck.store.keys() == []
            assert not list(ck.directory.glob(".tmp-*"))
        step = (latest + 1) if latest is not None else step
    assert kills == 5 and step > 3


# --------------------------------------------------------------------------- offloaded state


def test_store_objects_are_checkpointed_by_reference_and_survive_restart(tmp_path):
    c = cfg(tmp_path, flash=False)
    v1 = torch.randn(300, 100)
    with TieredStore(c) as store:
        store.put("optim/exp_avg", v1, kind="optim").result(T)
        used_before = store.stats()["tiers"]["nvme"]["used"]
        with LazyCheckpointer(c, store=store, keep_last=1) as ck:
            h = ck.save({"m": StoreRef(store, "optim/exp_avg"), "w": torch.ones(4)}, 1)
            h.wait(T)
            assert h.stats["referenced_bytes"] == v1.numel() * 4 and h.stats["bytes"] == 16
            assert store.stats()["tiers"]["nvme"]["used"] == used_before + 4096  # only "w" was written
            store.put("optim/exp_avg", torch.zeros(300, 100), kind="optim").result(T)  # a new version
            store.delete("optim/exp_avg")
            assert same(ck.load(1)["m"], v1)
            assert len(store.retained()) == 1
    with TieredStore(c) as store:  # the retention is in the store's manifest
        assert len(store.retained()) == 1
        for i in range(6):  # reuse free space: the retained extent must not be overwritten
            store.put(f"fill{i}", torch.full((300, 100), 7.0)).result(T)
        with LazyCheckpointer(c, store=store, keep_last=1) as ck:
            assert same(ck.load(1)["m"], v1)
            ck.save({"w": torch.ones(4)}, 2).wait(T)  # retires step 1: the store releases its extent
            assert [tag.split(":")[2] for tag in store.retained()] == ["2"]  # only step 2's own bytes
        assert used_before == 122880  # one 120000-byte object
        assert store.stats()["tiers"]["nvme"]["used"] == 6 * 122880 + 4096  # the retained extent was freed


def test_a_refused_save_gives_its_store_retention_back(tmp_path):
    c = cfg(tmp_path, flash=False)
    with TieredStore(c) as store, LazyCheckpointer(c, store=store, host_buffer="8MiB") as ck:
        store.put("k", torch.ones(10)).result(T)
        with pytest.raises(CheckpointError, match=r"'big' is not contiguous and larger"):
            ck.save({"k": StoreRef(store, "k"), "big": torch.randn(2048, 2048).t()}, 1)
        assert store.retained() == {}
        with LazyCheckpointer(cfg(tmp_path / "other", flash=False)) as other:
            with pytest.raises(CheckpointError, match="was not given"):
                other.save({"k": StoreRef(store, "k")}, 1)


def test_crashed_save_releases_its_store_retention_on_next_open(tmp_path):
    c = cfg(tmp_path, flash=False)
    with TieredStore(c) as store:
        store.put("k", torch.ones(10)).result(T)
        ck = LazyCheckpointer(c, store=store)
        prefix = ck._tag_prefix
        store.retain(prefix + "5:abcd", ["k"])  # what save() does before the crash
        with ck:
            assert store.retained(prefix) == {}


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("hold_copier", [True, False])
def test_cuda_state_is_snapshotted_before_the_optimizer_step(tmp_path, hold_copier):
    """GPU parameters and Adam state: the device->host copies run on a side stream after the
    work queued before save(); a step right after save() waits for them (or takes device-side
    copies while the background thread is held), and the checkpoint has the pre-step bytes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 512)).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(64, 512, device="cuda")
    for _ in range(2):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    with LazyCheckpointer(cfg(tmp_path), host_buffer="64MiB") as ck:
        ck.attach(opt)
        gate = block_copier(ck) if hold_copier else None
        sd = {"model": model.state_dict(), "optim": opt.state_dict()}
        h = ck.save(sd, 1)
        before = clone_tree(sd)  # queued after save(): same bytes as at save()
        model(x).square().mean().backward()
        opt.step()  # mutates in place on the GPU
        if gate is not None:
            gate.set()
        h.wait(T)
        got = ck.load(1)
        assert_tree_same(got, _cpu_tree(before))  # loaded as CPU tensors
        into = {"model": model.state_dict(), "optim": opt.state_dict()}
        ck.load(1, into=into)  # back onto the GPU tensors in place
        for n, t in model.state_dict().items():
            assert same(t.cpu(), before["model"][n].cpu())


def _cpu_tree(x):
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, dict):
        return {k: _cpu_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu_tree(v) for v in x)
    return x
