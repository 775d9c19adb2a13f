"""Sparse prefill patterns: ``pattern(q, ctx, q_start, params) -> mask``.

``q`` is [H, Lq, D] (query heads; positions ``q_start .. q_start+Lq-1``), ``ctx`` the
context's keys and values (``heron.layers.kv_cache.ContextKV``, positions ``0 .. Lk-1``,
Lk = q_start + Lq; the estimates read ``ctx.keys``, or the cache in place); the mask is
[H, nQB, nKB] bool over absolute blocks of ``params.block`` positions (query blocks
``q_start // block ..``), True = compute that block. Every pattern's mask is causal, with the
first key block (attention sink) and the diagonal block always kept (:func:`enforce_always_kept`,
or the compiled ``kernels.select_blocks``). A threshold of 1.0 keeps every causal block, so
the attention is exactly dense.

- ``xattention``: antidiagonal scoring with stride S (XAttention): queries of a block are
  regrouped S at a time in reverse order and keys S at a time in order, so one dot product of
  the regrouped rows sums an antidiagonal of the S x S score tile; a softmax over these strided
  scores, summed per (query block, key block), estimates each block's attention mass. Each
  query block keeps the fewest key blocks whose normalised mass reaches the threshold.
- ``vertical_slash``: MInference's estimate from the last ``last_q`` queries of the chunk:
  attention mass per key (vertical) and per diagonal offset (slash), aggregated to key blocks
  and block diagonals; keeps the fewest of each reaching the threshold, for every query block.
- ``flexprefill``: per head, the last query block's real block-attention distribution is
  compared with the pooled estimate (mean query . mean key per block) by the square root of
  the Jensen-Shannon divergence; heads under ``js_threshold`` get query-aware selection (pooled
  block scores of every query block, cumulative threshold per query block), the others the
  vertical-slash pattern from the last block's queries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from heron import kernels
from heron.layers.kv_cache import ContextKV
from heron.sparse.attention import enforce_always_kept, kernel_kv


@dataclass
class PatternParams:
    threshold: float = 0.9  # cumulative mass kept (tau / gamma); 1.0 keeps every block
    block: int = 128
    stride: int = 8  # xattention's antidiagonal stride
    last_q: int = 64  # vertical_slash: queries used for the estimate
    js_threshold: float = 0.1  # flexprefill: sqrt(JSD) under which a head is query-aware
    scale: float | None = None  # softmax scale (default 1/sqrt(D))


Pattern = Callable[[torch.Tensor, ContextKV, int, PatternParams], torch.Tensor]
PATTERNS: dict[str, Pattern] = {}


def register(name: str) -> Callable[[Pattern], Pattern]:
    def deco(fn: Pattern) -> Pattern:
        PATTERNS[name] = fn
        return fn

    return deco


def get_pattern(name: str) -> Pattern:
    try:
        return PATTERNS[name]
    except KeyError:
        raise ValueError(f"unknown sparse pattern {name!r}; known: {sorted(PATTERNS)}") from None


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


def _shape(q: torch.Tensor, q_start: int, block: int) -> tuple[int, int, int]:
    qb0 = q_start // block
    nqb = (q_start + q.shape[1] - 1) // block - qb0 + 1
    nkb = -(-(q_start + q.shape[1]) // block)
    return qb0, nqb, nkb


def _keys(ctx: ContextKV) -> torch.Tensor:
    """The context's keys as [Hkv, Lk, D]."""
    return ctx.keys.transpose(0, 1)


def _expand_kv(k: torch.Tensor, num_heads: int) -> torch.Tensor:
    group = num_heads // k.shape[0]
    return k if group == 1 else k.repeat_interleave(group, dim=0)


