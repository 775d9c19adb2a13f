"""Offline throughput: heron's ``LLM.generate`` vs. Hugging Face transformers' ``generate``
and llama.cpp's ``llama-batched-bench`` (when built; see ``heron.bench.llama_cpp``); with
``data_parallel_size`` > 1, also heron's ``DataParallelLLM`` (engine replicas on Ray,
heron.scaleout) against the single engine.

Both engines get the same work: ``num_prompts`` prompts of exactly ``input_len`` token ids
(drawn from the vocabulary without special tokens by a seeded ``torch.Generator``), and
``output_len`` new tokens each, greedy, EOS ignored, on the same model file and dtype. heron
gets every request at once (continuous batching); transformers runs fixed batches of
``hf_batch_size`` with left padding. Each is timed after a short warm-up; heron's engine is
freed before transformers loads the model. tok/s = generated tokens / wall time."""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from heron.bench import llama_cpp
from heron.bench.plot import pyplot
from heron.bench.record import Results, cpu_busy_elsewhere, speed_row
from heron.errors import InvalidRequestError, ModelLoadError

logger = logging.getLogger(__name__)

_WARMUP_PROMPTS = 2
_WARMUP_LEN = 16
_WARMUP_TOKENS = 4


@dataclass
class ThroughputConfig:
    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    num_prompts: int = 64
    input_len: int = 128
    output_len: int = 128
    hf_batch_size: int = 64
    skip_hf: bool = False
    skip_llama_cpp: bool = False
    seed: int = 0
    data_parallel_size: int = 1  # > 1: also time that many engine replicas on Ray
    cpus_per_replica: int | None = None
    engine_kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        names = ("num_prompts", "input_len", "output_len", "hf_batch_size")
        for name in (*names, "data_parallel_size", "cpus_per_replica"):
            value = getattr(self, name)
            if value is not None and value < 1:
                flag = "--" + name.replace("_", "-")
                raise InvalidRequestError(f"{flag}: must be >= 1, got {value}", param=name)


@dataclass
class EngineResult:
    engine: str
    requests: int
    generated_tokens: int
    seconds: float
    other_cpu_load: float | None = None  # cores busy with other processes just before timing

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ThroughputResult:
    config: ThroughputConfig
    model_path: str
    dtype: str
    device: str
    heron: EngineResult
    transformers: EngineResult | None = None
    llama_cpp: EngineResult | None = None
    data_parallel: EngineResult | None = None

    @property
    def ratio(self) -> float | None:
        """heron over transformers."""
        return _ratio(self.heron, self.transformers)

    @property
    def data_parallel_ratio(self) -> float | None:
        """heron's replicas over the single engine."""
        return _ratio(self.data_parallel, self.heron) if self.data_parallel else None

    @property
    def engines(self) -> list[EngineResult]:
        runs = (self.heron, self.data_parallel, self.transformers, self.llama_cpp)
        return [r for r in runs if r is not None]

    @property
    def llama_cpp_ratio(self) -> float | None:
        return _ratio(self.heron, self.llama_cpp)


def _ratio(a: EngineResult, b: EngineResult | None) -> float | None:
    if b is None or b.tokens_per_second == 0:
        return None
    return a.tokens_per_second / b.tokens_per_second


# ---------------------------------------------------------------------------- prompts
def make_prompts(tokenizer, num_prompts: int, input_len: int, seed: int) -> list[list[int]]:
    """``num_prompts`` lists of exactly ``input_len`` token ids, none of them special."""
    hf = tokenizer.hf
    special = set(hf.all_special_ids) | set(getattr(hf, "added_tokens_decoder", {}) or {})
    allowed = torch.tensor([i for i in range(len(hf)) if i not in special], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(allowed), (num_prompts, input_len), generator=gen)
    return allowed[picks].tolist()


# ---------------------------------------------------------------------------- heron
def run_heron(cfg: ThroughputConfig) -> tuple[EngineResult, Any, list[list[int]], dict]:
    """Time heron; returns its result, the tokenizer, the prompts and where it ran."""
    from heron import LLM

    llm = LLM(cfg.model, dtype=cfg.dtype, device=cfg.device, **cfg.engine_kwargs)
    tok = llm.get_tokenizer()
    info = {
        "model_path": llm.engine.model_path,
        "dtype": str(llm.engine.dtype).removeprefix("torch."),
        "device": str(llm.engine.device),
    }
    if cfg.input_len + cfg.output_len > llm.engine.max_model_len:
        raise InvalidRequestError(
            f"--input-len + --output-len = {cfg.input_len + cfg.output_len} exceeds the "
            f"model's context of {llm.engine.max_model_len} tokens"
        )
    prompts = make_prompts(tok, cfg.num_prompts, cfg.input_len, cfg.seed)
    # Different ids than the timed prompts, so the prefix cache cannot help the timed run.
    warmup = make_prompts(tok, _WARMUP_PROMPTS, _WARMUP_LEN, cfg.seed + 1)

    result = _time_generate("heron", llm, cfg, prompts, warmup, info["device"])
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result, tok, prompts, info


