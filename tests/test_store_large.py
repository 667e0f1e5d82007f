"""Objects larger than the host tier: put and get stream through it in pieces."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest
import torch

from helpers import store_config
from tiered.allocators import OutOfBudget
from tiered.io_engine import IOEngine
from tiered.store import SEGMENT, ChecksumError, HostBudgetError, StoreError, TieredStore, segment_checksums

T = 30.0
MiB = 1 << 20


def make_config(tmp_path: Path, host: str = "1MiB", nvme: str = "64MiB") -> dict:
    return store_config(tmp_path, host, nvme)


def big(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def test_put_larger_than_the_host_tier_streams_and_reads_back(tmp_path):
    n = SEGMENT // 4 + 12_345  # float32: more than one segment, not a multiple of 4 KiB
    x = big(n)
    cfg = make_config(tmp_path, host="4MiB")
    with TieredStore(cfg) as s:
        d = s.put("w", x).result(T)
        assert d["nbytes"] == 4 * n and not d["in_host"]
        assert s.stats()["tiers"]["host"]["used"] == 0, "the staging pieces were released"
        assert torch.equal(s.get("w").result(T), x)
        out = torch.empty_like(x)
        assert s.get("w", out=out).result(T) is out and torch.equal(out, x)
        s.put("w", x + 1, ephemeral=True).result(T)  # a new version of a streamed object
        assert s.meta("w")["ephemeral"] and torch.equal(s.get("w").result(T), x + 1)
        s.put("w", x).result(T)
    with TieredStore(make_config(tmp_path, host="64MiB")) as s:  # read back whole: the same crc32s
        assert torch.equal(s.get("w").result(T), x)
        assert s._objects["w"].crc32 == segment_checksums(x.reshape(-1).view(torch.uint8).numpy(), 0)


def test_get_of_a_corrupted_large_object_names_it(tmp_path):
    cfg = make_config(tmp_path)
    with TieredStore(cfg) as s:
        s.put("w", big(MiB)).result(T)
        offset = s.meta("w")["offset"]
    with open(tmp_path / "nvme" / "objects.dat", "r+b") as f:
        f.seek(offset + 3 * MiB)
        f.write(b"\xff" * 16)
    with TieredStore(cfg) as s:
        with pytest.raises(ChecksumError, match="'w'"):
            s.get("w").result(T)


def test_lease_of_an_object_larger_than_the_host_tier_fails_naming_key_and_budget(tmp_path):
    with TieredStore(make_config(tmp_path)) as s:
        s.put("w", big(MiB)).result(T)
        t0 = time.monotonic()
        with pytest.raises(HostBudgetError) as ei:
            s.acquire("w")
        assert time.monotonic() - t0 < 1.0
        msg = str(ei.value)
        assert "'w'" in msg and str(1 << 20) in msg and isinstance(ei.value, OutOfBudget), msg


def test_a_failed_streamed_put_names_the_key_and_keeps_the_previous_version(tmp_path):
    FaultyBackend = pytest.importorskip("tiered.io_engine.testing").FaultyBackend
    with TieredStore(make_config(tmp_path)) as s:
        s.put("w", big(MiB, 1)).result(T)
        used = s.stats()["tiers"]["nvme"]["used"]
        fb = FaultyBackend()
        s.engine.close()
        s.engine = IOEngine(fb, workers=2, chunk=1 << 20).open()
        fb.fail("write", errno.EIO, path="objects.dat", times=1)
        with pytest.raises(StoreError, match="'w'"):
            s.put("w", big(MiB, 2))
        assert s.stats()["tiers"]["nvme"]["used"] == used, "the failed put's extent was not given back"
        assert torch.equal(s.get("w").result(T), big(MiB, 1))


def test_large_put_that_fits_no_storage_tier_names_the_key(tmp_path):
    with TieredStore(make_config(tmp_path, nvme="2MiB")) as s:
        with pytest.raises(StoreError, match="'w'"):
            s.put("w", big(MiB))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tensor_larger_than_the_host_tier_streams_both_ways(tmp_path):
    x = big(MiB).cuda()
    with TieredStore(make_config(tmp_path)) as s:
        s.put("w", x).result(T)
        got = s.get("w", tier="gpu").result(T)
        assert got.is_cuda and torch.equal(got, x)
        out = torch.empty_like(x)
        assert torch.equal(s.get("w", out=out).result(T), x)


def test_streamed_get_errors_name_the_key(tmp_path):
    FaultyBackend = pytest.importorskip("tiered.io_engine.testing").FaultyBackend
    with TieredStore(make_config(tmp_path)) as s:
        s.put("w", big(MiB)).result(T)
        with pytest.raises(StoreError, match="'w'.*out has"):
            s.get("w", out=torch.empty(3)).result(T)
        fb = FaultyBackend()
        s.engine.close()
        s.engine = IOEngine(fb, workers=2, chunk=1 << 20).open()
        fb.fail("read", errno.EIO, path="objects.dat", times=1)
        with pytest.raises(StoreError, match="'w'"):
            s.get("w").result(T)
        assert torch.equal(s.get("w").result(T), big(MiB))  # the failed read held nothing
        assert s.stats()["tiers"]["host"]["used"] == 0
