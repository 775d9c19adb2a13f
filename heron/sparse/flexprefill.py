"""FlexPrefill: per head, the last query block's real block-attention distribution is compared
with the pooled estimate (mean query . mean key per block) by the square root of the
Jensen-Shannon divergence; heads under ``js_threshold`` get query-aware selection (pooled
block scores of every query block, cumulative threshold per query block), the others the
vertical-slash pattern from the last block's queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heron.layers.kv_cache import ContextKV
from heron.registry import is_number
from heron.sparse.attention import enforce_always_kept
from heron.sparse.patterns import (
    SPARSE_PATTERNS,
    SparsePattern,
    block_shape,
    causal_blocks,
    context_keys,
    expand_kv,
    select_cumulative,
    softmax_scale,
)
from heron.sparse.vertical_slash import last_query_attention, vertical_slash_mask


@SPARSE_PATTERNS.register("flexprefill")
@dataclass(eq=False)
class FlexPrefill(SparsePattern):
    js_threshold: float = 0.1  # sqrt(JSD) under which a head is query-aware

    def __post_init__(self) -> None:
        super().__post_init__()
        SPARSE_PATTERNS.check(
            is_number(self.js_threshold) and self.js_threshold >= 0,
            "js_threshold",
            f"a number >= 0; got {self.js_threshold!r}",
        )

    def mask(
        self, q: torch.Tensor, ctx: ContextKV, q_start: int, scale: float | None = None
    ) -> torch.Tensor:
        return self.heads(q, ctx, q_start, scale)[0]

    def heads(
        self, q: torch.Tensor, ctx: ContextKV, q_start: int, scale: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, query_aware [H] bool): the pattern and which heads took query-aware
        selection."""
        num_heads, q_len, head_dim = q.shape
        block, threshold = self.block, self.threshold
        qb0, nqb, nkb = block_shape(q, q_start, block)
        causal = causal_blocks(qb0, nqb, nkb)
        if threshold >= 1.0:
            mask = enforce_always_kept(causal.expand(num_heads, -1, -1), q_start, block)
            return mask, torch.ones(num_heads, dtype=torch.bool)
        scale = softmax_scale(scale, head_dim)
        k = context_keys(ctx)
        attn = last_query_attention(q, k, q_start, block, scale)
        k_len = k.shape[1]
        pad = nkb * block - k_len
        real = attn.sum(1).float() / attn.shape[1]
        real = torch.nn.functional.pad(real, (0, pad)).view(num_heads, nkb, block).sum(-1)
        k_means = expand_kv(block_means(k, 0, block, nkb), num_heads)  # [H, nKB, D]
        last_block = (q_start + q_len - 1) // block
        last_valid = torch.arange(nkb) <= last_block
        q_last_mean = q[:, q_len - attn.shape[1] :].float().mean(1)  # [H, D]
        est = torch.einsum("hd,hkd->hk", q_last_mean, k_means) * scale
        est = torch.softmax(est.masked_fill(~last_valid, float("-inf")), -1)
        query_aware = js_distance(est, real) < self.js_threshold
        # Query-aware: pooled scores of every query block against every key block.
        q_means = block_means(q, q_start, block, nqb)
        pooled = torch.einsum("hqd,hkd->hqk", q_means, k_means) * scale
        pooled = torch.softmax(pooled.masked_fill(~causal, float("-inf")), -1)
        qa_mask = enforce_always_kept(select_cumulative(pooled, threshold, causal), q_start, block)
        vs_mask = vertical_slash_mask(attn, q_start, nqb, nkb, threshold, block)
        return torch.where(query_aware[:, None, None], qa_mask, vs_mask), query_aware


def block_means(x: torch.Tensor, start: int, block: int, nblocks: int) -> torch.Tensor:
    """Mean of the rows of ``x`` [H, L, D] (positions ``start ..``) per absolute block:
    [H, nblocks, D] over the blocks ``start // block ..`` (empty blocks give 0)."""
    num_heads, length, head_dim = x.shape
    lead = start - (start // block) * block
    padded = x.new_zeros(num_heads, nblocks * block, head_dim, dtype=torch.float32)
    padded[:, lead : lead + length] = x
    counts = torch.zeros(nblocks * block)
    counts[lead : lead + length] = 1
    counts = counts.view(nblocks, block).sum(-1).clamp_min(1)
    return padded.view(num_heads, nblocks, block, head_dim).sum(2) / counts[None, :, None]


def js_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sqrt(Jensen-Shannon divergence) (natural log) between distributions on the last axis."""
    m = 0.5 * (a + b)

    def kl(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x * (x.clamp_min(1e-30).log() - m.clamp_min(1e-30).log()), 0.0)

    return (0.5 * kl(a).sum(-1) + 0.5 * kl(b).sum(-1)).clamp_min(0).sqrt()
