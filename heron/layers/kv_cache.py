"""The paged KV cache's storage: plain slots in the model's dtype, int8 slots with one
scale per (slot, KV head) (``kv_cache_dtype="int8"``), or KIVI's packed 4/2-bit blocks
(``"int4"``/``"int2"``, ``heron.layers.kivi``).

int8 is symmetric absmax quantization of each token's head vector (the granularity vLLM's and
llama.cpp's 8-bit caches use): a slot costs ``D + 4`` bytes per head instead of ``2 D`` (bf16)
or ``4 D`` (fp32), so the same ``kv_cache_memory`` holds 1.9x / 3.8x the tokens for a 64-wide
head. K/V are quantized once, when written, and dequantized to the compute dtype as attention
gathers them; the chunk a prefill step computes attends to its own K/V unquantized.

``write_slots``, ``gather_blocks`` and ``gather_slots`` take any storage, so attention reads
one way; ``ContextKV`` is what a prefill chunk attends to, read in place where it can be."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from heron import kernels
from heron.layers.kivi import KIVI_BITS, KiviSlots, kivi_block_bytes

KV_CACHE_DTYPES = ("auto", "int8", *KIVI_BITS)


@dataclass
class Int8Slots:
    """One layer's K (or V) cache: ``data`` [slots, Hkv, D] int8, ``scale`` [slots, Hkv]."""

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype  # what reads dequantize to


Cache = torch.Tensor | Int8Slots | KiviSlots


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 values, float32 scales [...]), x ~ values * scale."""
    x = x.float()
    scale = x.abs().amax(dim=-1).clamp_min(1e-8) / 127.0
    return torch.round(x / scale[..., None]).clamp_(-127, 127).to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * scale[..., None]).to(dtype)


def write_slots(cache: Cache, slots: torch.Tensor, x: torch.Tensor) -> None:
    """Store x [T, Hkv, D] at ``slots`` [T]."""
    if isinstance(cache, KiviSlots):
        cache.write(slots, x)
    elif isinstance(cache, Int8Slots):
        q, scale = quantize_int8(x)
        cache.data.index_copy_(0, slots, q)
        cache.scale.index_copy_(0, slots, scale)
    elif (
        kernels.usable(x) and cache.dtype == x.dtype and cache.is_contiguous() and x.stride(-1) == 1
    ):
        kernels.write_rows_(cache, slots, x)
    else:
        cache.index_copy_(0, slots, x)


def gather_blocks(cache: Cache, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """The slots of ``blocks`` (any shape ``[..., W]``) as ``[..., W * block_size, Hkv, D]``,
    in the compute dtype. Whole blocks go through ``index_select`` (several times faster on
    CPU than per-slot advanced indexing)."""
    if isinstance(cache, KiviSlots):
        return cache.gather(blocks)
    if isinstance(cache, Int8Slots):
        q = _gather(cache.data, blocks, block_size)
        return dequantize_int8(q, _gather(cache.scale, blocks, block_size), cache.dtype)
    return _gather(cache, blocks, block_size)


def table_slots(
    table: list[int], n: int, block_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """The cache slots of a sequence's first ``n`` tokens, in order, from its block table."""
    blocks = torch.tensor(table[: -(-n // block_size)], dtype=torch.long, device=device)
    offsets = torch.arange(block_size, device=device)
    return (blocks[:, None] * block_size + offsets).reshape(-1)[:n]


def gather_slots(cache: Cache, slots: torch.Tensor) -> torch.Tensor:
    """The given slots [N] as ``[N, Hkv, D]`` in the compute dtype."""
    if isinstance(cache, KiviSlots):  # unpack each block the slots touch once
        bs = cache.cache.block_size
        blocks, which = torch.unique(slots // bs, return_inverse=True)
        x = cache.gather(blocks[None])[0].unflatten(0, (-1, bs))  # [N, bs, Hkv, D]
        return x[which, slots % bs]
    if isinstance(cache, Int8Slots):
        q = cache.data.index_select(0, slots)
        return dequantize_int8(q, cache.scale.index_select(0, slots), cache.dtype)
    return cache.index_select(0, slots)


def _gather(t: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    per_block = t.view(-1, block_size, *t.shape[1:])
    out = per_block.index_select(0, blocks.reshape(-1))
    return out.view(*blocks.shape[:-1], blocks.shape[-1] * block_size, *t.shape[1:])


@dataclass
class ContextKV:
    """The keys and values of positions ``0 .. length - 1`` a prefill chunk attends to: rows
    of ``k``/``v`` (the chunk's own K/V [T, Hkv, D] with position = row, or a layer's cache
    read through the sequence's block ``table``). heron's compiled kernels read a plain cache
    in place (``in_place``); every other reader takes ``keys``/``values``, gathered once (and
    dequantized for an int8 / KIVI cache)."""

    k: Cache
    v: Cache
    length: int
    table: torch.Tensor | None = None  # block ids; None: position = row
    block_size: int = 1

    @property
    def in_place(self) -> bool:
        return isinstance(self.k, torch.Tensor)

    @functools.cached_property
    def keys(self) -> torch.Tensor:
        """[length, Hkv, D] in the compute dtype."""
        return self._gather(self.k)

    @functools.cached_property
    def values(self) -> torch.Tensor:
        return self._gather(self.v)

    def _gather(self, cache: Cache) -> torch.Tensor:
        if self.table is None:
            return cache[: self.length]
        return gather_blocks(cache, self.table, self.block_size)[: self.length]


def block_bytes(
    kv_cache_dtype: str,
    num_layers: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
) -> int:
    """Bytes one KV block takes over all layers, K and V."""
    if kv_cache_dtype in KIVI_BITS:
        bits = KIVI_BITS[kv_cache_dtype]
        return kivi_block_bytes(bits, num_layers, block_size, num_kv_heads, head_dim)
    if kv_cache_dtype == "int8":
        per_head = head_dim + 4
    else:
        per_head = head_dim * torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * per_head
