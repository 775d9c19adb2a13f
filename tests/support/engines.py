"""Engines of a model as the tests build them (conftest's ``llm`` and ``heron_runner``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from heron import LLM


def make_llm(model_path: Path, **kwargs: Any) -> LLM:
    """An engine of ``model_path`` with its own settings (small KV budgets, tiny chunks...);
    float32 on CPU with 256 MiB of KV cache unless ``kwargs`` say otherwise."""
    kwargs.setdefault("kv_cache_memory", 256 * 2**20)
    kwargs.setdefault("dtype", "float32")
    return LLM(str(model_path), device="cpu", **kwargs)