def _grouped_softmax(
    q: torch.Tensor, k: torch.Tensor, scale: float, hidden: torch.Tensor
) -> torch.Tensor:
    """softmax(scale * q . k^T) with ``hidden`` [Lq, Lk] (True = masked) for q [H, Lq, E] and
    k [Hkv, Lk, E]: [H, Lq, Lk] in the inputs' dtype. The query heads of one KV head are
    stacked along the rows (no key copy per head). bf16 GEMMs are ~7x fp32 on CPUs with AMX
    and an estimate needs no more (the softmax accumulates in fp32 either way)."""
    num_heads, q_len, _ = q.shape
    grouped = (q * scale).reshape(k.shape[0], -1, q.shape[-1])
    s = torch.matmul(grouped, k.transpose(1, 2)).view(num_heads, q_len, -1)
    return torch.softmax(s.masked_fill_(hidden, float("-inf")), dim=-1)


def _scale(p: PatternParams, head_dim: int) -> float:
    return p.scale if p.scale is not None else 1.0 / math.sqrt(head_dim)


def _causal_blocks(qb0: int, nqb: int, nkb: int) -> torch.Tensor:
    return torch.arange(nkb)[None, :] <= torch.arange(qb0, qb0 + nqb)[:, None]


# ---------------------------------------------------------------------------- xattention
@register("xattention")
def xattention(q: torch.Tensor, ctx: ContextKV, q_start: int, p: PatternParams) -> torch.Tensor:
    block, stride = p.block, p.stride
    num_heads, _, head_dim = q.shape
    qb0, nqb, nkb = _shape(q, q_start, block)
    causal = _causal_blocks(qb0, nqb, nkb)
    if p.threshold >= 1.0:
        return enforce_always_kept(causal.expand(num_heads, -1, -1), q_start, block)
    if kernels.sparse_prefill_usable(q):  # the same scores, fused (heron.kernels)
        k, _, table, bs = kernel_kv(ctx)
        block_scores = kernels.xattention_scores(
            q.transpose(0, 1), k, q_start, block, stride, _scale(p, head_dim), table, bs
        )
    else:
        block_scores = _xattention_scores(q, _keys(ctx), q_start, p)
    if kernels.usable(block_scores):  # the two steps below in one pass (~15 ops fewer)
        return kernels.select_blocks(block_scores, p.threshold, qb0)
    keep = select_cumulative(block_scores, p.threshold, causal)
    return enforce_always_kept(keep, q_start, block)


def _xattention_scores(
    q: torch.Tensor, k: torch.Tensor, q_start: int, p: PatternParams
) -> torch.Tensor:
    """XAttention's estimate of each (head, query block, key block)'s attention mass:
    [H, nQB, nKB] fp32 (PyTorch ops; ``heron.kernels.xattention_scores`` fuses them)."""
    block, stride = p.block, p.stride
    num_heads, q_len, head_dim = q.shape
    k_len = k.shape[1]
    qb0, nqb, nkb = _shape(q, q_start, block)
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
    probs = _grouped_softmax(qr, kr, _scale(p, head_dim) / stride, ~allowed)
    # Rows with no query of this chunk (padding of the first/last block) carry no estimate.
    inside = ((rows * stride + stride > q_start) & (rows * stride < q_start + q_len)).nonzero()
    probs[:, : int(inside[0])] = 0
    probs[:, int(inside[-1]) + 1 :] = 0
    per = block // stride
    # (bf16 reductions accumulate in fp32; asking for an fp32 result, a mean or two axes at
    # once copies the whole tensor first: 10x slower)
    return probs.view(num_heads, nqb, per, nkb, per).sum(-1).sum(2).float()


# ---------------------------------------------------------------------------- vertical-slash
def _last_query_attention(
    q: torch.Tensor, k: torch.Tensor, q_start: int, n: int, p: PatternParams
) -> torch.Tensor:
    """Softmax attention of the chunk's last ``n`` queries over all keys: [H, n, Lk] in the
    inputs' dtype."""
    num_heads, q_len, head_dim = q.shape
    n = min(n, q_len)
    pos = torch.arange(q_start + q_len - n, q_start + q_len)
    hidden = torch.arange(k.shape[1])[None, :] > pos[:, None]
    return _grouped_softmax(q[:, q_len - n :], k, _scale(p, head_dim), hidden)


