"""heron.platform: the lazily zeroed cache allocation and the free memory it leaves. The
OpenMP settings heron sets on import: tests/integration/test_process_start.py."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from heron.platform import free_memory_bytes, lazy_zeros


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8, torch.float16])
def test_lazy_zeros_is_a_zeroed_aligned_tensor(dtype):
    x = lazy_zeros((3, 5, 7), dtype, torch.device("cpu"))
    assert x.shape == (3, 5, 7) and x.dtype == dtype and x.is_contiguous()
    assert x.data_ptr() % 64 == 0
    assert not x.any()
    x[1, 2, 3] = 4  # writable, and its own memory
    assert x.sum().item() == 4


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_lazy_zeros_costs_no_memory_until_touched():
    """What makes a large KV cache free to create: 1 GiB allocated, almost none resident."""
    before = _resident_bytes()
    x = lazy_zeros((1 << 29,), torch.bfloat16, torch.device("cpu"))
    assert _resident_bytes() - before < 64 << 20
    x[: 1 << 20].fill_(1)  # touching 2 MiB makes about that much resident
    assert _resident_bytes() - before < 128 << 20
    assert x[(1 << 20) - 1].item() == 1 and x[1 << 20].item() == 0


def test_free_memory_counts_live_lazy_caches():
    """A second engine must not promise itself the memory the first one's cache may still
    touch: free_memory_bytes counts a live lazy_zeros tensor as taken, until it is freed."""
    cpu = torch.device("cpu")
    before = free_memory_bytes(cpu)
    x = lazy_zeros((1 << 30,), torch.uint8, cpu)
    view = x[1:]
    del x
    assert before - free_memory_bytes(cpu) > 0.9 * (1 << 30)
    del view  # the last reference
    gc.collect()
    assert abs(free_memory_bytes(cpu) - before) < 0.1 * (1 << 30)
