"""Peak resident memory of a block."""

from __future__ import annotations

import sys

import pytest
import torch

from ekfac_laplace.evaluation.memory import PeakMemory, status_kib

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")


@linux
def test_peak_memory_sees_a_temporary_allocation():
    with PeakMemory() as memory:
        block = torch.ones(64 * 2**20 // 8, dtype=torch.float64)  # 64 MiB, touched
        del block
    assert memory.exact
    assert 60 <= memory.growth_mib < 200
    assert memory.peak_mib >= memory.before_mib + memory.growth_mib - 1e-9
    assert status_kib("VmRSS") > 0 and status_kib("NoSuchField") is None


def test_nothing_measured_leaves_none():
    memory = PeakMemory()
    assert memory.peak_mib is None and memory.growth_mib is None
