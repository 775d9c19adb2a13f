"""One engine replica: a whole ``LLM`` (model, KV cache, scheduler) in its own process, run as
a Ray actor by ``DataParallelLLM``. Plain Python, so it can be built and tested without Ray."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from heron.config import SamplingParams
from heron.engine.engine import Engine
from heron.llm import LLM, Prompt
from heron.outputs import RequestOutput


class EngineReplica:
    """``threads``: torch's intra-op threads for this replica (the CPUs Ray reserved for it),
    so that replicas sharing a machine do not oversubscribe its cores. The engine is built by
    ``start``, not by the constructor: an error there (a model that is not installed on that
    node) then reaches the caller as itself, where Ray reports a failed actor constructor
    only as a dead actor."""

    def __init__(self, index: int, threads: int, llm_kwargs: dict[str, Any]) -> None:
        self.index = index
        self.threads = threads
        self.llm_kwargs = reseeded(llm_kwargs, index)
        self.llm: LLM | None = None

    def start(self) -> dict[str, Any]:
        """Load the model and build the engine; returns where this replica runs."""
        torch.set_num_threads(self.threads)
        self.llm = LLM(**self.llm_kwargs)
        return describe(self.llm.engine, self.index)

    def generate(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[RequestOutput]:
        return self._tag(self._llm().generate(prompts, params, use_tqdm=False))

    def chat(
        self,
        conversations: list[list[dict]],
        params: list[SamplingParams],
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        llm = self._llm()
        return self._tag(llm.chat(conversations, params, False, add_generation_prompt))

    def _llm(self) -> LLM:
        if self.llm is None:
            raise RuntimeError("EngineReplica.start() was not called")
        return self.llm

    def _tag(self, outs: list[RequestOutput]) -> list[RequestOutput]:
        """Request ids unique across replicas, and which replica served each output."""
        for out in outs:
            out.request_id = f"{self.index}-{out.request_id}"
            out.metrics["replica"] = self.index
        return outs


def reseeded(engine_kwargs: dict[str, Any], index: int) -> dict[str, Any]:
    """Replica ``index``'s engine settings: its seed is the given one (EngineConfig's 0 by
    default) plus ``index``, so unseeded samples differ between replicas."""
    return {**engine_kwargs, "seed": engine_kwargs.get("seed", 0) + index}


def describe(engine: Engine, index: int) -> dict[str, Any]:
    """Where a replica runs and what it serves (logged; tests check the work was spread)."""
    return {
        "replica": index,
        "pid": os.getpid(),
        "host": platform.node(),
        "threads": torch.get_num_threads(),
        "model_path": str(engine.model_path),
        "max_model_len": engine.max_model_len,
    }
