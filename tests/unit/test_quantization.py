"""Weight-only int8 / int4 linears against their dequantized reference, the int4 packing and
grid, and replacing a model's linears. In the engine:
tests/integration/test_quantization_engine.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from heron.errors import InvalidRequestError
from heron.layers import quantized_linear as ql
from heron.layers.quantized_linear import Int4Linear, Int8Linear, quantize_linears
from heron.platform import resolve_dtype


def _linear(in_f: int, out_f: int, bias: bool) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.2, 3.0, out_f)[:, None])  # channels of unlike range
    return lin


@pytest.mark.parametrize("kind", ["int8", "int4"])
# packed kernels (PyTorch's up to GEMV_MAX_ROWS, heron's further), then dense
@pytest.mark.parametrize("rows", [1, 5, ql.GEMV_MAX_ROWS + 7, ql.HERON_INT4_MAX_ROWS + 7])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_matches_dequantized_reference(kind, rows, bias, dtype):
    lin = _linear(192, 320, bias)
    q = Int8Linear(lin) if kind == "int8" else Int4Linear(lin, 32)
    w = q.dequantize(torch.float32)
    # The weight really is quantized: close to the original, not equal to it.
    rel = ((w - lin.weight).norm() / lin.weight.norm()).item()
    assert 0 < rel < (0.01 if kind == "int8" else 0.1), rel
    x = torch.randn(rows, 192).to(dtype)
    ref = nn.functional.linear(x.float(), w, lin.bias)
    y = q(x)
    assert y.shape == (rows, 320) and y.dtype == dtype
    # bf16 activations (the packed kernels', or the caller's): ~0.4% relative error.
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err
    y3 = q(x.view(1, rows, 192))  # any leading shape
    assert torch.allclose(y3.view(rows, 320), y)


def test_auto_dtype_is_bf16_with_quantized_weights():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, quantized=True) == torch.bfloat16
    assert resolve_dtype("float32", cpu, quantized=True) == torch.float32


def test_int4_levels_round_trip_through_the_packed_layout():
    assert ql._int4_block_n() is not None, "this PyTorch's int4 packing layout is unknown"
    q = torch.randint(0, 16, (128, 96), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(ql.unpack_int4(packed, 128, 96, torch.float32), q.float())


def test_int4_grid_reproduces_values_already_on_it():
    """A Q4_1 GGUF group (16 levels from its min to its max) requantizes exactly."""
    levels = torch.randint(0, 16, (8, 64))
    levels[:, 0], levels[:, 32], levels[:, 1], levels[:, 33] = 0, 0, 15, 15
    scale = torch.rand(8, 2) + 0.1
    lo = torch.randn(8, 2)
    w = (levels.view(8, 2, 32) * scale[..., None] + lo[..., None]).view(8, 64)
    q, s, z = ql.quantize_int4(w, 32)
    assert torch.equal(q, levels.to(torch.int32))
    back = ((q.view(8, 2, 32) - 8) * s[..., None] + z[..., None]).view(8, 64)
    assert torch.allclose(back, w, atol=1e-5)


def test_quantize_linears_replaces_every_linear_and_keeps_the_embedding():
    model = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 64), nn.Sequential(nn.Linear(64, 32)))
    model.lm_head = nn.Linear(64, 10)
    quantize_linears(model, "int4")
    assert isinstance(model[1], Int4Linear) and isinstance(model[2][0], Int4Linear)
    assert isinstance(model.lm_head, Int8Linear)  # the head stays 8-bit
    assert isinstance(model[0], nn.Embedding)
    quantize_linears(model, "none")  # a no-op
    with pytest.raises(InvalidRequestError, match="quantization"):
        quantize_linears(model, "int3")
    with pytest.raises(InvalidRequestError, match="divisible by 32"):
        quantize_linears(nn.Sequential(nn.Linear(48, 8)), "int4")
