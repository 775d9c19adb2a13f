"""Server input that must not hurt the other clients, checked on the app in this process over
the session engine (httpx's ASGI transport), where the model's logits and the tokenizer can
be instrumented: a request whose logits turn NaN/inf fails alone; a body over the size limit
is refused (413) before it is read; a big prompt is tokenized off the event loop, so /health
answers meanwhile, and one that cannot fit the context is refused without tokenizing it."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from heron import SamplingParams
from heron.server.app import ServerConfig, build_app
from heron.server.served_model import ServedModel
from tests.support.faults import poison_logits

MODEL = "smollm2-135m-instruct"
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
BIG = 8 * 2**20  # --max-request-bytes for 5 MB prompts


@asynccontextmanager
async def serving(llm, **config) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app over the session engine, between the app's startup and shutdown."""
    app = build_app(ServedModel.local(llm.engine, max_waiting=16), ServerConfig(MODEL, **config))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://heron") as client:
            yield client


def test_non_finite_logits_fail_only_their_request(llm, monkeypatch):
    good, bad = "The sky is", "Water boils at"
    solo = llm.generate(good, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    poison_logits(monkeypatch, llm, bad, math.nan, after=2)

    def body(prompt: str, **extra) -> dict:
        return {"prompt": prompt, "max_tokens": 6, "temperature": 0, **extra}

    async def main() -> list[httpx.Response]:
        async with serving(llm) as client:
            return await asyncio.gather(
                client.post(COMPLETIONS, json=body(good)),
                client.post(COMPLETIONS, json=body(bad)),
                client.post(COMPLETIONS, json=body(bad, stream=True)),
            )

    ok, failed, streamed = asyncio.run(main())
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == solo[0].outputs[0].text
    assert failed.status_code == 500, failed.text
    assert failed.json()["error"]["code"] == "generation_failed"
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "generation_failed"
    assert any(json.loads(e).get("choices") for e in events[:-2])  # the first tokens went out


def test_a_body_over_the_limit_is_refused_unread(llm):
    limit, chunk = 64 * 2**10, 4096
    pulled: dict[str, int] = {"declared": 0, "chunked": 0}

    async def body(name: str) -> AsyncIterator[bytes]:
        for _ in range(4 * limit // chunk):
            pulled[name] += 1
            yield b" " * chunk

    fits = json.dumps({"prompt": "The sky is", "max_tokens": 2}).encode().ljust(limit)
    json_type = {"content-type": "application/json"}

    async def main() -> list[httpx.Response]:
        async with serving(llm, max_request_bytes=limit) as client:
            return [
                # Content-Length says too much: refused before a byte is read
                await client.post(
                    COMPLETIONS,
                    content=body("declared"),
                    headers={**json_type, "content-length": str(4 * limit)},
                ),
                # chunked: no length given; refused once the limit is passed
                await client.post(COMPLETIONS, content=body("chunked"), headers=json_type),
                await client.post(COMPLETIONS, content=fits, headers=json_type),
            ]

    declared, chunked, ok = asyncio.run(main())
    for r in (declared, chunked):
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "request_too_large"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert pulled["declared"] == 0
    assert pulled["chunked"] == limit // chunk + 1  # the chunk that went over, no more
    assert ok.status_code == 200, ok.text


def _chat(content: str) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 1}


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/tokenize", {"prompt": "hello world " * 440_000}, 200),  # 5 MB
        (COMPLETIONS, {"prompt": "hello " * 60_000, "max_tokens": 1}, 400),  # > max_model_len
        (CHAT, _chat("hello " * 60_000), 400),
    ],
    ids=["tokenize", "completions", "chat"],
)
def test_health_answers_while_a_big_prompt_is_tokenized(llm, monkeypatch, path, body, status):
    """Order, not time: the tokenizer holds the big prompt until /health has answered."""
    hf = llm.get_tokenizer().hf
    encode = hf.encode
    events: list[str] = []
    release = threading.Event()

    async def main() -> httpx.Response:
        loop = asyncio.get_running_loop()
        tokenizing = asyncio.Event()

        def held(text: str, *args, **kwargs) -> list[int]:
            if len(text) > 100_000:
                events.append("tokenizing")
                loop.call_soon_threadsafe(tokenizing.set)
                # Set once /health answered; the timeout only ends the wait when the event
                # loop itself is held here (the bug), and the order below then fails.
                release.wait(timeout=60)
                events.append("tokenized")
            return encode(text, *args, **kwargs)

        monkeypatch.setattr(hf, "encode", held)
        async with serving(llm, max_request_bytes=BIG) as client:
            big = asyncio.create_task(client.post(path, json=body))
            started = asyncio.create_task(tokenizing.wait())
            await asyncio.wait({big, started}, return_when=asyncio.FIRST_COMPLETED)
            health = await client.get("/health")
            events.append(f"health {health.status_code}")
            release.set()
            return await big

    r = asyncio.run(main())
    assert events == ["tokenizing", "health 200", "tokenized"]
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["param"] == "prompt"  # more tokens than max_model_len


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (COMPLETIONS, {"prompt": "a" * 5 * 10**6}, "prompt"),
        (COMPLETIONS, {"prompt": ["a", "b" * 5 * 10**6]}, "prompt"),
        (CHAT, _chat("a" * 5 * 10**6), "messages"),
    ],
    ids=["completion", "prompt-list", "chat"],
)
def test_a_prompt_that_cannot_fit_is_refused_untokenized(llm, monkeypatch, path, body, param):
    hf = llm.get_tokenizer().hf
    encode = hf.encode
    sizes: list[int] = []

    def counted(text: str, *args, **kwargs) -> list[int]:
        sizes.append(len(text))
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(hf, "encode", counted)

    async def main() -> httpx.Response:
        async with serving(llm, max_request_bytes=BIG) as client:
            return await client.post(path, json=body)

    r = asyncio.run(main())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert "cannot fit" in r.json()["error"]["message"]
    assert all(n < 10**6 for n in sizes)  # the big text never reached the tokenizer
