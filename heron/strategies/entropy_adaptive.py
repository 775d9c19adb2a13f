"""Entropy-adaptive decoding (EAD): a cheap model generates the easy stretches of a completion
and the full model the uncertain ones, switching on the rolling mean of the next-token entropy.

``EntropyAdaptive`` carries the options (a request's ``SamplingParams.token_strategy``);
``EntropyAdaptiveDecoding`` is the engine's half.

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

import math
from collections import deque
from dataclasses import dataclass, field

import torch

from heron.engine.plugin import EngineParts, EnginePlugin, register_plugin
from heron.engine.sequence import Request, Sequence
from heron.errors import InvalidRequestError
from heron.registry import is_int, is_number
from heron.speculative.layer_skip import default_kept_layers, spread_layers
from heron.strategies.base import STRATEGIES, TokenStrategy, check_option


def _positive_int(value: object) -> bool:
    return is_int(value) and value >= 1


@STRATEGIES.register("entropy_adaptive")
@dataclass
class EntropyAdaptive(TokenStrategy):
    """``threshold``: rolling mean entropy (nats) at or above which the full model draws;
    0 = always the full model. ``window``: tokens in the rolling mean. ``min_span``: tokens
    a model keeps before a switch away from it. ``cheap_layers``: layers of the cheap model
    (default 5/6 of them, spread over depth)."""

    threshold: float = 1.0
    window: int = 4
    min_span: int = 8
    cheap_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option(
            is_number(self.threshold) and 0 <= self.threshold < math.inf,
            "threshold",
            f"entropy in nats, finite and >= 0; got {self.threshold!r}",
        )
        check_option(_positive_int(self.window), "window", f"an integer >= 1; got {self.window!r}")
        check_option(
            _positive_int(self.min_span), "min_span", f"an integer >= 1; got {self.min_span!r}"
        )
        check_option(
            self.cheap_layers is None or _positive_int(self.cheap_layers),
            "cheap_layers",
            f"an integer >= 1; got {self.cheap_layers!r}",
        )


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


@register_plugin
class EntropyAdaptiveDecoding(EnginePlugin):
    """The engine's half of EAD: each sequence's ``ModelSwitch``, the cheap model's layers
    for its decode rows, and the rewind to the full model."""

    name = "entropy_adaptive"

    def __init__(self, parts: EngineParts) -> None:
        super().__init__(parts)
        self.switches: dict[int, ModelSwitch] = {}
        self.rewinds: set[int] = set()  # sequences the full model takes back next step

    def add_request(self, req: Request, seq: Sequence) -> list[Sequence]:
        p = req.params
        ead = p.token_strategy
        if not isinstance(ead, EntropyAdaptive):
            return []
        if self.parts.multi_token_steps:
            raise InvalidRequestError(
                "strategy: entropy-adaptive decoding cannot be combined with speculative "
                "decoding (the engine runs with a speculative method)",
                param="strategy",
            )
        if p.kv_policy not in (None, "none") or self.parts.config.kv_policy is not None:
            raise InvalidRequestError(
                "strategy: entropy-adaptive decoding cannot be combined with KV compression "
                "(the full model recomputes the cheap model's positions)",
                param="strategy",
            )
        num_layers = self.parts.model_config.num_layers
        keep = ead.cheap_layers or default_kept_layers(num_layers)
        layers = spread_layers(num_layers, keep, STRATEGIES.options_param, "cheap_layers")
        switch = ModelSwitch(layers, float(ead.threshold), ead.window, ead.min_span)
        self.switches[seq.seq_id] = switch
        req.metrics.update(switch.metrics())
        return []

    def before_schedule(self, running: list[Sequence]) -> None:
        """A sequence that switched back to the full model is rewound to the first position
        the cheap model wrote, so the full model recomputes them."""
        for seq in running:
            if seq.seq_id not in self.rewinds:
                continue
            self.rewinds.discard(seq.seq_id)
            sw = self.switches[seq.seq_id]
            if sw.cheap_start is not None:
                sw.num_recomputed_tokens += seq.num_computed_tokens - sw.cheap_start
                seq.num_computed_tokens = sw.cheap_start
                sw.cheap_start = None
                seq.request.metrics.update(sw.metrics())

    def layers(self, seq: Sequence, n: int) -> list[int] | None:
        """The cheap model's layers for a decode row while it draws (remembering where its
        K/V begin)."""
        sw = self.switches.get(seq.seq_id)
        if sw is None or not sw.cheap or n != 1 or seq.num_computed_tokens == 0:
            return None
        if sw.cheap_start is None:
            sw.cheap_start = seq.num_computed_tokens
        return sw.layers

    def blocks_exact(self, seq: Sequence) -> bool:
        """Blocks the cheap model wrote lack the skipped layers' K/V."""
        sw = self.switches.get(seq.seq_id)
        return sw is None or sw.cheap_start is None

    def token_sampled(self, seq: Sequence, token: int, logits: torch.Tensor) -> None:
        sw = self.switches.get(seq.seq_id)
        if sw is None:
            return
        if sw.observe(entropy(logits)) and not sw.cheap:
            self.rewinds.add(seq.seq_id)
        seq.request.metrics.update(sw.metrics())

    def preempted(self, seq: Sequence) -> None:
        sw = self.switches.get(seq.seq_id)
        if sw is not None:  # the recomputation is the full model's
            sw.cheap_start = None
            self.rewinds.discard(seq.seq_id)

    def finished(self, seq: Sequence) -> None:
        self.switches.pop(seq.seq_id, None)
        self.rewinds.discard(seq.seq_id)