def _vertical_slash_from(
    attn: torch.Tensor,
    q_start: int,
    nqb: int,
    nkb: int,
    threshold: float,
    block: int,
) -> torch.Tensor:
    num_heads, n, k_len = attn.shape
    pad = nkb * block - k_len
    vertical = attn.sum(1).float()
    vertical = torch.nn.functional.pad(vertical, (0, pad)).view(num_heads, nkb, block).sum(-1)
    slash = _diagonal_sums(attn, pad)
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


def _diagonal_sums(attn: torch.Tensor, pad: int) -> torch.Tensor:
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


@register("vertical_slash")
def vertical_slash(q: torch.Tensor, ctx: ContextKV, q_start: int, p: PatternParams) -> torch.Tensor:
    qb0, nqb, nkb = _shape(q, q_start, p.block)
    if p.threshold >= 1.0:
        causal = _causal_blocks(qb0, nqb, nkb).expand(q.shape[0], -1, -1)
        return enforce_always_kept(causal, q_start, p.block)
    attn = _last_query_attention(q, _keys(ctx), q_start, p.last_q, p)
    return _vertical_slash_from(attn, q_start, nqb, nkb, p.threshold, p.block)


# ---------------------------------------------------------------------------- flexprefill
def _block_means(x: torch.Tensor, start: int, block: int, nblocks: int) -> torch.Tensor:
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


def flexprefill_heads(
    q: torch.Tensor, ctx: ContextKV, q_start: int, p: PatternParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, query_aware [H] bool): the pattern and which heads took query-aware selection."""
    num_heads, q_len, head_dim = q.shape
    block = p.block
    qb0, nqb, nkb = _shape(q, q_start, block)
    causal = _causal_blocks(qb0, nqb, nkb)
    if p.threshold >= 1.0:
        mask = enforce_always_kept(causal.expand(num_heads, -1, -1), q_start, block)
        return mask, torch.ones(num_heads, dtype=torch.bool)
    scale = _scale(p, head_dim)
    k = _keys(ctx)
    attn = _last_query_attention(q, k, q_start, block, p)
    k_len = k.shape[1]
    pad = nkb * block - k_len
    real = attn.sum(1).float() / attn.shape[1]
    real = torch.nn.functional.pad(real, (0, pad)).view(num_heads, nkb, block).sum(-1)
    k_means = _expand_kv(_block_means(k, 0, block, nkb), num_heads)  # [H, nKB, D]
    last_block = (q_start + q_len - 1) // block
    last_valid = torch.arange(nkb) <= last_block
    q_last_mean = q[:, q_len - attn.shape[1] :].float().mean(1)  # [H, D]
    est = torch.einsum("hd,hkd->hk", q_last_mean, k_means) * scale
    est = torch.softmax(est.masked_fill(~last_valid, float("-inf")), -1)
    query_aware = js_distance(est, real) < p.js_threshold
    # Query-aware: pooled scores of every query block against every key block.
    q_means = _block_means(q, q_start, block, nqb)
    pooled = torch.einsum("hqd,hkd->hqk", q_means, k_means) * scale
    pooled = torch.softmax(pooled.masked_fill(~causal, float("-inf")), -1)
    qa_mask = enforce_always_kept(select_cumulative(pooled, p.threshold, causal), q_start, block)
    vs_mask = _vertical_slash_from(attn, q_start, nqb, nkb, p.threshold, block)
    return torch.where(query_aware[:, None, None], qa_mask, vs_mask), query_aware


@register("flexprefill")
def flexprefill(q: torch.Tensor, ctx: ContextKV, q_start: int, p: PatternParams) -> torch.Tensor:
    return flexprefill_heads(q, ctx, q_start, p)[0]
