"""DefensiveKV (Feng et al., the fragility of mean aggregation): a token's importance is the
*largest* attention any observation-window query (and any query head of its GQA group) paid
it, not the mean, so a token one query needs badly is not averaged away; a small floor times
the mean keeps a tie-breaker among tokens nobody needs much."""

from __future__ import annotations

import torch

from heron.kv.policy import KVPolicy, pool1d


class DefensiveKV(KVPolicy):
    name = "defensivekv"
    window = 32
    kernel = 15  # as SnapKV
    floor = 0.01

    def score(self, layer, attn, keys, values, acc) -> torch.Tensor:
        worst = attn.amax(dim=(1, 2))  # [Hkv, S]
        mean = attn.mean(dim=(1, 2))
        return pool1d(worst + self.floor * mean, self.kernel, "max")
