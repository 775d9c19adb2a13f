"""Online serving benchmark: streaming completions at several concurrency levels.

For each level C, C clients each send streaming ``/v1/completions`` requests one after
another until ``num_prompts`` have been sent in all; every request asks for exactly
``output_len`` tokens (greedy, EOS ignored) after a prompt of about ``input_len`` tokens of
seeded random words. Per request: time to first token (TTFT), time per output token after the
first (TPOT); per level: p50/p99 of both and generated tokens per second of wall time.

The same load can run against a second OpenAI-compatible server (``--compare-url``, e.g.
llama.cpp's ``llama-server``, which understands ``ignore_eos``) in the same invocation, and the
ratio is printed. Without ``--url`` a heron server is started on a free port and stopped
afterwards; with ``data_parallel_size`` N > 1 a second heron with N engine replicas on Ray
(``heron serve --data-parallel-size N``) is started beside it and compared the same way."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx

from heron.bench.record import Results, Row, speed_row
from heron.errors import InvalidRequestError
from heron.server.process import ServerProcess

_WORDS = (
    "river heron stone water light morning field bridge winter garden silver story market "
    "mountain letter window quiet forest harbor lantern valley music thunder paper candle"
).split()


@dataclass
class ServeBenchConfig:
    url: str | None = None  # a running server; None = start heron
    model: str | None = None  # heron --model when starting one; the request's model field
    concurrency: tuple[int, ...] = (1, 8, 32, 64)
    num_prompts: int | None = None  # per level; default 2 x concurrency, at least 8
    input_len: int = 128
    output_len: int = 64
    seed: int = 0
    compare_url: str | None = None
    compare_name: str = "other"
    data_parallel_size: int = 1  # > 1: compare against heron with that many replicas

    @property
    def comparison(self) -> str | None:
        """The name of the server compared against, if any."""
        if self.data_parallel_size > 1:
            return f"heron x{self.data_parallel_size} (Ray)"
        return self.compare_name if self.compare_url else None

    def validate(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise InvalidRequestError("--concurrency: positive integers, e.g. 1,8,32,64")
        for name in ("input_len", "output_len"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"--{name.replace('_', '-')}: must be >= 1")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise InvalidRequestError("--num-prompts: must be >= 1")
        if self.data_parallel_size < 1:
            raise InvalidRequestError("--data-parallel-size: must be >= 1")
        if self.data_parallel_size > 1 and self.compare_url:
            raise InvalidRequestError(
                "--data-parallel-size compares against a heron it starts; drop --compare-url"
            )


@dataclass
class LevelResult:
    server: str
    concurrency: int
    requests: int
    errors: int
    generated_tokens: int
    seconds: float
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ServeBenchResult:
    config: ServeBenchConfig
    levels: list[LevelResult] = field(default_factory=list)


def make_prompts(n: int, input_len: int, seed: int) -> list[str]:
    """Seeded random words: roughly one token each for a BPE vocabulary."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(input_len)) for _ in range(n)]


