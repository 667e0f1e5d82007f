"""TieredStorageReader pointed at a checkpoint that torch's own FileSystemWriter wrote: the
error says what it is and what reads it (instead of "never saved")."""

from __future__ import annotations

import pytest
import torch


def test_reader_names_a_filesystemwriter_checkpoint(tmp_path):
    import torch.distributed.checkpoint as dcp

    from tiered.checkpoint import TieredStorageReader
    from tiered.checkpoint.format import CheckpointError

    sd = {"a": torch.arange(10.0), "b": torch.ones(3, dtype=torch.int64)}
    path = tmp_path / "ck"
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(path)))
    assert (path / ".metadata").exists() and any(p.suffix == ".distcp" for p in path.iterdir())
    reader = TieredStorageReader(path)
    with pytest.raises(CheckpointError, match=r"torch\.distributed\.checkpoint FileSystemWriter.*FileSystemReader") as ei:
        reader.read_metadata()
    assert str(path) in str(ei.value) and "never saved" not in str(ei.value)
    with pytest.raises(BaseException, match="FileSystemReader"):
        dcp.load({"a": torch.zeros(10), "b": torch.zeros(3, dtype=torch.int64)}, storage_reader=TieredStorageReader(path))
    dest = {"a": torch.zeros(10), "b": torch.zeros(3, dtype=torch.int64)}
    dcp.load(dest, storage_reader=dcp.FileSystemReader(str(path)))  # the reader the message names works
    assert torch.equal(dest["a"], sd["a"]) and torch.equal(dest["b"], sd["b"])


def test_reader_still_says_never_saved_for_an_empty_directory(tmp_path):
    from tiered.checkpoint import TieredStorageReader
    from tiered.checkpoint.format import CheckpointError

    (tmp_path / "ck").mkdir()
    with pytest.raises(CheckpointError, match="never saved"):
        TieredStorageReader(tmp_path / "ck").read_metadata()


def test_reader_calls_distcp_files_without_metadata_an_incomplete_save(tmp_path):
    import torch.distributed.checkpoint as dcp

    from tiered.checkpoint import TieredStorageReader
    from tiered.checkpoint.format import CheckpointError

    path = tmp_path / "ck"
    dcp.save({"a": torch.arange(10.0)}, storage_writer=dcp.FileSystemWriter(str(path)))
    (path / ".metadata").unlink()  # what a FileSystemWriter save that died before finish() leaves
    with pytest.raises(CheckpointError, match=r"incomplete torch\.distributed\.checkpoint FileSystemWriter save") as ei:
        TieredStorageReader(path).read_metadata()
    assert "FileSystemReader" not in str(ei.value) and "__0_0.distcp" in str(ei.value)
