"""Fixtures the test files share (plain helper functions are in helpers.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """On a 2-core machine torch's OpenMP workers and the I/O engine's threads fight for the
    cores (forwards get ~7x slower); one intra-op thread keeps a file fast. References and
    offloaded runs use the same setting, so bitwise comparisons stay meaningful. A file asks for
    it with ``pytest.mark.usefixtures("one_intra_op_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
