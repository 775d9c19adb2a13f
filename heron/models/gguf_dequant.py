"""GGUF block formats to float32, in torch: the same arithmetic as ``gguf.quants`` (whose
numpy code is the reference, and the fallback for every other format), bit for bit, faster.

Why: ``gguf.quants`` works in single-threaded numpy temporaries with a Python loop per group,
which made dequantizing most of a model's load time; the same operations on torch tensors run
on every core without that loop. Each function takes the tensor's raw bytes as
``[n_blocks, type_size]`` uint8 and returns ``[n_blocks, block_size]`` float32, with the
operations in gguf's order (float32 products and sums, no fused multiply-add), so the weights
equal what transformers loads."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256  # weights per K-quant super-block
_K_SCALE_SIZE = 12


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Flat float32 weights of a tensor's raw bytes (``gguf.quants.dequantize``'s values), in
    memory of their own (``raw`` may be a read-only map of the file)."""
    fn = _FORMATS.get(qtype)
    if fn is None and qtype != GGMLQuantizationType.F32:
        from gguf.quants import dequantize as reference

        return torch.from_numpy(np.asarray(reference(raw, qtype), dtype=np.float32).reshape(-1))
    data = np.array(raw, dtype=np.uint8).reshape(-1)  # a writable copy of the bytes
    if fn is None:
        return torch.from_numpy(data.view(np.float32))
    blocks = torch.from_numpy(data).view(-1, GGML_QUANT_SIZES[qtype][1])
    return fn(blocks).reshape(-1)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] bytes -> [n, 1] float32 (a block's half-precision scale, or an F16 weight)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, width: int) -> torch.Tensor:
    """Low nibbles of each ``width`` bytes, then their high nibbles: [n, g, width] -> [n, g, 2w]."""
    q = qs.reshape(qs.shape[0], -1, width)
    return torch.cat([q & 0x0F, q >> 4], dim=-1)


def _bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Bit i of the little-endian integer in each row's bytes, i < count: [n, count] uint8."""
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # [n, bytes, 8]
    return bits.reshape(packed.shape[0], -1)[:, :count]


def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.bfloat16).float()


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    return blocks[:, 2:].contiguous().view(torch.int8).float() * d


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    q = _nibbles(blocks[:, 2:], 16).reshape(blocks.shape[0], -1).to(torch.int8) - 8
    return d * q.float()


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 4:], 16).reshape(blocks.shape[0], -1).float()
    return d * q + m


def _five_bit(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1 codes: the low nibbles of ``qs`` with bit i of ``qh`` as bit 4 of code i."""
    low = _nibbles(qs, 16).reshape(qs.shape[0], -1)
    return low | (_bits(qh, 32) << 4)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    q = _five_bit(blocks[:, 2:6], blocks[:, 6:]).to(torch.int8) - 16
    return d * q.float()


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    return d * _five_bit(blocks[:, 4:8], blocks[:, 8:]).float() + m


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: the 8 six-bit scales and minimums packed in 12 bytes -> two [n, 8]."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_affine(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """d * scale * q - dmin * min per 32-weight group of a Q4_K / Q5_K super-block."""
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scales(blocks[:, 4 : 4 + _K_SCALE_SIZE])
    d = (d * sc.float()).reshape(n, -1, 1)
    dm = (dmin * mn.float()).reshape(n, -1, 1)
    return (d * q.reshape(n, -1, 32).float() - dm).reshape(n, QK_K)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    return _k_affine(blocks, _nibbles(blocks[:, 4 + _K_SCALE_SIZE :], 32))


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    start = 4 + _K_SCALE_SIZE
    qh = blocks[:, start : start + QK_K // 8].reshape(n, 1, 32)
    low = _nibbles(blocks[:, start + QK_K // 8 :], 32).reshape(n, 8, 32)
    high = (qh >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)) & 1  # [n, 8, 32]
    return _k_affine(blocks, low | (high << 4))


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql = blocks[:, : QK_K // 2]
    qh = blocks[:, QK_K // 2 : QK_K // 2 + QK_K // 4]
    scales = blocks[:, QK_K // 2 + QK_K // 4 : QK_K // 2 + QK_K // 4 + QK_K // 16]
    d = _f16(blocks[:, -2:])
    d = (d * scales.contiguous().view(torch.int8).float()).reshape(n, QK_K // 16, 1)
    low = _nibbles(ql, 64).reshape(n, -1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    high = ((qh.reshape(n, -1, 1, 32) >> shifts) & 0x03).reshape(n, -1, 32)
    q = (low | (high << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, QK_K // 16, -1).float()).reshape(n, QK_K)


_FORMATS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLQuantizationType.F16: _f16,
    GGMLQuantizationType.BF16: _bf16,
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q5_0: _q5_0,
    GGMLQuantizationType.Q5_1: _q5_1,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q5_K: _q5_k,
    GGMLQuantizationType.Q6_K: _q6_k,
}
