"""Entropy-adaptive decoding (EAD): a cheap model generates while the next-token entropy is
low, the full model while it is high.

The cheap model is the target with only some of its layers (``heron.speculative.layer_skip``'s
even spread; no second model of the same tokenizer ships here), so both share one paged cache.
A cheap step writes K/V only for its kept layers; the skipped layers' K/V of those positions
do not exist. So when a sequence switches back to the full model, the positions the cheap
model wrote are recomputed by the full model (one prefill chunk, batched like any other, the
full model's logits of its last row choosing the next token) before it goes on: from then
on the cache is exactly what plain decoding would hold. That recomputation is the price of
a switch, hence ``min_span``: each model keeps at least that many tokens.

The prompt and the first token always go through the full model; the rolling mean of the
entropy of the distributions tokens were drawn from decides, after each token, which model
draws the next."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch


def entropy(logits: torch.Tensor) -> float:
    """Entropy in nats of softmax(logits) for one row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float(-(logp.exp() * logp).sum())


@dataclass
class ModelSwitch:
    """One sequence's state: which model draws its next token, and what it spent."""

    layers: list[int]  # the cheap model's layers
    threshold: float  # rolling mean entropy (nats) at or above which the full model draws
    window: int
    min_span: int
    cheap: bool = False
    span: int = 0  # tokens drawn since the last switch
    # First position whose K/V the cheap model wrote (None: the cache is all full-model).
    cheap_start: int | None = None
    recent: deque[float] = field(default_factory=deque)
    num_cheap_tokens: int = 0
    num_full_tokens: int = 0
    num_switches: int = 0
    num_recomputed_tokens: int = 0
    modes: list[bool] = field(default_factory=list)  # per generated token: drawn cheaply?

    def observe(self, token_entropy: float) -> bool:
        """Record the token just drawn (by the current model) and its distribution's
        entropy; returns True when the next token goes to the other model."""
        self.modes.append(self.cheap)
        if self.cheap:
            self.num_cheap_tokens += 1
        else:
            self.num_full_tokens += 1
        self.recent.append(token_entropy)
        if len(self.recent) > self.window:
            self.recent.popleft()
        self.span += 1
        if self.span < self.min_span:
            return False
        uncertain = sum(self.recent) / len(self.recent) >= self.threshold
        if uncertain == self.cheap:  # cheap and uncertain, or full and confident
            self.cheap = not self.cheap
            self.span = 0
            self.num_switches += 1
            return True
        return False

    def metrics(self) -> dict[str, float]:
        return {
            "ead_cheap_tokens": self.num_cheap_tokens,
            "ead_full_tokens": self.num_full_tokens,
            "ead_switches": self.num_switches,
            "ead_recomputed_tokens": self.num_recomputed_tokens,
        }
