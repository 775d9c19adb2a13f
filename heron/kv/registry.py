"""KV policies by name (``policy.KV_POLICIES``), as ``EngineConfig.kv_policy``,
``SamplingParams.kv_policy``, the CLI's ``--kv-policy`` and the server body's ``kv_policy``
name them, with their options (``kv_policy_options``). Importing this module registers every
policy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import heron.kv.d2o  # noqa: F401  (each policy registers in its module)
import heron.kv.defensivekv  # noqa: F401
import heron.kv.h2o  # noqa: F401
import heron.kv.pyramidkv  # noqa: F401
import heron.kv.snapkv  # noqa: F401
import heron.kv.streaming_llm  # noqa: F401
import heron.kv.tokenselect  # noqa: F401
from heron.kv.policy import KV_POLICIES, KVPolicy

__all__ = ["KV_POLICIES", "make_policy"]


def make_policy(name: str, options: Mapping[str, Any] | None = None) -> KVPolicy:
    return KV_POLICIES.make(name, options)
