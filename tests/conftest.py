"""Shared fixtures. The real default model (SmolLM2-135M-Instruct GGUF) is loaded once per
session in float32, the precision the parity tests need."""

from __future__ import annotations

import math

import pytest
import torch

from heron import LLM
from heron.errors import HeronError
from heron.models.catalog import DEFAULT_MODEL, KNOWN_MODELS
from heron.server.process import ServerProcess


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
    """A separate engine with its own settings (small KV budgets, tiny chunks...); float32 on
    CPU unless ``dtype`` says otherwise."""
    path = KNOWN_MODELS[DEFAULT_MODEL].locate()
    kwargs.setdefault("kv_cache_memory", 256 * 2**20)
    kwargs.setdefault("dtype", "float32")
    return LLM(str(path), device="cpu", **kwargs)


def poison_logits(
    monkeypatch: pytest.MonkeyPatch, llm: LLM, prompt: str, value: float, after: int = 0
) -> None:
    """The model's logits for the request of ``prompt`` hold ``value`` once it has generated
    ``after`` tokens (a NaN or inf from the model, as an overflow would give)."""
    runner = llm.engine.runner
    ids = llm.get_tokenizer().encode(prompt)
    execute = runner.execute

    def poisoned(*args, **kwargs):
        result = execute(*args, **kwargs)
        for row, seq in enumerate(result.sample_seqs):
            if seq.request.prompt_token_ids == ids and len(seq.output_token_ids) >= after:
                with torch.inference_mode():  # -inf everywhere: nothing left to draw
                    result.sample_logits[row, :: 1 if value == -math.inf else 1000] = value
        return result

    monkeypatch.setattr(runner, "execute", poisoned)


# ---------------------------------------------------------------------------- server
SERVER_MAX_BYTES = 2**20  # the session server's --max-request-bytes


def start_server(*args: str) -> ServerProcess:
    """A real `heron serve` subprocess (float32 on CPU, 256 MiB of KV cache)."""
    base = ["--dtype", "float32", "--device", "cpu", "--kv-cache-memory", str(256 * 2**20)]
    try:
        return ServerProcess(*base, *args, ready_timeout=180)
    except HeronError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def server():
    proc = start_server("--max-num-seqs", "64", "--max-request-bytes", str(SERVER_MAX_BYTES))
    yield proc
    proc.stop()
