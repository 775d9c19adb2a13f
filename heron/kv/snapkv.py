"""SnapKV (Li et al.): the last ``window`` prompt queries (the observation window) vote for
the earlier keys; their attention is summed over the window, smoothed with a 1-D max-pool
(``kernel``) so a selected token brings its neighbours, and each KV head keeps its top keys
plus the window itself.

GQA: a KV head serves ``group`` query heads; their scores are averaged (as in the paper and
kvpress), ``gqa="max"`` keeps a key any one of them needs.

Why max-pooling with a wide kernel: a pass key's digits are separate tokens and the window's
attention peaks on one or two of them. kvpress's avg-pool dilutes that peak below the
filler's and no pooling keeps only the peak digit, so both lose the key on SmolLM2-135M;
max-pooling keeps the winner's neighbours, and the kernel must cover the whole key sentence
("The pass key is 68142. ..."), not just the digits. A longer window lets more filler
queries vote. Defaults: window 32 (the paper's), kernel 15; ``heron bench kv`` measures them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heron.kv.policy import KV_POLICIES, KVPolicy, group_reduce, pool1d, window_scores


@KV_POLICIES.register("snapkv")
@dataclass(eq=False)
class SnapKV(KVPolicy):
    window: int = 32  # prompt queries that vote (the observation window)
    kernel: int = 15  # max-pool width over the tokens (1: no pooling)
    pooling: str = "max"  # or "avg"
    gqa: str = "mean"  # or "max": how a KV head's query heads combine their votes

    def __post_init__(self) -> None:
        super().__post_init__()
        KV_POLICIES.check_int("window", self.window, 1)
        KV_POLICIES.check_int("kernel", self.kernel, 1)
        KV_POLICIES.check(
            self.pooling in ("max", "avg"), "pooling", f"max or avg; got {self.pooling!r}"
        )
        KV_POLICIES.check(self.gqa in ("mean", "max"), "gqa", f"mean or max; got {self.gqa!r}")

    def score(self, layer, attn, keys, values, acc) -> torch.Tensor:
        scores = window_scores(attn, "sum")  # [Hkv, G, S]
        scores = pool1d(scores, self.kernel, self.pooling)
        return group_reduce(scores, self.gqa)
