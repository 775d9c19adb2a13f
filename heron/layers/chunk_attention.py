"""Causal attention of a prefill chunk over its context without a dense mask, and the compiled
block kernel it shares with every attention that computes a subset of (query block, key block)
pairs.

The compiled kernel (heron.kernels) takes the kept blocks of each (head, query block) row as a
CSR mask and reads a plain cache in place. Blocks are aligned on absolute positions (block
``b`` holds positions ``b*B .. b*B+B-1``), so a chunk that starts after cached tokens uses the
same blocks as an unchunked prefill."""

from __future__ import annotations

import torch

from heron import kernels
from heron.layers.kv_cache import ContextKV


def block_kernel_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the compiled block kernel runs on tensors of this device and dtype (then
    :func:`causal_chunk_attention` takes it)."""
    return kernels.sparse_prefill_runs(device, dtype)


def causal_block_mask(q_start: int, q_len: int, k_len: int, block: int) -> torch.Tensor:
    """[nQB, nKB] bool: key block ``kb`` is at or before query block ``qb`` (absolute blocks
    ``q_start // block ..``)."""
    qb0 = q_start // block
    nqb = (q_start + q_len - 1) // block - qb0 + 1
    nkb = -(-k_len // block)
    qb = torch.arange(qb0, qb0 + nqb)
    return torch.arange(nkb)[None, :] <= qb[:, None]


def causal_chunk_attention(
    q: torch.Tensor, ctx: ContextKV, q_start: int, scale: float, block: int = 128
) -> torch.Tensor:
    """Dense causal attention of a prefill chunk ``q`` [Lq, H, D] (positions ``q_start ..``)
    over its context. Returns [Lq, H, D]. Through the compiled block kernel with every causal
    block kept where it runs (:func:`block_kernel_runs`); elsewhere (a CPU) in two parts
    merged by their log-sum-exps: the earlier context, unmasked, with the query heads of one
    KV head stacked into one call, and the chunk's own keys, causal. SDPA with the chunk's
    mask computes every masked score, which the two unmasked calls avoid."""
    if block_kernel_runs(q.device, q.dtype):
        causal = causal_block_mask(q_start, q.shape[0], ctx.length, block)  # [nQB, nKB]
        return kernel_attention(q, ctx, causal.expand(q.shape[1], -1, -1), q_start, block, scale)
    q_len, num_heads, head_dim = q.shape
    k, v = ctx.keys.transpose(0, 1), ctx.values.transpose(0, 1)  # [Hkv, Lk, D]
    kv_heads = k.shape[0]
    group = num_heads // kv_heads
    qh = q.transpose(0, 1)  # [H, Lq, D]; head h reads KV head h // group
    own_k = k[:, q_start:].repeat_interleave(group, 0)
    own_v = v[:, q_start:].repeat_interleave(group, 0)
    out, lse = attend_with_lse(qh, own_k, own_v, scale, causal=True)
    if q_start:
        stacked = qh.reshape(kv_heads, group * q_len, head_dim)
        early, early_lse = attend_with_lse(stacked, k[:, :q_start], v[:, :q_start], scale)
        # One softmax over both parts: the earlier context's share is sigmoid(lse_e - lse).
        share = torch.sigmoid(early_lse.reshape(num_heads, q_len) - lse).unsqueeze(-1)
        merged = out.float().lerp_(early.reshape(num_heads, q_len, head_dim).float(), share)
        out = merged.to(q.dtype)
    return out.transpose(0, 1)


def kernel_kv(ctx: ContextKV) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """What the compiled kernels read for ``ctx``: (k, v, block table, block size), the cache
    itself where it is plain, else the gathered (dequantized) context."""
    if ctx.in_place:
        return ctx.k, ctx.v, ctx.table, ctx.block_size
    return ctx.keys, ctx.values, None, 1


def kernel_attention(
    q: torch.Tensor,
    ctx: ContextKV,
    mask: torch.Tensor,
    q_start: int,
    block: int,
    scale: float,
) -> torch.Tensor:
    """The compiled block kernel over the blocks ``mask`` [H, nQB, nKB] keeps (each row's
    diagonal among them), for q [Lq, H, D]: the mask as CSR. Call only where
    the kernel runs (:func:`block_kernel_runs`)."""
    counts = mask.sum(-1).view(-1)
    row_ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=row_ptr[1:])
    cols = mask.nonzero()[:, 2]  # row-major: each row's kept blocks, in order
    k, v, table, bs = kernel_kv(ctx)
    return kernels.sparse_prefill(q, k, v, row_ptr, cols, q_start, block, scale, table, bs)


def attend_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` [N, Lq, D] over ``k``/``v`` [N, Lk, D], and the log-sum-exp of each
    query's scores [N, Lq] (fp32), which lets two parts of one softmax be merged. On CPU this
    is PyTorch's flash kernel (which returns it); elsewhere the scores are materialised."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[None], k[None], v[None], 0.0, causal, scale=scale
        )
        return out[0], lse[0]
    s = torch.matmul(q.float(), k.float().transpose(1, 2)) * scale
    if causal:
        s.masked_fill_(torch.ones_like(s[0], dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.matmul(torch.exp(s - lse[..., None]), v.float()).to(q.dtype), lse
