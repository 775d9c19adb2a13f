"""Entropy-adaptive decoding: a cheap model generates the easy stretches of a completion and
the full model the uncertain ones, switching on the rolling mean of the next-token entropy.
Here the cheap model is the full one with layers skipped (no second model with the same
tokenizer ships with heron). The engine does the work (``heron.engine.model_switch``); this
class only carries the options."""

from __future__ import annotations

from dataclasses import dataclass, replace

from heron.config import SamplingParams
from heron.strategies.base import TokenStrategy, check_option


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class EntropyAdaptive(TokenStrategy):
    """``threshold``: rolling mean entropy (nats) at or above which the full model draws;
    0 = always the full model. ``window``: tokens in the rolling mean. ``min_span``: tokens
    a model keeps before a switch away from it. ``cheap_layers``: layers of the cheap model
    (default 5/6 of them, spread over depth)."""

    name = "entropy_adaptive"
    threshold: float = 1.0
    window: int = 4
    min_span: int = 8
    cheap_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option(
            isinstance(self.threshold, int | float) and self.threshold >= 0,
            "threshold",
            f"entropy in nats, >= 0; got {self.threshold!r}",
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

    def request_params(self, params: SamplingParams) -> SamplingParams:
        return replace(
            params,
            entropy_threshold=float(self.threshold),
            entropy_window=self.window,
            entropy_min_span=self.min_span,
            cheap_layers=self.cheap_layers,
        )
