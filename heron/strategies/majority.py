"""Majority vote (self-consistency): extract each sample's final answer and return the most
frequent one, with its vote share. Samples without an answer count in the total but vote
for nothing; ties go to the answer that appeared first."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from heron.outputs import CompletionOutput
from heron.strategies.answers import AnswerExtractor
from heron.strategies.base import STRATEGIES, Selection, Strategy


@dataclass
class Votes:
    """Each sample's answer and the count of each answer."""

    answers: list[str | None]
    counts: Counter[str]

    @property
    def winner(self) -> str | None:
        if not self.counts:
            return None
        return max(self.counts, key=lambda a: (self.counts[a], -self.answers.index(a)))

    def share(self, answer: str | None) -> float:
        return self.counts[answer] / len(self.answers) if answer is not None else 0.0


@STRATEGIES.register("majority")
@dataclass
class Majority(Strategy):
    """``answer``: "auto", "boxed" or "number" (see ``answers``); ``answer_regex``: a regex
    whose last match (group 1 if it has groups) is the answer, used instead."""

    answer: str = "auto"
    answer_regex: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.extract = AnswerExtractor(self.answer, self.answer_regex)

    def votes(self, samples: Sequence[CompletionOutput]) -> Votes:
        answers = [self.extract(c.text) for c in samples]
        return Votes(answers, Counter(a for a in answers if a is not None))

    def select(self, samples: Sequence[CompletionOutput]) -> Selection:
        votes = self.votes(samples)
        winner = votes.winner
        index = votes.answers.index(winner) if winner is not None else 0
        return Selection(
            index=index, answer=winner, vote_share=votes.share(winner), votes=dict(votes.counts)
        )
