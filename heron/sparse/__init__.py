"""Sparse prefill attention: a pattern picks (query block, key block) pairs per head and a
block-sparse attention computes only those. Used for the prompt chunks of sequences whose
prompt has at least the pattern's ``min_tokens`` tokens; decode and short prompts stay dense.

``SparsePrefill`` is what the model runner holds: it runs the pattern, counts the blocks kept
(``density``) and calls :func:`block_sparse_attention`."""

from __future__ import annotations

import torch

from heron.layers.chunk_attention import causal_block_mask
from heron.layers.kv_cache import ContextKV
from heron.layers.workspace import Workspace
from heron.sparse.attention import block_sparse_attention, enforce_always_kept
from heron.sparse.patterns import SPARSE_PATTERNS, SparsePattern

__all__ = [
    "SPARSE_PATTERNS",
    "SparsePattern",
    "SparsePrefill",
    "block_sparse_attention",
    "build_sparse_prefill",
    "causal_block_mask",
    "enforce_always_kept",
]


class SparsePrefill:
    def __init__(self, pattern: SparsePattern) -> None:
        self.name = pattern.name
        self.pattern = pattern
        self.kept_blocks = 0
        self.causal_blocks = 0
        self.workspace = Workspace()

    def applies(self, num_prompt_tokens: int) -> bool:
        return num_prompt_tokens >= self.pattern.min_tokens

    @property
    def density(self) -> float | None:
        """Kept / causal (query block, key block, head) triples since the last reset."""
        return self.kept_blocks / self.causal_blocks if self.causal_blocks else None

    def reset_stats(self) -> None:
        self.kept_blocks = self.causal_blocks = 0

    def attend(self, q: torch.Tensor, ctx: ContextKV, q_start: int, scale: float) -> torch.Tensor:
        """q: [Lq, H, D] at positions ``q_start ..`` over the keys and values of positions
        ``0 .. q_start + Lq - 1``. Returns [Lq, H, D]."""
        qh = q.transpose(0, 1)
        block = self.pattern.block
        mask = self.pattern.mask(qh, ctx, q_start, scale)
        causal = causal_block_mask(q_start, q.shape[0], ctx.length, block)
        self.kept_blocks += int(mask.sum())
        self.causal_blocks += int(causal.sum()) * q.shape[1]
        out = block_sparse_attention(qh, ctx, mask, q_start, block, scale, self.workspace)
        return out.transpose(0, 1)


def build_sparse_prefill(config) -> SparsePrefill | None:
    """The engine's SparsePrefill from an EngineConfig, or None when sparse prefill is off."""
    if config.sparse_prefill is None:
        return None
    return SparsePrefill(SPARSE_PATTERNS.make(config.sparse_prefill, config.sparse_prefill_options))
