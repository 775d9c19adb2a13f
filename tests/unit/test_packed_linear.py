"""Linears pre-packed for oneDNN (heron.layers.packed_linear) on stand-in weights: in bf16
the same bits as F.linear at every row count oneDNN serves, in float32 the same within
rounding; a decode step's few bf16 rows through heron's bf16 GEMV; a float32 linear packed
only off Intel CPUs. In models loaded from the real GGUF:
tests/integration/test_packed_linear_engine.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from heron import kernels
from heron.layers import packed_linear
from heron.layers.packed_linear import PackedLinear, pack_linears
from tests.support.skips import needs_packing


@needs_packing(torch.bfloat16)
@pytest.mark.parametrize("rows", [1, 3, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_gives_f_linear_bits(rows, bias, monkeypatch):
    """oneDNN's packed product (every row count with heron's bf16 GEMV off, above its rows
    with it on) is F.linear's."""
    linear, x = _bf16_linear(rows, bias)
    packed = PackedLinear(linear)
    if rows <= packed.gemv_rows:
        monkeypatch.setattr(packed_linear, "_bf16_gemv_runs", lambda weight: False)
        packed = PackedLinear(linear)
    assert rows > packed.gemv_rows
    with torch.inference_mode():
        assert torch.equal(packed(x), linear(x))


@needs_packing(torch.bfloat16)
@pytest.mark.parametrize("rows", [1, 3, 16])  # 16: its most rows where the CPU has AMX
@pytest.mark.parametrize("bias", [False, True])
def test_few_bf16_rows_go_through_the_bf16_gemv(rows, bias):
    """Up to its gemv_rows rows a packed bf16 linear is heron's bf16 GEMV on its plain weight,
    which agrees with F.linear within bf16 rounding of the output."""
    if not kernels.bf16_gemv_runs():
        pytest.skip("needs AVX512_BF16")
    linear, x = _bf16_linear(rows, bias)
    packed = PackedLinear(linear)
    assert rows <= packed.gemv_rows
    assert packed.few_rows_weight.data_ptr() == linear.weight.data_ptr()  # no copy made
    with torch.inference_mode():
        y, want = packed(x), linear(x)
    assert torch.equal(y, kernels.bf16_gemv(x, linear.weight, linear.bias))
    torch.testing.assert_close(y, want, rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_linear_takes_no_rows(dtype):
    """A step that samples nothing asks the LM head for 0 rows."""
    if not packed_linear._packs_correctly(dtype):
        pytest.skip(f"no oneDNN {dtype} weight packing here")
    linear = nn.Linear(64, 48).to(dtype)
    with torch.inference_mode():
        assert PackedLinear(linear)(torch.empty(0, 64, dtype=dtype)).shape == (0, 48)


def _bf16_linear(rows: int, bias: bool) -> tuple[nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(rows)
    linear = nn.Linear(576, 960, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(960, 576, generator=g))
    return linear, torch.randn(rows, 576, generator=g).to(torch.bfloat16)


@needs_packing(torch.float32)
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_packed_float32_linear_is_f_linear_within_rounding(rows):
    g = torch.Generator().manual_seed(rows)
    linear = nn.Linear(576, 960)
    x = torch.randn(rows, 576, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(linear)(x), linear(x), rtol=1e-5, atol=1e-5)


@needs_packing(torch.float32)
@pytest.mark.parametrize("intel", [True, False])
def test_float32_is_packed_only_off_intel(monkeypatch, intel):
    monkeypatch.setattr(packed_linear, "cpu_is_intel", lambda: intel)
    fp32 = nn.Sequential(nn.Linear(8, 8))
    pack_linears(fp32)
    assert isinstance(fp32[0], PackedLinear) != intel
    bf16 = nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16))
    pack_linears(bf16)
    assert isinstance(bf16[0], PackedLinear) == packed_linear._packs_correctly(torch.bfloat16)
