"""What the HTTP app serves: a request loop and the facts about the model its routes need.

``ServedModel.local(engine)``: one engine in this process, stepped by an ``AsyncEngine``
thread. ``heron.scaleout.router.serve_replicas`` builds one whose loop is a ``ReplicaRouter``
over engine replicas on Ray; the routes cannot tell the two apart."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from heron.config import SamplingParams
from heron.engine.engine import Engine
from heron.server.async_engine import AsyncEngine, RequestStream
from heron.tokenizer import Tokenizer


class RequestLoop(Protocol):
    """What the app needs of an engine loop (``AsyncEngine`` is the reference)."""

    last_stats: dict[str, float]  # Engine.stats(), summed over replicas; read by /metrics

    def start(self) -> None: ...
    def stop(self) -> None: ...
    @property
    def alive(self) -> bool: ...
    async def add(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        prompt_text: str | None = None,
    ) -> RequestStream: ...
    def abort(self, request_id: str) -> None: ...
    def abort_all(self, error: BaseException) -> None:
        """Refuse new requests and fail each one in flight with ``error`` (on SIGTERM, once
        --shutdown-timeout has passed): routes answer 503 or end their stream with an error
        event and ``[DONE]``."""


@dataclass
class ServedModel:
    loop: RequestLoop
    tokenizer: Tokenizer
    model_path: str
    max_model_len: int
    max_num_seqs: int  # also the most samples (n) per prompt
    vocab_size: int

    @classmethod
    def local(cls, engine: Engine, max_waiting: int) -> ServedModel:
        return cls(
            AsyncEngine(engine, max_waiting=max_waiting),
            engine.tokenizer,
            str(engine.model_path),
            engine.max_model_len,
            engine.config.max_num_seqs,
            engine.model_config.vocab_size,
        )
