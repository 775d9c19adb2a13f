"""RMSNorm computed in float32 and cast back, as the reference implementations do.

On CPU it runs as one fused op from heron's kernels (``heron.kernels.rms_norm``, which rounds
at the same points as the PyTorch code below); elsewhere, or without a compiler, as PyTorch
ops."""

import torch
import torch.nn.functional as F
from torch import nn

from heron import kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        # Gemma stores (weight - 1) and scales in float32; offset=1.0 selects that convention.
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fused(x):
            return kernels.rms_norm(x, self.weight, self.eps, self.offset)[0]
        return self._norm(x)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + residual, norm(x + residual))``: a residual add and the norm after it, in one
        pass over the rows where the kernels run."""
        if _fused(x):
            total, normed = kernels.rms_norm(x, self.weight, self.eps, self.offset, residual)
            return total, normed
        total = x + residual
        return total, self._norm(total)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is x * rsqrt(mean(x^2) + eps) in one op (five in eager arithmetic).
        if x.dtype == torch.float32 and not self.offset:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        if self.offset:
            return ((self.weight.float() + self.offset) * h).to(x.dtype)
        return self.weight * h.to(x.dtype)  # the weight scales the rounded value, as in HF


def _fused(x: torch.Tensor) -> bool:
    return x.dim() in (2, 3) and x.stride(-1) == 1 and kernels.usable(x)