def _time_generate(
    name: str, llm, cfg: ThroughputConfig, prompts: list[list[int]], warmup, device: str
) -> EngineResult:
    """Warm ``llm`` (an ``LLM`` or a ``DataParallelLLM``) up, then time ``prompts``."""
    from heron import SamplingParams

    logger.info("%s: warm-up", name)
    llm.generate(
        warmup,
        SamplingParams(temperature=0, max_tokens=_WARMUP_TOKENS, ignore_eos=True),
        use_tqdm=False,
    )
    params = SamplingParams(temperature=0, max_tokens=cfg.output_len, ignore_eos=True)
    logger.info(
        "%s: %d prompts x %d tokens in, %d out",
        name,
        cfg.num_prompts,
        cfg.input_len,
        cfg.output_len,
    )
    load = cpu_busy_elsewhere()
    _sync(device)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    _sync(device)
    secs = time.perf_counter() - t0
    generated = sum(len(c.token_ids) for o in outs for c in o.outputs)
    expected = cfg.num_prompts * cfg.output_len
    if generated != expected:
        logger.warning("%s generated %d tokens, expected %d", name, generated, expected)
    return EngineResult(name, len(outs), generated, secs, load)


def run_data_parallel(cfg: ThroughputConfig, tokenizer, prompts: list[list[int]], info: dict):
    """The same work through ``cfg.data_parallel_size`` engine replicas on Ray."""
    from heron.scaleout.data_parallel import DataParallelLLM

    size = cfg.data_parallel_size
    name = f"heron x{size} (Ray)"
    logger.info("%s: starting the replicas", name)
    with DataParallelLLM(
        cfg.model,
        dtype=info["dtype"],
        device=cfg.device,
        data_parallel_size=size,
        cpus_per_replica=cfg.cpus_per_replica,
        **cfg.engine_kwargs,
    ) as llm:
        # enough warm-up prompts for every replica to get some
        warmup = make_prompts(tokenizer, max(_WARMUP_PROMPTS, size), _WARMUP_LEN, cfg.seed + 1)
        return _time_generate(name, llm, cfg, prompts, warmup, info["device"])


# ---------------------------------------------------------------------------- transformers
def load_hf_model(path: Path, dtype: torch.dtype, device: str):
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise ModelLoadError(f"the transformers baseline needs transformers: {e}") from None
    try:
        if path.is_dir():
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=dtype
            )
    except ImportError as e:
        raise ModelLoadError(
            f"transformers could not load {path.name}: {e} (GGUF needs `pip install accelerate "
            "gguf`); or pass --skip-hf"
        ) from None
    return model.to(device).eval()


def _left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, row in enumerate(batch):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def _hf_generate(model, batch: list[list[int]], new_tokens: int, pad_id: int, device: str) -> int:
    from transformers import GenerationConfig

    ids, mask = _left_pad(batch, pad_id)
    gen_cfg = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=model.generation_config.eos_token_id,
    )
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg
        )
    return int(out.shape[1] - ids.shape[1]) * len(batch)


def run_transformers(
    cfg: ThroughputConfig, tokenizer, prompts: list[list[int]], info: dict
) -> EngineResult:
    from tqdm.auto import tqdm

    dtype = getattr(torch, info["dtype"])
    device = info["device"]
    logger.info("transformers: loading %s in %s", Path(info["model_path"]).name, info["dtype"])
    t0 = time.perf_counter()
    model = load_hf_model(Path(info["model_path"]), dtype, device)
    logger.info("transformers: loaded in %.1fs", time.perf_counter() - t0)
    hf_tok = tokenizer.hf
    pad_id = hf_tok.pad_token_id
    if pad_id is None:
        pad_id = hf_tok.eos_token_id if hf_tok.eos_token_id is not None else 0

    logger.info("transformers: warm-up")
    warmup = make_prompts(tokenizer, _WARMUP_PROMPTS, _WARMUP_LEN, cfg.seed + 1)
    _hf_generate(model, warmup, _WARMUP_TOKENS, pad_id, device)

    batches = [
        prompts[i : i + cfg.hf_batch_size] for i in range(0, len(prompts), cfg.hf_batch_size)
    ]
    generated = 0
    load = cpu_busy_elsewhere()
    _sync(device)
    t0 = time.perf_counter()
    for batch in tqdm(batches, desc="transformers", unit="batch"):
        generated += _hf_generate(model, batch, cfg.output_len, pad_id, device)
    _sync(device)
    secs = time.perf_counter() - t0
    del model
    gc.collect()
    return EngineResult("transformers", len(prompts), generated, secs, load)


# ---------------------------------------------------------------------------- driver
def run_throughput(cfg: ThroughputConfig) -> ThroughputResult:
    cfg.validate()
    heron_result, tok, prompts, info = run_heron(cfg)
    logger.info(
        "heron: %d tokens in %.1fs (%.1f tok/s)",
        heron_result.generated_tokens,
        heron_result.seconds,
        heron_result.tokens_per_second,
    )
    dp_result = None
    if cfg.data_parallel_size > 1:
        dp_result = run_data_parallel(cfg, tok, prompts, info)
    hf_result = None
    if not cfg.skip_hf:
        hf_result = run_transformers(cfg, tok, prompts, info)
    return ThroughputResult(
        config=cfg,
        model_path=str(info["model_path"]),
        dtype=info["dtype"],
        device=info["device"],
        heron=heron_result,
        data_parallel=dp_result,
        transformers=hf_result,
        llama_cpp=None if cfg.skip_llama_cpp else run_llama_cpp(cfg, Path(info["model_path"])),
    )


