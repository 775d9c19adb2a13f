"""The method families an ``EngineConfig`` names, each by its registry (heron.registry): the
registry's ``kind`` and ``options_param`` are the config's fields for the method's name and
options. Front ends check them here before a model loads; the engine builds (and so checks)
each method again where it uses it."""

from __future__ import annotations

from heron.config import EngineConfig
from heron.kv.registry import KV_POLICIES
from heron.registry import Registry
from heron.sparse.patterns import SPARSE_PATTERNS
from heron.speculative.registry import PROPOSERS

ENGINE_METHODS: tuple[Registry, ...] = (KV_POLICIES, PROPOSERS, SPARSE_PATTERNS)


def check_engine_methods(config: EngineConfig) -> None:
    """Each method the config names, built from its options: an unknown name, an unknown
    option or a bad value raises the registry's ``InvalidRequestError``."""
    for registry in ENGINE_METHODS:
        name = getattr(config, registry.kind)
        if name is not None:
            registry.make(name, getattr(config, registry.options_param))
