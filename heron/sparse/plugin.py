"""Sparse prefill's engine plugin (heron.engine.plugin): the prompt chunks of a long enough
prompt attend through the engine's ``SparsePrefill`` in the model's global layers; decode
steps, short prompts and sliding-window layers stay dense."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heron.config import EngineConfig
from heron.engine.plugin import EngineParts, EnginePlugin, register_plugin
from heron.engine.sequence import Sequence
from heron.layers.attention import RowsAttention
from heron.layers.kv_cache import ContextKV
from heron.sparse import SparsePrefill, build_sparse_prefill


@dataclass
class SparseChunk:
    """A prompt chunk's attention through ``sparse`` (heron.layers.attention.RowsAttend)."""

    sparse: SparsePrefill

    def attend(self, q: torch.Tensor, ctx: ContextKV, layer: int, scale: float) -> torch.Tensor:
        return self.sparse.attend(q, ctx, ctx.length - q.shape[0], scale)


@register_plugin
class SparsePrefillPlugin(EnginePlugin):
    """Runs in engines built with a ``sparse_prefill`` pattern; holds its ``SparsePrefill``
    (which counts the blocks it keeps: ``density``)."""

    name = "sparse_prefill"

    @classmethod
    def enabled(cls, config: EngineConfig) -> bool:
        return config.sparse_prefill is not None

    def __init__(self, parts: EngineParts) -> None:
        super().__init__(parts)
        self.sparse = build_sparse_prefill(parts.config)
        self.chunk = RowsAttention(attend=SparseChunk(self.sparse))

    def attention(self, seq: Sequence, n: int) -> RowsAttention | None:
        start = seq.num_computed_tokens
        if (
            seq.num_evicted  # block-sparse masks assume slot == position
            or start >= seq.num_prompt_tokens
            or (n == 1 and start > 0)  # one row after a computed context: a decode row
            or not self.sparse.applies(seq.num_prompt_tokens)
        ):
            return None
        return self.chunk

    @property
    def density(self) -> float | None:
        """Kept / causal (query block, key block, head) triples since the last reset."""
        return self.sparse.density

    def reset_stats(self) -> None:
        self.sparse.reset_stats()
