"""The seeded synthetic workloads the rl bench reports on (bench/synthetic_traces.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "synthetic_traces.py"


@pytest.fixture(scope="module")
def synth():
    spec = importlib.util.spec_from_file_location("synthetic_traces", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


def test_instances_are_reproducible_and_seeds_differ(synth):
    for fam in synth.FAMILIES:
        a, b, c = synth.make(fam, 7, 4000), synth.make(fam, 7, 4000), synth.make(fam, 8, 4000)
        assert np.array_equal(a.key, b.key) and np.array_equal(a.size, b.size) and np.array_equal(a.op, b.op)
        assert not np.array_equal(a.key, c.key), fam
        assert len(a.key) == 4000 and a.size.min() > 0 and set(np.unique(a.op)) <= {0, 1}
        # an object's size never changes
        order = np.argsort(a.key, kind="stable")
        k, s = a.key[order], a.size[order]
        assert np.all(s[1:][k[1:] == k[:-1]] == s[:-1][k[1:] == k[:-1]]), fam


def test_held_out_never_tuned_on(synth):
    tuning = set(synth.TUNING)
    for held in (synth.HELD_OUT, synth.HELD_OUT_FRESH):
        assert not tuning & set(held)
        assert {s for _, s in held}.isdisjoint({s for _, s in synth.TUNING})
    assert {s for _, s in synth.HELD_OUT}.isdisjoint({s for _, s in synth.HELD_OUT_FRESH})
    assert "bursty" in {f for f, _ in synth.HELD_OUT} - {f for f, _ in synth.TUNING}
    with pytest.raises(KeyError, match="unknown synthetic family 'nope'"):
        synth.make("nope", 1)
