"""Block-sparse attention: only the kept (query block, key block) pairs are computed.

On a CPU with AVX512_BF16 (AMX or not) in bf16 this is heron's compiled kernel
(``heron.kernels.sparse_prefill``: one flash-attention loop per row over its kept blocks, read
in place). On CUDA, FlexAttention (compiled) with a ``BlockMask`` made of the kept blocks.
Elsewhere, the portable PyTorch path: the kept earlier key/value blocks of every (head, query
block) are gathered and attended by batched calls, the diagonal block by one causal call, and
the two merged by their log-sum-exps; no [Lq, Lk] score matrix is ever built.

Blocks are aligned on absolute positions (block ``b`` holds positions ``b*B .. b*B+B-1``), so
a prefill chunk that starts after cached tokens uses the same blocks as an unchunked prefill.
"""

from __future__ import annotations

import functools

import torch

from heron import kernels
from heron.layers.chunk_attention import attend_with_lse, kernel_attention
from heron.layers.kv_cache import ContextKV
from heron.layers.workspace import Workspace

# Elements of the gathered keys of one SDPA call; bounds memory.
_TILE_BUDGET = 1 << 25


def enforce_always_kept(mask: torch.Tensor, q_start: int, block: int) -> torch.Tensor:
    """Causal-clip ``mask`` [H, nQB, nKB] and keep the first key block and the diagonal."""
    nqb, nkb = mask.shape[-2:]
    qb = torch.arange(q_start // block, q_start // block + nqb)
    kb = torch.arange(nkb)
    causal = kb[None, :] <= qb[:, None]
    always = (kb[None, :] == 0) | (kb[None, :] == qb[:, None])
    return (mask | always) & causal


def with_diagonal(mask: torch.Tensor, q_start: int, block: int, keep: bool) -> torch.Tensor:
    """A copy of ``mask`` [H, nQB, nKB] with every row's diagonal block (query block ``i``'s
    own absolute block ``q_start // block + i``) set to ``keep``."""
    nqb = mask.shape[1]
    qb0 = q_start // block
    out = mask.clone()
    out[
        :, torch.arange(nqb, device=mask.device), torch.arange(qb0, qb0 + nqb, device=mask.device)
    ] = keep
    return out


def block_sparse_attention(
    q: torch.Tensor,
    ctx: ContextKV,
    mask: torch.Tensor,
    q_start: int,
    block: int,
    scale: float,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """Causal attention of ``q`` [H, Lq, D] (positions ``q_start ..``) over the context's keys
    and values (positions ``0 .. q_start + Lq - 1``), computing only the key blocks ``mask``
    [H, nQB, nKB] keeps; the diagonal block is always computed (causal). Returns [H, Lq, D].

    On the PyTorch path each (head, query block) row attends in two parts merged by their
    log-sum-exps: its diagonal block (one causal call for all rows, which skips the upper half)
    and its kept earlier blocks, gathered and grouped by their count ``c`` so that one unmasked
    call serves each group: no padding, no mask, no dense score matrix."""
    if kernels.sparse_prefill_usable(q):
        mask = with_diagonal(mask, q_start, block, True)
        out = kernel_attention(q.transpose(0, 1), ctx, mask, q_start, block, scale)
        return out.transpose(0, 1)
    k, v = ctx.keys.transpose(0, 1), ctx.values.transpose(0, 1)
    if q.device.type == "cuda":
        return flex_block_sparse_attention(q, k, v, mask, q_start, block, scale)
    num_heads, q_len, head_dim = q.shape
    group = num_heads // k.shape[0]
    qb0 = q_start // block
    nqb, nkb = mask.shape[1], mask.shape[2]
    rows = num_heads * nqb
    lead = q_start - qb0 * block  # rows of the first query block before the chunk
    ws = workspace or Workspace()
    q_rows = _pad(ws, "q", q, nqb * block, lead).view(rows, block, head_dim)
    k_blocks = _pad(ws, "k", k, nkb * block, 0).view(-1, block, head_dim)
    v_blocks = _pad(ws, "v", v, nkb * block, 0).view(-1, block, head_dim)
    head_base = (torch.arange(num_heads) // group).repeat_interleave(nqb) * nkb  # [R]
    qb_abs = torch.arange(qb0, qb0 + nqb).repeat(num_heads)  # [R]
    diag = head_base + qb_abs
    kd = torch.index_select(k_blocks, 0, diag, out=ws.get("kd", q_rows.shape, q))
    vd = torch.index_select(v_blocks, 0, diag, out=ws.get("vd", q_rows.shape, q))
    out, lse = attend_with_lse(q_rows, kd, vd, scale, causal=True)
    off = with_diagonal(mask, q_start, block, False).reshape(rows, nkb)
    counts = off.sum(-1)
    # The earlier blocks' part of every row (rows without one keep weight 0: lse -inf).
    out_off = ws.get("out_off", q_rows.shape, q).zero_()
    lse_off = ws.get("lse_off", lse.shape, lse).fill_(float("-inf"))
    budget = max(_TILE_BUDGET, nkb * block * head_dim)
    kbuf, vbuf = ws.get("kg", (budget,), q), ws.get("vg", (budget,), q)
    for c in torch.unique(counts).tolist():
        if c == 0:
            continue
        sel_all = (counts == c).nonzero().squeeze(1)
        per_call = max(1, budget // (c * block * head_dim))
        for sel in sel_all.split(per_call):
            n = sel.shape[0]
            idx = off.index_select(0, sel).nonzero()[:, 1].view(n, c)  # kept blocks, in order
            flat = (head_base.index_select(0, sel)[:, None] + idx).reshape(-1)
            size = flat.shape[0] * block * head_dim
            shape = (flat.shape[0], block, head_dim)
            kg = torch.index_select(k_blocks, 0, flat, out=kbuf[:size].view(shape))
            vg = torch.index_select(v_blocks, 0, flat, out=vbuf[:size].view(shape))
            qg = q_rows
            if n != rows:
                qg = torch.index_select(q_rows, 0, sel, out=ws.get("qg", (n, block, head_dim), q))
            o, o_lse = attend_with_lse(
                qg, kg.view(n, c * block, head_dim), vg.view(n, -1, head_dim), scale
            )
            out_off.index_copy_(0, sel, o)
            lse_off.index_copy_(0, sel, o_lse)
    # One softmax over both parts: the earlier blocks' share is sigmoid(lse_off - lse).
    share = torch.sigmoid(lse_off - lse).to(q.dtype).unsqueeze(-1)
    out = out.lerp_(out_off, share.expand_as(out))
    return out.view(num_heads, nqb * block, head_dim)[:, lead : lead + q_len]


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    q_start: int,
    block: int,
    scale: float,
) -> torch.Tensor:
    """:func:`block_sparse_attention` through FlexAttention (the CUDA path; compiled there,
    eager elsewhere, where it computes every score and only serves to check the masks).

    The query rows are padded in front to a block boundary so that FlexAttention's query and
    key blocks are heron's absolute blocks; each row's kept earlier blocks are "full" blocks
    (no mask evaluated) and its diagonal block the one partial block, under the causal
    ``mask_mod``, which also looks the kept blocks up so that eager mode (which ignores the
    block structure) computes the same thing."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    num_heads, q_len, head_dim = q.shape
    k_len = k.shape[1]
    qb0, nqb, nkb = q_start // block, mask.shape[1], mask.shape[2]
    lead = q_start - qb0 * block
    q_pad = q.new_zeros(num_heads, nqb * block, head_dim)
    q_pad[:, lead : lead + q_len] = q
    dev = q.device
    diag = torch.arange(qb0, qb0 + nqb, device=dev)
    kept = with_diagonal(mask.to(dev), q_start, block, True)
    earlier = with_diagonal(kept, q_start, block, False)
    full_num = earlier.sum(-1, dtype=torch.int32)
    full_idx = torch.argsort((~earlier).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    part_num = torch.ones(num_heads, nqb, dtype=torch.int32, device=dev)
    part_idx = torch.zeros(num_heads, nqb, nkb, dtype=torch.int32, device=dev)
    part_idx[:, :, 0] = diag.to(torch.int32)
    # A tensor, not an int: the compiled kernel takes it as an input instead of specialising
    # (and recompiling) on every chunk's start.
    base = torch.tensor(qb0 * block, device=dev)

    def causal_kept(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + base) & kept[h, q_idx // block, kv_idx // block]

    block_mask = BlockMask.from_kv_blocks(
        part_num[None],
        part_idx[None],
        full_num[None],
        full_idx[None],
        BLOCK_SIZE=block,
        mask_mod=causal_kept,
        seq_lengths=(nqb * block, k_len),
        compute_q_blocks=False,  # the backward pass's index: not needed for inference
    )
    attend = _compiled_flex_attention() if dev.type == "cuda" else flex_attention
    out = attend(q_pad[None], k[None], v[None], block_mask=block_mask, scale=scale, enable_gqa=True)
    return out[0, :, lead : lead + q_len]


def _pad(ws: Workspace, name: str, x: torch.Tensor, length: int, lead: int) -> torch.Tensor:
    """``x`` [H, L, D] placed at rows ``lead ..`` of a zeroed [H, length, D] buffer."""
    out = ws.get(name, (x.shape[0], length, x.shape[2]), x)
    if lead:
        out[:, :lead].zero_()
    out[:, lead : lead + x.shape[1]] = x
    out[:, lead + x.shape[1] :].zero_()
    return out
