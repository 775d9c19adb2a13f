"""KV policies by name (``policy.KV_POLICIES``), as ``EngineConfig.kv_policy``,
``SamplingParams.kv_policy``, the CLI's ``--kv-policy`` and the server body's ``kv_policy``
name them, with their options (``kv_policy_options``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from heron.kv.policy import KV_POLICIES, KVPolicy

__all__ = ["KV_POLICIES", "make_policy"]


def make_policy(name: str, options: Mapping[str, Any] | None = None) -> KVPolicy:
    return KV_POLICIES.make(name, options)
