"""Entropy-adaptive decoding on the arithmetic word problems, one request at a time (batch 1,
where a cheaper step is a faster token): accuracy, generated tokens per second, the share of
tokens the cheap (layer-skipped) model drew, switches and the tokens the full model had to
recompute, for plain greedy decoding and each entropy threshold, in the same run."""

from __future__ import annotations

import logging
import time
from typing import Any

from heron.config import SamplingParams
from heron.speculative.layer_skip import default_kept_layers
from heron.strategies import AnswerExtractor, EntropyAdaptive

logger = logging.getLogger(__name__)

_SPENT = ("ead_cheap_tokens", "ead_full_tokens", "ead_switches", "ead_recomputed_tokens")


def run_entropy_adaptive(
    llm,
    prompts: list[str | list[int]],
    answers: list[str],
    thresholds: tuple[float, ...] = (0.5, 1.0, 2.0),
    max_tokens: int = 256,
    cheap_layers: int | None = None,
    min_span: int = 8,
) -> dict[str, Any]:
    extract = AnswerExtractor("auto")
    llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm
    rows = []
    for threshold in (None, *thresholds):
        ead = None
        if threshold is not None:
            ead = EntropyAdaptive(threshold=threshold, min_span=min_span, cheap_layers=cheap_layers)
        params = SamplingParams(temperature=0, max_tokens=max_tokens, token_strategy=ead)
        ok, tokens, secs = 0, 0, 0.0
        spent = dict.fromkeys(_SPENT, 0.0)
        for prompt, truth in zip(prompts, answers, strict=True):
            t0 = time.perf_counter()
            out = llm.generate(prompt, params, use_tqdm=False)[0]
            secs += time.perf_counter() - t0
            ok += extract(out.outputs[0].text) == truth
            tokens += len(out.outputs[0].token_ids)
            for key in _SPENT:
                spent[key] += out.metrics.get(key, 0)
        rows.append(
            {
                "threshold": threshold,
                "accuracy": ok / len(prompts),
                "tokens": tokens,
                "tokens_per_second": tokens / secs,
                "cheap_share": spent["ead_cheap_tokens"] / tokens if tokens else 0.0,
                **{k.removeprefix("ead_"): v for k, v in spent.items()},
            }
        )
        logger.info("entropy_adaptive threshold %s: %s", threshold, rows[-1])
    base = rows[0]["tokens_per_second"]
    for row in rows:
        row["speedup"] = row["tokens_per_second"] / base
    return {
        "num_problems": len(prompts),
        "cheap_layers": cheap_layers,
        "min_span": min_span,
        "rows": rows,
    }


def format_entropy_adaptive(r: dict[str, Any], num_layers: int) -> list[str]:
    cheap = r["cheap_layers"] or default_kept_layers(num_layers)
    lines = [
        f"Entropy-adaptive decoding, {r['num_problems']} word problems at batch 1 (cheap model: "
        f"{cheap} of {num_layers} layers; min span {r['min_span']}):",
        f"  {'threshold':<12}{'acc':>6}{'tok/s':>8}{'speed-up':>9}{'cheap':>7}{'switches':>9}"
        f"{'recomputed':>11}",
    ]
    for row in r["rows"]:
        name = "plain" if row["threshold"] is None else f"{row['threshold']:g} nats"
        lines.append(
            f"  {name:<12}{row['accuracy']:>6.2f}{row['tokens_per_second']:>8.1f}"
            f"{row['speedup']:>8.2f}x{row['cheap_share']:>7.0%}{row['switches']:>9.0f}"
            f"{row['recomputed_tokens']:>11.0f}"
        )
    return lines
