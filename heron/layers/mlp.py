"""Gated feed-forward block (SwiGLU for Llama/Qwen2, GeGLU-tanh for Gemma3).

Gate and up projections are fused into one matmul at load time (``gate_up_proj``)."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from heron import kernels


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (Gemma3's GeGLU)."""
    return F.gelu(x, approximate="tanh")


class GatedMLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        act: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.act is F.silu and gate_up.dim() == 2 and kernels.usable(gate_up):
            return self.down_proj(kernels.silu_mul(gate_up))  # one pass, no temporaries
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)
