"""Engine and sampling settings: plain dataclasses, each validated once in ``__post_init__``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from heron.errors import InvalidRequestError
from heron.layers.kivi import KIVI_BITS, KIVI_BLOCK_SIZE
from heron.layers.kv_cache import KV_CACHE_DTYPES
from heron.layers.quantized_linear import QUANTIZATIONS

if TYPE_CHECKING:
    from heron.structured import StructuredOutputsParams

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
ROUTINGS = ("prefix", "least_busy")
# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS): dividing logits by less
# overflows float32, and the draw would be the argmax anyway.
SAMPLING_EPS = 1e-5
# Seen tokens' logits are divided (or, if negative, multiplied) by the penalty: at 100 they are
# as good as banned, at 0.01 as good as forced, so nothing is lost by refusing values beyond,
# such as 1e-300, which float32 rounds to 0 (a division by zero).
REPETITION_PENALTY_RANGE = (0.01, 100.0)


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(f"{param}: {message}", param=param)


@dataclass
class EngineConfig:
    """How the engine is built: model, precision, KV-cache memory and batching limits."""

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    # Weight-only quantization of every linear layer: "none", "int8" or "int4" (heron.layers.
    # quantized_linear); the embedding, norms and KV cache keep ``dtype``.
    quantization: str = "none"
    # Tokens per KV block; None: 16, or 32 (KIVI's key group) with an int4/int2 KV cache.
    block_size: int | None = None
    # Bytes (int > 1) or a fraction of the free memory (0 < x <= 1).
    kv_cache_memory: float = 0.25
    # "auto": K/V in ``dtype``; "int8": one byte per value plus a scale per token and head
    # (heron.layers.kv_cache), ~2x (bf16) to ~4x (fp32) the tokens in the same memory;
    # "int4"/"int2": KIVI (heron.layers.kivi), keys per channel and values per token, the
    # block still filling in full precision.
    kv_cache_dtype: str = "auto"
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    # Speculative decoding (heron.speculative): None = off, or a proposer name ("ngram", ...)
    # with its options ({"ngram_max": 4}, {"model": "..."} for "draft", ...).
    speculative_method: str | None = None
    speculative_options: dict[str, Any] | None = None
    # The most drafts per step (adaptive k shrinks it); None: the proposer's default (4, or
    # 16 for "lookahead": the nodes of its draft tree).
    num_speculative_tokens: int | None = None
    # Sparse prefill attention (heron.sparse): None = dense, or a pattern name ("xattention",
    # "vertical_slash", "flexprefill") with its options ({"threshold": 0.9, "min_tokens": 2048}:
    # the attention mass kept, the shortest prompt that uses it, ...).
    sparse_prefill: str | None = None
    sparse_prefill_options: dict[str, Any] | None = None
    # KV-cache compression (heron.kv): None = off (the full cache), or a policy name
    # ("snapkv", "streaming_llm", ...) with its options, applied to every request that does
    # not choose its own.
    kv_policy: str | None = None
    kv_policy_options: dict[str, Any] | None = None
    kv_budget: float = 0.2  # tokens kept: a fraction (0, 1] of the prompt, or a count (> 1)

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.device in DEVICES, "device", f"must be one of {DEVICES}, got {self.device!r}")
        _check(
            self.quantization in QUANTIZATIONS,
            "quantization",
            f"must be one of {QUANTIZATIONS}, got {self.quantization!r}",
        )
        _check(
            self.kv_cache_dtype in KV_CACHE_DTYPES,
            "kv_cache_dtype",
            f"must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}",
        )
        if self.block_size is None:
            self.block_size = KIVI_BLOCK_SIZE if self.kv_cache_dtype in KIVI_BITS else 16
        _check(self.block_size >= 1, "block_size", f"must be >= 1, got {self.block_size}")
        _check(
            self.kv_cache_memory > 0,
            "kv_cache_memory",
            f"must be bytes (> 1) or a fraction of free memory in (0, 1], "
            f"got {self.kv_cache_memory}",
        )
        _check(self.max_num_seqs >= 1, "max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")
        _check(
            self.max_num_batched_tokens >= 1,
            "max_num_batched_tokens",
            f"must be >= 1, got {self.max_num_batched_tokens}",
        )
        _check(
            self.max_model_len is None or self.max_model_len >= 1,
            "max_model_len",
            f"must be >= 1, got {self.max_model_len}",
        )
        _check_method(
            "sparse_prefill",
            self.sparse_prefill,
            "sparse_prefill_options",
            self.sparse_prefill_options,
        )
        _check_method("kv_policy", self.kv_policy, "kv_policy_options", self.kv_policy_options)
        _check_kv_budget(self.kv_budget)
        _check(
            self.kv_policy is None or self.speculative_method is None,
            "kv_policy",
            "KV compression cannot be combined with speculative decoding "
            "(drafts would be verified against an evicted cache); choose one",
        )
        _check_method(
            "speculative_method",
            self.speculative_method,
            "speculative_options",
            self.speculative_options,
        )
        _check(
            self.num_speculative_tokens is None or self.num_speculative_tokens >= 1,
            "num_speculative_tokens",
            f"must be >= 1, got {self.num_speculative_tokens}",
        )


def _check_method(kind: str, name: object, options_param: str, options: object) -> None:
    """A method family's two settings: a name (or None, or "none": off) and its options. The
    name and the options themselves are the family registry's to check (heron.registry),
    when the engine builds the method."""
    _check(name is None or isinstance(name, str), kind, f"must be a name, got {name!r}")
    _check(
        options is None or isinstance(options, dict),
        options_param,
        f"must be an object of option names to values, got {options!r}",
    )
    _check(
        not options or name not in (None, "none"),
        options_param,
        f"options of no method: set {kind} too",
    )


def _check_kv_budget(budget: float | None) -> None:
    _check(
        budget is None or budget > 0,
        "kv_budget",
        f"must be a fraction of the prompt in (0, 1] or a token count > 1, got {budget}",
    )


@dataclass
class DataParallelConfig:
    """How engine replicas are spread over a Ray cluster (heron.scaleout: ``DataParallelLLM``
    and ``heron serve --data-parallel-size``)."""

    data_parallel_size: int = 2  # engine replicas, each a whole model copy and KV cache
    # A running cluster ("auto", "ray://host:10001", ...); None: the one this process is
    # connected to, or a local one started on this machine (and stopped with the replicas).
    ray_address: str | None = None
    # CPUs Ray reserves for each replica, also its torch threads; None: the cluster's CPUs
    # divided evenly between the replicas.
    cpus_per_replica: int | None = None
    # The server's choice of replica per request: "prefix" (the one that has seen the longest
    # prefix of the prompt, within a load slack) or "least_busy" (fewest requests in flight).
    routing: str = "prefix"

    def __post_init__(self) -> None:
        _check(
            self.routing in ROUTINGS,
            "routing",
            f"must be one of {ROUTINGS}, got {self.routing!r}",
        )
        _check(
            self.data_parallel_size >= 1,
            "data_parallel_size",
            f"must be >= 1, got {self.data_parallel_size}",
        )
        _check(
            self.cpus_per_replica is None or self.cpus_per_replica >= 1,
            "cpus_per_replica",
            f"must be >= 1, got {self.cpus_per_replica}",
        )


@dataclass
class SamplingParams:
    """Per-request decoding settings, with the same names and meanings as vLLM's."""

    n: int = 1
    temperature: float = 1.0  # below SAMPLING_EPS (0 included): greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # Constrain the output to a JSON schema, regex, choice list or grammar (heron.structured).
    structured_outputs: StructuredOutputsParams | None = None
    # heron extra: KV compression for this request (overrides EngineConfig.kv_policy/budget;
    # "none" = the full cache even when the engine compresses by default).
    kv_policy: str | None = None
    kv_policy_options: dict[str, Any] | None = None  # the options of this request's kv_policy
    kv_budget: float | None = None
    # Query-agnostic compression: compress once the first this many prompt tokens (the
    # context) are in, then prefill the rest (the question) on the compressed cache, so the
    # question does not choose what is kept. None: compress after the whole prompt.
    kv_prefix_tokens: int | None = None
    # heron extra: a per-token decoding strategy the engine applies to this request's one
    # sample, given as the strategy's options object (a heron.strategies.TokenStrategy:
    # ``ContextAware``, ``EntropyAdaptive``); its engine plugin recognises and checks it.
    token_strategy: Any = None
    stop_strings: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        for f in fields(self):  # NaN passes no range check below, inf would pass some
            value = getattr(self, f.name)
            if isinstance(value, float):
                _check(math.isfinite(value), f.name, f"must be a finite number, got {value}")
        _check(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        _check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= -1, "top_k", f"must be -1, 0 (off) or positive, got {self.top_k}")
        _check(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        low, high = REPETITION_PENALTY_RANGE
        _check(
            low <= self.repetition_penalty <= high,
            "repetition_penalty",
            f"must be in [{low}, {high}] (1 = off), got {self.repetition_penalty}",
        )
        _check(
            -2 <= self.presence_penalty <= 2,
            "presence_penalty",
            f"must be in [-2, 2], got {self.presence_penalty}",
        )
        _check(
            -2 <= self.frequency_penalty <= 2,
            "frequency_penalty",
            f"must be in [-2, 2], got {self.frequency_penalty}",
        )
        _check(
            self.max_tokens is None or self.max_tokens > 0,
            "max_tokens",
            f"must be > 0, got {self.max_tokens}",
        )
        _check(self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens}")
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
        )
        _check(
            self.logprobs is None or self.logprobs >= 0,
            "logprobs",
            f"must be >= 0, got {self.logprobs}",
        )
        _check(
            self.prompt_logprobs is None or self.prompt_logprobs >= 0,
            "prompt_logprobs",
            f"must be >= 0, got {self.prompt_logprobs}",
        )
        _check_method("kv_policy", self.kv_policy, "kv_policy_options", self.kv_policy_options)
        _check_kv_budget(self.kv_budget)
        _check(
            self.kv_prefix_tokens is None or self.kv_prefix_tokens >= 1,
            "kv_prefix_tokens",
            f"must be >= 1, got {self.kv_prefix_tokens}",
        )
        _check(
            self.token_strategy is None or getattr(self.token_strategy, "per_token", False),
            "token_strategy",
            f"must be a per-token strategy (heron.strategies), got {self.token_strategy!r}",
        )
        _check(
            self.token_strategy is None or self.n == 1,
            "n",
            f"a per-token strategy draws one sample; got n={self.n}",
        )
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        _check(all(isinstance(s, str) and s for s in stops), "stop", "must be non-empty strings")
        self.stop_strings = stops
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS
