"""One engine replica of an HTTP server: an ``Engine`` stepped by its own ``AsyncEngine``
thread, run as an async Ray actor; the server's ``ReplicaRouter`` streams each request's
outputs from it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import torch

from heron.config import EngineConfig, SamplingParams
from heron.engine.engine import Engine
from heron.outputs import RequestOutput
from heron.scaleout.replica import describe, reseeded
from heron.server.async_engine import AsyncEngine


class ServingReplica:
    """``engine_kwargs``: EngineConfig fields (reseeded per replica, see ``reseeded``). Built by
    ``start`` (see ``EngineReplica`` for why not in ``__init__``)."""

    def __init__(
        self, index: int, threads: int, engine_kwargs: dict[str, Any], max_waiting: int
    ) -> None:
        self.index = index
        self.threads = threads
        self.engine_kwargs = engine_kwargs
        self.max_waiting = max_waiting
        self.loop: AsyncEngine | None = None

    async def start(self) -> dict[str, Any]:
        """Load the model and start the engine loop; returns where this replica runs and what
        the server's routes need (the tokenizer, with the chat template the engine settled
        on)."""
        torch.set_num_threads(self.threads)
        config = EngineConfig(**reseeded(self.engine_kwargs, self.index))
        engine = Engine(config)
        self.loop = AsyncEngine(engine, max_waiting=self.max_waiting)
        self.loop.start()
        return {
            **describe(engine, self.index),
            "tokenizer": engine.tokenizer,
            "max_num_seqs": config.max_num_seqs,
            "vocab_size": engine.model_config.vocab_size,
        }

    async def stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        prompt_text: str | None,
    ) -> AsyncIterator[RequestOutput | None]:
        """``None`` once the engine took the request (or its refusal raised), then its
        outputs. Cancelling the call (the router's abort) aborts the request here."""
        assert self.loop is not None, "start() first"
        stream = await self.loop.add(prompt_ids, params, request_id, prompt_text)
        yield None
        async for out in stream:
            out.metrics["replica"] = self.index
            yield out

    def stats(self) -> dict[str, float]:
        assert self.loop is not None, "start() first"
        return {**self.loop.last_stats, "num_waiting": self.loop.num_waiting}

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.stop()
