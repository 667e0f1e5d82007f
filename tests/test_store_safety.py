"""The store refuses what would destroy data: a tier directory of another store, a reordered
config, a disk that is not mounted, a repair racing with a put; a fork child cannot touch its
parent's store."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from tiered.cli import main
from tiered.store import ChecksumError, StoreError, TieredStore

MiB = 1 << 20
T = 30.0


def two_tier(tmp_path, order=("fast", "slow")):
    tiers = {"host": {"capacity": "8MiB"}}
    for name in order:
        tiers[name] = {"path": str(tmp_path / name), "capacity": "16MiB"}
    return {"tiers": tiers, "engine": {"workers": 2}}


def filled(v, n=MiB // 4):
    return torch.full((n,), v, dtype=torch.float32)


def test_check_of_a_non_root_tier_directory_is_refused_and_destroys_nothing(tmp_path, capsys):
    with TieredStore(two_tier(tmp_path)) as s:
        s.put("a", filled(1), tier="slow").result(T)
        s.put("b", filled(2), tier="fast").result(T)
    assert main(["store", "check", str(tmp_path / "slow"), "--repair"]) == 2
    err = capsys.readouterr().err
    assert "tier 'slow' of the store at" in err and str(tmp_path / "fast") in err
    with TieredStore(two_tier(tmp_path)) as s:
        assert torch.equal(s.get("a").result(T), filled(1)) and torch.equal(s.get("b").result(T), filled(2))


def test_a_config_with_the_tiers_reordered_is_refused(tmp_path):
    with TieredStore(two_tier(tmp_path)) as s:
        s.put("a", filled(1), tier="slow").result(T)
    with pytest.raises(StoreError, match="tier 'slow' of the store at .*not a store's first tier"):
        TieredStore(two_tier(tmp_path, ("slow", "fast"))).open(start_empty=True)
    with TieredStore(two_tier(tmp_path)) as s:
        assert torch.equal(s.get("a").result(T), filled(1))


def test_every_tier_directory_is_locked(tmp_path):
    with TieredStore(two_tier(tmp_path)):
        other = {"tiers": {"host": {"capacity": "8MiB"}, "solo": {"path": str(tmp_path / "slow"),
                                                                   "capacity": "16MiB"}}}
        with pytest.raises(StoreError, match="already open in this process|open in another"):
            TieredStore(other).open()


def test_a_tier_whose_data_file_is_missing_is_refused_not_recreated(tmp_path):
    with TieredStore(two_tier(tmp_path)) as s:
        s.put("a", filled(1), tier="slow").result(T)
    data = tmp_path / "slow" / "objects.dat"
    os.rename(data, tmp_path / "elsewhere.dat")  # the disk is not mounted
    with pytest.raises(StoreError, match="is missing.*is the tier's disk mounted"):
        TieredStore(two_tier(tmp_path)).open()
    assert not data.exists()
    os.rename(tmp_path / "elsewhere.dat", data)
    with TieredStore(two_tier(tmp_path)) as s:
        assert torch.equal(s.get("a").result(T), filled(1))


def test_repair_keeps_objects_it_could_not_read(tmp_path, monkeypatch):
    from tiered.store import stream

    with TieredStore(two_tier(tmp_path)) as s:
        s.put("a", filled(1)).result(T)

        def eio(*a, **k):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(stream, "read_streamed", eio)
        report = s.check(repair=True)
        assert "a" in report["unreadable"] and report["removed"] == [] and "a" in s


def test_repair_does_not_delete_a_version_put_after_the_check(tmp_path, monkeypatch):
    from tiered.store import check

    with TieredStore(two_tier(tmp_path)) as s:
        s.put("k", filled(1)).result(T)
        real = check._verify

        def corrupt_then_put(store, key):
            out = real(store, key)
            store.put(key, filled(2)).result(T)  # a good version lands before the repair acts
            return out[0], out[1], "crc32 mismatch (simulated)", True

        monkeypatch.setattr(check, "_verify", corrupt_then_put)
        report = s.check(repair=True)
        assert report["removed"] == [] and torch.equal(s.get("k").result(T), filled(2))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_fork_child_neither_uses_nor_keeps_the_parents_store(tmp_path):
    cfg = two_tier(tmp_path)
    s = TieredStore.shared(cfg)
    s.put("a", filled(1), ephemeral=True).result(T)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            s.get("a")
            code = 3  # must refuse
        except StoreError:
            pass
        s.close()  # must not delete the parent's ephemeral object
        os.write(w, b"x")
        os._exit(code)
    import select

    ready, _, _ = select.select([r], [], [], T)
    if not ready:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    assert ready, "the fork child hung on its parent's store"
    assert os.WEXITSTATUS(status) == 0
    assert torch.equal(s.get("a").result(T), filled(1))
    s.close()
    with TieredStore(cfg) as again:  # the child kept no copy of the lock
        assert "a" not in again


def test_a_corrupt_object_is_still_found_and_removed(tmp_path):
    with TieredStore(two_tier(tmp_path)) as s:
        s.put("bad", filled(1)).result(T)
        off = s.meta("bad")["offset"]
    with open(tmp_path / "fast" / "objects.dat", "r+b") as f:
        f.seek(off + 100)
        f.write(b"\xff\xfe")
    with TieredStore(two_tier(tmp_path)) as s:
        with pytest.raises(ChecksumError):
            s.get("bad").result(T)
        report = s.check(repair=True)
        assert report["removed"] == ["bad"] and "bad" not in s


def test_a_new_store_cannot_take_another_stores_tier(tmp_path):
    with TieredStore(two_tier(tmp_path)) as s:
        s.put("w", filled(1), tier="slow").result(T)
    other = {"tiers": {"host": {"capacity": "8MiB"}, "new": {"path": str(tmp_path / "new"), "capacity": "16MiB"},
                       "slow": {"path": str(tmp_path / "slow"), "capacity": "16MiB"}}}
    with pytest.raises(StoreError, match="tier 'slow' of the store at .*fast"):
        TieredStore(other).open(start_empty=True)
    with TieredStore(two_tier(tmp_path)) as s:
        assert torch.equal(s.get("w").result(T), filled(1))
