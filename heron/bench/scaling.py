"""Inference-time scaling and decoding strategies, task by task (``--tasks``):

- ``arithmetic``: does spending more samples per problem buy accuracy on word problems, and
  what do the samples cost in KV memory? (below)
- ``humaneval``: greedy pass@1 vs best-of-n picked by the problems' own tests
  (``heron.bench.humaneval``);
- ``cad``: context-aware decoding on counterfactual contexts (``heron.bench.counterfactual``);
- ``entropy_adaptive``: entropy-adaptive decoding's speed and accuracy at batch 1 on the word
  problems (``heron.bench.entropy_adaptive``).

Per problem (``word_problems``, fixed seed, several levels) heron draws one greedy answer and
``max(ks)`` samples at once (one request with ``n = max(ks)``; the samples share the prompt's
KV blocks). Each strategy at k < max(ks) is scored on the disjoint k-sized slices of those
samples (16 / k slices per problem, averaged), which estimates its accuracy at k without
drawing again; ``adaptive`` replays the samples in order, so its rounds see exactly what a
live run with these seeds would draw. pass@k (some sample in the slice is right) is the
ceiling any picker can reach. KV blocks held are read from the engine's block manager while
one prompt runs with n = 1 and with n = ``kv_n``."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from heron.bench.counterfactual import format_counterfactual, run_counterfactual
from heron.bench.entropy_adaptive import format_entropy_adaptive, run_entropy_adaptive
from heron.bench.humaneval import format_humaneval, run_humaneval
from heron.bench.plot import pyplot
from heron.bench.record import Results, Row, speed_row
from heron.bench.word_problems import Problem, make_problems
from heron.config import SamplingParams
from heron.errors import InvalidRequestError
from heron.outputs import CompletionOutput
from heron.strategies import (
    Adaptive,
    AnswerExtractor,
    BestOfMajority,
    BestOfN,
    Majority,
    StrategyRun,
)

logger = logging.getLogger(__name__)

PREFERRED_MODEL = "qwen2.5-coder-0.5b-instruct"
METHODS = ("majority", "best_of_n", "best_of_majority", "pass")
TASKS = ("arithmetic", "humaneval", "cad", "entropy_adaptive")
_KV_TOKENS = 32  # tokens per sample in the KV measurement: enough to pass the fork


@dataclass
class ScalingConfig:
    model: str | None = None  # None: PREFERRED_MODEL when installed, else heron's default
    dtype: str = "auto"
    device: str = "auto"
    per_level: int = 8
    levels: tuple[int, ...] = (1, 2, 3)
    ks: tuple[int, ...] = (1, 4, 8, 16)
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256
    threshold: float = 0.3  # best_of_majority's vote share
    agreements: tuple[float, ...] = (0.5, 0.75, 1.0)  # adaptive's stopping agreement
    adaptive_initial: int = 4
    kv_n: int = 8
    seed: int = 0
    tasks: tuple[str, ...] = TASKS
    humaneval_problems: int = 20
    humaneval_k: int = 8
    cad_alphas: tuple[float, ...] = (0.5, 1.0)
    entropy_thresholds: tuple[float, ...] = (0.5, 1.0, 2.0)
    entropy_problems: int = 6  # of the word problems, run one at a time

    def validate(self) -> None:
        def check(ok: bool, flag: str, message: str) -> None:
            if not ok:
                raise InvalidRequestError(f"--{flag}: {message}", param=flag.replace("-", "_"))

        check(self.per_level >= 1, "per-level", f"must be >= 1, got {self.per_level}")
        check(
            bool(self.levels) and min(self.levels) >= 1,
            "levels",
            f"levels are >= 1, got {self.levels}",
        )
        top = max(self.ks, default=0)
        check(
            bool(self.ks) and min(self.ks) >= 1 and all(top % k == 0 for k in self.ks),
            "ks",
            f"sample counts >= 1 that divide the largest, got {self.ks}",
        )
        check(self.temperature > 0, "temperature", "sampling needs a temperature > 0")
        check(self.max_tokens >= 1, "max-tokens", f"must be >= 1, got {self.max_tokens}")
        check(self.kv_n >= 2, "kv-n", f"must be >= 2, got {self.kv_n}")
        unknown = sorted(set(self.tasks) - set(TASKS))
        check(
            bool(self.tasks) and not unknown,
            "tasks",
            f"choose from {', '.join(TASKS)}; got {', '.join(unknown) or 'none'}",
        )
        check(
            self.humaneval_problems >= 1 and self.humaneval_k >= 1,
            "humaneval-problems",
            "problems and --humaneval-k must be >= 1",
        )
        check(
            all(a >= 0 for a in self.cad_alphas), "cad-alphas", f"must be >= 0: {self.cad_alphas}"
        )
        check(
            all(t >= 0 for t in self.entropy_thresholds),
            "entropy-thresholds",
            f"entropies in nats, >= 0: {self.entropy_thresholds}",
        )
        check(self.entropy_problems >= 1, "entropy-problems", "must be >= 1")
        # The strategies check their own options.
        BestOfMajority(n=top, threshold=self.threshold)
        for a in self.agreements:
            Adaptive(n=top, initial=self.adaptive_initial, agreement=a)


def resolve_model(model: str | None) -> str:
    from heron.models.catalog import DEFAULT_MODEL, KNOWN_MODELS

    if model is not None:
        return model
    preferred = KNOWN_MODELS.get(PREFERRED_MODEL)
    if preferred is not None and preferred.locate() is not None:
        return PREFERRED_MODEL
    logger.warning("%s is not installed; using %s", PREFERRED_MODEL, DEFAULT_MODEL)
    return DEFAULT_MODEL


def run_scaling(cfg: ScalingConfig) -> dict[str, Any]:
    from heron import LLM

    cfg.validate()
    model = resolve_model(cfg.model)
    llm = LLM(model, dtype=cfg.dtype, device=cfg.device)
    engine = llm.engine
    problems = make_problems(cfg.per_level, cfg.levels, cfg.seed)
    tok = engine.tokenizer
    chat = bool(tok.hf.chat_template)
    prompts: list[str | list[int]] = [
        tok.encode_chat([{"role": "user", "content": p.prompt}])[1] if chat else p.prompt
        for p in problems
    ]
    truth = [str(p.answer) for p in problems]
    result: dict[str, Any] = {
        "model": model,
        "model_path": str(engine.model_path),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "device": str(engine.device),
        "num_layers": engine.model_config.num_layers,
        "config": asdict(cfg),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    if "arithmetic" in cfg.tasks:
        result.update(run_arithmetic(llm, cfg, problems, prompts, truth))
    if "humaneval" in cfg.tasks:
        result["humaneval"] = run_humaneval(
            llm, cfg.humaneval_problems, cfg.humaneval_k, seed=cfg.seed
        )
    if "cad" in cfg.tasks:
        result["cad"] = run_counterfactual(llm, cfg.cad_alphas)
    if "entropy_adaptive" in cfg.tasks:
        n = cfg.entropy_problems
        result["entropy_adaptive"] = run_entropy_adaptive(
            llm, prompts[:n], truth[:n], cfg.entropy_thresholds, cfg.max_tokens
        )
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def run_arithmetic(
    llm, cfg: ScalingConfig, problems: list[Problem], prompts: list, truth: list[str]
) -> dict[str, Any]:
    logger.info("%d problems; greedy first, then %d samples each", len(problems), max(cfg.ks))
    greedy_params = SamplingParams(temperature=0, max_tokens=cfg.max_tokens)
    greedy, greedy_time = _timed(lambda: llm.generate(prompts, greedy_params, use_tqdm=False))
    top = max(cfg.ks)
    sample_params = [
        SamplingParams(
            n=top,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=cfg.seed * 100_003 + i,
            max_tokens=cfg.max_tokens,
            logprobs=0,
        )
        for i in range(len(problems))
    ]
    pools, pool_time = _timed(lambda: llm.generate(prompts, sample_params, use_tqdm=False))

    extract = AnswerExtractor("auto")
    greedy_ok = [extract(o.outputs[0].text) == t for o, t in zip(greedy, truth, strict=True)]
    samples = [o.outputs for o in pools]
    greedy_tokens = sum(len(o.outputs[0].token_ids) for o in greedy)
    pool_tokens = sum(len(c.token_ids) for s in samples for c in s)
    result: dict[str, Any] = {
        "num_problems": len(problems),
        "problems_per_level": cfg.per_level,
        "subsampling": (
            f"{top} samples drawn once per problem; accuracy at k is the mean over the "
            f"{top}/k disjoint slices of k samples; adaptive replays the samples in order"
        ),
        "greedy": {
            **_accuracy(greedy_ok, problems),
            "mean_tokens": greedy_tokens / len(problems),
            "tokens_per_second": greedy_tokens / greedy_time,
            "seconds": greedy_time,
        },
        "sampling": {
            "samples_per_problem": top,
            "tokens": pool_tokens,
            "seconds": pool_time,
            "tokens_per_second": pool_tokens / pool_time,
        },
        "methods": {m: {} for m in METHODS},
        "adaptive": [],
    }
    for k in cfg.ks:
        for method in METHODS:
            result["methods"][method][str(k)] = score_at_k(
                method, k, samples, truth, problems, extract, cfg.threshold
            )
    for agreement in cfg.agreements:
        result["adaptive"].append(
            replay_adaptive(samples, truth, problems, agreement, cfg.adaptive_initial)
        )
    result["kv_blocks"] = measure_kv_blocks(llm, prompts[0], cfg.kv_n, _KV_TOKENS)
    return result


# ---------------------------------------------------------------------------- scoring
def score_at_k(
    method: str,
    k: int,
    samples: list[list[CompletionOutput]],
    truth: list[str],
    problems: list[Problem],
    extract: AnswerExtractor,
    threshold: float,
) -> dict[str, Any]:
    """``method``'s accuracy at k: per problem, the mean over the disjoint k-sample slices of
    its samples (method "pass": some sample in the slice is right)."""
    pick = {
        "majority": Majority(n=k),
        "best_of_n": BestOfN(n=k),
        "best_of_majority": BestOfMajority(n=k, threshold=threshold),
    }.get(method)
    per_problem, tokens = [], []
    for pool, t in zip(samples, truth, strict=True):
        slices = [pool[j : j + k] for j in range(0, len(pool) - k + 1, k)]
        hits = []
        for s in slices:
            if pick is None:  # pass@k: does any sample get it right?
                hits.append(any(extract(c.text) == t for c in s))
            else:
                hits.append(extract(s[pick.select(s).index].text) == t)
            tokens.append(sum(len(c.token_ids) for c in s))
        per_problem.append(sum(hits) / len(hits))
    return {**_accuracy(per_problem, problems), "mean_tokens": sum(tokens) / len(tokens)}


def replay_adaptive(
    samples: list[list[CompletionOutput]],
    truth: list[str],
    problems: list[Problem],
    agreement: float,
    initial: int,
) -> dict[str, Any]:
    """Adaptive sampling replayed on each problem's samples in order: its accuracy and the
    samples and tokens it spent."""
    strategy = Adaptive(n=len(samples[0]), initial=initial, agreement=agreement)
    ok, drawn, tokens = [], [], []
    for pool, t in zip(samples, truth, strict=True):
        run = StrategyRun(strategy)
        while k := run.wanted():
            run.add(pool[len(run.samples) : len(run.samples) + k], model_calls=0)
        report = run.report()
        ok.append(report.answer == t)
        drawn.append(report.num_samples)
        tokens.append(report.num_tokens)
    return {
        "agreement": agreement,
        "initial": initial,
        **_accuracy(ok, problems),
        "mean_samples": sum(drawn) / len(drawn),
        "mean_tokens": sum(tokens) / len(tokens),
    }


def _accuracy(scores: list[float] | list[bool], problems: list[Problem]) -> dict[str, Any]:
    by_level: dict[str, list[float]] = {}
    for s, p in zip(scores, problems, strict=True):
        by_level.setdefault(str(p.level), []).append(float(s))
    return {
        "accuracy": sum(map(float, scores)) / len(scores),
        "accuracy_by_level": {lv: sum(v) / len(v) for lv, v in by_level.items()},
    }


# ---------------------------------------------------------------------------- KV memory
def measure_kv_blocks(llm, prompt: str | list[int], n: int, max_tokens: int) -> dict[str, Any]:
    """Blocks held by one request while it runs alone, n = 1 vs n, ``max_tokens`` tokens per
    sample: those covering the prompt's positions once every sample has written its first
    token, how many of them all samples share (the full prompt blocks; a partial last block
    is copied on each sample's first write), and the peak."""
    engine = llm.engine
    bm = engine.block_manager
    result: dict[str, Any] = {"block_size": bm.block_size}
    for count in (1, n):
        params = SamplingParams(n=count, temperature=1.0, seed=0, max_tokens=max_tokens)
        req = engine.add_request(prompt, params)
        num_prompt = len(req.prompt_token_ids)
        prompt_slots = -(-num_prompt // bm.block_size)
        prompt_blocks, shared, peak = None, None, 0
        while not req.finished:
            engine.step()
            peak = max(peak, bm.num_blocks - bm.num_free_blocks)
            running = [s for s in req.seqs if s.block_table]
            if (
                prompt_blocks is None
                and req.forked
                and all(s.num_tokens > num_prompt + 1 for s in running)
            ):
                blocks = {b for s in running for b in s.block_table[:prompt_slots]}
                prompt_blocks = len(blocks)
                shared = sum(bm.blocks[b].ref_count == len(running) for b in blocks)
        result[f"n{count}"] = {
            "prompt_tokens": num_prompt,
            "prompt_blocks": prompt_blocks,
            "shared_prompt_blocks": shared,
            "peak_blocks": peak,
        }
    one, many = result["n1"], result[f"n{n}"]
    if one["prompt_blocks"] and many["prompt_blocks"]:
        result["prompt_blocks_ratio"] = many["prompt_blocks"] / one["prompt_blocks"]
    result["peak_blocks_ratio"] = many["peak_blocks"] / max(one["peak_blocks"], 1)
    result["peak_blocks_without_sharing"] = n * one["peak_blocks"]
    return result


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------------------- output
def format_table(result: dict[str, Any]) -> str:
    lines = [f"model {result['model']} ({result['dtype']}, {result['device']})"]
    if "greedy" in result:
        lines += ["", *_format_arithmetic(result)]
    if "humaneval" in result:
        lines += ["", *format_humaneval(result["humaneval"])]
    if "cad" in result:
        lines += ["", *format_counterfactual(result["cad"])]
    if "entropy_adaptive" in result:
        lines += ["", *format_entropy_adaptive(result["entropy_adaptive"], result["num_layers"])]
    return "\n".join(lines)


def _format_arithmetic(result: dict[str, Any]) -> list[str]:
    levels = list(result["greedy"]["accuracy_by_level"])
    lines = [
        f"Arithmetic word problems: {result['num_problems']} problems, "
        f"{result['problems_per_level']} per level {', '.join(levels)}",
        f"note: {result['subsampling']}",
        "",
        f"{'method':<22}{'k':>3}  {'acc':>6}  " + "".join(f"{'L' + lv:>6}" for lv in levels)
        + f"  {'tokens/problem':>14}",
    ]  # fmt: skip

    def row(name: str, k: str, r: dict[str, Any]) -> str:
        by = "".join(f"{r['accuracy_by_level'][lv]:>6.2f}" for lv in levels)
        return f"{name:<22}{k:>3}  {r['accuracy']:>6.2f}  {by}  {r['mean_tokens']:>14.0f}"

    lines.append(row("greedy", "1", result["greedy"]))
    for method in METHODS:
        for k, r in result["methods"][method].items():
            lines.append(row(method + ("@k (ceiling)" if method == "pass" else ""), k, r))
    for a in result["adaptive"]:
        name = f"adaptive (agree {a['agreement']:g})"
        lines.append(row(name, f"{a['mean_samples']:.1f}"[:3], a))
    lines.append("(adaptive's k column: mean samples drawn)")
    s, g = result["sampling"], result["greedy"]
    lines += [
        "",
        f"tokens/s: greedy {g['tokens_per_second']:.1f} (batch of {result['num_problems']}), "
        f"sampling {s['tokens_per_second']:.1f} (n = {s['samples_per_problem']} per problem); "
        f"load average before/after {result['load_average_before'][0]} / "
        f"{result['load_average_after'][0]} on {os.cpu_count()} CPUs",
    ]
    kv = result["kv_blocks"]
    n_key = next(k for k in kv if k.startswith("n") and k != "n1")
    one, many = kv["n1"], kv[n_key]
    lines.append(
        f"KV blocks ({kv['block_size']} tokens), prompt of {one['prompt_tokens']} tokens: "
        f"covering the prompt n=1 {one['prompt_blocks']}, {n_key.replace('n', 'n=')} "
        f"{many['prompt_blocks']} ({kv.get('prompt_blocks_ratio', float('nan')):.2f}x, "
        f"{many.get('shared_prompt_blocks')} of them shared by all samples); "
        f"peak n=1 {one['peak_blocks']}, {n_key.replace('n', 'n=')} {many['peak_blocks']} "
        f"({kv['peak_blocks_ratio']:.2f}x; {kv['peak_blocks_without_sharing']} without sharing)"
    )
    return lines


def to_results(result: dict[str, Any]) -> Results:
    """The record's results: each strategy's accuracy against greedy decoding's (and CAD's
    share of answers that follow the context against plain decoding's), and the speed of
    sampling and of entropy-adaptive decoding against greedy."""
    table: list[Row] = []
    if "greedy" in result:
        greedy = result["greedy"]["accuracy"]
        for method, by_k in result["methods"].items():
            for k, r in by_k.items():
                table.append(Row(f"word-problem accuracy, {method} at k = {k}", r["accuracy"],
                                 "greedy", greedy))  # fmt: skip
        for a in result["adaptive"]:
            measured = (
                f"word-problem accuracy, adaptive (agreement {a['agreement']:g}, "
                f"{a['mean_samples']:.1f} samples)"
            )
            table.append(Row(measured, a["accuracy"], "greedy", greedy))
        sampling = result["sampling"]
        measured = f"tok/s, {sampling['samples_per_problem']} samples per problem"
        greedy_speed = result["greedy"]["tokens_per_second"]
        table.append(speed_row(measured, sampling["tokens_per_second"], "greedy", greedy_speed))
    if "humaneval" in result:
        h = result["humaneval"]
        for pick in ("tests", "logprob"):
            measured = f"HumanEval pass@1, best of {h['k']} by {pick}"
            table.append(Row(measured, h[f"best_of_n_by_{pick}"], "greedy", h["greedy_pass_at_1"]))
    if "cad" in result:
        plain = result["cad"]["rows"][0]["follows_context"]
        for r in result["cad"]["rows"][1:]:
            measured = f"answers that follow the context, CAD alpha {r['alpha']:g}"
            table.append(Row(measured, r["follows_context"], "plain decoding", plain))
    if "entropy_adaptive" in result:
        plain, *rows = result["entropy_adaptive"]["rows"]
        for r in rows:
            name = f"entropy-adaptive, threshold {r['threshold']:g} nats"
            table.append(Row(f"word-problem accuracy, {name}", r["accuracy"], "greedy",
                             plain["accuracy"]))  # fmt: skip
            table.append(speed_row(f"tok/s (batch 1), {name}", r["tokens_per_second"], "greedy",
                                   plain["tokens_per_second"]))  # fmt: skip
    model = f"{Path(result['model_path']).name}, {result['dtype']} on {result['device']}"
    return Results("scaling", result, table, model)


def write_plots(result: dict[str, Any], prefix: str | os.PathLike) -> list[Path]:
    """accuracy vs k and accuracy vs tokens per problem, as PNGs (needs the ``bench`` extra:
    matplotlib); returns the files written, none without matplotlib."""
    if "methods" not in result:  # the arithmetic task did not run
        return []
    plt = pyplot()
    if plt is None:
        return []
    written = []
    for x_key, x_label, name in (
        ("k", "samples per problem (k)", "accuracy_vs_k"),
        ("mean_tokens", "generated tokens per problem", "accuracy_vs_compute"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for method in METHODS:
            points = result["methods"][method]
            xs = [int(k) if x_key == "k" else r["mean_tokens"] for k, r in points.items()]
            label = "pass@k (ceiling)" if method == "pass" else method
            style = ":" if method == "pass" else "-"
            ax.plot(xs, [r["accuracy"] for r in points.values()], style, marker="o", label=label)
        for a in result["adaptive"]:
            x = a["mean_samples"] if x_key == "k" else a["mean_tokens"]
            ax.scatter([x], [a["accuracy"]], marker="*", s=120, zorder=3,
                       label=f"adaptive (agree {a['agreement']:g})")  # fmt: skip
        ax.axhline(result["greedy"]["accuracy"], color="gray", linestyle="--", label="greedy")
        ax.set_xscale("log", base=2)
        if x_key == "k":
            ks = [int(k) for k in result["methods"]["majority"]]
            ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel(x_label)
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{result['model']}: {result['num_problems']} word problems")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(f"{prefix}_{name}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
