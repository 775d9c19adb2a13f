"""Paged attention, portable PyTorch path (CPU, and CUDA through the same code).

The KV cache of one layer is a flat tensor of slots ``[num_blocks * block_size, Hkv, D]``; a
sequence's block table names its blocks, so slot ``block_table[i // bs] * bs + i % bs`` holds
its token ``i`` (in the model's dtype, or int8: ``kv_cache``). The runner orders each step's
flat batch as decodes first (one query each, or the last real token and its drafts for a
sequence verifying a draft tree, under a tree mask; a draft chain's rows are plain decode rows
of growing length), then spans: decode rows with their own attention (an engine plugin's,
``RowsAttention``), then prefill chunks. It builds the block tables once per step; every layer
reuses them. Reads gather
whole blocks; the slots past a sequence's length are masked out. On CPU, plain decode rows
(one query each, float cache) instead attend through heron's compiled kernel, which reads
the blocks in place (``heron.kernels``).

Sliding-window layers (Gemma3's local layers) read the same blocks through a second mask that
also hides keys older than the window: query ``p`` sees keys ``p - window + 1 .. p``. The
runner builds it once per step, only where the window hides something; the compiled kernel
takes the window as a bound instead (``AttentionMetadata.sliding_window``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from heron import kernels
from heron.layers.chunk_attention import causal_chunk_attention
from heron.layers.kv_cache import Cache, ContextKV, gather_blocks, write_slots


class RowsAttend(Protocol):
    """A sequence's own attention for its rows of a step, in the model's global layers
    (sliding-window layers attend to them densely, under their window)."""

    def attend(self, q: torch.Tensor, ctx: ContextKV, layer: int, scale: float) -> torch.Tensor:
        """``q`` [n, H, D]: the rows at the last ``n`` of the ``ctx.length`` slots they see,
        their own K/V already written. Returns [n, H, D]."""
        ...


@dataclass
class RowsAttention:
    """What an engine plugin changes about how one sequence's rows of a step attend
    (heron.engine.plugin: ``EnginePlugin.attention``); a field left at its default changes
    nothing."""

    # Offsets among the rows whose rotated queries every layer captures: the runner returns
    # them ([L, len(capture), H, D]) with the slots those rows were written to.
    capture: list[int] = field(default_factory=list)
    # Slots layer l must not read, ``hole_start[l] .. hole_end`` ([L]): a layer that holds
    # fewer tokens than the sequence has slots for. None: every layer reads every slot.
    hole_start: torch.Tensor | None = None
    hole_end: int = 0
    # The rows' attention in the global layers instead of the dense one, or None.
    attend: RowsAttend | None = None

    @staticmethod
    def combine(plans: list[RowsAttention]) -> RowsAttention:
        """One plan from several plugins' plans; no two of them may set the same part."""
        capture = [p.capture for p in plans if p.capture]
        holes = [(p.hole_start, p.hole_end) for p in plans if p.hole_start is not None]
        attend = [p.attend for p in plans if p.attend is not None]
        if max(len(capture), len(holes), len(attend)) > 1:
            raise ValueError("two engine plugins change the same part of a sequence's attention")
        hole_start, hole_end = holes[0] if holes else (None, 0)
        return RowsAttention(
            capture[0] if capture else [], hole_start, hole_end, attend[0] if attend else None
        )


