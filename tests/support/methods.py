"""Method families' registries as the tests drive them: a method of each family with its bad
options, and the error every front end (Python, the CLI, the server) must give for each bad
case."""

from __future__ import annotations

from heron.kv.registry import KV_POLICIES
from heron.sparse.patterns import SPARSE_PATTERNS
from heron.speculative.registry import PROPOSERS
from heron.strategies import STRATEGIES

# (family's registry, a method, its bad options: unknown option, bad value, the option named)
FAMILIES = [
    (KV_POLICIES, "snapkv", {"width": 8}, {"window": 0}, "window"),
    (PROPOSERS, "ngram", {"depth": 2}, {"ngram_min": 0}, "ngram_min"),
    (SPARSE_PATTERNS, "xattention", {"last_q": 8}, {"threshold": 1.5}, "threshold"),
    (STRATEGIES, "majority", {"temperature": 1}, {"answer": "essay"}, "answer"),
]
IDS = [f[0].kind for f in FAMILIES]


def error_cases(registry, method, unknown, bad, option):
    """(settings, the parameter named, a piece of the message) of each bad case."""
    return [
        (("nope", None), registry.kind, f"unknown {registry.kind.replace('_', ' ')} 'nope'"),
        ((method, unknown), registry.options_param, f"not an option of {method}"),
        ((method, bad), registry.options_param, f"{registry.options_param}.{option}:"),
    ]
