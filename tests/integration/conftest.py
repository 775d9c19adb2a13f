"""Fixtures of the integration tests: transformers as the reference heron is held to."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support.parity import transformers_reference


@pytest.fixture(scope="session")
def transformers_runner() -> Callable[..., list[dict]]:
    """transformers' greedy tokens, top-2 gaps and prompt logprobs on a GGUF dequantized to
    float32: ``transformers_runner(model_path, prompt_ids, max_new, eos_token_ids)``."""
    return transformers_reference
