"""KIVI-style 4- and 2-bit KV cache (``kv_cache_dtype="int4"`` / ``"int2"``; Liu et al.).

Keys are quantized per channel over a group of tokens, values per token over groups of 32
channels (keys have outlier channels, values do not), asymmetric (a float16 scale and minimum
per group), packed two or four to a byte. A key group is one KV block, so the engine uses
32-token blocks for these caches (the paper's group); the block of each sequence that is still
filling stays in full precision — KIVI's residual of recent tokens.

How it fits the paged cache: a block being written has a *staging row*, a full-precision copy
of the block (all layers, K and V). ``prepare`` gives every block a step writes a row before
the forward; each layer writes its K/V there; ``finish`` quantizes, for all layers at once,
the blocks whose last slot the step wrote (tokens are written in order, so such a block is
complete) and gives their rows back. Attention gathers the packed blocks dequantized, with
the blocks that have a row read from it instead, so a step sees its own tokens, and a
sequence its open block, unquantized. Rewriting a quantized block (speculative decoding's
rejected drafts, entropy-adaptive decoding's rewind) first unpacks it into a new row. Rows
are allocated as needed (about one per running sequence, plus the blocks of the step's
prefill chunks) on top of ``kv_cache_memory``; a freed block gives its row back
(``release``, called by the block manager)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heron.platform import lazy_zeros

KIVI_BITS = {"int4": 4, "int2": 2}
KIVI_BLOCK_SIZE = 32  # tokens per key group = per block
VALUE_GROUP = 32  # channels per value group


def value_group(head_dim: int) -> int:
    return VALUE_GROUP if head_dim % VALUE_GROUP == 0 else head_dim


def kivi_block_bytes(bits: int, num_layers: int, block_size: int, heads: int, dim: int) -> int:
    """Bytes of one packed block: K and V codes, key scales/minima per channel, value
    scales/minima per token and channel group (float16)."""
    codes = 2 * block_size * heads * dim * bits // 8
    key_params = 2 * heads * dim * 2
    value_params = 2 * block_size * heads * (dim // value_group(dim)) * 2
    return num_layers * (codes + key_params + value_params)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] in [0, 2^bits) -> [..., D * bits / 8]: code ``i`` of each byte
    is element ``i`` of each run of ``8 / bits``."""
    per = 8 // bits
    parts = q.view(*q.shape[:-1], -1, per)
    out = parts[..., 0].clone()
    for i in range(1, per):
        out |= parts[..., i] << (bits * i)
    return out


def unpack(p: torch.Tensor, bits: int) -> torch.Tensor:
    per, mask = 8 // bits, (1 << bits) - 1
    parts = [(p >> (bits * i)) & mask for i in range(per)]
    return torch.stack(parts, dim=-1).view(*p.shape[:-1], p.shape[-1] * per)


