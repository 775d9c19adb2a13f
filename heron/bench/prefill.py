"""``heron bench prefill --sparse``: prefill time, attention density and passkey accuracy of
each sparse prefill pattern against dense attention, at several prompt lengths, in one run.

Per method (dense first) one engine is built; per length, a prompt of random token ids is
prefilled (``max_tokens=1``, no prefix caching) ``repeats`` times and the fastest time is
kept; density is the fraction of causal (head, query block, key block) triples the pattern
kept over those prefills; passkey accuracy is over ``num_passkey`` prompts with the key at
evenly spaced depths (greedy, 8 new tokens)."""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from heron.bench.passkey import is_correct, make_passkey

logger = logging.getLogger(__name__)


@dataclass
class PrefillBenchConfig:
    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    patterns: list[str] = field(
        default_factory=lambda: ["xattention", "vertical_slash", "flexprefill"]
    )
    threshold: float = 0.9
    min_tokens: int = 1024
    repeats: int = 1
    num_passkey: int = 3
    kv_cache_memory: float = float(2**30)
    max_num_batched_tokens: int = 2048
    seed: int = 0


@dataclass
class Row:
    method: str
    length: int
    prefill_s: float
    density: float | None
    passkey_correct: int
    passkey_total: int
    speedup: float | None = None
    accuracy_delta_points: float | None = None

    @property
    def accuracy(self) -> float:
        return self.passkey_correct / self.passkey_total if self.passkey_total else 0.0


def run_prefill_bench(cfg: PrefillBenchConfig) -> list[Row]:
    from heron import LLM, SamplingParams

    rows: list[Row] = []
    for method in ["dense", *cfg.patterns]:
        kwargs: dict[str, Any] = {}
        if method != "dense":
            kwargs = dict(
                sparse_prefill=method,
                sparse_threshold=cfg.threshold,
                sparse_min_tokens=cfg.min_tokens,
            )
        llm = LLM(
            cfg.model,
            dtype=cfg.dtype,
            device=cfg.device,
            kv_cache_memory=cfg.kv_cache_memory,
            enable_prefix_caching=False,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            **kwargs,
        )
        sparse = llm.engine.runner.sparse
        tok = llm.get_tokenizer()
        vocab = llm.engine.model_config.vocab_size
        one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        for length in cfg.lengths:
            g = torch.Generator().manual_seed(cfg.seed + length)
            ids = torch.randint(100, min(vocab, 40000), (length,), generator=g).tolist()
            if sparse is not None:
                sparse.reset_stats()
            best = float("inf")
            for _ in range(cfg.repeats):
                t0 = time.perf_counter()
                llm.generate([ids], one, use_tqdm=False)
                best = min(best, time.perf_counter() - t0)
            density = sparse.density if sparse is not None else None
            correct = 0
            for i in range(cfg.num_passkey):
                depth = (i + 0.5) / cfg.num_passkey
                case = make_passkey(tok, length, depth, cfg.seed * 1000 + length + i)
                out = llm.generate(
                    [case.prompt], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False
                )[0]
                correct += is_correct(case, out.outputs[0].text)
            row = Row(method, length, best, density, correct, cfg.num_passkey)
            logger.info(
                "%s @ %d: %.2fs density %s passkey %d/%d",
                method,
                length,
                best,
                density,
                correct,
                cfg.num_passkey,
            )
            rows.append(row)
        del llm
        gc.collect()
    dense = {r.length: r for r in rows if r.method == "dense"}
    for r in rows:
        d = dense.get(r.length)
        if d is not None and r.method != "dense":
            r.speedup = d.prefill_s / r.prefill_s
            r.accuracy_delta_points = 100 * (r.accuracy - d.accuracy)
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [
        f"{'method':<16}{'len':>6}{'prefill s':>11}{'speed-up':>10}{'density':>9}{'passkey':>9}"
    ]
    for r in rows:
        sp = f"{r.speedup:.2f}x" if r.speedup else "-"
        de = f"{r.density:.3f}" if r.density is not None else "-"
        lines.append(
            f"{r.method:<16}{r.length:>6}{r.prefill_s:>11.2f}{sp:>10}{de:>9}"
            f"{f'{r.passkey_correct}/{r.passkey_total}':>9}"
        )
    return "\n".join(lines)


def write_json(rows: list[Row], cfg: PrefillBenchConfig, path: str) -> None:
    data = {"config": asdict(cfg), "rows": [asdict(r) | {"accuracy": r.accuracy} for r in rows]}
    Path(path).write_text(json.dumps(data, indent=2))


def write_png(rows: list[Row], path: str) -> bool:
    """Speed-up and passkey accuracy vs length; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r.method for r in rows):
        rs = [r for r in rows if r.method == method]
        if method != "dense":
            a.plot([r.length for r in rs], [r.speedup for r in rs], marker="o", label=method)
        b.plot([r.length for r in rs], [r.accuracy for r in rs], marker="o", label=method)
    a.set(xlabel="prompt tokens", ylabel="prefill speed-up vs dense")
    b.set(xlabel="prompt tokens", ylabel="passkey accuracy")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True
