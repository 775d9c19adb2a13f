"""Decoding strategies through the server's body: a strategy over n samples (completions and
chat, streamed once decided) and a per-token strategy streamed token by token; bad names and
options are 400s naming the parameter."""

from __future__ import annotations

import json

import httpx

from tests.support.prompts import CAD_CONTEXT, CAD_MESSAGES


def test_server_strategy_in_the_body(server):
    body = {
        "prompt": "Q: What is 2 + 3?\nA:",
        "max_tokens": 8,
        "temperature": 1.0,
        "seed": 7,
        "n": 3,
        "strategy": "majority",
        "strategy_options": {"answer": "number"},
    }
    url = server.url + "/v1/completions"
    r = httpx.post(url, json=body, timeout=300)
    assert r.status_code == 200, r.text
    data = r.json()
    assert len(data["choices"]) == 1 and data["choices"][0]["index"] == 0
    report = data["choices"][0]["strategy"]
    assert report["strategy"] == "majority" and report["num_samples"] == 3
    assert "samples" not in report
    assert data["usage"]["completion_tokens"] == report["num_tokens"]
    # The plain n = 3 samples with the same seed contain the chosen text.
    plain_body = {k: v for k, v in body.items() if not k.startswith("strategy")}
    plain = httpx.post(url, json=plain_body, timeout=300).json()
    assert data["choices"][0]["text"] in [c["text"] for c in plain["choices"]]

    # Streaming sends the chosen completion once it is decided, then [DONE].
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=300) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == data["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["strategy"]["answer"] == report["answer"]

    bad = httpx.post(url, json={**body, "strategy": "vote"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "strategy"
    bad = httpx.post(url, json={**body, "strategy_options": {"threshold": 2}}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "strategy_options"


def test_server_chat_with_adaptive(server):
    body = {
        "messages": [{"role": "user", "content": "What is 6 times 7? Answer with a number."}],
        "max_tokens": 6,
        "temperature": 0,
        "n": 8,
        "strategy": "adaptive",
        "strategy_options": {"answer_regex": "(?s).+"},  # the whole text is the answer
    }
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    report = choice["strategy"]
    assert (report["num_samples"], report["rounds"]) == (4, 1)  # greedy samples agree at once
    assert choice["message"]["role"] == "assistant" and report["model_calls"] >= 1


def test_server_streams_a_per_token_strategy(server):
    body = {
        "messages": CAD_MESSAGES,
        "max_tokens": 8,
        "temperature": 0,
        "strategy": "cad",
        "strategy_options": {"context": CAD_CONTEXT, "alpha": 1.0},
    }
    url = server.url + "/v1/chat/completions"
    r = httpx.post(url, json=body, timeout=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert "Lyon" in choice["message"]["content"]
    assert choice["strategy"]["metrics"]["cad_context_free_prompt_tokens"] > 0
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=300) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    assert len([d for d in deltas if d]) > 1  # token by token, not one whole chunk
    assert "".join(deltas) == choice["message"]["content"]
    bad = httpx.post(url, json={**body, "strategy_options": {"context": "not there"}}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "strategy_options"
