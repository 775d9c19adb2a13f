"""Block-sparse attention: only the kept (query block, key block) pairs are computed.

On a CPU with AMX in bf16 this is heron's compiled kernel (``heron.kernels.sparse_prefill``:
one flash-attention loop per row over its kept blocks, read in place). Elsewhere, the portable
PyTorch path: the kept earlier key/value blocks of every (head, query block) are gathered and
attended by batched calls, the diagonal block by one causal call, and the two merged by their
log-sum-exps; no [Lq, Lk] score matrix is ever built.

Blocks are aligned on absolute positions (block ``b`` holds positions ``b*B .. b*B+B-1``), so
a prefill chunk that starts after cached tokens uses the same blocks as an unchunked prefill.
"""

from __future__ import annotations

import torch

from heron import kernels

# Elements of the gathered keys of one SDPA call; bounds memory.
_TILE_BUDGET = 1 << 25


def causal_block_mask(q_start: int, q_len: int, k_len: int, block: int) -> torch.Tensor:
    """[nQB, nKB] bool: key block ``kb`` is at or before query block ``qb`` (absolute blocks
    ``q_start // block ..``)."""
    qb0 = q_start // block
    nqb = (q_start + q_len - 1) // block - qb0 + 1
    nkb = -(-k_len // block)
    qb = torch.arange(qb0, qb0 + nqb)
    return torch.arange(nkb)[None, :] <= qb[:, None]


def enforce_always_kept(mask: torch.Tensor, q_start: int, block: int) -> torch.Tensor:
    """Causal-clip ``mask`` [H, nQB, nKB] and keep the first key block and the diagonal."""
    nqb, nkb = mask.shape[-2:]
    qb = torch.arange(q_start // block, q_start // block + nqb)
    kb = torch.arange(nkb)
    causal = kb[None, :] <= qb[:, None]
    always = (kb[None, :] == 0) | (kb[None, :] == qb[:, None])
    return (mask | always) & causal


class Workspace:
    """Buffers reused across calls. Fresh large CPU allocations are page-faulted on first
    touch, which costs as much as the gathers themselves; reusing them avoids that."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        buf = self._bufs.get(name)
        if (
            buf is None
            or buf.numel() < numel
            or buf.dtype != like.dtype
            or buf.device != like.device
        ):
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._bufs[name] = buf
        return buf[:numel].view(shape)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    q_start: int,
    block: int,
    scale: float,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """Causal attention of ``q`` [H, Lq, D] (positions ``q_start ..``) over ``k``/``v``
    [Hkv, Lk, D] (positions ``0 .. Lk-1``, ``Lk = q_start + Lq``), computing only the key
    blocks ``mask`` [H, nQB, nKB] keeps; the diagonal block is always computed (causal).
    Returns [H, Lq, D].

    On the PyTorch path each (head, query block) row attends in two parts merged by their
    log-sum-exps: its diagonal block (one causal call for all rows, which skips the upper half)
    and its kept earlier blocks, gathered and grouped by their count ``c`` so that one unmasked
    call serves each group: no padding, no mask, no dense score matrix."""
    if kernels.sparse_prefill_usable(q):
        nqb = mask.shape[1]
        mask = mask.clone()
        mask[:, torch.arange(nqb), torch.arange(q_start // block, q_start // block + nqb)] = True
        counts = mask.sum(-1).view(-1)
        row_ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=row_ptr[1:])
        cols = mask.nonzero()[:, 2]  # row-major: each row's kept blocks, in order
        out = kernels.sparse_prefill(
            q.transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            row_ptr,
            cols,
            q_start,
            block,
            scale,
        )
        return out.transpose(0, 1)
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
    out, lse = _attend(q_rows, kd, vd, scale, causal=True)
    off = mask.reshape(rows, nkb).clone()
    off[torch.arange(rows), qb_abs] = False
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
            o, o_lse = _attend(qg, kg.view(n, c * block, head_dim), vg.view(n, -1, head_dim), scale)
            out_off.index_copy_(0, sel, o)
            lse_off.index_copy_(0, sel, o_lse)
    # One softmax over both parts: the earlier blocks' share is sigmoid(lse_off - lse).
    share = torch.sigmoid(lse_off - lse).to(q.dtype).unsqueeze(-1)
    out = out.lerp_(out_off, share.expand_as(out))
    return out.view(num_heads, nqb * block, head_dim)[:, lead : lead + q_len]


def _attend(
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


def _pad(ws: Workspace, name: str, x: torch.Tensor, length: int, lead: int) -> torch.Tensor:
    """``x`` [H, L, D] placed at rows ``lead ..`` of a zeroed [H, length, D] buffer."""
    out = ws.get(name, (x.shape[0], length, x.shape[2]), x)
    if lead:
        out[:, :lead].zero_()
    out[:, lead : lead + x.shape[1]] = x
    out[:, lead + x.shape[1] :].zero_()
    return out