async def _one_request(
    http: httpx.AsyncClient, url: str, model: str | None, prompt: str, output_len: int
) -> tuple[float, float, int]:
    """(ttft, total seconds, generated tokens) of one streaming request."""
    body = {
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    t0 = time.perf_counter()
    ttft, chunks, usage_tokens = None, 0, None
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage_tokens = event["usage"]["completion_tokens"]
            if any(c.get("text") for c in event.get("choices", [])):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return (ttft if ttft is not None else total), total, usage_tokens or chunks


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def run_level(
    name: str, url: str, model: str | None, prompts: list[str], concurrency: int, output_len: int
) -> LevelResult:
    todo = list(prompts)
    ttfts: list[float] = []
    tpots: list[float] = []
    tokens = 0
    errors = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        while todo:
            prompt = todo.pop()
            try:
                ttft, total, n = await _one_request(http, url, model, prompt, output_len)
            except (httpx.HTTPError, RuntimeError) as e:
                errors += 1
                print(f"{name}: request failed: {e}", file=sys.stderr)
                continue
            ttfts.append(ttft)
            tokens += n
            if n > 1:
                tpots.append((total - ttft) / (n - 1))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        secs = time.perf_counter() - t0
    return LevelResult(
        name,
        concurrency,
        len(prompts),
        errors,
        tokens,
        secs,
        _percentile(ttfts, 50),
        _percentile(ttfts, 99),
        _percentile(tpots, 50),
        _percentile(tpots, 99),
    )


def _check_reachable(url: str) -> None:
    try:
        httpx.get(url + "/v1/models", timeout=10)
    except httpx.HTTPError as e:
        raise InvalidRequestError(f"cannot reach {url}: {e}") from None


def run_serve_bench(cfg: ServeBenchConfig) -> ServeBenchResult:
    cfg.validate()
    started: list[ServerProcess] = []
    model_args = ["--model", cfg.model] if cfg.model else []
    url = cfg.url
    if url is None:
        started.append(ServerProcess(*model_args))
        url = started[-1].url
    else:
        _check_reachable(url)
    if cfg.compare_url:
        _check_reachable(cfg.compare_url)
    compare_url = cfg.compare_url
    if cfg.data_parallel_size > 1:
        started.append(
            ServerProcess(*model_args, "--data-parallel-size", str(cfg.data_parallel_size))
        )
        compare_url = started[-1].url
    result = ServeBenchResult(cfg)
    try:
        targets = [("heron", url, cfg.model)]
        if cfg.comparison:
            dp_model = cfg.model if cfg.data_parallel_size > 1 else None
            targets.append((cfg.comparison, compare_url, dp_model))
        for c in cfg.concurrency:
            n = cfg.num_prompts or max(8, 2 * c)
            prompts = make_prompts(n, cfg.input_len, cfg.seed + c)
            for name, target, model in targets:
                # Warm the server's caches and code paths; distinct words keep the prefix
                # cache from helping the timed prompts.
                warm = make_prompts(2, 8, cfg.seed + 10_000 + c)
                asyncio.run(run_level(name, target, model, warm, 2, 2))
                level = asyncio.run(run_level(name, target, model, prompts, c, cfg.output_len))
                print(_format_row(level), file=sys.stderr)
                result.levels.append(level)
    finally:
        for server in started:
            server.stop()
    return result


def _format_row(r: LevelResult) -> str:
    return (
        f"{r.server:<16} {r.concurrency:>5} {r.requests:>5} {r.errors:>4} "
        f"{r.ttft_p50 * 1e3:>9.0f} {r.ttft_p99 * 1e3:>9.0f} "
        f"{r.tpot_p50 * 1e3:>9.1f} {r.tpot_p99 * 1e3:>9.1f} {r.tokens_per_second:>8.1f}"
    )


def format_table(result: ServeBenchResult) -> str:
    c = result.config
    header = (
        f"{'server':<16} {'conc':>5} {'reqs':>5} {'errs':>4} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'TPOT p50':>9} {'TPOT p99':>9} {'tok/s':>8}"
    )
    lines = [
        f"serve: {c.input_len}-word prompts, {c.output_len} tokens out (greedy, ignore_eos), "
        "streaming /v1/completions; times in ms",
        header,
        "-" * len(header),
        *(_format_row(r) for r in result.levels),
    ]
    by_key = {(r.server, r.concurrency): r for r in result.levels}
    if c.comparison:
        for conc in c.concurrency:
            ours, theirs = by_key.get(("heron", conc)), by_key.get((c.comparison, conc))
            if ours and theirs and theirs.tokens_per_second > 0:
                ratio = ours.tokens_per_second / theirs.tokens_per_second
                lines.append(f"concurrency {conc}: heron / {c.comparison} tok/s = {ratio:.2f}x")
    return "\n".join(lines)


def to_results(result: ServeBenchResult) -> Results:
    """The record's results: heron's tok/s at each concurrency against the compared server,
    and heron's replicas' against the single engine; heron alone where neither ran."""
    c = result.config
    table: list[Row] = []
    by_key = {(r.server, r.concurrency): r for r in result.levels}
    for conc in c.concurrency:
        heron, other = by_key.get(("heron", conc)), by_key.get((c.comparison, conc))
        if heron is None:
            continue
        measured = f"tok/s at concurrency {conc} (heron's TPOT p50 {heron.tpot_p50 * 1e3:.1f} ms)"
        speed = heron.tokens_per_second
        if other is None:
            table.append(speed_row(measured, speed))
        elif c.data_parallel_size > 1:
            measured = f"tok/s at concurrency {conc}, {other.server}"
            table.append(speed_row(measured, other.tokens_per_second, "heron, one engine", speed))
        else:
            table.append(speed_row(measured, speed, other.server, other.tokens_per_second))
    data = {
        "config": asdict(c),
        "levels": [{**asdict(r), "tokens_per_second": r.tokens_per_second} for r in result.levels],
    }
    return Results("serve", data, table, c.model or c.url or "")
