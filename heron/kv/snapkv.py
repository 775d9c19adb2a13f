"""SnapKV (Li et al.): the last ``window`` prompt queries (the observation window) vote for
the earlier keys; their attention is summed over the window, smoothed with a 1-D max-pool
(``kernel``) so a selected token brings its neighbours, and each KV head keeps its top keys
plus the window itself.

GQA: a KV head serves ``group`` query heads; their scores are averaged (as in the paper and
kvpress), ``gqa="max"`` keeps a key any one of them needs.

Why SnapKV collapses on SmolLM2-135M in kvpress (passkey, 0/8 at 10-20%): most likely the
pooling (only 3 cases measured; the kvpress-like run also used window 64). The
pass key's digits are separate tokens and the window's attention peaks on one or two of
them; kvpress's avg-pool (kernel 5, window 64) dilutes that peak below the filler's, and no
pooling keeps only the peak digit. Max-pooling (kernel 7, as here) keeps the whole number
span. Measured with heron on the bench's passkey cases (1k tokens, 10% kept): kvpress-like
settings 0/3, no pooling 0/3 (answers "6"), ``gqa="max"`` 0/3 (3 of 5 digits), these
defaults 2/3.
"""

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
