"""Decoding strategies over one request's group of samples (inference-time scaling):
best-of-n, majority vote, best-of-majority, adaptive sampling; and per-token strategies the
engine applies to one sample: context-aware and entropy-adaptive decoding. See ``base`` and
``run``."""

from heron.strategies.adaptive import Adaptive
from heron.strategies.answers import AnswerExtractor
from heron.strategies.base import Selection, Strategy, TokenStrategy
from heron.strategies.best_of_majority import BestOfMajority
from heron.strategies.best_of_n import BestOfN
from heron.strategies.context_aware import ContextAware
from heron.strategies.entropy_adaptive import EntropyAdaptive
from heron.strategies.majority import Majority
from heron.strategies.registry import STRATEGIES, make_strategy
from heron.strategies.run import StrategyRun

__all__ = [
    "STRATEGIES",
    "Adaptive",
    "AnswerExtractor",
    "BestOfMajority",
    "BestOfN",
    "ContextAware",
    "EntropyAdaptive",
    "Majority",
    "Selection",
    "Strategy",
    "StrategyRun",
    "TokenStrategy",
    "make_strategy",
]
