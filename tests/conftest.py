"""Shared fixtures. The real default model (SmolLM2-135M-Instruct GGUF) is loaded once per
session in float32, the precision the parity tests need."""

from __future__ import annotations

import concurrent.futures
import json
import math
import re
import signal
import time

import httpx
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


def assert_shutdown_aborts_what_is_left(proc: ServerProcess) -> None:
    """SIGTERM with a streaming and a non-streaming request that outlive the server's
    --shutdown-timeout: the stream ends with an OpenAI error event, then ``[DONE]``; the other
    gets a 503 with OpenAI's error body; the process exits 0."""
    long = {"prompt": "Tell me a story.", "max_tokens": 3000, "ignore_eos": True}
    url = proc.url + "/v1/completions"
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        httpx.stream("POST", url, json={**long, "stream": True}, timeout=120) as stream,
    ):
        assert stream.status_code == 200
        events = (line for line in stream.iter_lines() if line.startswith("data: "))
        assert "choices" in json.loads(next(events)[6:])  # generating
        whole = pool.submit(httpx.post, url, json=long, timeout=120)
        while _running(proc) < 2:  # both are in the engine's batch
            assert not whole.done(), whole.result().text
            time.sleep(0.1)
        proc.proc.send_signal(signal.SIGTERM)
        rest = list(events)
        r = whole.result()
    assert rest[-1] == "data: [DONE]", rest[-3:]
    error = json.loads(rest[-2][6:])["error"]
    assert error["type"] == "service_unavailable" and "shutting down" in error["message"]
    assert all("choices" in json.loads(e[6:]) for e in rest[:-2])
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "service_unavailable"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert proc.proc.wait(timeout=120) == 0, proc.output()


def _running(proc: ServerProcess) -> float:
    text = httpx.get(proc.url + "/metrics", timeout=60).text
    return float(re.search(r"^heron:num_requests_running\{[^}]*\} (\S+)$", text, re.M).group(1))
