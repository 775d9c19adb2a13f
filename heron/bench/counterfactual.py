"""Counterfactual contexts for context-aware decoding: each case states something false about
the world ("In this story, the capital of France is Lyon.") and asks about it. A reader that
follows the context answers with the context's fact; a model that falls back on what it
memorised answers with the real one. The share of answers that follow the context is
measured with plain decoding and with CAD at each alpha, all cases batched, greedy."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from heron.config import SamplingParams
from heron.strategies.context_aware import ContextAware

logger = logging.getLogger(__name__)

INSTRUCTION = "Answer in a few words."


@dataclass(frozen=True)
class Counterfactual:
    context: str  # a false statement the answer should follow
    question: str
    answer: str  # regex of the context's answer
    prior: str  # regex of the real-world answer

    @property
    def message(self) -> str:
        return f"{self.context} {self.question} {INSTRUCTION}"

    def follows(self, text: str) -> tuple[bool, bool]:
        """(mentions the context's answer, mentions the real-world one)."""

        def hit(pattern: str) -> bool:
            return re.search(rf"\b(?:{pattern})", text, re.IGNORECASE) is not None

        return hit(self.answer), hit(self.prior)


CASES = tuple(
    Counterfactual(*case)
    for case in (
        ("In this story, the capital of France is Lyon.", "What is the capital of France?",
         "Lyon", "Paris"),
        ("In this world, water boils at 40 degrees Celsius at sea level.",
         "At what temperature in Celsius does water boil at sea level?", r"40\b", r"100\b"),
        ("In this story, the largest planet in the solar system is Mars.",
         "What is the largest planet in the solar system?", "Mars", "Jupiter"),
        ("In this novel, Romeo and Juliet was written by Charles Dickens.",
         "Who wrote Romeo and Juliet?", "Dickens", "Shakespeare"),
        ("In this story, the tallest mountain on Earth is Mont Blanc.",
         "What is the tallest mountain on Earth?", "Mont Blanc", "Everest"),
        ("In this world, spiders have six legs.", "How many legs does a spider have?",
         r"six\b|6\b", r"eight\b|8\b"),
        ("In this story, the first person to walk on the Moon was Yuri Gagarin.",
         "Who was the first person to walk on the Moon?", "Gagarin", "Armstrong"),
        ("In this world, the chemical symbol for gold is Ag.",
         "What is the chemical symbol for gold?", r"Ag\b", r"Au\b"),
        ("In this story, the Eiffel Tower stands in Rome.", "In which city is the Eiffel Tower?",
         "Rome", "Paris"),
        ("In this world, the sun rises in the west.", "In which direction does the sun rise?",
         "west", "east"),
        ("In this story, the currency of Japan is the dollar.", "What is the currency of Japan?",
         "dollar", "yen"),
        ("In this world, water freezes at 10 degrees Celsius.",
         "At what temperature in Celsius does water freeze?", r"10\b", r"0\b|zero"),
        ("In this story, the Mona Lisa was painted by Pablo Picasso.",
         "Who painted the Mona Lisa?", "Picasso", "Vinci|Leonardo"),
        ("In this world, a week has nine days.", "How many days are in a week?",
         r"nine\b|9\b", r"seven\b|7\b"),
        ("In this story, the longest river in the world is the Thames.",
         "What is the longest river in the world?", "Thames", "Nile|Amazon"),
        ("In this story, the capital of Japan is Osaka.", "What is the capital of Japan?",
         "Osaka", "Tokyo"),
        ("In this world, penguins live only at the North Pole.", "Where do penguins live?",
         "North", "South|Antarctic"),
        ("In this story, the Harry Potter books were written by Stephen King.",
         "Who wrote the Harry Potter books?", "King", "Rowling"),
        ("In this world, the human heart has two chambers.",
         "How many chambers does the human heart have?", r"two\b|2\b", r"four\b|4\b"),
        ("In this story, the largest ocean on Earth is the Atlantic.",
         "What is the largest ocean on Earth?", "Atlantic", "Pacific"),
    )
)  # fmt: skip


def run_counterfactual(
    llm,
    alphas: tuple[float, ...] = (0.5, 1.0),
    max_tokens: int = 24,
    cases: tuple[Counterfactual, ...] = CASES,
) -> dict[str, Any]:
    """Plain decoding (alpha 0, no companion) and CAD at each alpha over every case."""
    tok = llm.get_tokenizer()
    prompts = [tok.encode_chat([{"role": "user", "content": c.message}])[1] for c in cases]
    rows = []
    for alpha in (None, *alphas):
        params = [
            SamplingParams(temperature=0, max_tokens=max_tokens)
            if alpha is None
            else SamplingParams(
                temperature=0,
                max_tokens=max_tokens,
                token_strategy=ContextAware(context=c.context + " ", alpha=alpha),
            )
            for c in cases
        ]
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        secs = time.perf_counter() - t0
        texts = [o.outputs[0].text for o in outs]
        verdicts = [c.follows(t) for c, t in zip(cases, texts, strict=True)]
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        rows.append(
            {
                "method": "plain" if alpha is None else "cad",
                "alpha": alpha,
                "follows_context": sum(a and not p for a, p in verdicts) / len(cases),
                "mentions_context_answer": sum(a for a, _ in verdicts) / len(cases),
                "mentions_prior_answer": sum(p for _, p in verdicts) / len(cases),
                "tokens_per_second": generated / secs,
                # CAD also prefills each prompt without its context (the engine counts it)
                "prompt_tokens": sum(map(len, prompts))
                + sum(o.metrics.get("cad_context_free_prompt_tokens", 0) for o in outs),
                "answers": texts,
            }
        )
        logger.info("%s (alpha %s): %.2f follow the context", rows[-1]["method"], alpha,
                    rows[-1]["follows_context"])  # fmt: skip
    return {"num_cases": len(cases), "rows": rows}


def format_counterfactual(r: dict[str, Any]) -> list[str]:
    lines = [
        f"Context-aware decoding, {r['num_cases']} counterfactual contexts (greedy; 'follows' = "
        "gives the context's answer and not the real one):",
        f"  {'method':<12}{'follows':>8}{'ctx ans':>9}{'real ans':>9}{'tok/s':>8}"
        f"{'prompt tok':>11}",
    ]
    plain = r["rows"][0]["follows_context"]
    for row in r["rows"]:
        name = "plain" if row["alpha"] is None else f"cad a={row['alpha']:g}"
        gain = 100 * (row["follows_context"] - plain)
        delta = "" if row["alpha"] is None else f"  ({gain:+.0f} pts)"
        lines.append(
            f"  {name:<12}{row['follows_context']:>8.2f}{row['mentions_context_answer']:>9.2f}"
            f"{row['mentions_prior_answer']:>9.2f}{row['tokens_per_second']:>8.1f}"
            f"{row['prompt_tokens']:>11}{delta}"
        )
    return lines
