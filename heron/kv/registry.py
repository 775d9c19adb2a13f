"""KV policies by name, as ``EngineConfig.kv_policy``, ``SamplingParams.kv_policy``, the CLI's
``--kv-policy`` and the server body's ``kv_policy`` name them."""

from __future__ import annotations

from heron.errors import InvalidRequestError
from heron.kv.d2o import D2O
from heron.kv.defensivekv import DefensiveKV
from heron.kv.h2o import H2O, Scissorhands
from heron.kv.policy import KVPolicy
from heron.kv.pyramidkv import PyramidKV
from heron.kv.snapkv import SnapKV
from heron.kv.streaming_llm import StreamingLLM
from heron.kv.tokenselect import TokenSelect

POLICIES: dict[str, type[KVPolicy]] = {
    cls.name: cls
    for cls in (StreamingLLM, SnapKV, PyramidKV, DefensiveKV, H2O, Scissorhands, D2O, TokenSelect)
}


def make_policy(name: str, **options) -> KVPolicy:
    cls = POLICIES.get(name)
    if cls is None:
        raise InvalidRequestError(
            f"kv_policy: unknown {name!r}; one of {sorted(POLICIES)}", param="kv_policy"
        )
    try:
        return cls(**options)
    except TypeError as e:
        raise InvalidRequestError(f"kv_policy_options: {e}", param="kv_policy_options") from None
