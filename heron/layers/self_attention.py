"""The self-attention block every decoder family shares: fused Q/K/V projection, optional
per-head q/k RMSNorm (Gemma3), rotary, paged attention (optionally sliding-window), output
projection. Families differ only in the options they pass."""

from __future__ import annotations

import torch
from torch import nn

from heron.layers.attention import AttentionMetadata, paged_attention
from heron.layers.norm import RMSNorm
from heron.layers.rotary import apply_rotary_


class SelfAttention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        scale: float,
        qkv_bias: bool = False,
        qk_norm: tuple[float, float] | None = None,
        sliding: bool = False,
    ) -> None:
        """``qk_norm``: (eps, weight offset) of an RMSNorm applied to each query and key head
        before rotary; ``sliding``: this layer attends only within the step's sliding window."""
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        self.qkv_proj = nn.Linear(hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, hidden_size, bias=False)
        self.scale = scale
        self.sliding = sliding
        self.layer_idx = 0  # set by the runner; selects per-layer KV-compression masks
        self.q_norm = self.k_norm = None
        if qk_norm is not None:
            eps, offset = qk_norm
            self.q_norm = RMSNorm(head_dim, eps, offset)
            self.k_norm = RMSNorm(head_dim, eps, offset)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x).view(t, -1, self.head_dim)  # heads: q, then k, then v
        qk, v = qkv.split([self.num_heads + self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.q_norm is not None:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        q, k = apply_rotary_(qk, cos_sin).split([self.num_heads, self.num_kv_heads], dim=1)
        o = paged_attention(
            q,
            k,
            v,
            kv_cache[0],
            kv_cache[1],
            meta,
            self.scale,
            sliding=self.sliding,
            layer=self.layer_idx,
        )
        return self.o_proj(o.reshape(t, self.q_size))
