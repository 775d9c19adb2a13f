"""Vertical-slash (MInference): estimate from the last ``last_q`` queries of the chunk the
attention mass per key (vertical) and per diagonal offset (slash), aggregated to key blocks
and block diagonals; keep the fewest of each reaching the threshold, for every query block."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heron.layers.kv_cache import ContextKV
from heron.sparse.attention import enforce_always_kept
from heron.sparse.patterns import (
    SPARSE_PATTERNS,
    SparsePattern,
    block_shape,
    causal_blocks,
    context_keys,
    grouped_softmax,
    select_cumulative,
    softmax_scale,
)


@SPARSE_PATTERNS.register("vertical_slash")
@dataclass(eq=False)
class VerticalSlash(SparsePattern):
    last_q: int = 64  # queries the estimate uses

    def __post_init__(self) -> None:
        super().__post_init__()
        SPARSE_PATTERNS.check_int("last_q", self.last_q, 1)

    def mask(
        self, q: torch.Tensor, ctx: ContextKV, q_start: int, scale: float | None = None
    ) -> torch.Tensor:
        qb0, nqb, nkb = block_shape(q, q_start, self.block)
        if self.threshold >= 1.0:
            causal = causal_blocks(qb0, nqb, nkb).expand(q.shape[0], -1, -1)
            return enforce_always_kept(causal, q_start, self.block)
        scale = softmax_scale(scale, q.shape[2])
        attn = last_query_attention(q, context_keys(ctx), q_start, self.last_q, scale)
        return vertical_slash_mask(attn, q_start, nqb, nkb, self.threshold, self.block)


def last_query_attention(
    q: torch.Tensor, k: torch.Tensor, q_start: int, n: int, scale: float
) -> torch.Tensor:
    """Softmax attention of the chunk's last ``n`` queries over all keys: [H, n, Lk] in the
    inputs' dtype."""
    num_heads, q_len, head_dim = q.shape
    n = min(n, q_len)
    pos = torch.arange(q_start + q_len - n, q_start + q_len)
    hidden = torch.arange(k.shape[1])[None, :] > pos[:, None]
    return grouped_softmax(q[:, q_len - n :], k, scale, hidden)


def vertical_slash_mask(
    attn: torch.Tensor,
    q_start: int,
    nqb: int,
    nkb: int,
    threshold: float,
    block: int,
) -> torch.Tensor:
    """The vertical-slash blocks from the attention ``attn`` [H, n, Lk] of the chunk's last
    ``n`` queries."""
    num_heads, n, k_len = attn.shape
    pad = nkb * block - k_len
    vertical = attn.sum(1).float()
    vertical = torch.nn.functional.pad(vertical, (0, pad)).view(num_heads, nkb, block).sum(-1)
    slash = diagonal_sums(attn, pad)
    slash = slash.view(num_heads, nkb, block).sum(-1)  # [H, delta]: offsets delta*B .. +B-1
    all_blocks = torch.ones(nkb, dtype=torch.bool)
    vert_keep = select_cumulative(vertical, threshold, all_blocks)
    slash_keep = select_cumulative(slash, threshold, all_blocks)
    # A diagonal with offset in [delta*B, delta*B+B) crosses block diagonals delta and delta+1.
    slash_keep[:, 1:] |= slash_keep[:, :-1].clone()
    qb0 = q_start // block
    delta = (torch.arange(qb0, qb0 + nqb)[:, None] - torch.arange(nkb)[None, :]).clamp(0, nkb - 1)
    mask = vert_keep[:, None, :] | slash_keep[:, delta]
    return enforce_always_kept(mask, q_start, block)


def diagonal_sums(attn: torch.Tensor, pad: int) -> torch.Tensor:
    """[H, Lk + pad] fp32: entry ``d`` sums ``attn`` [H, n, Lk] over query - key = d, for the
    last ``n`` queries of a context of Lk keys (query i at position Lk - n + i). Rows padded
    with n zeros on the left and read back one element longer each are row i shifted left by
    i: each diagonal lines up in column n + key - query, and a column sum adds it up."""
    num_heads, n, k_len = attn.shape
    width = k_len + n
    skewed = torch.nn.functional.pad(attn, (n, 0, 0, 1)).view(num_heads, -1)
    skewed = skewed[:, : n * (width + 1)].view(num_heads, n, width + 1)
    sums = skewed.sum(1).float()  # column c holds query - key = Lk - c
    return torch.nn.functional.pad(sums[:, 1 : k_len + 1].flip(-1), (0, pad))
