"""KV-compression benchmark: passkey retrieval (a 5-digit number hidden in filler text at
several depths) at a few context lengths, every policy at every budget against the full cache
in the same run.

Setting: query-aware (the question is the end of the compressed prompt, as in the SnapKV
paper). The full cache stored in int8 (a second engine, ``kv_cache_dtype="int8"``) is one
more row, ``int8_cache``. Per (policy, budget): accuracy (the passkey appears in the greedy
answer), KV bytes held per sequence while decoding (measured from the block manager: blocks
in use / running sequences x bytes per block) and decode tok/s (steps where every scheduled
sequence decodes).
All cases of one configuration run batched through the engine."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from heron.bench.passkey import is_correct, make_passkey
from heron.config import SamplingParams
from heron.engine.runner import ModelRunner


@dataclass
class KVBenchConfig:
    lengths: tuple[int, ...] = (1000, 2000)  # prompt tokens (about)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    policies: tuple[str, ...] = (
        "streaming_llm",
        "snapkv",
        "h2o",
        "pyramidkv",
        "defensivekv",
        "d2o",
    )
    budgets: tuple[float, ...] = (0.1, 0.2, 0.5)
    max_tokens: int = 8
    seed: int = 0


@dataclass
class KVResult:
    policy: str
    budget: float | None
    length: int
    correct: int
    cases: int
    kv_bytes_per_seq: float
    decode_tok_s: float
    answers: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.cases if self.cases else 0.0


def _run_config(engine, cases, policy, budget, max_tokens) -> tuple:
    params = SamplingParams(
        temperature=0,
        max_tokens=max_tokens,
        ignore_eos=True,
        kv_policy=policy or "none",
        kv_budget=budget,
    )
    reqs = [engine.add_request(c.prompt, params) for c in cases]
    bm = engine.block_manager
    per_block = ModelRunner.bytes_per_block(
        engine.model_config, bm.block_size, engine.dtype, engine.config.kv_cache_dtype
    )
    held: list[float] = []
    decode_time, decode_tokens = 0.0, 0
    while engine.has_unfinished_requests():
        sched = engine.scheduler
        decoding = not sched.waiting and all(
            s.num_uncomputed == 1 and not s.in_prompt_phase for s in sched.running
        )
        if decoding and sched.running:
            held.append((bm.num_blocks - bm.num_free_blocks) * per_block / len(sched.running))
        n = len(sched.running)
        t0 = time.perf_counter()
        engine.step()
        if decoding:
            decode_time += time.perf_counter() - t0
            decode_tokens += n
    answers = [r.seqs[0].text for r in reqs]
    correct = sum(is_correct(c, a) for c, a in zip(cases, answers, strict=True))
    tok_s = decode_tokens / decode_time if decode_time else 0.0
    return correct, max(held, default=0.0), tok_s, answers


def run_kv_bench(engine, cfg: KVBenchConfig, log=print, int8=None) -> list[KVResult]:
    """Every configuration on ``engine``; the full cache also on ``int8`` (an engine with an
    int8 KV cache) when given."""
    results = []
    for length in cfg.lengths:
        cases = [
            make_passkey(engine.tokenizer, length, d, cfg.seed * 1000 + length + i)
            for i, d in enumerate(cfg.depths)
        ]
        configs = [(None, None)] + [(p, b) for p in cfg.policies for b in cfg.budgets]
        for policy, budget in configs:
            correct, held, tok_s, answers = _run_config(
                engine, cases, policy, budget, cfg.max_tokens
            )
            r = KVResult(
                policy or "full", budget, length, correct, len(cases), held, tok_s, answers
            )
            results.append(r)
            log(_row(r))
        if int8 is not None:
            correct, held, tok_s, answers = _run_config(int8, cases, None, None, cfg.max_tokens)
            r = KVResult("int8_cache", None, length, correct, len(cases), held, tok_s, answers)
            results.append(r)
            log(_row(r))
    return results


def _row(r: KVResult) -> str:
    budget = "-" if r.budget is None else f"{r.budget:g}"
    return (
        f"{r.length:>6} {r.policy:>14} {budget:>6} {r.correct:>3}/{r.cases:<3}"
        f" {r.kv_bytes_per_seq / 2**20:>9.2f} MiB {r.decode_tok_s:>8.1f} tok/s"
    )


def header() -> str:
    return f"{'len':>6} {'policy':>14} {'budget':>6} {'acc':>7} {'KV held/seq':>13} {'decode':>14}"


def write_json(results: list[KVResult], cfg: KVBenchConfig, path: str) -> None:
    rows = [{**asdict(r), "accuracy": r.accuracy} for r in results]
    Path(path).write_text(json.dumps({"config": asdict(cfg), "results": rows}, indent=2))
