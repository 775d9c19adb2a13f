"""D2O (Wan et al., 2024, dynamic discriminative operations): evict like the attention-score
policies, but (1) give each layer a budget from how its attention is spread, and (2) do not
simply drop an evicted token: merge it into its most similar kept token.

* Scoring: SnapKV's (the observation window's summed attention, max-pooled; the window
  kept): the paper's H2O-style sum without pooling loses the pass keys on SmolLM2-135M at
  small budgets, for the reason ``snapkv`` explains. Compression happens once the prompt
  is in (no decode-time eviction here).
* Layer budgets (``budget_from_attention``, off by default): a layer whose window attention
  is spread over many tokens (low variance) gets more than one that attends to a few; budgets
  follow 1 / variance, keep the uniform total and stay within [budget / 2, 2 * budget]. As
  with PyramidKV a sequence then holds its largest layer's budget in slots (one block table
  for all layers), twice the memory, and on the passkey bench it retrieved less than
  uniform budgets: the peaky (high-variance) layers are the ones that retrieve the key, and
  they lose budget.
* Merging: per layer and head, each evicted token's key is compared (cosine) with the kept
  keys; when its best similarity reaches the threshold (the mean best similarity of that
  head's evicted tokens, the paper's running average taken over one compression) its key and
  value are averaged into that kept token, weighted by the similarity."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from heron.kv.policy import KV_POLICIES
from heron.kv.snapkv import SnapKV


@KV_POLICIES.register("d2o")
@dataclass(eq=False)
class D2O(SnapKV):
    budget_from_attention: bool = False  # see the module docstring: retrieves less here

    def __post_init__(self) -> None:
        super().__post_init__()
        KV_POLICIES.check(
            isinstance(self.budget_from_attention, bool),
            "budget_from_attention",
            f"true or false; got {self.budget_from_attention!r}",
        )

    def layer_weight(self, attn: torch.Tensor) -> float:
        """1 / variance of the layer's mean window attention over the held tokens."""
        dist = attn.mean(dim=(0, 1, 2))  # [S]
        return 1.0 / (float(dist.var()) + 1e-12)

    def layer_budgets(
        self, budget: int, num_layers: int, weights: list[float] | None = None
    ) -> list[int]:
        if weights is None:
            return [budget] * num_layers
        w = torch.tensor(weights, dtype=torch.float64)
        raw = (budget * num_layers * w / w.sum()).clamp(budget / 2, 2 * budget)
        return [max(1, round(float(b))) for b in raw]

    def merge(
        self, keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """keys/values [Hkv, S, D]; kept [Hkv, b] token indices; valid [S]. Returns the kept
        tokens' keys and values [Hkv, b, D] with the similar evicted tokens merged in."""
        num_heads, held, dim = keys.shape
        index = kept[..., None].expand(-1, -1, dim)
        k_kept, v_kept = keys.gather(1, index), values.gather(1, index)
        evicted = valid[None, :].expand(num_heads, held).clone()
        evicted.scatter_(1, kept, False)
        if not bool(evicted.any()):
            return k_kept, v_kept
        sim = F.normalize(keys, dim=-1) @ F.normalize(k_kept, dim=-1).transpose(1, 2)
        best, target = sim.max(dim=-1)  # [Hkv, S]: most similar kept token
        counts = evicted.sum(dim=1).clamp_min(1)
        threshold = torch.where(evicted, best, 0.0).sum(dim=1) / counts  # [Hkv]
        weight = torch.where(evicted & (best >= threshold[:, None]) & (best > 0), best, 0.0)
        total = torch.ones_like(weight[:, : kept.shape[1]]).scatter_add_(1, target, weight)
        tgt = target[..., None].expand(-1, -1, dim)
        k_sum = k_kept.clone().scatter_add_(1, tgt, weight[..., None] * keys)
        v_sum = v_kept.clone().scatter_add_(1, tgt, weight[..., None] * values)
        return k_sum / total[..., None], v_sum / total[..., None]
