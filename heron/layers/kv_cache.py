"""The paged KV cache's storage: plain slots in the model's dtype, or int8 slots with one
scale per (slot, KV head) (``kv_cache_dtype="int8"``).

int8 is symmetric absmax quantization of each token's head vector (the granularity vLLM's and
llama.cpp's 8-bit caches use): a slot costs ``D + 4`` bytes per head instead of ``2 D`` (bf16)
or ``4 D`` (fp32), so the same ``kv_cache_memory`` holds 1.9x / 3.8x the tokens for a 64-wide
head. K/V are quantized once, when written, and dequantized to the compute dtype as attention
gathers them; the chunk a prefill step computes attends to its own K/V unquantized.

``write_slots`` and ``gather_blocks`` take either storage, so attention reads one way."""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_CACHE_DTYPES = ("auto", "int8")


@dataclass
class Int8Slots:
    """One layer's K (or V) cache: ``data`` [slots, Hkv, D] int8, ``scale`` [slots, Hkv]."""

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype  # what reads dequantize to


Cache = torch.Tensor | Int8Slots


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 values, float32 scales [...]), x ~ values * scale."""
    x = x.float()
    scale = x.abs().amax(dim=-1).clamp_min(1e-8) / 127.0
    return torch.round(x / scale[..., None]).clamp_(-127, 127).to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * scale[..., None]).to(dtype)


def write_slots(cache: torch.Tensor | Int8Slots, slots: torch.Tensor, x: torch.Tensor) -> None:
    """Store x [T, Hkv, D] at ``slots`` [T]."""
    if isinstance(cache, Int8Slots):
        q, scale = quantize_int8(x)
        cache.data.index_copy_(0, slots, q)
        cache.scale.index_copy_(0, slots, scale)
    else:
        cache.index_copy_(0, slots, x)


def gather_blocks(
    cache: torch.Tensor | Int8Slots, blocks: torch.Tensor, block_size: int
) -> torch.Tensor:
    """The slots of ``blocks`` (any shape ``[..., W]``) as ``[..., W * block_size, Hkv, D]``,
    in the compute dtype. Whole blocks go through ``index_select`` (several times faster on
    CPU than per-slot advanced indexing)."""
    if isinstance(cache, Int8Slots):
        q = _gather(cache.data, blocks, block_size)
        return dequantize_int8(q, _gather(cache.scale, blocks, block_size), cache.dtype)
    return _gather(cache, blocks, block_size)


def gather_slots(cache: torch.Tensor | Int8Slots, slots: torch.Tensor) -> torch.Tensor:
    """The given slots [N] as ``[N, Hkv, D]`` in the compute dtype."""
    if isinstance(cache, Int8Slots):
        q = cache.data.index_select(0, slots)
        return dequantize_int8(q, cache.scale.index_select(0, slots), cache.dtype)
    return cache.index_select(0, slots)


def _gather(t: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    per_block = t.view(-1, block_size, *t.shape[1:])
    out = per_block.index_select(0, blocks.reshape(-1))
    return out.view(*blocks.shape[:-1], blocks.shape[-1] * block_size, *t.shape[1:])


def slot_bytes(kv_cache_dtype: str, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one token's K (or V) takes per KV head."""
    if kv_cache_dtype == "int8":
        return head_dim + 4
    return head_dim * torch.empty((), dtype=dtype).element_size()
