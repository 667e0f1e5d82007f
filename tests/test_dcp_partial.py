"""Partial reads of DCP items: a load that needs part of a stored tensor (resharding) reads the
blocks of it that hold those bytes, each checked against its crc32, not the whole item; a
checkpoint written without block checksums still loads (whole items)."""

from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_ranks, store_config
from tiered.checkpoint import TieredStorageReader, TieredStorageWriter
from tiered.checkpoint.format import CheckpointChecksumError
from tiered.store import TieredStore

pytestmark = pytest.mark.timeout(240)
JOIN_S = 150
ROWS, COLS = 1500, 500  # 3 MB of float32: a third of it is 1 MB, no multiple of a checksum block


# --------------------------------------------------------------------------- 1 -> 3 with FSDP2

def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(COLS, ROWS))


def _full(state) -> dict:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _full(v).items()})
        elif isinstance(v, torch.Tensor):
            out[k] = v.full_tensor() if hasattr(v, "full_tensor") else v
    return out


def _counting_reader(root: str):
    """A reader that counts the bytes its store's engine reads during ``read_data`` and the
    bytes of tensor data its load plan asks for."""
    from contextlib import contextmanager

    from torch.distributed.checkpoint.planner import LoadItemType

    from tiered.checkpoint.format import dtype_from

    class Counting(TieredStorageReader):
        read_bytes = needed_bytes = 0

        @contextmanager
        def _open_store(self):
            with super()._open_store() as store:
                before = store.engine.stats()["read"]["bytes"]
                yield store
                self.read_bytes += store.engine.stats()["read"]["bytes"] - before

        def read_data(self, plan, planner):
            for req in plan.items:
                info = self.storage_data.get(req.storage_index)
                if req.type == LoadItemType.TENSOR and info is not None:
                    self.needed_bytes += math.prod(req.lengths) * dtype_from(info["dtype"], "test").itemsize
            return super().read_data(plan, planner)

    return Counting(root)


def _worker(rank: int, world: int, mode: str, root: str, init: str, out: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        mesh = init_device_mesh("cpu", (world,))
        model = _model()
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        if mode == "save":
            model(torch.ones(2, COLS)).sum().backward()
            opt.step()
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        if mode == "save":
            dcp.save(sd, storage_writer=TieredStorageWriter(root))
        else:
            reader = _counting_reader(root)
            dcp.load(sd, storage_reader=reader)
            Path(out, f"bytes-r{rank}.json").write_text(json.dumps({"read": reader.read_bytes,
                                                                    "needed": reader.needed_bytes}))
        full = _full(sd)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in full.items()}, str(Path(out, f"{mode}.safetensors")))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(world: int, mode: str, root: Path, out: Path) -> None:
    init = str(root.parent / f"init-{mode}{world}")
    run_ranks(_worker, world, lambda r: (r, world, mode, str(root), init, str(out)), timeout=JOIN_S)


def test_a_load_at_three_ranks_of_a_one_rank_save_reads_about_what_each_rank_needs(tmp_path):
    root, out = tmp_path / "ck", tmp_path / "out"
    out.mkdir()
    _run(1, "save", root, out)
    _run(3, "load", root, out)
    saved, loaded = load_file(out / "save.safetensors"), load_file(out / "load.safetensors")
    assert sorted(saved) == sorted(loaded) and any(k.startswith("optim.") for k in saved)
    for k in saved:
        assert torch.equal(saved[k], loaded[k]), k
    for r in range(3):
        n = json.loads((out / f"bytes-r{r}.json").read_text())
        assert n["needed"] >= 3 * ROWS * COLS * 4 // 3  # weight, exp_avg, exp_avg_sq: a third each
        assert n["read"] <= 1.2 * n["needed"], (r, n)


# --------------------------------------------------------------------------- one process, plans by hand

W_ROWS, W_COLS = 600, 1000  # 2.4 MB of float32: 4000 bytes a row


class _Into:
    """The planner half the reader calls: copies every request into ``dest``."""

    def __init__(self, dest: torch.Tensor) -> None:
        self.dest, self.committed = dest, 0

    def resolve_tensor(self, req):
        return self.dest

    def commit_tensor(self, req, tensor) -> None:
        self.committed += 1


