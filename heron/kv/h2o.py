"""H2O (Zhang et al., heavy hitters) and Scissorhands (Liu et al., persistence of importance):
decode-time eviction from running statistics.

H2O keeps the tokens with the largest attention summed over every query so far (the prompt's
observation window, then each generated token), plus the most recent half of the budget.
Scissorhands counts, per token, how often its attention reached the uniform level 1/t (t =
keys the query saw) and keeps the most often important ones, plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heron.kv.policy import KV_POLICIES, KVPolicy
from heron.registry import is_number


@KV_POLICIES.register("h2o")
@dataclass(eq=False)
class H2O(KVPolicy):
    protect_window = False
    evict_during_decode = True
    needs_decode_queries = True
    accumulates = True
    window: int = 32
    recent_ratio: float = 0.5  # of the budget, always kept

    def __post_init__(self) -> None:
        super().__post_init__()
        KV_POLICIES.check_int("window", self.window, 1)
        KV_POLICIES.check(
            is_number(self.recent_ratio) and 0 <= self.recent_ratio <= 1,
            "recent_ratio",
            f"a share of the budget in [0, 1]; got {self.recent_ratio!r}",
        )

    def accumulate(self, acc, attn) -> torch.Tensor:
        new = attn.sum(dim=(1, 2))  # [Hkv, S]
        return new if acc is None else acc + new

    def score(self, layer, attn, keys, values, acc) -> torch.Tensor:
        return acc


@KV_POLICIES.register("scissorhands")
@dataclass(eq=False)
class Scissorhands(H2O):
    recent_ratio: float = 0.25

    def accumulate(self, acc, attn) -> torch.Tensor:
        seen = (attn > 0).sum(dim=-1, keepdim=True).clamp_min(1)  # keys each query saw
        new = (attn * seen >= 1).sum(dim=(1, 2)).float()
        return new if acc is None else acc + new
