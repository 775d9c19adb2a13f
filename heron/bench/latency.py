"""``heron bench latency``: one request at a time — time to first token and decode speed —
for heron in each weight format, against transformers (in unquantized heron's dtype) and
llama.cpp (its own format of the same GGUF), in one run; with each heron format's perplexity
on a fixed text.

heron: one engine per weight format (prefix caching off), a prompt of ``input_len`` random
token ids, ``output_len`` new tokens, greedy, EOS ignored; TTFT = add_request to the first
token, decode tok/s = the other ``output_len - 1`` tokens over their time; best of
``repeats``. transformers: TTFT = one forward over the prompt; decode = ``generate`` time
minus that. llama.cpp: ``llama-bench -p input_len -n output_len -r repeats`` (TTFT = prompt
/ its mean prefill speed)."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from heron.bench import llama_cpp
from heron.bench.perplexity import perplexity, perplexity_tokens
from heron.bench.plot import pyplot
from heron.bench.record import Results, Row, speed_row
from heron.bench.throughput import load_hf_model, make_prompts
from heron.errors import InvalidRequestError
from heron.platform import resolve_dtype

logger = logging.getLogger(__name__)


@dataclass
class LatencyBenchConfig:
    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    quantizations: list[str] = field(default_factory=lambda: ["none", "int8", "int4"])
    input_len: int = 128
    output_len: int = 128
    repeats: int = 3
    perplexity_tokens: int = 1024  # 0 = no perplexity
    skip_hf: bool = False
    skip_llama_cpp: bool = False
    seed: int = 0

    def validate(self) -> None:
        for name in ("input_len", "output_len", "repeats"):
            if getattr(self, name) < 1 + (name == "output_len"):
                flag = "--" + name.replace("_", "-")
                raise InvalidRequestError(f"{flag}: too small, got {getattr(self, name)}")
        if not self.quantizations:
            raise InvalidRequestError("--quantizations: name at least one weight format")


@dataclass
class LatencyRow:
    engine: str  # heron / transformers / llama.cpp
    weights: str  # heron: its quantization; others: the format they ran
    ttft_ms: float
    decode_tokens_per_second: float
    perplexity: float | None = None
    weight_mib: float | None = None  # parameters + buffers held by the model
    activations: str = ""  # dtype of activations and KV cache (heron, transformers)


def _model_mib(model: torch.nn.Module) -> float:
    """Parameters and buffers, each memory once: a tied LM head's GEMV weight is the
    embedding's own (oneDNN's packed weights are opaque tensors, each its own memory)."""
    held: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr() if t.layout == torch.strided else id(t)
        held[key] = max(held.get(key, 0), t.numel() * t.element_size())
    return sum(held.values()) / 2**20


def run_heron(cfg: LatencyBenchConfig, quantization: str) -> tuple[LatencyRow, dict]:
    from heron import LLM, SamplingParams

    llm = LLM(
        cfg.model,
        dtype=cfg.dtype,
        device=cfg.device,
        quantization=quantization,
        enable_prefix_caching=False,
        max_num_seqs=1,
    )
    engine = llm.engine
    tok = llm.get_tokenizer()
    prompt = make_prompts(tok, 1, cfg.input_len, cfg.seed)[0]
    params = SamplingParams(temperature=0, max_tokens=cfg.output_len, ignore_eos=True)
    llm.generate([prompt[:16]], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    best_ttft, best_decode = float("inf"), 0.0
    for _ in range(cfg.repeats):
        t0 = time.perf_counter()
        engine.add_request(prompt, params)
        first = None
        while engine.has_unfinished_requests():
            outs = engine.step()
            if first is None and outs and outs[0].outputs[0].token_ids:
                first = time.perf_counter()
        end = time.perf_counter()
        best_ttft = min(best_ttft, first - t0)
        best_decode = max(best_decode, (cfg.output_len - 1) / (end - first))
    ppl_ids = perplexity_tokens(tok, cfg.perplexity_tokens) if cfg.perplexity_tokens else []
    ppl = perplexity(llm, ppl_ids) if ppl_ids else None
    dtype = str(engine.dtype).removeprefix("torch.")
    mib = _model_mib(engine.runner.model)
    row = LatencyRow("heron", quantization, best_ttft * 1e3, best_decode, ppl, mib, dtype)
    info = {
        "model_path": str(engine.model_path),
        "dtype": dtype,
        "device": str(engine.device),
        "prompt": prompt,
        "perplexity_ids": ppl_ids,
    }
    del llm, engine
    gc.collect()
    return row, info


def run_transformers(cfg: LatencyBenchConfig, info: dict) -> LatencyRow:
    """In the dtype unquantized heron runs in (``auto`` may pick bf16 for quantized rows)."""
    from transformers import GenerationConfig

    dtype = resolve_dtype(cfg.dtype, torch.device(info["device"]))
    model = load_hf_model(Path(info["model_path"]), dtype, info["device"])
    ids = torch.tensor([info["prompt"]], device=info["device"])
    gen = GenerationConfig(
        max_new_tokens=cfg.output_len,
        min_new_tokens=cfg.output_len,
        do_sample=False,
        pad_token_id=0,
    )
    best_ttft, best_total = float("inf"), float("inf")
    with torch.inference_mode():
        model.generate(ids[:, :16], generation_config=GenerationConfig(max_new_tokens=4))
        for _ in range(cfg.repeats):
            t0 = time.perf_counter()
            model(ids).logits[:, -1].argmax(-1)
            best_ttft = min(best_ttft, time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
            best_total = min(best_total, time.perf_counter() - t0)
        ppl = None
        if info["perplexity_ids"]:
            x = torch.tensor([info["perplexity_ids"]], device=info["device"])
            loss = model(x, labels=x).loss.item()
            ppl = float(torch.tensor(loss).exp())
    name = str(dtype).removeprefix("torch.")
    row = LatencyRow(
        "transformers",
        name,
        best_ttft * 1e3,
        (cfg.output_len - 1) / (best_total - best_ttft),
        ppl,
        _model_mib(model),
        name,
    )
    del model
    gc.collect()
    return row


def run_llama_cpp(cfg: LatencyBenchConfig, info: dict) -> LatencyRow | None:
    path = Path(info["model_path"])
    if path.suffix != ".gguf":
        logger.warning("llama.cpp baseline skipped: %s is not a GGUF file", path.name)
        return None
    results = llama_cpp.llama_bench(path, [cfg.input_len], cfg.output_len, cfg.repeats)
    if not results:
        return None
    prefill = next(r for r in results if r.prompt_tokens)
    decode = next(r for r in results if r.gen_tokens)
    return LatencyRow(
        "llama.cpp",
        "gguf as stored",
        cfg.input_len / prefill.tokens_per_second * 1e3,
        decode.tokens_per_second,
        weight_mib=path.stat().st_size / 2**20,
    )


@dataclass
class LatencyResult:
    config: LatencyBenchConfig
    model_path: str
    dtype: str
    device: str
    rows: list[LatencyRow]

    def baseline(self, engine: str) -> LatencyRow | None:
        return next((r for r in self.rows if r.engine == engine), None)


def run_latency_bench(cfg: LatencyBenchConfig) -> LatencyResult:
    cfg.validate()
    rows: list[LatencyRow] = []
    info: dict = {}
    for q in cfg.quantizations:
        logger.info("heron, %s weights: %d tokens in, %d out", q, cfg.input_len, cfg.output_len)
        row, info = run_heron(cfg, q)
        rows.append(row)
    if not cfg.skip_hf:
        logger.info("transformers: %d tokens in, %d out", cfg.input_len, cfg.output_len)
        rows.append(run_transformers(cfg, info))
    if not cfg.skip_llama_cpp and (row := run_llama_cpp(cfg, info)) is not None:
        rows.append(row)
    return LatencyResult(cfg, info["model_path"], info["dtype"], info["device"], rows)


def format_table(result: LatencyResult) -> str:
    c = result.config
    hf, lc = result.baseline("transformers"), result.baseline("llama.cpp")
    head = [
        "engine", "weights", "act", "MiB", "TTFT ms", "decode tok/s", "x HF", "x llama.cpp", "ppl"
    ]  # fmt: skip
    table = [head]
    for r in result.rows:
        table.append(
            [
                r.engine,
                r.weights,
                r.activations,
                "" if r.weight_mib is None else f"{r.weight_mib:.0f}",
                f"{r.ttft_ms:.1f}",
                f"{r.decode_tokens_per_second:.1f}",
                _ratio(r, hf),
                _ratio(r, lc),
                "" if r.perplexity is None else f"{r.perplexity:.3f}",
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = [
        f"latency: {Path(result.model_path).name} on {result.device}, batch 1, "
        f"{c.input_len} tokens in, {c.output_len} out (greedy), "
        f"best of {c.repeats}, {torch.get_num_threads()} threads; ppl over "
        f"{c.perplexity_tokens} tokens of The Tempest"
    ]
    for i, row in enumerate(table):
        lines.append(
            "  ".join(
                v.ljust(w) if j < 3 else v.rjust(w)
                for j, (v, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ratio(row: LatencyRow, base: LatencyRow | None) -> str:
    if base is None or row is base or row.engine != "heron":
        return ""
    return f"{row.decode_tokens_per_second / base.decode_tokens_per_second:.2f}x"


def to_dict(result: LatencyResult) -> dict[str, Any]:
    return {
        "config": asdict(result.config),
        "model_path": result.model_path,
        "dtype": result.dtype,
        "device": result.device,
        "rows": [asdict(r) for r in result.rows],
    }


def to_results(result: LatencyResult) -> Results:
    """The record's results: each heron format's decode speed against each baseline, and its
    perplexity against unquantized transformers' (no ratio: quality, not speed)."""
    baselines = [r for r in result.rows if r.engine != "heron"]
    rows: list[Row] = []
    for r in result.rows:
        if r.engine != "heron":
            continue
        measured = f"decode tok/s (batch 1), {r.weights} weights"
        for b in baselines:
            name = f"{b.engine} ({b.weights})"
            rows.append(
                speed_row(measured, r.decode_tokens_per_second, name, b.decode_tokens_per_second)
            )
        if not baselines:
            rows.append(speed_row(measured, r.decode_tokens_per_second))
        if r.perplexity is not None:
            hf = result.baseline("transformers")
            ppl = None if hf is None else hf.perplexity
            name = "" if ppl is None else f"transformers ({hf.weights})"
            rows.append(Row(f"perplexity, {r.weights} weights", r.perplexity, name, ppl))
    model = f"{Path(result.model_path).name}, {result.dtype} on {result.device}"
    return Results("latency", to_dict(result), rows, model)


def write_png(result: LatencyResult, path: str) -> bool:
    """Decode tok/s per engine and format; False when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    labels = [f"{r.engine}\n{r.weights}" for r in result.rows]
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 2, 4))
    ax.bar(labels, [r.decode_tokens_per_second for r in result.rows])
    ax.set(ylabel="batch-1 decode tok/s", title=Path(result.model_path).name)
    fig.tight_layout()
    fig.savefig(path)
    return True
