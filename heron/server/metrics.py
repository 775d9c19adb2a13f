"""Prometheus metrics of one server, in vLLM's spirit and under the ``heron:`` prefix.

Counters and histograms are recorded per request by the serving code; the engine's gauges
(running/waiting sequences, KV-cache usage, prefix-cache hits) are read from the engine loop's
latest stats when Prometheus scrapes, so they cost nothing between scrapes. Each server owns
its registry, so several apps in one process (tests) do not collide."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class _EngineStats(Collector):
    def __init__(self, stats: Callable[[], dict[str, float]], model: str) -> None:
        self.stats = stats
        self.model = model

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.stats()
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"heron:{name}", doc, labels=labels)
            g.add_metric([self.model], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"heron:{name}", doc, labels=labels)
            c.add_metric([self.model], value)
            return c

        total = s["kv_blocks_total"]
        used = total - s["kv_blocks_free"]
        queries = s["prefix_cache_queries"]
        yield gauge("num_requests_running", "Sequences in the running batch", s["num_running"])
        yield gauge("num_requests_waiting", "Sequences waiting for KV blocks", s["num_waiting"])
        yield gauge("kv_cache_blocks_total", "KV-cache blocks in the pool", total)
        yield gauge("kv_cache_blocks_used", "KV-cache blocks held by sequences", used)
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use", used / total)
        yield counter("prefix_cache_queries", "Full prompt blocks looked up", queries)
        yield counter(
            "prefix_cache_hits", "Full prompt blocks found cached", s["prefix_cache_hits"]
        )
        yield gauge(
            "prefix_cache_hit_rate",
            "Prefix-cache hits / queries since start",
            s["prefix_cache_hits"] / queries if queries else 0.0,
        )
        yield counter("num_preemptions", "Sequences preempted for KV blocks", s["num_preemptions"])
        if "spec_draft_tokens" in s:  # speculative decoding is on
            yield counter("spec_draft_tokens", "Tokens drafted", s["spec_draft_tokens"])
            yield counter("spec_accepted_tokens", "Drafts accepted", s["spec_accepted_tokens"])
            yield counter("spec_verify_steps", "Verify passes", s["spec_verify_steps"])


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict[str, float]], model: str) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        self.registry.register(_EngineStats(stats, model))
        r = self.registry
        self.requests = Counter(
            "heron:requests", "Finished HTTP requests by endpoint and status code",
            ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "heron:prompt_tokens", "Prompt tokens of accepted requests", registry=r
        )
        self.generation_tokens = Counter("heron:generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "heron:time_to_first_token_seconds", "From arrival to the first token",
            buckets=_TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "heron:time_per_output_token_seconds", "Mean gap between a request's later tokens",
            buckets=_TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "heron:e2e_request_latency_seconds", "From arrival to the last token",
            buckets=_TTFT_BUCKETS, registry=r,
        )  # fmt: skip

    def observe_request(
        self, prompt_tokens: int, output_tokens: int, ttft: float | None, e2e: float
    ) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        self.e2e.observe(e2e)
        if ttft is not None:
            self.ttft.observe(ttft)
            if output_tokens > 1:
                self.tpot.observe((e2e - ttft) / (output_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
