"""``heron bench structured``: JSON-schema-constrained generation against free generation on
the same prompts, lengths and seeds, at each batch size, in one run; the share of
constrained outputs that validate against the schema; and a schema's compile time, cold and
cached.

Speed runs generate exactly ``output_len`` tokens per request (``ignore_eos``: once the
document is complete the grammar allows only the end token, so the constrained run still
masks every step); each is timed ``repeats`` times, alternating free and constrained, and the
fastest kept. The valid rate comes from separate runs that stop at the document's end."""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from heron.bench.record import Results, Row, speed_row

logger = logging.getLogger(__name__)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 4},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}
PROMPTS = [
    "Describe a person as JSON.",
    "Invent a character for a novel and give their details as JSON.",
    "Write a JSON record for a new member of a chess club.",
    "Give the profile of a retired sailor as JSON.",
]


@dataclass
class StructuredBenchConfig:
    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    output_len: int = 64
    valid_samples: int = 16  # constrained requests (temperature 1) checked against the schema
    repeats: int = 2
    seed: int = 0


@dataclass
class SpeedRow:
    batch_size: int
    free_tokens_per_second: float
    constrained_tokens_per_second: float

    @property
    def ratio(self) -> float:
        return self.constrained_tokens_per_second / self.free_tokens_per_second


@dataclass
class StructuredBenchResult:
    model_path: str
    dtype: str
    device: str
    speeds: list[SpeedRow]
    valid: int
    samples: int
    validator: str  # "jsonschema", or "json" where jsonschema is not installed
    compile_cold_ms: float
    compile_cached_ms: float


def run_structured_bench(cfg: StructuredBenchConfig) -> StructuredBenchResult:
    from heron import LLM, SamplingParams, StructuredOutputsParams

    llm = LLM(model=cfg.model, dtype=cfg.dtype, device=cfg.device)
    engine = llm.engine
    spec = StructuredOutputsParams(json=SCHEMA)

    def params(constrained: bool, seed: int, **kw: Any) -> SamplingParams:
        so = spec if constrained else None
        return SamplingParams(temperature=1.0, seed=seed, structured_outputs=so, **kw)

    llm.generate(PROMPTS[:1], params(True, 0, max_tokens=8), use_tqdm=False)  # warm-up
    speeds = []
    for b in cfg.batch_sizes:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
        best = {False: float("inf"), True: float("inf")}
        for _ in range(cfg.repeats):
            for constrained in (False, True):
                ps = [
                    params(constrained, cfg.seed + i, max_tokens=cfg.output_len, ignore_eos=True)
                    for i in range(b)
                ]
                t0 = time.perf_counter()
                llm.generate(prompts, ps, use_tqdm=False)
                best[constrained] = min(best[constrained], time.perf_counter() - t0)
        tokens = b * cfg.output_len
        speeds.append(SpeedRow(b, tokens / best[False], tokens / best[True]))
        logger.info(
            "batch %d: free %.1f, constrained %.1f tok/s", b, *(tokens / best[k] for k in best)
        )

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(cfg.valid_samples)]
    outs = llm.generate(
        prompts,
        [params(True, cfg.seed + i, max_tokens=256) for i in range(cfg.valid_samples)],
        use_tqdm=False,
    )
    check, validator = _validator()
    valid = sum(check(o.outputs[0].text) for o in outs)

    compiler = engine.plugins.get("structured_output").compiler
    fresh = StructuredOutputsParams(json={**SCHEMA, "title": uuid.uuid4().hex})  # not cached
    t0 = time.perf_counter()
    compiler.compile(fresh)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiler.compile(fresh)
    cached = time.perf_counter() - t0
    return StructuredBenchResult(
        str(engine.model_path),
        str(engine.dtype).removeprefix("torch."),
        str(engine.device),
        speeds,
        valid,
        cfg.valid_samples,
        validator,
        cold * 1e3,
        cached * 1e3,
    )


def _validator():
    """A check of one output against the schema: jsonschema where installed, else that it
    parses as a JSON object with the required keys."""
    try:
        import jsonschema
    except ImportError:
        jsonschema = None

    def check(text: str) -> bool:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            return False
        if jsonschema is None:
            return isinstance(doc, dict) and set(SCHEMA["required"]) <= set(doc)
        try:
            jsonschema.validate(doc, SCHEMA)
        except jsonschema.ValidationError:
            return False
        return True

    return check, "json" if jsonschema is None else "jsonschema"


def format_table(result: StructuredBenchResult) -> str:
    lines = [
        f"{Path(result.model_path).name}, {result.dtype} on {result.device}",
        f"{'batch':>5}  {'free tok/s':>11}  {'JSON schema tok/s':>17}  {'ratio':>6}",
    ]
    for s in result.speeds:
        lines.append(
            f"{s.batch_size:>5}  {s.free_tokens_per_second:>11.1f}  "
            f"{s.constrained_tokens_per_second:>17.1f}  {s.ratio:>5.2f}x"
        )
    lines.append(
        f"schema-valid outputs: {result.valid}/{result.samples} ({result.validator}); "
        f"compile: {result.compile_cold_ms:.1f} ms cold, {result.compile_cached_ms:.3f} ms cached"
    )
    return "\n".join(lines)


def to_results(result: StructuredBenchResult) -> Results:
    rows = [
        speed_row(
            f"decode tok/s (batch {s.batch_size}), JSON schema",
            s.constrained_tokens_per_second,
            "free generation",
            s.free_tokens_per_second,
        )
        for s in result.speeds
    ]
    rows.append(Row("schema-valid outputs (share)", result.valid / result.samples))
    rows.append(Row("schema compile ms, cold", result.compile_cold_ms))
    rows.append(Row("schema compile ms, cached", result.compile_cached_ms))
    data = asdict(result)
    model = f"{Path(result.model_path).name}, {result.dtype} on {result.device}"
    return Results("structured", data, rows, model)
