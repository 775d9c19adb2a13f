"""TokenSelect (Wu et al.): each decode step attends to only the cached tokens that matter for
its query, chosen per layer by a soft vote of the heads (each query head's softmax attention
over the cached keys, summed over all heads), plus the first ``sinks`` and the last ``recent``
tokens. Selection, not eviction: the cache keeps every token (so prefix caching still works),
and the gain is decode speed at long context, not memory.

Consecutive queries are alike: when a layer's query has cosine similarity at least
``reuse_similarity`` with the query that made the layer's last choice, that choice is reused
(plus the tokens that have left the recent window since) without scoring the cache, and the
step reads only ``budget`` tokens of the whole context.

The budget (``kv_budget``, a fraction of the prompt or a token count) counts every token a
step attends to, sinks and recent window included; a sequence holding no more than that
attends densely. Prefill stays dense."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from heron.kv.compressor import KVState
from heron.kv.policy import KV_POLICIES, KVPolicy
from heron.layers.kv_cache import Cache, ContextKV, gather_slots
from heron.registry import is_number


@KV_POLICIES.register("tokenselect")
@dataclass(eq=False)
class TokenSelect(KVPolicy):
    evicts = False
    selects = True
    sinks: int = 4
    recent: int = 32
    # A query at least this similar (cosine) to the one that made a layer's last choice
    # reuses it; above 1: never.
    reuse_similarity: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        KV_POLICIES.check(
            is_number(self.reuse_similarity),
            "reuse_similarity",
            f"a cosine similarity (a number); got {self.reuse_similarity!r}",
        )

    def score(self, layer, attn, keys, values, acc) -> torch.Tensor:
        """The heads' soft vote: ``attn`` [Hkv, G, 1, S] summed over every query head, one
        score per token that every head shares (so one gather serves the layer)."""
        vote = attn.sum(dim=(0, 1, 2))
        return vote.expand(keys.shape[0], -1)


@dataclass(frozen=True)
class Selection:
    """A layer's last choice for one sequence."""

    query: torch.Tensor  # [H * D] the query that chose, float32
    middle: torch.Tensor  # chosen token indices between the sinks and the recent window
    end: int  # where the recent window began then


@dataclass
class SelectedRows:
    """A decode row that attends through TokenSelect (heron.layers.attention.RowsAttend)."""

    state: KVState  # the sequence's
    slots: torch.Tensor  # the sequence's cache slots in token order [S]

    def attend(self, q: torch.Tensor, ctx: ContextKV, layer: int, scale: float) -> torch.Tensor:
        """q: [1, H, D] (this step's K/V already written to the cache ``ctx`` reads).
        Returns [1, H, D]."""
        k_cache, v_cache = ctx.k, ctx.v
        idx = _choose(self.state, layer, q[0], self.slots, k_cache, scale)
        keys = gather_slots(k_cache, self.slots[idx]).transpose(0, 1)  # [Hkv, n, D]
        values = gather_slots(v_cache, self.slots[idx]).transpose(0, 1)
        num_kv_heads, d = keys.shape[0], keys.shape[2]
        qi = q[0].view(num_kv_heads, -1, d)  # the group's query heads as query rows
        out = F.scaled_dot_product_attention(qi, keys, values, scale=scale)
        return out.view(1, -1, d)


def _choose(
    st, layer: int, q: torch.Tensor, slots: torch.Tensor, k_cache: Cache, scale: float
) -> torch.Tensor:
    """Token indices (into ``slots``) this query attends to: sinks, chosen middle, recent."""
    policy: TokenSelect = st.policy
    held = slots.shape[0]
    end = max(policy.sinks, held - policy.recent)
    flat = q.reshape(-1).float()
    last = st.selection.get(layer)
    if last is not None and F.cosine_similarity(flat, last.query, dim=0) >= policy.reuse_similarity:
        middle = torch.cat([last.middle, torch.arange(last.end, end)])
        st.num_reused += 1
    else:
        keys = gather_slots(k_cache, slots[policy.sinks : end]).transpose(0, 1).float()
        num_kv_heads, d = keys.shape[0], keys.shape[2]
        logits = torch.einsum("hgd,hsd->hgs", flat.view(num_kv_heads, -1, d), keys) * scale
        attn = torch.softmax(logits, dim=-1).unsqueeze(2)  # [Hkv, G, 1, M]
        vote = policy.score(layer, attn, keys, keys, None)[0]
        k = min(max(0, st.target - policy.sinks - policy.recent), vote.shape[0])
        middle = vote.topk(k).indices.sort().values + policy.sinks
        st.selection[layer] = Selection(flat, middle, end)
        st.num_selections += 1
    return torch.cat([torch.arange(min(policy.sinks, held)), middle, torch.arange(end, held)])
