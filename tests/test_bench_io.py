"""``tiered bench io`` and ``tiered probe``: the keys the issue asks for, JSON-only stdout,
running without fio, catching reads that did not happen, and probe's measured tiers.

Sizes are small (16-32 MiB) so the whole file runs in well under 20 s; tmp_path is
on a real disk here, so O_DIRECT is exercised for real.
"""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest

from helpers import store_config
from tiered.io_engine.bench import FIO_HINT, REQUIRED_KEYS, BenchError, Pattern, parse_fio_json
from tiered.io_engine.bench import run as engine_bench_run
from tiered.tools.bench_io import add_bench_io_arguments, bench_io_main, print_report, run_bench_io
from tiered.tools.probe import add_probe_arguments, print_probe, probe, probe_main

MiB = 1 << 20
HAVE_FIO = shutil.which("fio") is not None


def _args(add, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


def _small(**kw):
    opts = dict(rand_seconds=0.3, sweep=False, progress=False, window=8 * MiB)
    opts.update(kw)
    return opts


@pytest.mark.timeout(60)
def test_run_bench_io_reports_required_keys(tmp_path, capsys):
    r = run_bench_io(tmp_path / "bench", "32MiB", workers=2, chunk="4MiB", **_small())
    for key in REQUIRED_KEYS:
        assert key in r
    for key in ("read_gbps", "write_gbps", "rand64k_read_iops", "read_gbps_no_hugepages",
                "posix_read_gbps", "posix_write_gbps", "aiofiles_read_gbps", "aiofiles_write_gbps",
                "aiofiles_rand64k_read_iops"):
        assert r[key] > 0, key
    if HAVE_FIO:
        for key in ("fio_read_gbps", "fio_write_gbps", "fio_rand64k_read_iops", "fio_rand64k_read_iops_qd32"):
            assert r[key] > 0, key
        assert r["rand64k_ratio"] > 0
    else:
        assert r["fio_read_gbps"] is None and FIO_HINT in r["notes"]
    assert r["cold"] == "O_DIRECT" and r["read_buffered_bytes"] == 0 and r["write_buffered_bytes"] == 0
    assert r["verified_blocks"] == 32 * MiB // 4096
    assert r["read_ratio"] == pytest.approx(r["read_gbps"] / r["best_read_ref_gbps"])
    assert r["best_read_ref"] in ("fio", "posix-contig", "ds_io")
    assert r["ds_io_read_gbps"] is None or r["ds_io_read_gbps"] > 0
    assert set(r["meets_targets"]) == {"read", "write", "rand64k"}
    assert not list((tmp_path / "bench").iterdir()), "the benchmark file must be removed"
    assert capsys.readouterr().out == "", "run_bench_io must not print to stdout"
    json.dumps(r)  # JSON-able
    print_report(r)
    out = capsys.readouterr().out
    assert "seq read GB/s" in out and "cold: O_DIRECT" in out and "huge pages" in out


@pytest.mark.timeout(60)
def test_json_mode_prints_only_json(tmp_path, capsys):
    args = _args(add_bench_io_arguments, [
        "--dir", str(tmp_path), "--size", "16MiB", "--workers", "2", "--chunk", "4MiB", "--backend", "threads",
        "--rand-seconds", "0.2", "--no-sweep", "--no-fio", "--compare", "", "--json",
    ])
    assert bench_io_main(args) == 0
    captured = capsys.readouterr()
    obj = json.loads(captured.out)  # stdout is exactly one JSON object
    for key in REQUIRED_KEYS:
        assert key in obj
    assert obj["read_gbps"] > 0 and obj["fio_read_gbps"] is None
    assert "[bench io]" in captured.err  # progress went to stderr


@pytest.mark.timeout(60)
def test_without_fio_fields_are_null_and_said(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engine_bench_run.shutil, "which", lambda name, *a, **k: None)
    r = run_bench_io(tmp_path, "16MiB", workers=2, chunk="4MiB", backends_compare=(), **_small(rand_seconds=0.2))
    for key in ("fio_read_gbps", "fio_write_gbps", "fio_rand64k_read_iops"):
        assert r[key] is None
    assert r["rand64k_ratio"] is None and r["meets_targets"]["rand64k"] is None
    assert FIO_HINT in r["notes"] and r["fio"]["installed"] is False
    assert r["read_gbps"] > 0 and r["best_read_ref"] == "posix-contig"
    print_report(r)
    assert "fio not installed" in capsys.readouterr().out


def test_pattern_catches_a_read_that_did_not_happen():
    pat = Pattern(64 * 1024, seed=3)
    buf = np.zeros(64 * 1024, dtype=np.uint8)
    pat.fill(buf)
    pat.stamp(buf, 1 << 30, len(buf))
    assert pat.verify(buf, 1 << 30, len(buf), "f") == 16
    with pytest.raises(BenchError, match="did not return"):
        pat.verify(buf, 0, len(buf), "f")  # right payload, wrong place
    with pytest.raises(BenchError):
        pat.verify(np.zeros_like(buf), 1 << 30, len(buf), "f")  # nothing read
    bad = buf.copy()
    bad[pat.samples[0] + 100] ^= 1
    with pytest.raises(BenchError, match="payload"):
        pat.verify(bad, 1 << 30, len(buf), "f")


def test_fio_json_with_preamble():
    text = 'fio: some warning\n{"jobs": [{"read": {"bw_bytes": 5, "iops": 1.0}}]}\n'
    assert parse_fio_json(text)["jobs"][0]["read"]["bw_bytes"] == 5


def test_bad_directory_is_an_error_not_a_traceback(tmp_path, capsys):
    from tiered.tools.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["bench", "io", "--dir", str(blocker / "sub"), "--size", "16MiB", "--workers", "2",
                 "--chunk", "4MiB", "--backend", "threads", "--no-fio"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --dir ") and "Traceback" not in err
    assert main(["bench", "io", "--dir", str(blocker), "--size", "16MiB", "--no-fio"]) == 2
    assert "not a directory" in capsys.readouterr().err


def _config(tmp_path) -> dict:
    return store_config(tmp_path, "64MiB", "1GiB", chunk="4MiB")


@pytest.mark.timeout(60)
def test_probe_measures_storage_tiers(tmp_path, capsys):
    r = probe(_config(tmp_path), size=16 * MiB)
    assert r["host"]["total_bytes"] > 0 and r["host"]["tier_capacity"] == 64 * MiB
    assert r["host"]["thp_enabled"] in (None, "always", "madvise", "never")
    assert r["gpu"]["torch"] and isinstance(r["gpu"]["devices"], list)
    assert "threads" in r["backends"] and r["backends"]["threads"] is None
    [s] = r["storage"]
    assert s["name"] == "nvme" and s["disk_free_bytes"] > 0 and s["o_direct"] is True
    assert s["read_gbps"] > 0 and s["write_gbps"] > 0 and s["measured"]["cold"]
    assert s.get("fstype")
    assert [p.name for p in (tmp_path / "nvme").iterdir()] == [], "probe must clean up"
    json.dumps(r)
    print_probe(r)
    assert "storage tier nvme" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_probe_main_json_without_measuring(tmp_path, capsys):
    cfg = tmp_path / "offload.toml"
    cfg.write_text(f'[tiers.nvme]\npath = "{tmp_path / "nvme"}"\ncapacity = "1GiB"\n')
    assert probe_main(_args(add_probe_arguments, ["--config", str(cfg), "--no-measure", "--json"])) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["storage"][0]["read_gbps"] is None and obj["storage"][0]["path"] == str(tmp_path / "nvme")


class _FakeAioHandle:
    """Stands in for DeepSpeed's aio_handle (deepspeed is not a dependency)."""

    def __init__(self, block, qd, single_submit, overlap_events, threads):
        self.block = block

    def new_cpu_locked_tensor(self, n, like):
        import torch

        return torch.empty(n, dtype=torch.uint8)

    def free_cpu_locked_tensor(self, t):
        pass

    def sync_pread(self, t, path):
        with open(path, "rb") as f:
            f.readinto(t.numpy())
        return 1

    def sync_pwrite(self, t, path):
        with open(path, "r+b") as f:
            f.write(t.numpy().tobytes())
        return 1


@pytest.mark.timeout(60)
def test_deepnvme_reference_is_used_when_deepspeed_is_importable(tmp_path, monkeypatch):
    import sys
    import types

    ds = types.ModuleType("deepspeed")
    ops = types.ModuleType("deepspeed.ops")
    builder = types.ModuleType("deepspeed.ops.op_builder")

    class AsyncIOBuilder:
        def load(self, verbose=False):
            return types.SimpleNamespace(aio_handle=_FakeAioHandle)

    builder.AsyncIOBuilder = AsyncIOBuilder
    for name, mod in (("deepspeed", ds), ("deepspeed.ops", ops), ("deepspeed.ops.op_builder", builder)):
        monkeypatch.setitem(sys.modules, name, mod)
    r = run_bench_io(tmp_path, "16MiB", workers=2, chunk="4MiB", backends_compare=(), fio=False,
                     **_small(rand_seconds=0.2))
    assert r["ds_io_read_gbps"] > 0 and r["ds_io_write_gbps"] > 0
    assert not any("deepspeed" in n or "DeepNVMe" in n for n in r["notes"])
    assert r["best_read_ref"] in ("posix-contig", "ds_io")
