"""RMSNorm computed in float32 and cast back, as the reference implementations do."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        # Gemma stores (weight - 1) and scales in float32; offset=1.0 selects that convention.
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is x * rsqrt(mean(x^2) + eps) in one op (five in eager arithmetic).
        if x.dtype == torch.float32 and not self.offset:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        if self.offset:
            return ((self.weight.float() + self.offset) * h).to(x.dtype)
        return self.weight * h.to(x.dtype)  # the weight scales the rounded value, as in HF
