"""Faults injected into a running engine."""

from __future__ import annotations

import math

import pytest
import torch

from heron import LLM


def poison_logits(
    monkeypatch: pytest.MonkeyPatch, llm: LLM, prompt: str, value: float, after: int = 0
) -> None:
    """The model's logits for the request of ``prompt`` hold ``value`` once it has generated
    ``after`` tokens (a NaN or inf from the model, as an overflow would give)."""
    runner = llm.engine.runner
    ids = llm.get_tokenizer().encode(prompt)
    execute = runner.execute

    def poisoned(*args, **kwargs):
        result = execute(*args, **kwargs)
        for row, seq in enumerate(result.sample_seqs):
            if seq.request.prompt_token_ids == ids and len(seq.output_token_ids) >= after:
                with torch.inference_mode():  # -inf everywhere: nothing left to draw
                    result.sample_logits[row, :: 1 if value == -math.inf else 1000] = value
        return result

    monkeypatch.setattr(runner, "execute", poisoned)