@dataclass
class RowSpan:
    """One sequence's rows ``start:end`` of the batch that attend apart from the decode rows:
    a prefill chunk, or decode rows with their own attention (``attend``)."""

    start: int
    end: int
    # Blocks holding the whole context (cached tokens + this chunk); None when the chunk is the
    # whole context, so the chunk's own K/V are used directly.
    context_blocks: torch.Tensor | None
    # [Lq, blocks * bs] bool (True = attend) when the chunk starts after cached tokens and
    # attends through SDPA, an additive bias once the step is built (``make_masks_additive``);
    # None = causal (``causal_chunk``, or SDPA's causal flash for a chunk alone).
    mask: torch.Tensor | None
    # The mask of sliding-window layers ([Lq, Lk] like ``mask``); None where the window hides
    # no key, so those layers use ``mask``.
    window_mask: torch.Tensor | None = None
    # The sequence's own attention for these rows (global layers only); None = dense.
    attend: RowsAttend | None = None
    q_start: int = 0  # slot of the chunk's first token
    # Causal attention through ``causal_chunk_attention`` (the compiled block kernel where it
    # runs, else two flash calls): on a CPU every chunk after cached tokens, and a first chunk
    # of many tokens where the kernel runs.
    causal_chunk: bool = False
    # ``mask`` per layer ([L, Lq, Lk]) where layers do not read all slots, or None.
    layer_masks: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    """Everything attention needs about one step's batch, shared by all layers."""

    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    block_size: int
    num_decodes: int = 0
    decode_blocks: torch.Tensor | None = None  # [B, W] block tables, padded with block 0
    # [B, 1, Q, W * bs] bool, True = valid slot; Q = 1, or (rows per sequence) * (query heads
    # per KV head) when some sequence verifies drafts (``decode_rows``)
    decode_mask: torch.Tensor | None = None
    decode_window_mask: torch.Tensor | None = None  # same for sliding-window layers, or None
    # [B] slots each decode row attends to, set where every decode row is a single query and
    # the compiled kernel (heron.kernels.paged_decode) may read the cache in place; else None.
    decode_lens: torch.Tensor | None = None
    # [B, 2] (from, bits) with decode_lens where some decode row is a draft-tree row: slot
    # from + j is seen only where bit j is set (heron.kernels.paged_decode); None: all < len.
    decode_visible: torch.Tensor | None = None
    # The model's sliding window, for the kernel's decode rows of sliding-window layers (0:
    # none): a row of length n attends to slots n - window .. n - 1.
    sliding_window: int = 0
    spans: list[RowSpan] = field(default_factory=list)
    # Sequences verifying drafts have several decode rows: the flat batch row of each
    # sequence's i-th query ([B, M], padded with its first) and the indices of the real ones
    # among B * M, in flat-batch order; None: one row each.
    decode_rows: torch.Tensor | None = None
    decode_valid: torch.Tensor | None = None
    # Per-layer decode masks where some sequence's layers do not read all its slots
    # ([L, B, 1, 1, W * bs], ``RowsAttention.hole_start``), else None; and the rows whose
    # (rotated) queries each layer appends to ``captured`` (``RowsAttention.capture``).
    decode_layer_masks: torch.Tensor | None = None
    capture_rows: torch.Tensor | None = None
    captured: list[torch.Tensor] = field(default_factory=list)

    def plain_decodes(self, num_rows: int) -> bool:
        """Whether all ``num_rows`` rows of the step are decode rows of one query each that
        attend through the compiled kernel, with nothing else per layer: no span (prefill
        chunk, rows with their own attention), no captured queries, no per-layer masks."""
        return (
            self.decode_lens is not None
            and self.num_decodes == num_rows
            and not self.spans
            and self.capture_rows is None
            and self.decode_layer_masks is None
        )

    def make_masks_additive(self, dtype: torch.dtype) -> None:
        """Turn every mask of the step (shared by all layers) into 0 / -inf biases once: SDPA
        would otherwise convert a boolean mask in every layer, a visible cost on long prompts,
        and takes a bias faster."""
        for holder, names in [
            (self, ("decode_mask", "decode_window_mask", "decode_layer_masks")),
            *((span, ("mask", "window_mask", "layer_masks")) for span in self.spans),
        ]:
            for name in names:
                mask = getattr(holder, name)
                if mask is not None and mask.dtype == torch.bool:
                    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
                    setattr(holder, name, bias.masked_fill_(~mask, float("-inf")))


