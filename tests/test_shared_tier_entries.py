"""Entries of the shared tier (``encode``/``decode``): a malformed header is a bad entry (read as a
miss, then deleted), never an exception escaping to the lookup. No server needed."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from tiered.checksums import crc32
from tiered.kv.shared import FORMAT, MAGIC, VERSION, BadEntry, decode, encode


def _value(data: bytes = bytes(12), **header) -> bytes:
    h = {"format": FORMAT, "version": VERSION, "key": "k/1", "identity": "m", "dtype": "float32",
         "shape": [3], "nbytes": 12, "crc32": crc32(memoryview(data)), **header}
    raw = json.dumps(h).encode()  # allow_nan: writes Infinity/NaN as a foreign writer might
    return MAGIC + struct.pack("<I", len(raw)) + raw + data


def test_a_good_entry_decodes():
    value = encode("k/1", "m", torch.arange(3.0).numpy().tobytes(), torch.float32, (3,))
    assert torch.equal(decode("k/1", "m", value), torch.arange(3.0))
    assert torch.equal(decode("k/1", "m", _value()), torch.zeros(3))
    empty = decode("k/1", "m", encode("k/1", "m", b"", torch.float16, (0, 4)))
    assert empty.shape == (0, 4) and empty.dtype == torch.float16


@pytest.mark.parametrize("header", [
    {"shape": [-1, -3]}, {"shape": [-3, -1]}, {"shape": [float("inf")]}, {"shape": [True, 3]},
    {"shape": [1.5, 2]}, {"shape": 3}, {"nbytes": float("inf")}, {"nbytes": -12}, {"crc32": float("nan")},
    {"crc32": True}, {"nbytes": "12"},
])
def test_a_malformed_header_is_a_bad_entry(header):
    with pytest.raises(BadEntry):
        decode("k/1", "m", _value(**header))


def test_a_huge_empty_shape_is_a_bad_entry():
    with pytest.raises(BadEntry):
        decode("k/1", "m", _value(b"", shape=[1 << 70, 0], nbytes=0))
