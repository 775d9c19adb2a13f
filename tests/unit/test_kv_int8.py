"""The int8 KV cache (``kv_cache_dtype="int8"``): quantization error bounds, the storage
round trip and the settings it refuses. In the engine:
tests/integration/test_kv_int8_engine.py."""

from __future__ import annotations

import pytest
import torch

from heron.config import EngineConfig
from heron.errors import InvalidRequestError
from heron.layers.kv_cache import (
    Int8Slots,
    dequantize_int8,
    gather_blocks,
    quantize_int8,
    write_slots,
)


def test_quantization_error_is_half_a_step_and_zeros_are_safe():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 64) * torch.tensor([0.01, 1.0, 30.0])[None, :, None]
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (5, 3)
    err = (dequantize_int8(q, scale, torch.float32) - x).abs()
    assert bool((err <= scale[..., None] / 2 + 1e-6).all())
    assert int(q.abs().max()) == 127  # absmax maps to the end of the range
    zq, zs = quantize_int8(torch.zeros(2, 1, 8))
    assert not dequantize_int8(zq, zs, torch.float32).isnan().any()


def test_int8_slots_store_and_gather_like_the_float_cache():
    torch.manual_seed(1)
    slots, heads, dim, bs = 32, 2, 16, 4
    plain = torch.zeros(slots, heads, dim)
    packed = Int8Slots(
        torch.zeros(slots, heads, dim, dtype=torch.int8), torch.zeros(slots, heads), torch.float32
    )
    where = torch.tensor([3, 9, 10, 30])
    x = torch.randn(4, heads, dim)
    write_slots(plain, where, x)
    write_slots(packed, where, x)
    blocks = torch.tensor([[0, 2], [7, 1]])
    a, b = gather_blocks(plain, blocks, bs), gather_blocks(packed, blocks, bs)
    assert a.shape == b.shape == (2, 2 * bs, heads, dim)
    torch.testing.assert_close(b, a, atol=0.02, rtol=0)
    assert not torch.equal(a, b)  # really quantized


def test_int8_cache_bad_settings():
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp8")
    EngineConfig(kv_cache_dtype="int8", kv_policy="snapkv")  # compression works on int8