def _kernel_decodes(meta: AttentionMetadata, k_cache: Cache) -> bool:
    """Whether this layer's decode rows can use the compiled kernel: one query each, a plain
    (not quantized) cache, the same slots in every layer."""
    return (
        meta.decode_lens is not None
        and meta.decode_layer_masks is None
        and isinstance(k_cache, torch.Tensor)
    )


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: Cache,
    v_cache: Cache,
    meta: AttentionMetadata,
    scale: float,
    sliding: bool = False,
    layer: int = 0,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D]; caches: [slots, Hkv, D]. Returns [T, H, D].

    Writes this step's K/V into the cache, then attends over each sequence's cached slots
    (only those inside the sliding window when ``sliding``)."""
    write_slots(k_cache, meta.slot_mapping, k)
    write_slots(v_cache, meta.slot_mapping, v)
    if meta.capture_rows is not None:
        meta.captured.append(q.index_select(0, meta.capture_rows))
    num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    group = num_heads // num_kv_heads
    b = meta.num_decodes
    in_kernel = b > 0 and _kernel_decodes(meta, k_cache)
    if in_kernel:
        qd = q[:b].view(b, num_kv_heads, group, head_dim)
        od = kernels.paged_decode(
            qd,
            k_cache,
            v_cache,
            meta.decode_blocks,
            meta.decode_lens,
            meta.block_size,
            scale,
            meta.decode_visible,
            meta.sliding_window if sliding else 0,
        ).view(b, num_heads, head_dim)
        if b == q.shape[0]:  # a step of plain decodes only: nothing else to place
            return od
    out = torch.empty_like(q)
    if in_kernel:
        out[:b] = od
    elif b:
        # All queries of one KV group see the same keys: fold the group (and a verifying
        # sequence's rows) into the query axis so GQA needs no key expansion.
        rows = meta.decode_rows
        m = 1 if rows is None else rows.shape[1]
        qd = q[:b] if rows is None else q.index_select(0, rows.view(-1))
        qd = qd.view(b, m, num_kv_heads, group, head_dim).transpose(1, 2)
        qd = qd.reshape(b, num_kv_heads, m * group, head_dim)
        kd = gather_blocks(k_cache, meta.decode_blocks, meta.block_size).permute(0, 2, 1, 3)
        vd = gather_blocks(v_cache, meta.decode_blocks, meta.block_size).permute(0, 2, 1, 3)
        mask = meta.decode_mask
        if meta.decode_layer_masks is not None:
            mask = meta.decode_layer_masks[layer]
        if sliding and meta.decode_window_mask is not None:
            mask = meta.decode_window_mask
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale)
        od = od.view(b, num_kv_heads, m, group, head_dim).transpose(1, 2)
        od = od.reshape(b * m, num_heads, head_dim)
        if rows is None:
            out[:b] = od
        else:
            out[: meta.decode_valid.numel()] = od.index_select(0, meta.decode_valid)

    for span in meta.spans:
        n = span.end - span.start
        if span.context_blocks is None:
            ctx = ContextKV(k[span.start : span.end], v[span.start : span.end], n)
        else:
            length, bs = span.q_start + n, meta.block_size
            ctx = ContextKV(k_cache, v_cache, length, span.context_blocks, bs)
        qs = q[span.start : span.end]
        if span.attend is not None and not sliding:
            out[span.start : span.end] = span.attend.attend(qs, ctx, layer, scale)
            continue
        mask = span.window_mask if sliding and span.window_mask is not None else span.mask
        if span.layer_masks is not None:
            mask = span.layer_masks[layer]
        if mask is None and span.causal_chunk:
            out[span.start : span.end] = causal_chunk_attention(qs, ctx, span.q_start, scale)
            continue
        if mask is not None:
            mask = mask[..., : ctx.length]  # masks span whole blocks
        op = F.scaled_dot_product_attention(
            qs.transpose(0, 1).unsqueeze(0),
            ctx.keys.transpose(0, 1).unsqueeze(0),
            ctx.values.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=group > 1,
        )
        out[span.start : span.end] = op.squeeze(0).transpose(0, 1)
    return out
