"""Context-aware decoding (Shi et al., 2023): amplify what the context says over what the
model believes without it. The prompt also runs without ``context`` in lockstep, and each
token is drawn from (1 + alpha) * logits(with context) - alpha * logits(without); alpha = 0
is plain decoding. Use it when the context should override the model's prior (a document
that contradicts what the model memorised). The engine does the work
(``heron.engine.context_aware``); this class only carries the options."""

from __future__ import annotations

from dataclasses import dataclass, replace

from heron.config import SamplingParams
from heron.strategies.base import TokenStrategy, check_option


@dataclass
class ContextAware(TokenStrategy):
    """``context``: the exact text of the context inside the prompt (required);
    ``alpha``: how strongly the context-free prediction is subtracted."""

    name = "cad"
    context: str | None = None
    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option(
            isinstance(self.context, str) and self.context != "",
            "context",
            "the text of the context inside the prompt is required (the part to leave out "
            "of the context-free run)",
        )
        check_option(
            isinstance(self.alpha, int | float) and self.alpha >= 0,
            "alpha",
            f"a number >= 0; got {self.alpha!r}",
        )

    def request_params(self, params: SamplingParams) -> SamplingParams:
        return replace(params, cad_context=self.context, cad_alpha=float(self.alpha))
