"""StreamingLLM (Xiao et al., attention sinks): keep the first few tokens (the sinks) and a
window of the most recent ones; evict the middle as decoding goes, so a sequence can generate
for ever in a bounded cache. Keys were rotated at their original positions when written, so
the window's relative positions stay right (heron does not re-assign positions in the cache;
positions past the model's trained range extrapolate RoPE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heron.kv.policy import KV_POLICIES, KVPolicy


@KV_POLICIES.register("streaming_llm")
@dataclass(eq=False)
class StreamingLLM(KVPolicy):
    protect_window = False
    evict_during_decode = True
    sinks: int = 4

    def score(self, layer, attn, keys, values, acc) -> torch.Tensor:
        num_kv_heads, num_slots = keys.shape[0], keys.shape[1]
        recency = torch.arange(num_slots, dtype=torch.float32, device=keys.device)
        return recency.expand(num_kv_heads, num_slots)
