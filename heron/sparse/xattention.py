"""XAttention: antidiagonal scoring with stride S. Queries of a block are regrouped S at a
time in reverse order and keys S at a time in order, so one dot product of the regrouped rows
sums an antidiagonal of the S x S score tile; a softmax over these strided scores, summed per
(query block, key block), estimates each block's attention mass. Each query block keeps the
fewest key blocks whose normalised mass reaches the threshold."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heron import kernels
from heron.layers.chunk_attention import kernel_kv
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


@SPARSE_PATTERNS.register("xattention")
@dataclass(eq=False)
class XAttention(SparsePattern):
    stride: int = 8  # the antidiagonal stride; divides ``block``

    def __post_init__(self) -> None:
        super().__post_init__()
        SPARSE_PATTERNS.check_int("stride", self.stride, 1)
        SPARSE_PATTERNS.check(
            self.block % self.stride == 0,
            "stride",
            f"must divide block ({self.block}); got {self.stride}",
        )

    def mask(
        self, q: torch.Tensor, ctx: ContextKV, q_start: int, scale: float | None = None
    ) -> torch.Tensor:
        block, stride = self.block, self.stride
        num_heads, _, head_dim = q.shape
        qb0, nqb, nkb = block_shape(q, q_start, block)
        causal = causal_blocks(qb0, nqb, nkb)
        if self.threshold >= 1.0:
            return enforce_always_kept(causal.expand(num_heads, -1, -1), q_start, block)
        scale = softmax_scale(scale, head_dim)
        if kernels.sparse_prefill_usable(q):  # the same scores, fused (heron.kernels)
            k, _, table, bs = kernel_kv(ctx)
            block_scores = kernels.xattention_scores(
                q.transpose(0, 1), k, q_start, block, stride, scale, table, bs
            )
        else:
            block_scores = self.scores(q, context_keys(ctx), q_start, scale)
        if kernels.usable(block_scores):  # the two steps below in one pass (~15 ops fewer)
            return kernels.select_blocks(block_scores, self.threshold, qb0)
        keep = select_cumulative(block_scores, self.threshold, causal)
        return enforce_always_kept(keep, q_start, block)

    def scores(self, q: torch.Tensor, k: torch.Tensor, q_start: int, scale: float) -> torch.Tensor:
        """XAttention's estimate of each (head, query block, key block)'s attention mass:
        [H, nQB, nKB] fp32 (PyTorch ops; ``heron.kernels.xattention_scores`` fuses them)."""
        block, stride = self.block, self.stride
        num_heads, q_len, head_dim = q.shape
        k_len = k.shape[1]
        qb0, nqb, nkb = block_shape(q, q_start, block)
        lead = q_start - qb0 * block
        q_pad = q.new_zeros(num_heads, nqb * block, head_dim)
        q_pad[:, lead : lead + q_len] = q
        k_pad = k.new_zeros(k.shape[0], nkb * block, head_dim)
        k_pad[:, :k_len] = k
        # Row i of qr: queries i*S+S-1 .. i*S (reversed); row j of the keys: j*S .. j*S+S-1.
        kv_heads = k.shape[0]
        qr = q_pad.view(num_heads, -1, stride, head_dim).flip(2)
        qr = qr.reshape(num_heads, -1, stride * head_dim)
        rows = qb0 * block // stride + torch.arange(qr.shape[1])
        cols = torch.arange(k_pad.shape[1] // stride)
        allowed = (cols[None, :] <= rows[:, None]) & (cols[None, :] * stride < k_len)
        kr = k_pad.view(kv_heads, -1, stride * head_dim)
        probs = grouped_softmax(qr, kr, scale / stride, ~allowed)
        # Rows with no query of this chunk (padding of the first/last block) carry no estimate.
        inside = ((rows * stride + stride > q_start) & (rows * stride < q_start + q_len)).nonzero()
        probs[:, : int(inside[0])] = 0
        probs[:, int(inside[-1]) + 1 :] = 0
        per = block // stride
        # (bf16 reductions accumulate in fp32; asking for an fp32 result, a mean or two axes at
        # once copies the whole tensor first, which costs more than the sum)
        return probs.view(num_heads, nqb, per, nkb, per).sum(-1).sum(2).float()
