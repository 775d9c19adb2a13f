"""Sparse prefill patterns: ``pattern.mask(q, ctx, q_start, scale) -> mask``.

``q`` is [H, Lq, D] (query heads; positions ``q_start .. q_start+Lq-1``), ``ctx`` the
context's keys and values (``heron.layers.kv_cache.ContextKV``, positions ``0 .. Lk-1``,
Lk = q_start + Lq; the estimates read ``ctx.keys``, or the cache in place); the mask is
[H, nQB, nKB] bool over absolute blocks of ``pattern.block`` positions (query blocks
``q_start // block ..``), True = compute that block. Every pattern's mask is causal, with the
first key block (attention sink) and the diagonal block always kept (:func:`enforce_always_kept`,
or the compiled ``kernels.select_blocks``). A threshold of 1.0 keeps every causal block, so
the attention is exactly dense.

A pattern is a dataclass of its options, registered in its own module (``xattention``,
``vertical_slash``, ``flexprefill``); this module holds what they share."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from heron.layers.kv_cache import ContextKV
from heron.registry import Registry, is_number

# Patterns by name, as ``EngineConfig.sparse_prefill``/``sparse_prefill_options`` and the
# CLI's ``--sparse-prefill``/``--sparse-prefill-option`` name them.
SPARSE_PATTERNS: Registry[SparsePattern] = Registry("sparse_prefill", "heron.sparse")


@dataclass(eq=False)
class SparsePattern(ABC):
    name: ClassVar[str]
    threshold: float = 0.9  # cumulative attention mass kept (tau / gamma); 1.0: every block
    block: int = 128  # positions per block
    min_tokens: int = 2048  # shortest prompt that uses the pattern (shorter ones stay dense)

    def __post_init__(self) -> None:
        SPARSE_PATTERNS.check(
            is_number(self.threshold) and 0 < self.threshold <= 1,
            "threshold",
            f"a share of the attention mass in (0, 1]; got {self.threshold!r}",
        )
        SPARSE_PATTERNS.check_int("block", self.block, 1)
        SPARSE_PATTERNS.check_int("min_tokens", self.min_tokens, 1)

    @abstractmethod
    def mask(
        self, q: torch.Tensor, ctx: ContextKV, q_start: int, scale: float | None = None
    ) -> torch.Tensor:
        """The blocks to compute, [H, nQB, nKB] bool; ``scale``: the softmax scale (default
        1/sqrt(D))."""


# ---------------------------------------------------------------------------- helpers
def select_cumulative(scores: torch.Tensor, threshold: float, valid: torch.Tensor) -> torch.Tensor:
    """Per row of ``scores`` [..., N] (non-negative), the fewest entries whose share of the
    row's total (over ``valid`` entries) reaches ``threshold``. Returns a bool mask."""
    if threshold >= 1.0:
        return valid.expand_as(scores).clone()
    s = scores.masked_fill(~valid, 0.0)
    s = s / s.sum(-1, keepdim=True).clamp_min(1e-30)
    sorted_s, order = torch.sort(s, dim=-1, descending=True)
    before = torch.cumsum(sorted_s, -1) - sorted_s  # mass of the strictly better entries
    keep_sorted = before < threshold
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return keep & valid


def block_shape(q: torch.Tensor, q_start: int, block: int) -> tuple[int, int, int]:
    """(first query block, query blocks, key blocks) of a chunk ``q`` [H, Lq, D]."""
    qb0 = q_start // block
    nqb = (q_start + q.shape[1] - 1) // block - qb0 + 1
    nkb = -(-(q_start + q.shape[1]) // block)
    return qb0, nqb, nkb


def context_keys(ctx: ContextKV) -> torch.Tensor:
    """The context's keys as [Hkv, Lk, D]."""
    return ctx.keys.transpose(0, 1)


def expand_kv(k: torch.Tensor, num_heads: int) -> torch.Tensor:
    group = num_heads // k.shape[0]
    return k if group == 1 else k.repeat_interleave(group, dim=0)


def grouped_softmax(
    q: torch.Tensor, k: torch.Tensor, scale: float, hidden: torch.Tensor
) -> torch.Tensor:
    """softmax(scale * q . k^T) with ``hidden`` [Lq, Lk] (True = masked) for q [H, Lq, E] and
    k [Hkv, Lk, E]: [H, Lq, Lk] in the inputs' dtype. The query heads of one KV head are
    stacked along the rows (no key copy per head). bf16 GEMMs are several times faster than
    fp32 on CPUs with AMX and an estimate needs no more (the softmax accumulates in fp32
    either way)."""
    num_heads, q_len, _ = q.shape
    grouped = (q * scale).reshape(k.shape[0], -1, q.shape[-1])
    s = torch.matmul(grouped, k.transpose(1, 2)).view(num_heads, q_len, -1)
    return torch.softmax(s.masked_fill_(hidden, float("-inf")), dim=-1)


def softmax_scale(scale: float | None, head_dim: int) -> float:
    return scale if scale is not None else 1.0 / math.sqrt(head_dim)


def causal_blocks(qb0: int, nqb: int, nkb: int) -> torch.Tensor:
    return torch.arange(nkb)[None, :] <= torch.arange(qb0, qb0 + nqb)[:, None]