def _saved(tmp_path: Path, store, rows: int = W_ROWS) -> tuple[Path, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    w = torch.randn(rows, W_COLS, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "ck"
    dcp.save({"w": w}, storage_writer=TieredStorageWriter(path, store=store))
    return path, w


def _read(path: Path, store, offsets, lengths) -> tuple[torch.Tensor, int]:
    """Rows/columns ``offsets`` .. ``offsets + lengths`` of the saved "w" as one ReadItem; the
    tensor and the bytes the store's engine read."""
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

    reader = TieredStorageReader(path, store=store)
    md = reader.read_metadata()
    reader.set_up_storage_reader(md, True)
    index = next(i for i in md.storage_data if i.fqn == "w")
    into = _Into(torch.empty(*lengths))
    item = ReadItem(LoadItemType.TENSOR, MetadataIndex("w", [0, 0]), torch.Size([0, 0]), index,
                    torch.Size(offsets), torch.Size(lengths))
    before = store.engine.stats()["read"]["bytes"]
    reader.read_data(LoadPlan([item]), into).wait()
    assert into.committed == 1
    return into.dest, store.engine.stats()["read"]["bytes"] - before


def _data_offset(path: Path, byte: int) -> tuple[Path, int]:
    """Where byte ``byte`` of the saved "w" lies: its data file and the offset in it."""
    doc = json.loads((path / ".metadata.json").read_text())
    info = next(e[3] for e in doc["storage_data"] if e[0] == "w")
    for part in info["parts"]:
        if byte < part["nbytes"]:
            f = Path(part["path"])
            return (f if f.is_absolute() else path / f), part["offset"] + byte
        byte -= part["nbytes"]
    raise AssertionError("byte outside the item")


def _flip(file: Path, offset: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_rows_of_a_stored_tensor_read_only_their_blocks(tmp_path):
    with TieredStore(store_config(tmp_path, "32MiB", "256MiB")) as store:
        path, w = _saved(tmp_path, store)
        got, nread = _read(path, store, [210, 0], [130, W_COLS])
        assert torch.equal(got, w[210:340])
        assert nread <= 130 * W_COLS * 4 + 3 * 64 * 1024  # the rows, their edge blocks and a table


@pytest.mark.parametrize("rows", [W_ROWS, 4500])  # 2.4 MB: one stored piece; 18 MB: three
def test_columns_of_a_stored_tensor_read_as_runs_equal_the_saved_ones(tmp_path, rows):
    with TieredStore(store_config(tmp_path, "32MiB", "256MiB")) as store:
        path, w = _saved(tmp_path, store, rows)
        doc = json.loads((path / ".metadata.json").read_text())
        assert len(next(e[3] for e in doc["storage_data"] if e[0] == "w")["parts"]) == (1 if rows == W_ROWS else 3)
        for offsets, lengths in (([0, 250], [rows, 500]), ([17, 999], [3, 1]), ([rows - 1, 0], [1, W_COLS]),
                                 ([0, 0], [rows, W_COLS]), ([rows // 3, 0], [rows // 3, W_COLS]),
                                 ([2000 % rows, 1], [rows - 2000 % rows, 998])):
            got, _n = _read(path, store, offsets, lengths)
            rows, cols = slice(offsets[0], offsets[0] + lengths[0]), slice(offsets[1], offsets[1] + lengths[1])
            assert torch.equal(got, w[rows, cols]), (offsets, lengths)


def test_a_corrupted_byte_inside_a_partially_read_range_is_caught_and_one_outside_is_not_read(tmp_path):
    with TieredStore(store_config(tmp_path, "32MiB", "256MiB")) as store:
        path, w = _saved(tmp_path, store)
        _flip(*_data_offset(path, 450 * W_COLS * 4 + 123))  # inside row 450
        with pytest.raises(CheckpointChecksumError, match="block"):
            _read(path, store, [400, 0], [100, W_COLS])
        got, _n = _read(path, store, [0, 0], [100, W_COLS])  # rows far from it: not read, not refused
        assert torch.equal(got, w[:100])


def test_a_corrupted_block_table_is_caught(tmp_path):
    from tiered.allocators import align_up

    with TieredStore(store_config(tmp_path, "32MiB", "256MiB")) as store:
        path, _w = _saved(tmp_path, store)
        doc = json.loads((path / ".metadata.json").read_text())
        part = next(e[3] for e in doc["storage_data"] if e[0] == "w")["parts"][0]
        file = Path(part["path"]) if os.path.isabs(part["path"]) else path / part["path"]
        _flip(file, part["offset"] + align_up(part["nbytes"]) + 2)  # the table follows the padded data
        with pytest.raises(CheckpointChecksumError, match="table"):
            _read(path, store, [0, 0], [10, W_COLS])


def test_a_checkpoint_without_block_checksums_loads_whole_items(tmp_path):
    """Written before items had block checksums (reproduced by removing them from the metadata):
    a part of an item is read by reading the item whole, checked per segment."""
    with TieredStore(store_config(tmp_path, "32MiB", "256MiB")) as store:
        path, w = _saved(tmp_path, store)
        mpath = path / ".metadata.json"
        doc = json.loads(mpath.read_text())
        for entry in doc["storage_data"]:
            for part in entry[3].get("parts", []):
                assert part.pop("block") and part.pop("table_crc") is not None
        mpath.write_text(json.dumps(doc))
        got, nread = _read(path, store, [210, 0], [130, W_COLS])
        assert torch.equal(got, w[210:340]) and nread >= W_ROWS * W_COLS * 4
        _flip(*_data_offset(path, 5))
        with pytest.raises(CheckpointChecksumError, match="segment"):
            _read(path, store, [210, 0], [130, W_COLS])


def test_the_writer_checks_its_block_size_and_block_0_writes_no_tables(tmp_path):
    import torch.distributed.checkpoint as dcp

    from tiered.checkpoint.format import CheckpointError

    for bad in (1000, "3MiB", 8192 * 3):
        with pytest.raises(CheckpointError, match="block"):
            TieredStorageWriter(tmp_path / "x", block=bad)
    with TieredStore(store_config(tmp_path, "32MiB", "256MiB")) as store:
        w = torch.arange(W_ROWS * W_COLS, dtype=torch.float32).view(W_ROWS, W_COLS)
        path = tmp_path / "ck"
        dcp.save({"w": w}, storage_writer=TieredStorageWriter(path, store=store, block=0))
        doc = json.loads((path / ".metadata.json").read_text())
        assert all("block" not in p for e in doc["storage_data"] for p in e[3]["parts"])
        got, nread = _read(path, store, [10, 0], [5, W_COLS])
        assert torch.equal(got, w[10:15]) and nread >= W_ROWS * W_COLS * 4
