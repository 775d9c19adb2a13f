"""Shared fixtures. The real default model (SmolLM2-135M-Instruct GGUF) is loaded once per
session in float32, the precision the parity tests need."""

from __future__ import annotations

import pytest

from heron import LLM
from heron.models.catalog import DEFAULT_MODEL, KNOWN_MODELS


@pytest.fixture(scope="session")
def model_path():
    path = KNOWN_MODELS[DEFAULT_MODEL].locate()
    if path is None:
        pytest.fail(f"default model missing: {KNOWN_MODELS[DEFAULT_MODEL].install_hint}")
    return path


@pytest.fixture(scope="session")
def llm(model_path) -> LLM:
    return LLM(str(model_path), dtype="float32", device="cpu", kv_cache_memory=512 * 2**20)


def make_llm(**kwargs) -> LLM:
    """A separate engine with its own settings (small KV budgets, tiny chunks...)."""
    path = KNOWN_MODELS[DEFAULT_MODEL].locate()
    kwargs.setdefault("kv_cache_memory", 256 * 2**20)
    return LLM(str(path), dtype="float32", device="cpu", **kwargs)
