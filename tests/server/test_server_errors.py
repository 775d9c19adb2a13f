"""Bad requests get the right 4xx with OpenAI's error body, and never disturb the server:
after each one a normal request still succeeds. API keys, a full waiting queue, SIGTERM (also
past --shutdown-timeout) and CORS run against their own server processes (the app's own
checks of key and CORS in this process: tests/unit/test_server_app.py). A method
family's unknown name, unknown option or bad option value is a 400 naming the parameter, as
in every other front end (tests/unit/test_registry.py)."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import httpx
import pytest

from tests.support.methods import FAMILIES, IDS, error_cases
from tests.support.server import (
    SERVER_MAX_BYTES,
    assert_error,
    assert_shutdown_aborts_what_is_left,
    start_server,
)

MODEL = "smollm2-135m-instruct"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]
LONG_PROMPT = "hello " * 9000  # more tokens than the model's context (8192)

# (name, path, JSON body or raw bytes, expected status, expected param or None)
CASES = [
    ("missing prompt", COMPLETIONS, {"model": MODEL}, 400, "prompt"),
    ("missing messages", CHAT, {"model": MODEL}, 400, "messages"),
    ("empty messages", CHAT, {"messages": []}, 400, "messages"),
    ("empty prompt", COMPLETIONS, {"prompt": ""}, 400, "prompt"),
    ("empty prompt list", COMPLETIONS, {"prompt": []}, 400, "prompt"),
    ("prompt wrong type", COMPLETIONS, {"prompt": 12}, 400, "prompt"),
    ("token id negative", COMPLETIONS, {"prompt": [1, -5]}, 400, "prompt"),
    ("token id out of vocab", COMPLETIONS, {"prompt": [1, 10**9]}, 400, "prompt"),
    ("max_tokens negative", COMPLETIONS, {"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens zero", CHAT, {"messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens string", COMPLETIONS, {"prompt": "a", "max_tokens": "ten"}, 400, "max_tokens"),
    ("temperature negative", CHAT, {"messages": MSG, "temperature": -1}, 400, "temperature"),
    ("temperature too high", CHAT, {"messages": MSG, "temperature": 7}, 400, "temperature"),
    ("top_p zero", COMPLETIONS, {"prompt": "a", "top_p": 0}, 400, "top_p"),
    ("top_p above one", COMPLETIONS, {"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ("n zero", COMPLETIONS, {"prompt": "a", "n": 0}, 400, "n"),
    ("n huge", COMPLETIONS, {"prompt": "a", "n": 100000}, 400, "n"),
    ("presence_penalty", CHAT, {"messages": MSG, "presence_penalty": 3}, 400, "presence_penalty"),
    (
        "frequency_penalty infinite",
        COMPLETIONS,
        b'{"prompt": "a", "frequency_penalty": -Infinity}',
        400,
        "frequency_penalty",
    ),  # fmt: skip
    (
        "repetition_penalty zero",
        CHAT,
        {"messages": MSG, "repetition_penalty": 0},
        400,
        "repetition_penalty",
    ),
    (
        "repetition_penalty underflow",
        COMPLETIONS,
        {"prompt": "a", "repetition_penalty": 1e-300},
        400,
        "repetition_penalty",
    ),  # fmt: skip
    (
        "top_logprobs too many",
        CHAT,
        {"messages": MSG, "logprobs": True, "top_logprobs": 50},
        400,
        "top_logprobs",
    ),  # fmt: skip
    (
        "top_logprobs without logprobs",
        CHAT,
        {"messages": MSG, "top_logprobs": 2},
        400,
        "top_logprobs",
    ),  # fmt: skip
    ("logprobs too many", COMPLETIONS, {"prompt": "a", "logprobs": 99}, 400, "logprobs"),
    ("bad role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("stop wrong type", COMPLETIONS, {"prompt": "a", "stop": 5}, 400, "stop"),
    ("stop empty string", COMPLETIONS, {"prompt": "a", "stop": [""]}, 400, "stop"),
    (
        "min_tokens above max",
        COMPLETIONS,
        {"prompt": "a", "max_tokens": 2, "min_tokens": 5},
        400,
        "min_tokens",
    ),  # fmt: skip
    ("top_k negative", COMPLETIONS, {"prompt": "a", "top_k": -7}, 400, "top_k"),
    ("stream not bool", COMPLETIONS, {"prompt": "a", "stream": "yes"}, 400, "stream"),
    ("tool no function", CHAT, {"messages": MSG, "tools": [{"type": "function"}]}, 400, "tools"),
    ("unknown model", COMPLETIONS, {"model": "gpt-9", "prompt": "a"}, 404, "model"),
    ("prompt too long", COMPLETIONS, {"prompt": LONG_PROMPT, "max_tokens": 4}, 400, "prompt"),
    (
        "prompt + max_tokens too long",
        COMPLETIONS,
        {"prompt": "a", "max_tokens": 10**6},
        400,
        "max_tokens",
    ),  # fmt: skip
    ("malformed JSON", COMPLETIONS, b'{"prompt": "a",', 400, None),
    ("not an object", COMPLETIONS, b"[1, 2, 3]", 400, None),
    ("non-UTF-8 bytes", COMPLETIONS, b'{"prompt": "\xff\xfe"}', 400, None),
    ("unknown route", "/v1/embeddings", {"input": "a"}, 404, None),
    # JSON's \ud800 escape is a lone surrogate: not valid Unicode, so no tokenizer can take it.
    ("surrogate prompt", COMPLETIONS, rb'{"prompt": "a\ud800"}', 400, "prompt"),
    ("surrogate in prompt list", COMPLETIONS, rb'{"prompt": ["a", "\udfff"]}', 400, "prompt"),
    ("surrogate stop", COMPLETIONS, rb'{"prompt": "a", "stop": ["\ud800"]}', 400, "stop"),
    (
        "surrogate chat content",
        CHAT,
        rb'{"messages": [{"role": "user", "content": "hi \ud83d"}]}',
        400,
        "messages",
    ),  # fmt: skip
    (
        "surrogate chat content part",
        CHAT,
        rb'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}',
        400,
        "messages",
    ),  # fmt: skip
    ("surrogate tokenize", "/tokenize", rb'{"prompt": "\ud800"}', 400, "prompt"),
    (
        "surrogate tokenize messages",
        "/tokenize",
        rb'{"messages": [{"role": "user", "content": "\ud800"}]}',
        400,
        "messages",
    ),  # fmt: skip
    (
        "surrogate in an error message",
        COMPLETIONS,
        rb'{"prompt": "a", "strategy": "majority", "strategy_options": {"\ud800": 1}}',
        400,
        "strategy_options",
    ),  # fmt: skip
]


def _post(server, path: str, body, **kw) -> httpx.Response:
    if isinstance(body, bytes):
        headers = {"content-type": "application/json", **kw.pop("headers", {})}
        return httpx.post(server.url + path, content=body, headers=headers, timeout=60, **kw)
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def _ok(server) -> None:
    r = _post(server, COMPLETIONS, {"prompt": "The sky is", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    ("name", "path", "body", "status", "param"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_request(server, name, path, body, status, param):
    assert_error(_post(server, path, body), status, param)
    _ok(server)


def test_bad_stream_request_fails_before_streaming(server):
    r = _post(server, COMPLETIONS, {"prompt": LONG_PROMPT, "stream": True})
    assert_error(r, 400, "prompt")


def test_wrong_method_is_a_client_error(server):
    r = httpx.get(server.url + COMPLETIONS)
    assert_error(r, 405)
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_body_over_max_request_bytes_is_413(server):
    big = b'{"prompt": "' + b"a" * SERVER_MAX_BYTES + b'"}'
    assert_error(_post(server, COMPLETIONS, big), 413)

    def chunked():  # no Content-Length: counted as it arrives
        yield from (big[i : i + 65536] for i in range(0, len(big), 65536))

    json_type = {"content-type": "application/json"}
    r = httpx.post(server.url + COMPLETIONS, content=chunked(), headers=json_type, timeout=60)
    assert_error(r, 413)
    _ok(server)


def test_api_key_and_queue_limit_and_sigterm():
    proc = start_server("--api-key", "sekret", "--max-num-seqs", "1", "--max-waiting", "1")
    try:
        body = {"prompt": "The sky is", "max_tokens": 2}
        assert_error(_post(proc, COMPLETIONS, body), 401)
        assert_error(_post(proc, COMPLETIONS, body, headers={"Authorization": "Bearer no"}), 401)
        # The key comes before the body: no validation errors for a client without it.
        assert_error(_post(proc, COMPLETIONS, b'{"prompt": ', headers={"Authorization": "x"}), 401)
        assert httpx.get(proc.url + "/health").status_code == 200  # open without a key
        assert httpx.get(proc.url + "/metrics").status_code == 200
        auth = {"Authorization": "Bearer sekret"}
        assert _post(proc, COMPLETIONS, body, headers=auth).status_code == 200

        # One running sequence and one waiting are all it takes: the rest get 429.
        slow = {"prompt": "Tell me a story.", "max_tokens": 40, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(_post, proc, COMPLETIONS, slow, headers=auth) for _ in range(8)]
            codes = sorted(f.result().status_code for f in futures)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
        for f in futures:
            if f.result().status_code == 429:
                assert_error(f.result(), 429)

        # SIGTERM with a request in flight: it finishes, then the process exits 0.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(_post, proc, COMPLETIONS, slow, headers=auth)
            time.sleep(1.0)
            proc.proc.send_signal(signal.SIGTERM)
            r = inflight.result()
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40
        assert proc.proc.wait(timeout=60) == 0, proc.output()
    finally:
        proc.stop()


def test_shutdown_past_the_grace_period_and_cors():
    """What --shutdown-timeout leaves running is aborted with errors the clients can read (the
    same server checks that --allowed-origins reaches the app)."""
    origins = ("--allowed-origins", "http://a.example,http://b.example")
    proc = start_server(
        "--shutdown-timeout", "2", *origins, "--allowed-origins", "http://c.example"
    )
    try:
        for origin in ("http://b.example", "http://c.example"):
            r = httpx.options(
                proc.url + CHAT,
                headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
            )
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        assert_shutdown_aborts_what_is_left(proc)
    finally:
        proc.stop()


# ---------------------------------------------------------------------------- method families
@pytest.mark.parametrize(
    ("registry", "method", "unknown", "bad", "option"),
    [FAMILIES[0], FAMILIES[3]],
    ids=[IDS[0], IDS[3]],
)
def test_server_errors(server, registry, method, unknown, bad, option):
    for (name, options), param, message in error_cases(registry, method, unknown, bad, option):
        body = {"prompt": "Hello", "max_tokens": 2, "n": 2, registry.kind: name}
        body[registry.options_param] = options
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and message in error["message"], error
