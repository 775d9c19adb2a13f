"""The OpenAI-compatible server, driven through the official `openai` client against a real
`heron serve` subprocess (float32, so greedy outputs equal the offline engine's)."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from heron import SamplingParams

MODEL = "smollm2-135m-instruct"
CHAT = [{"role": "user", "content": "Name three rivers in Europe."}]
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_chat_matches_offline_engine_with_template(client, llm):
    offline = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == offline.outputs[0].text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(offline.prompt_token_ids)
    assert r.usage.completion_tokens == 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24


def test_completion_matches_offline_engine(client, llm):
    offline = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0)
    assert r.choices[0].text == offline[0].outputs[0].text
    assert r.usage.prompt_tokens == len(offline[0].prompt_token_ids)
    assert r.usage.completion_tokens == len(offline[0].outputs[0].token_ids)


def test_chat_stream_equals_non_stream(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=20, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_completion_stream_n3_seeded_matches_non_stream(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, n=3, seed=11)
    full = client.completions.create(**kw)
    assert sorted(c.index for c in full.choices) == [0, 1, 2]
    texts = {0: "", 1: "", 2: ""}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == {c.index: c.text for c in full.choices}
    assert len(set(texts.values())) > 1, "three seeded samples should not all be equal"


def test_seed_reproducible(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=5)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob)  # greedy: the top one
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        assert bytes(t.bytes).decode() == t.token


def test_completion_logprobs_with_echo(client, llm):
    n_prompt = len(llm.get_tokenizer().encode(PROMPT))
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2, echo=True
    )
    c = r.choices[0]
    assert c.text.startswith(PROMPT) and len(c.text) > len(PROMPT)
    lp = c.logprobs
    assert len(lp.tokens) == n_prompt + 5
    assert lp.token_logprobs[0] is None and all(x is not None for x in lp.token_logprobs[1:])
    assert all(len(t) >= 1 for t in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)


def test_stop_string(client):
    r = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"]
    )
    c = r.choices[0]
    assert c.finish_reason == "stop"
    assert " 7" not in c.text and c.text.strip().startswith("5")


def test_several_prompts_and_token_ids(client, llm):
    ids = llm.get_tokenizer().encode("Hello, my name is")
    r = client.completions.create(
        model=MODEL, prompt=["Hello, my name is", "Paris is"], max_tokens=6, temperature=0, n=2
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in r.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]  # greedy samples agree
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert r2.choices[0].text == by_index[0]


def test_extra_body_heron_fields(client):
    r = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=8,
        temperature=1.0,
        extra_body={"top_k": 1, "min_tokens": 8, "repetition_penalty": 1.1},
    )
    greedy = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        extra_body={"repetition_penalty": 1.1},
    )
    assert r.choices[0].text == greedy.choices[0].text  # top_k=1 is greedy


def test_temperature_below_eps_is_greedy(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8)
    greedy = client.completions.create(**kw, temperature=0).choices[0].text
    assert client.completions.create(**kw, temperature=1e-300).choices[0].text == greedy


def test_tokenize_detokenize(server):
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert r["count"] == len(r["tokens"]) > 0
    back = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"].endswith("Hello world")


def test_health_and_metrics(client, server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "heron:num_requests_running",
        "heron:num_requests_waiting",
        "heron:kv_cache_usage_perc",
        "heron:prefix_cache_hit_rate",
        "heron:time_to_first_token_seconds_bucket",
        "heron:time_per_output_token_seconds_bucket",
        "heron:prompt_tokens_total",
        "heron:generation_tokens_total",
    ):
        assert name in text, name
    assert _metric(server, "heron:generation_tokens_total") >= 4
    assert 'heron:requests_total{endpoint="/v1/completions",status="200"}' in text


def test_disconnect_frees_kv_blocks(server):
    assert _metric(server, "heron:kv_cache_blocks_used") == 0
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 3000,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(8)]
        assert any(line.startswith("data: {") for line in got)
        assert _metric(server, "heron:kv_cache_blocks_used") > 0
    # The connection is closed: the request must be aborted and its blocks returned.
    deadline = time.monotonic() + 30
    while _metric(server, "heron:kv_cache_blocks_used") > 0:
        assert time.monotonic() < deadline, "KV blocks not freed after the client went away"
        time.sleep(0.2)
    assert _metric(server, "heron:num_requests_running") == 0


def test_concurrent_streaming_clients(client, server):
    """64 streaming clients, 2 requests each: every response complete and correct."""
    prompts = [f"Count from {i}:" for i in range(4)]
    expected = {
        p: client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0)
        .choices[0]
        .text
        for p in prompts
    }

    async def one_client(aclient: AsyncOpenAI, k: int) -> list[tuple[str, str, str]]:
        results = []
        for r in range(2):
            prompt = prompts[(k + r) % len(prompts)]
            text, finish = "", None
            stream = await aclient.completions.create(
                model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True
            )
            async for chunk in stream:
                for c in chunk.choices:
                    text += c.text
                    finish = c.finish_reason or finish
            results.append((prompt, text, finish))
        return results

    async def main() -> list[tuple[str, str, str]]:
        aclient = AsyncOpenAI(
            base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600
        )
        batches = await asyncio.wait_for(
            asyncio.gather(*(one_client(aclient, k) for k in range(64))), timeout=900
        )
        await aclient.close()
        return [r for b in batches for r in b]

    results = asyncio.run(main())
    assert len(results) == 128
    for prompt, text, finish in results:
        assert finish == "length"
        assert text == expected[prompt]


def test_bench_serve_against_running_server(server, tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "serve.json"
    cmd = [sys.executable, "-m", "heron.cli", "bench", "serve", "--url", server.url, "-q"]
    cmd += ["--concurrency", "1,2", "--num-prompts", "2", "--input-len", "8", "--output-len", "4"]
    r = subprocess.run([*cmd, "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "TTFT p50" in r.stdout
    levels = json.loads(out.read_text())["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    for lv in levels:
        assert lv["errors"] == 0 and lv["generated_tokens"] == 2 * 4
        assert 0 < lv["ttft_p50"] <= lv["ttft_p99"]