def quantize(
    x: torch.Tensor, dim: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric ``bits``-bit codes of x over ``dim``: (codes uint8, scale, minimum), float16
    parameters with ``dim`` reduced; x ~ codes * scale + minimum."""
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    scale = ((hi - lo) / ((1 << bits) - 1)).clamp_min(1e-6).half()
    lo = lo.half()
    codes = torch.round((x - lo.float()) / scale.float()).clamp_(0, (1 << bits) - 1)
    return codes.to(torch.uint8), scale.squeeze(dim), lo.squeeze(dim)


@dataclass
class KiviSlots:
    """One layer's K (``kv`` 0) or V (1) view of a KiviCache, what attention reads and
    writes through ``heron.layers.kv_cache``."""

    cache: KiviCache
    layer: int
    kv: int

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        c = self.cache
        bs = c.block_size
        staged = c.row_of[slots // bs] * bs + slots % bs
        c.staging[self.layer, self.kv].view(-1, *x.shape[1:]).index_copy_(0, staged, x)

    def gather(self, blocks: torch.Tensor) -> torch.Tensor:
        """Blocks [..., W] as ``[..., W * bs, Hkv, D]`` in the compute dtype."""
        c = self.cache
        flat = blocks.reshape(-1)
        out = c.dequantize(self.layer, self.kv, flat)  # [N, bs, H, D]
        rows = c.row_of.index_select(0, flat)
        open_ = (rows >= 0).nonzero().squeeze(1)
        if open_.numel():
            out[open_] = c.staging[self.layer, self.kv].index_select(0, rows[open_])
        return out.view(*blocks.shape[:-1], -1, *out.shape[2:])


class KiviCache:
    """Every layer's packed K/V, the staging rows and which block has one."""

    def __init__(
        self,
        kv_cache_dtype: str,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        heads: int,
        dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.bits = KIVI_BITS[kv_cache_dtype]
        self.block_size, self.dtype = block_size, dtype
        self.group = value_group(dim)
        packed = (num_layers, num_blocks, block_size, heads, dim * self.bits // 8)
        self.codes = lazy_zeros((2, *packed), torch.uint8, device)  # K, V
        # scale, minimum per block and channel
        self.key_params = lazy_zeros((2, num_layers, num_blocks, heads, dim), torch.float16, device)
        self.value_params = lazy_zeros(  # scale, minimum per token and channel group
            (2, num_layers, num_blocks, block_size, heads, dim // self.group), torch.float16, device
        )
        self.row_of = torch.full((num_blocks,), -1, dtype=torch.long, device=device)
        self.rows: dict[int, int] = {}  # block -> staging row
        self.free_rows: list[int] = []
        self.staging = torch.zeros(
            (num_layers, 2, 0, block_size, heads, dim), dtype=dtype, device=device
        )
        self._filled: torch.Tensor | None = None

    def layer(self, layer: int) -> tuple[KiviSlots, KiviSlots]:
        return KiviSlots(self, layer, 0), KiviSlots(self, layer, 1)

    @property
    def staging_bytes(self) -> int:
        """Bytes of the staging rows in use."""
        per_row = self.staging[:, :, :1].numel() * self.staging.element_size()
        return len(self.rows) * per_row

    # ------------------------------------------------------------------ a step's writes
    def prepare(self, slots: torch.Tensor, refill: bool = False) -> None:
        """Before a forward that writes ``slots``: every block written gets a staging row
        (one holding packed content is unpacked into it first; with ``refill`` every block,
        for writers such as KV compaction that may leave slots of a block unwritten)."""
        bs = self.block_size
        blocks = (slots // bs).tolist()
        first: dict[int, int] = {}
        for block, offset in zip(blocks, (slots % bs).tolist(), strict=True):
            first[block] = min(first.get(block, offset), offset)
        refill = []
        for block, offset in first.items():
            if block not in self.rows:
                self._assign(block)
                if offset > 0 or refill:  # slots before the first written one hold content
                    refill.append(block)
        if refill:
            idx = torch.tensor(refill, device=slots.device)
            rows = self.row_of.index_select(0, idx)
            for kv in (0, 1):
                for layer in range(self.staging.shape[0]):
                    self.staging[layer, kv, rows] = self.dequantize(layer, kv, idx)
        self._filled = torch.unique(slots[slots % bs == bs - 1] // bs)

    def finish(self) -> None:
        """After the forward: quantize the blocks the step completed; their rows go back."""
        blocks, self._filled = self._filled, None
        if blocks is None or not blocks.numel():
            return
        rows = self.row_of.index_select(0, blocks)
        x = self.staging[:, :, rows].float()  # [L, 2, n, bs, H, D]
        codes, scale, lo = quantize(x[:, 0], dim=2, bits=self.bits)  # keys: over the tokens
        self.codes[0][:, blocks] = pack(codes, self.bits)
        self.key_params[0][:, blocks] = scale
        self.key_params[1][:, blocks] = lo
        v = x[:, 1].unflatten(-1, (-1, self.group))  # values: per token, channel groups
        codes, scale, lo = quantize(v, dim=-1, bits=self.bits)
        self.codes[1][:, blocks] = pack(codes.flatten(-2), self.bits)
        self.value_params[0][:, blocks] = scale
        self.value_params[1][:, blocks] = lo
        for block in blocks.tolist():
            self.release(block)

    def dequantize(self, layer: int, kv: int, blocks: torch.Tensor) -> torch.Tensor:
        """Blocks [N] of one layer as ``[N, bs, H, D]`` in the compute dtype."""
        codes = unpack(self.codes[kv, layer].index_select(0, blocks), self.bits).float()
        if kv == 0:
            scale, lo = (p[layer].index_select(0, blocks)[:, None] for p in self.key_params)
            return (codes * scale.float() + lo.float()).to(self.dtype)
        scale, lo = (p[layer].index_select(0, blocks)[..., None] for p in self.value_params)
        codes = codes.unflatten(-1, (-1, self.group))
        return (codes * scale.float() + lo.float()).flatten(-2).to(self.dtype)

    # ------------------------------------------------------------------ bookkeeping
    def release(self, block: int) -> None:
        """The block is free or packed: its staging row (if any) goes back."""
        row = self.rows.pop(block, None)
        if row is not None:
            self.row_of[block] = -1
            self.free_rows.append(row)

    def copy(self, src: int, dst: int) -> None:
        """Copy-on-write: ``dst`` becomes a copy of ``src`` (packed content and open row)."""
        self.codes[:, :, dst] = self.codes[:, :, src]
        self.key_params[:, :, dst] = self.key_params[:, :, src]
        self.value_params[:, :, dst] = self.value_params[:, :, src]
        if src in self.rows:
            if dst not in self.rows:
                self._assign(dst)
            self.staging[:, :, self.rows[dst]] = self.staging[:, :, self.rows[src]]
        else:
            self.release(dst)

    def _assign(self, block: int) -> None:
        if not self.free_rows:  # grow: double the rows (at least 8)
            have = self.staging.shape[2]
            more = max(8, have)
            self.staging = torch.cat(
                [
                    self.staging,
                    self.staging.new_zeros(
                        (*self.staging.shape[:2], more, *self.staging.shape[3:])
                    ),
                ],
                dim=2,
            )
            self.free_rows.extend(range(have + more - 1, have - 1, -1))
        row = self.free_rows.pop()
        self.rows[block] = row
        self.row_of[block] = row
