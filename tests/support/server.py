"""`heron serve` as the server tests start it, and what they check on one."""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import time

import httpx
import pytest

from heron.errors import HeronError
from heron.server.process import ServerProcess

SERVER_MAX_BYTES = 2**20  # the session server's --max-request-bytes


def start_server(*args: str) -> ServerProcess:
    """A real `heron serve` subprocess (float32 on CPU, 256 MiB of KV cache)."""
    base = ["--dtype", "float32", "--device", "cpu", "--kv-cache-memory", str(256 * 2**20)]
    try:
        return ServerProcess(*base, *args, ready_timeout=180)
    except HeronError as e:
        pytest.fail(str(e))


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


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> None:
    """``r`` is an error of ``status`` with OpenAI's error body (naming ``param`` if given);
    a 4xx never claims an internal error."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if 400 <= status < 500:
        assert err["type"] != "internal_server_error", err
    if param is not None:
        assert err["param"] == param, err
