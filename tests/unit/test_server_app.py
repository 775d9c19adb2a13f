"""The server app's own checks, in this process and without a model: the error type OpenAI's
body gives each status, the API key (checked before the body, in constant time) and CORS, on
an app whose request loop no request reaches. Against real `heron serve` processes:
tests/server/test_server_errors.py."""

from __future__ import annotations

import hmac
from typing import ClassVar

from fastapi.testclient import TestClient

from heron.server.app import ServerConfig, build_app
from heron.server.served_model import ServedModel
from heron.server.serving import error_body
from tests.support.server import assert_error

MODEL = "smollm2-135m-instruct"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def test_error_type_follows_the_status():
    types = {status: error_body("x", status)["error"]["type"] for status in range(400, 600)}
    assert types[400] == types[405] == types[413] == types[422] == "invalid_request_error"
    assert types[401] == "authentication_error" and types[429] == "rate_limit_error"
    assert all(types[s] != "internal_server_error" for s in range(400, 500))
    assert types[500] == "internal_server_error" and types[503] == "service_unavailable"


class _UnusedLoop:
    """A request loop no test request reaches: the key, CORS and routing answer first."""

    last_stats: ClassVar[dict[str, float]] = {}  # /metrics is tried on a real server
    alive = True

    def start(self) -> None: ...
    def stop(self) -> None: ...

    async def add(self, *args, **kwargs):
        raise AssertionError("a request reached the engine loop")

    def abort(self, request_id: str) -> None: ...
    def abort_all(self, error: BaseException) -> None: ...


def _client(**config) -> TestClient:
    served = ServedModel(_UnusedLoop(), None, "m", 64, 1, 100)  # type: ignore[arg-type]
    return TestClient(build_app(served, ServerConfig(MODEL, **config)))


def test_api_key_is_checked_before_the_body_and_in_constant_time(monkeypatch):
    compared = []
    constant_time = hmac.compare_digest

    def compare_digest(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return constant_time(a, b)

    monkeypatch.setattr(hmac, "compare_digest", compare_digest)
    client = _client(api_key="sekret")
    bad_json = b'{"prompt": '
    for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sekret"}):
        headers = {"content-type": "application/json", **auth}
        r = client.post(COMPLETIONS, content=bad_json, headers=headers)
        assert_error(r, 401)
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert (b"wrong", b"sekret") in compared
    auth = {"Authorization": "Bearer sekret", "content-type": "application/json"}
    assert_error(client.post(COMPLETIONS, content=bad_json, headers=auth), 400)
    assert client.get("/v1/models", headers=auth).status_code == 200
    for path in ("/health", "/docs", "/openapi.json"):  # open without a key
        assert client.get(path).status_code == 200, path


def test_cors_only_with_allowed_origins():
    preflight = {
        "Origin": "http://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    r = _client().options(CHAT, headers=preflight)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    client = _client(api_key="sekret", allowed_origins=("http://app.example", "http://b.example"))
    r = client.options(CHAT, headers=preflight)  # a preflight carries no key
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == "http://app.example"
    assert "POST" in r.headers["access-control-allow-methods"]
    r = client.options(CHAT, headers={**preflight, "Origin": "http://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = client.get("/v1/models", headers={"Origin": "http://b.example"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://b.example"
