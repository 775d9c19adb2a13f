"""H2O (Zhang et al., heavy hitters) and Scissorhands (Liu et al., persistence of importance):
decode-time eviction from running statistics.

H2O keeps the tokens with the largest attention summed over every query so far (the prompt's
observation window, then each generated token), plus the most recent half of the budget.
Scissorhands counts, per token, how often its attention reached the uniform level 1/t (t =
keys the query saw) and keeps the most often important ones, plus a recent window."""

from __future__ import annotations

import torch

from heron.kv.policy import KVPolicy


class H2O(KVPolicy):
    name = "h2o"
    window = 32
    recent_ratio = 0.5  # of the budget, always kept
    protect_window = False
    evict_during_decode = True
    needs_decode_queries = True
    accumulates = True

    def accumulate(self, acc, attn) -> torch.Tensor:
        new = attn.sum(dim=(1, 2))  # [Hkv, S]
        return new if acc is None else acc + new

    def score(self, layer, attn, keys, values, acc) -> torch.Tensor:
        return acc


class Scissorhands(H2O):
    name = "scissorhands"
    recent_ratio = 0.25

    def accumulate(self, acc, attn) -> torch.Tensor:
        seen = (attn > 0).sum(dim=-1, keepdim=True).clamp_min(1)  # keys each query saw
        new = (attn * seen >= 1).sum(dim=(1, 2)).float()
        return new if acc is None else acc + new
