"""llama.cpp as a baseline: its native ``llama-bench`` and ``llama-batched-bench`` run on the
same GGUF file heron loads, in llama.cpp's own weight format (a Q4_1 GGUF stays Q4_1 there).

The binaries come from ``make bench-deps`` (built from the llama.cpp source vendored in the
llama-cpp-python sdist, installed into the venv's bin); ``HERON_LLAMA_CPP_DIR`` or ``PATH``
may point at others. Without them, benchmarks skip this baseline and say so."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

INSTALL_HINT = "run `make bench-deps` to build llama.cpp's llama-bench (about 10 minutes)"


def find_tool(name: str) -> Path | None:
    """``llama-bench`` or ``llama-batched-bench``: from $HERON_LLAMA_CPP_DIR, this Python's
    bin folder (where `make bench-deps` puts them), then PATH."""
    folders = [os.environ.get("HERON_LLAMA_CPP_DIR"), str(Path(sys.prefix) / "bin")]
    for folder in filter(None, folders):
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    return Path(found) if found else None


@dataclass
class LlamaBenchResult:
    prompt_tokens: int
    gen_tokens: int
    tokens_per_second: float  # llama-bench's mean over its repetitions


def llama_bench(
    model: Path,
    prompt_lens: list[int],
    gen_len: int,
    repetitions: int = 1,
    threads: int | None = None,
) -> list[LlamaBenchResult] | None:
    """Prefill speed for each prompt length (``-p``) and batch-1 decode speed over ``gen_len``
    tokens (``-n``), averaged over ``repetitions`` runs of each; None when llama-bench is not
    installed or fails (logged)."""
    tool = find_tool("llama-bench")
    if tool is None:
        logger.warning("llama.cpp baseline skipped: llama-bench not found; %s", INSTALL_HINT)
        return None
    cmd = [str(tool), "-m", str(model), "-t", str(threads or torch.get_num_threads())]
    cmd += ["-p", ",".join(map(str, prompt_lens)) or "0", "-n", str(gen_len)]
    cmd += ["-r", str(repetitions), "-o", "json"]
    rows = _run_json(cmd, no_repack=["--repack", "0"])
    if rows is None:
        return None
    return [LlamaBenchResult(r["n_prompt"], r["n_gen"], float(r["avg_ts"])) for r in rows]


@dataclass
class BatchedBenchResult:
    prompts: int
    prompt_len: int
    gen_len: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def generated_tokens_per_second(self) -> float:
        """Generated tokens over the whole run (prefill included), as heron's throughput."""
        return self.prompts * self.gen_len / self.seconds


def batched_bench(
    model: Path, prompts: int, prompt_len: int, gen_len: int, threads: int | None = None
) -> BatchedBenchResult | None:
    """``prompts`` sequences of ``prompt_len`` tokens decoded ``gen_len`` tokens each in one
    batch; None when llama-batched-bench is not installed or fails (logged)."""
    tool = find_tool("llama-batched-bench")
    if tool is None:
        logger.warning(
            "llama.cpp baseline skipped: llama-batched-bench not found; %s", INSTALL_HINT
        )
        return None
    ctx = prompts * (prompt_len + gen_len)
    cmd = [str(tool), "-m", str(model), "-t", str(threads or torch.get_num_threads())]
    cmd += ["-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(prompt_len)]
    cmd += ["-ntg", str(gen_len), "-npl", str(prompts), "--output-format", "jsonl"]
    rows = _run_json(cmd, jsonl=True, no_repack=["--no-repack"])
    if not rows:
        return None
    r = rows[-1]
    return BatchedBenchResult(prompts, prompt_len, gen_len, float(r["t_pp"]), float(r["t_tg"]))


def _run_json(cmd: list[str], no_repack: list[str], jsonl: bool = False) -> list[dict] | None:
    """Run a llama.cpp tool and parse its JSON output. Where the tool crashes with weight
    repacking (the AMX kernels of this llama.cpp segfault on some AMX CPUs), it is run again
    with ``no_repack`` (the flag turning repacking off, which the tools spell differently)."""
    proc = _run(cmd)
    if proc is not None and proc.returncode < 0:
        logger.warning(
            "llama.cpp crashed (signal %d) with weight repacking; running it again without",
            -proc.returncode,
        )
        proc = _run(cmd + no_repack)
    if proc is None:
        return None
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        logger.warning("llama.cpp baseline failed (exit %d): %s", proc.returncode, " | ".join(tail))
        return None
    try:
        if jsonl:
            return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        return json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        logger.warning("llama.cpp baseline: unreadable output (%s)", e)
        return None


def _run(cmd: list[str]) -> subprocess.CompletedProcess | None:
    logger.info(
        "llama.cpp: %s", " ".join(Path(cmd[0]).name if i == 0 else c for i, c in enumerate(cmd))
    )
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        logger.warning("llama.cpp baseline skipped: %s", e)
        return None
