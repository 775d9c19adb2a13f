"""Best-of-n: draw n samples, return the one a scorer ranks highest (by default the mean
token logprob, i.e. the sample the model itself is most sure of)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from heron.outputs import CompletionOutput
from heron.strategies.base import STRATEGIES, Selection, Strategy
from heron.strategies.scorers import Scorer, resolve_scorer


@STRATEGIES.register("best_of_n")
@dataclass
class BestOfN(Strategy):
    """``scorer``: a name from ``scorers.SCORERS`` or a callable (higher is better)."""

    scorer: str | Scorer = "mean_logprob"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._score = resolve_scorer(self.scorer)

    def scores(self, samples: Sequence[CompletionOutput]) -> list[float]:
        return [float(self._score(c)) for c in samples]

    def select(self, samples: Sequence[CompletionOutput]) -> Selection:
        scores = self.scores(samples)
        best = max(range(len(samples)), key=scores.__getitem__)  # ties: the earliest
        return Selection(index=best, score=scores[best])