def run_llama_cpp(cfg: ThroughputConfig, path: Path) -> EngineResult | None:
    if path.suffix != ".gguf":
        logger.warning("llama.cpp baseline skipped: %s is not a GGUF file", path.name)
        return None
    logger.info("llama.cpp: %d prompts in one batch", cfg.num_prompts)
    load = cpu_busy_elsewhere()
    r = llama_cpp.batched_bench(path, cfg.num_prompts, cfg.input_len, cfg.output_len)
    if r is None:
        return None
    return EngineResult("llama.cpp", r.prompts, r.prompts * r.gen_len, r.seconds, load)


def format_table(result: ThroughputResult) -> str:
    c = result.config
    rows = [("engine", "requests", "gen tokens", "seconds", "tok/s")]
    for r in result.engines:
        rows.append(
            (
                r.engine,
                str(r.requests),
                str(r.generated_tokens),
                f"{r.seconds:.2f}",
                f"{r.tokens_per_second:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        f"throughput: {Path(result.model_path).name}, {result.dtype} on {result.device}, "
        f"heron weights: {c.engine_kwargs.get('quantization', 'none')}, "
        f"{c.num_prompts} prompts x {c.input_len} tokens in, {c.output_len} out "
        f"(greedy, ignore_eos), {torch.get_num_threads()} threads",
    ]
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            v.rjust(w) for v, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if result.data_parallel_ratio is not None:
        lines.append(
            f"{result.data_parallel.engine} / heron: {result.data_parallel_ratio:.2f}x "
            "(replicas of one engine each vs one engine with all of this process's threads)"
        )
    if result.ratio is not None:
        lines.append(f"heron / transformers: {result.ratio:.2f}x")
    if result.llama_cpp_ratio is not None:
        lines.append(
            f"heron / llama.cpp: {result.llama_cpp_ratio:.2f}x (llama.cpp runs the GGUF's own "
            "weight format)"
        )
    for r in result.engines:
        if r.other_cpu_load is not None and r.other_cpu_load >= 0.2:
            lines.append(
                f"note: other processes kept {r.other_cpu_load:.1f} CPU cores busy when the "
                f"{r.engine} run started; its timing is unreliable"
            )
    return "\n".join(lines)


def to_dict(result: ThroughputResult) -> dict[str, Any]:
    def engine(r: EngineResult | None) -> dict[str, Any] | None:
        if r is None:
            return None
        return {**asdict(r), "tokens_per_second": r.tokens_per_second}

    return {
        "config": asdict(result.config),
        "model_path": result.model_path,
        "dtype": result.dtype,
        "device": result.device,
        "heron": engine(result.heron),
        "data_parallel": engine(result.data_parallel),
        "transformers": engine(result.transformers),
        "llama_cpp": engine(result.llama_cpp),
        "data_parallel_over_heron": result.data_parallel_ratio,
        "heron_over_transformers": result.ratio,
        "heron_over_llama_cpp": result.llama_cpp_ratio,
    }


def to_results(result: ThroughputResult) -> Results:
    """The record's results: heron's tok/s against each baseline, and the replicas' against
    the single engine."""
    c = result.config
    heron = result.heron.tokens_per_second
    measured = f"generated tok/s, {c.engine_kwargs.get('quantization', 'none')} weights"
    rows = []
    if result.transformers is not None:
        hf = f"transformers (batches of {min(c.hf_batch_size, c.num_prompts)})"
        rows.append(speed_row(measured, heron, hf, result.transformers.tokens_per_second))
    if result.llama_cpp is not None:
        lc = "llama.cpp llama-batched-bench (GGUF as stored)"
        rows.append(speed_row(measured, heron, lc, result.llama_cpp.tokens_per_second))
    if not rows:
        rows.append(speed_row(measured, heron))
    if result.data_parallel is not None:
        replicas = f"generated tok/s, {c.data_parallel_size} engine replicas on Ray"
        dp = result.data_parallel.tokens_per_second
        rows.append(speed_row(replicas, dp, "heron, one engine", heron))
    model = f"{Path(result.model_path).name}, {result.dtype} on {result.device}"
    return Results("throughput", to_dict(result), rows, model)


def write_png(result: ThroughputResult, path: str | os.PathLike) -> bool:
    """tok/s per engine; False when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    engines = result.engines
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([r.engine for r in engines], [r.tokens_per_second for r in engines])
    c = result.config
    ax.set(
        ylabel="generated tok/s",
        title=f"{c.num_prompts} x {c.input_len} in, {c.output_len} out",
    )
    fig.tight_layout()
    fig.savefig(path)
    return True


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
