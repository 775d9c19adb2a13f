"""DefensiveKV (Feng et al., the fragility of mean aggregation): a token's importance is the
*largest* attention any observation-window query (and any query head of its GQA group) paid
it, not the mean, so a token one query needs badly is not averaged away; a small floor times
the mean keeps a tie-breaker among tokens nobody needs much."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heron.kv.policy import KV_POLICIES, KVPolicy, pool1d
from heron.registry import is_number


@KV_POLICIES.register("defensivekv")
@dataclass(eq=False)
class DefensiveKV(KVPolicy):
    window: int = 32
    kernel: int = 15  # as SnapKV
    floor: float = 0.01  # weight of the mean attention (the tie-breaker)

    def __post_init__(self) -> None:
        super().__post_init__()
        KV_POLICIES.check_int("window", self.window, 1)
        KV_POLICIES.check_int("kernel", self.kernel, 1)
        KV_POLICIES.check(
            is_number(self.floor) and self.floor >= 0, "floor", f"a number >= 0; got {self.floor!r}"
        )

    def score(self, layer, attn, keys, values, acc) -> torch.Tensor:
        worst = attn.amax(dim=(1, 2))  # [Hkv, S]
        mean = attn.mean(dim=(1, 2))
        return pool1d(worst + self.floor * mean, self.kernel, "max")
