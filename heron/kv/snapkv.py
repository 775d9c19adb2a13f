"""SnapKV (Li et al.): the last ``window`` prompt queries (the observation window) vote for
the earlier keys; their attention is summed over the window, smoothed with a 1-D max-pool
(``kernel``) so a selected token brings its neighbours, and each KV head keeps its top keys
plus the window itself.

GQA: a KV head serves ``group`` query heads. The paper (and kvpress) average their scores;
``gqa="max"`` keeps a key any one of them needs — on a small GQA model (SmolLM2-135M: 9 query
heads over 3 KV heads) the few retrieval heads are outvoted by the mean (see bench kv)."""

from __future__ import annotations

import torch

from heron.kv.policy import KVPolicy, group_reduce, pool1d, window_scores


class SnapKV(KVPolicy):
    name = "snapkv"
    window = 32
    kernel = 7
    pooling = "max"
    gqa = "mean"

    def score(self, layer, attn, keys, values, acc) -> torch.Tensor:
        scores = window_scores(attn, "sum")  # [Hkv, G, S]
        scores = pool1d(scores, self.kernel, self.pooling)
        return group_reduce(scores, self.gqa)
