"""``heron bench prefill``: prefill time of heron's dense attention against transformers
(one forward, same dtype) and llama.cpp (``llama-bench -p``, when built) at several prompt
lengths; with ``--sparse``, also the time, attention density and retrieval accuracy (passkey
and needle) of each sparse prefill pattern against dense attention; all in one run.

Per method (dense first) one engine is built; per length, a prompt of random token ids is
prefilled (``max_tokens=1``, no prefix caching) ``repeats`` times and the fastest time is
kept; density is the fraction of causal (head, query block, key block) triples the pattern
kept over those prefills; retrieval accuracy is over ``num_passkey`` passkey prompts and
``num_needle`` needle-in-the-essays prompts (the generators of ``heron bench kv``) with the key
at evenly spaced depths (greedy, 8 new tokens)."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from heron.bench.passkey import RetrievalCase, is_correct, make_needle, make_passkey
from heron.bench.plot import pyplot
from heron.bench.record import Results, speed_row
from heron.bench.record import Row as RecordRow

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
    threshold: float = 0.9  # every pattern's options
    min_tokens: int = 1024
    repeats: int = 1
    num_passkey: int = 3
    num_needle: int = 3
    kv_cache_memory: float = float(2**30)
    max_num_batched_tokens: int = 2048
    skip_hf: bool = False  # the transformers baseline (one forward over the prompt)
    skip_llama_cpp: bool = False  # llama-bench -p LENGTHS, when built
    seed: int = 0

    @property
    def pattern_options(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "min_tokens": self.min_tokens}


@dataclass
class Row:
    method: str
    length: int
    prefill_s: float
    density: float | None
    passkey_correct: int
    passkey_total: int
    needle_correct: int = 0
    needle_total: int = 0
    speedup: float | None = None
    accuracy_delta_points: float | None = None

    @property
    def accuracy(self) -> float:
        """Over the passkey and needle cases together."""
        total = self.passkey_total + self.needle_total
        return (self.passkey_correct + self.needle_correct) / total if total else 0.0


def _prompt(cfg: PrefillBenchConfig, length: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(cfg.seed + length)
    return torch.randint(100, min(vocab, 40000), (length,), generator=g).tolist()


def run_prefill_bench(cfg: PrefillBenchConfig) -> list[Row]:
    from heron import LLM, SamplingParams

    rows: list[Row] = []
    model_path, dtype, device, vocab = "", "", "", 0
    for method in ["dense", *cfg.patterns]:
        kwargs: dict[str, Any] = {}
        if method != "dense":
            kwargs = dict(
                sparse_prefill=method,
                sparse_prefill_options=cfg.pattern_options,
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
        sparse = llm.engine.plugins.get("sparse_prefill")
        tok = llm.get_tokenizer()
        vocab = llm.engine.model_config.vocab_size
        model_path, dtype, device = llm.engine.model_path, llm.engine.dtype, llm.engine.device
        one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        for length in cfg.lengths:
            ids = _prompt(cfg, length, vocab)
            if sparse is not None:
                sparse.reset_stats()
            best = float("inf")
            for _ in range(cfg.repeats):
                t0 = time.perf_counter()
                llm.generate([ids], one, use_tqdm=False)
                best = min(best, time.perf_counter() - t0)
            density = sparse.density if sparse is not None else None
            passkeys = [
                make_passkey(tok, length, (i + 0.5) / cfg.num_passkey, cfg.seed * 1000 + length + i)
                for i in range(cfg.num_passkey)
            ]
            needles = [
                make_needle(tok, length, (i + 0.5) / cfg.num_needle) for i in range(cfg.num_needle)
            ]
            row = Row(
                method,
                length,
                best,
                density,
                _retrieved(llm, passkeys),
                len(passkeys),
                _retrieved(llm, needles),
                len(needles),
            )
            logger.info(
                "%s @ %d: %.2fs density %s passkey %d/%d needle %d/%d",
                method,
                length,
                best,
                density,
                row.passkey_correct,
                row.passkey_total,
                row.needle_correct,
                row.needle_total,
            )
            rows.append(row)
        del llm
        gc.collect()
    if not cfg.skip_hf:
        rows += _transformers_rows(cfg, Path(model_path), dtype, device, vocab)
    if not cfg.skip_llama_cpp:
        rows += _llama_cpp_rows(cfg, Path(model_path))
    dense = {r.length: r for r in rows if r.method == "dense"}
    for r in rows:
        d = dense.get(r.length)
        if d is not None and r.method != "dense":
            # a pattern: its speed-up over dense heron; a baseline: dense heron's speed-up
            # over it (the same direction as every other bench's "x baseline" column)
            base = r.method in BASELINES
            r.speedup = r.prefill_s / d.prefill_s if base else d.prefill_s / r.prefill_s
            if r.passkey_total + r.needle_total:
                r.accuracy_delta_points = 100 * (r.accuracy - d.accuracy)
    return rows


BASELINES = ("transformers", "llama.cpp")


def _retrieved(llm, cases: list[RetrievalCase]) -> int:
    """How many of ``cases`` the engine answers (greedy, 8 new tokens)."""
    from heron import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=8)
    outs = [llm.generate([c.prompt], params, use_tqdm=False)[0] for c in cases]
    return sum(is_correct(c, o.outputs[0].text) for c, o in zip(cases, outs, strict=True))


def _transformers_rows(
    cfg: PrefillBenchConfig, path: Path, dtype: torch.dtype, device: torch.device, vocab: int
) -> list[Row]:
    """One forward over each prompt (what a prefill is), fastest of ``repeats``."""
    from heron.bench.throughput import load_hf_model

    model = load_hf_model(path, dtype, str(device))
    rows = []
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]], device=device))  # warm-up
        for length in cfg.lengths:
            ids = torch.tensor([_prompt(cfg, length, vocab)], device=device)
            best = float("inf")
            for _ in range(cfg.repeats):
                t0 = time.perf_counter()
                model(ids, logits_to_keep=1)
                best = min(best, time.perf_counter() - t0)
            logger.info("transformers @ %d: %.2fs", length, best)
            rows.append(Row("transformers", length, best, None, 0, 0))
    del model
    gc.collect()
    return rows


def _llama_cpp_rows(cfg: PrefillBenchConfig, path: Path) -> list[Row]:
    from heron.bench import llama_cpp

    if path.suffix != ".gguf":
        logger.warning("llama.cpp baseline skipped: %s is not a GGUF file", path.name)
        return []
    results = llama_cpp.llama_bench(path, list(cfg.lengths), 0, cfg.repeats) or []
    return [
        Row("llama.cpp", r.prompt_tokens, r.prompt_tokens / r.tokens_per_second, None, 0, 0)
        for r in results
        if r.prompt_tokens
    ]


def format_table(rows: list[Row]) -> str:
    """Speed-up: a sparse pattern's over dense heron; for a baseline row, dense heron's over
    that baseline (> 1: heron is faster)."""
    lines = [
        f"{'method':<16}{'len':>6}{'prefill s':>11}{'tok/s':>9}{'speed-up':>10}{'density':>9}"
        f"{'passkey':>9}{'needle':>8}"
    ]
    for r in rows:
        sp = f"{r.speedup:.2f}x" if r.speedup else "-"
        de = f"{r.density:.3f}" if r.density is not None else "-"
        pk = f"{r.passkey_correct}/{r.passkey_total}" if r.passkey_total else "-"
        nd = f"{r.needle_correct}/{r.needle_total}" if r.needle_total else "-"
        lines.append(
            f"{r.method:<16}{r.length:>6}{r.prefill_s:>11.2f}{r.length / r.prefill_s:>9.0f}"
            f"{sp:>10}{de:>9}{pk:>9}{nd:>8}"
        )
    return "\n".join(lines)


def to_results(rows: list[Row], cfg: PrefillBenchConfig) -> Results:
    """The record's results: dense heron's prefill speed against each baseline, and each
    sparse pattern's against dense (with the density and retrieval of both)."""
    dense = {r.length: r for r in rows if r.method == "dense"}
    table: list[RecordRow] = []
    for length, d in dense.items():
        speed = length / d.prefill_s
        measured = f"prefill tok/s at {length} tokens, dense attention"
        baselines = [r for r in rows if r.method in BASELINES and r.length == length]
        table += [speed_row(measured, speed, b.method, length / b.prefill_s) for b in baselines]
        if not baselines:
            table.append(speed_row(measured, speed))
        for r in rows:
            if r.length != length or r.method in ("dense", *BASELINES):
                continue
            measured = f"prefill tok/s at {length} tokens, {r.method}"
            if r.density is not None:
                measured += f" (density {r.density:.2f})"
            if r.passkey_total + r.needle_total:
                measured += f", passkey + needle {_found(r)} vs dense {_found(d)}"
            table.append(speed_row(measured, length / r.prefill_s, "dense", speed))
    data = {"config": asdict(cfg), "rows": [asdict(r) | {"accuracy": r.accuracy} for r in rows]}
    return Results("prefill", data, table)


def _found(r: Row) -> str:
    return f"{r.passkey_correct + r.needle_correct}/{r.passkey_total + r.needle_total}"


def write_png(rows: list[Row], path: str) -> bool:
    """Prefill tok/s and retrieval accuracy vs length; False when matplotlib is not
    installed."""
    plt = pyplot()
    if plt is None:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r.method for r in rows):
        rs = [r for r in rows if r.method == method]
        speed = [r.length / r.prefill_s for r in rs]
        a.plot([r.length for r in rs], speed, marker="o", label=method)
        if method not in BASELINES:
            b.plot([r.length for r in rs], [r.accuracy for r in rs], marker="o", label=method)
    a.set(xlabel="prompt tokens", ylabel="prefill tok/s")
    b.set(xlabel="prompt tokens", ylabel="passkey + needle accuracy")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True
