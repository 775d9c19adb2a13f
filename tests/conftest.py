"""Fixtures for every test folder: the real default model (SmolLM2-135M-Instruct GGUF) in
float32, the precision the parity tests need, as one engine for the session (``llm``) and as
engines with their own settings (``heron_runner``). A folder's own conftest.py adds what only
it uses (tests/integration: ``transformers_runner``; tests/server: ``server``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest

from heron import LLM
from heron.models.catalog import DEFAULT_MODEL, KNOWN_MODELS
from tests.support.engines import make_llm


@pytest.fixture(scope="session")
def model_path() -> Path:
    path = KNOWN_MODELS[DEFAULT_MODEL].locate()
    if path is None:
        pytest.fail(f"default model missing: {KNOWN_MODELS[DEFAULT_MODEL].install_hint}")
    return path


@pytest.fixture(scope="session")
def heron_runner(model_path) -> Callable[..., LLM]:
    """Builds a separate engine of the default model with its own settings, e.g.
    ``heron_runner(max_num_batched_tokens=24)``: float32 on CPU with 256 MiB of KV cache
    unless told otherwise."""
    return functools.partial(make_llm, model_path)


@pytest.fixture(scope="session")
def llm(heron_runner) -> LLM:
    """The session's engine (512 MiB of KV cache), for tests that leave it as they found it."""
    return heron_runner(kv_cache_memory=512 * 2**20)
