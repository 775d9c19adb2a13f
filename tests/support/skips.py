"""Skip markers for what a machine may lack: heron's compiled kernels (no C++ compiler), and
oneDNN weight packing that matches F.linear."""

from __future__ import annotations

import pytest
import torch

from heron import kernels
from heron.layers import packed_linear

needs_kernels = pytest.mark.skipif(
    not kernels.available(), reason="no C++ compiler for the kernels"
)


def needs_packing(dtype: torch.dtype) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not packed_linear._packs_correctly(dtype),
        reason=f"no oneDNN {dtype} weight packing (matching F.linear) here",
    )
