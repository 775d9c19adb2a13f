"""Strategies by name, for ``LLM.generate(strategy=...)``, the CLI and the server."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from heron.errors import InvalidRequestError
from heron.strategies.adaptive import Adaptive
from heron.strategies.base import Strategy
from heron.strategies.best_of_majority import BestOfMajority
from heron.strategies.best_of_n import BestOfN
from heron.strategies.context_aware import ContextAware
from heron.strategies.entropy_adaptive import EntropyAdaptive
from heron.strategies.majority import Majority

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (BestOfN, Majority, BestOfMajority, Adaptive, ContextAware, EntropyAdaptive)
}


def make_strategy(
    spec: str | Strategy, n: int = 1, options: dict[str, Any] | None = None
) -> Strategy:
    """A strategy from its name, ``n`` samples and its options; an instance passes through
    (its own ``n`` rules, so a different ``n`` > 1 given beside it is an error)."""
    if isinstance(spec, Strategy):
        if options:
            raise InvalidRequestError(
                "strategy_options: give options to the strategy's constructor instead",
                param="strategy_options",
            )
        if n not in (1, spec.n):
            raise InvalidRequestError(
                f"n: the strategy draws its own n={spec.n} samples; leave n at 1 or set it "
                f"to {spec.n}",
                param="n",
            )
        return spec
    cls = STRATEGIES.get(spec) if isinstance(spec, str) else None
    if cls is None:
        raise InvalidRequestError(
            f"strategy: unknown strategy {spec!r}; known: {', '.join(STRATEGIES)}",
            param="strategy",
        )
    options = dict(options or {})
    allowed = [f.name for f in fields(cls) if f.init and f.name != "n"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise InvalidRequestError(
            f"strategy_options: {', '.join(unknown)} not an option of {spec}; "
            f"its options: {', '.join(allowed)}",
            param="strategy_options",
        )
    return cls(n=n, **options)


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings (the CLI's) as options: a JSON value (number, true, null...)
    where the value parses as one, else the plain string."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidRequestError(
                f"--strategy-option: expected KEY=VALUE, got {pair!r}", param="strategy_options"
            )
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options
