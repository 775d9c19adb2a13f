"""Rotary position embedding (the "rotate half" layout used by Hugging Face checkpoints).

Keys are rotated once, when written to the KV cache, so the cache never needs positions."""

import torch
from torch import nn

from heron import kernels
from heron.layers.rope_scaling import RopeScaling


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: RopeScaling | None = None,
    ) -> None:
        """``scaling``: the checkpoint's RoPE scaling (heron.layers.rope_scaling); None:
        plain RoPE."""
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self.scaling = scaling or RopeScaling()
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str = "cpu") -> None:
        """(Re)compute the cos/sin tables; models are built on the meta device, then this."""
        d, s = self.head_dim, self.scaling
        inv_freq, attention_factor = s.frequencies(self.theta, d, device=device)
        t = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        # Where the frequencies depend on the length, position p is rotated for a sequence
        # that ends there (heron.layers.rope_scaling says why that is exact).
        threshold = s.length_threshold
        for p in range(threshold or self.max_positions, self.max_positions):
            freqs[p] = t[p] * s.frequencies(self.theta, d, p + 1, device)[0]
        emb = freqs.repeat(1, 2)
        # rotate_half(x) = roll(x, D/2) with its first half negated: the sign lives in the
        # table, so applying rotary is one roll and three arithmetic ops.
        sign = torch.ones(d, device=device)
        sign[: d // 2] = -1
        self.cos = emb.cos() * attention_factor
        self.sin = emb.sin() * attention_factor * sign

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and (signed) sin for the step's positions [T], shaped [T, 1, D]; computed once
        per step and shared by every layer."""
        cos = self.cos[positions].unsqueeze(1).to(dtype)
        sin = self.sin[positions].unsqueeze(1).to(dtype)
        return cos, sin


def apply_rotary_(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotates x [T, heads, D] (queries, keys, or both side by side) in place and returns it;
    on CPU in one op from heron's kernels (same rounding as the PyTorch fallback)."""
    cos, signed_sin = cos_sin
    if x.stride(-1) == 1 and kernels.usable(x):
        kernels.rotary_(x, cos, signed_sin)
        return x
    return x.copy_(x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin)
