"""Server input that must not hurt the other clients, checked on the app in this process over
the session engine (httpx's ASGI transport), where the model's logits and the tokenizer can
be instrumented: a request whose logits turn NaN/inf fails alone."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from heron import SamplingParams
from heron.server.app import ServerConfig, build_app
from heron.server.served_model import ServedModel
from tests.conftest import poison_logits

MODEL = "smollm2-135m-instruct"
COMPLETIONS = "/v1/completions"


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
