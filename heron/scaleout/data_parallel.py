"""DataParallelLLM: ``LLM``'s offline API over several engine replicas on a Ray cluster.

Each replica (heron.scaleout.replica) is a Ray actor holding a whole engine: its own model
copy, KV cache and continuous batching, with the CPUs Ray reserved for it as its torch threads.
A batch of prompts is split once, longest expected work first onto the least-loaded replica,
so each replica gets one large batch to schedule (what continuous batching is best at); the
outputs come back in input order, each with ``metrics["replica"]`` saying which replica served
it. One machine's cores are usually best used by one engine (``heron bench throughput
--data-parallel-size`` measures both side by side); replicas pay off across machines, or on
a many-core or multi-socket host where one engine's threads stop scaling.

Replica ``i`` seeds its engine with ``seed + i``: unseeded sampled requests draw different
numbers on each replica, and which replica serves a prompt depends on the batch, so only
requests with ``SamplingParams.seed`` (or greedy) repeat exactly across runs and sizes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from heron.config import DataParallelConfig, EngineConfig, SamplingParams
from heron.errors import HeronError, InvalidRequestError
from heron.llm import Prompt, as_conversations, as_params_list, as_prompt_list
from heron.methods import check_engine_methods
from heron.outputs import RequestOutput
from heron.scaleout.cluster import ReplicaGroup
from heron.scaleout.replica import EngineReplica


class DataParallelLLM:
    """``DataParallelLLM(model=None, data_parallel_size=2)``: ``generate`` and ``chat`` as
    ``LLM``'s, served by ``data_parallel_size`` engine replicas.

    Other keyword arguments are EngineConfig fields, given to every replica (each replica's
    ``kv_cache_memory`` fraction is of the memory free where and when it starts). Call
    ``shutdown()`` (or use ``with``) to stop the replicas; a local Ray cluster this object
    started stops with them."""

    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        data_parallel_size: int = 2,
        ray_address: str | None = None,
        cpus_per_replica: int | None = None,
        **kwargs: Any,
    ) -> None:
        config = DataParallelConfig(data_parallel_size, ray_address, cpus_per_replica)
        llm_kwargs = {"model": model, "dtype": dtype, "device": device, **kwargs}
        try:  # bad engine settings fail here, before any replica starts
            check_engine_methods(EngineConfig(**llm_kwargs))
        except TypeError as e:
            raise InvalidRequestError(f"DataParallelLLM(): {e}") from None
        self.group: ReplicaGroup | None = ReplicaGroup(EngineReplica, config, llm_kwargs)
        self.replica_info = self.group.info

    # ------------------------------------------------------------------ the LLM API
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """As ``LLM.generate``: every prompt, outputs in input order."""
        prompt_list = as_prompt_list(prompts)
        params = as_params_list(sampling_params, len(prompt_list))
        costs = [_cost(_prompt_size(p), sp) for p, sp in zip(prompt_list, params, strict=True)]
        return self._run("generate", prompt_list, params, costs, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """As ``LLM.chat``: one conversation or a list of them, each through the chat template."""
        conversations = as_conversations(messages)
        params = as_params_list(sampling_params, len(conversations))
        costs = [
            _cost(sum(_prompt_size(str(m.get("content", ""))) for m in conv), sp)
            for conv, sp in zip(conversations, params, strict=True)
        ]
        return self._run("chat", conversations, params, costs, use_tqdm, add_generation_prompt)

    def _run(
        self,
        method: str,
        items: list[Any],
        params: list[SamplingParams],
        costs: list[int],
        use_tqdm: bool,
        *extra: Any,
    ) -> list[RequestOutput]:
        group = self.group
        if group is None:
            raise HeronError("DataParallelLLM: the replicas were shut down")
        shards = split_work(costs, len(group.actors))
        pending = {}
        for replica, shard in zip(group.actors, shards, strict=True):
            if shard:
                call = getattr(replica, method).remote(
                    [items[i] for i in shard], [params[i] for i in shard], *extra
                )
                pending[call] = shard
        results: list[RequestOutput | None] = [None] * len(items)
        with tqdm(total=len(items), desc="generating", disable=not use_tqdm, unit="req") as bar:
            while pending:
                done, _ = group.ray.wait(list(pending), num_returns=1)
                shard = pending.pop(done[0])
                for i, out in zip(shard, group.get(done)[0], strict=True):
                    results[i] = out
                bar.update(len(shard))
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ lifecycle
    def shutdown(self) -> None:
        """Stop the replicas (and the local Ray cluster, if this object started it)."""
        if self.group is not None:
            self.group.shutdown()
            self.group = None

    def __enter__(self) -> DataParallelLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def split_work(costs: list[int], num_replicas: int) -> list[list[int]]:
    """Indices of the items for each replica: the costliest first, each onto the replica
    with the least work so far (longest-processing-time scheduling); each list ascending."""
    loads = [0] * num_replicas
    shards: list[list[int]] = [[] for _ in range(num_replicas)]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        r = loads.index(min(loads))
        shards[r].append(i)
        loads[r] += costs[i]
    return [sorted(s) for s in shards]


def _cost(prompt_size: int, params: SamplingParams) -> int:
    """A request's expected work, in tokens: its prompt and the most it may generate."""
    return prompt_size + (params.max_tokens or 256) * params.n


def _prompt_size(prompt: Prompt) -> int:
    """A prompt's length in tokens, about (~4 characters a token for text)."""
    if isinstance(prompt, dict):
        prompt = prompt.get("prompt_token_ids", prompt.get("prompt", ""))
    if isinstance(prompt, str):
        return len(prompt) // 4 + 1
    return len(prompt)
