"""Weight-only int8 / int4 linears in the engine on the real model: every linear quantized,
prompt logprobs close to full precision, and a clear error for an unknown format. The
linears against their dequantized reference: tests/unit/test_quantization.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from heron import SamplingParams
from heron.errors import InvalidRequestError

PROMPT = "The heron stood in the shallow river, waiting for a fish. It had been there since"


@pytest.fixture(scope="module")
def reference_logprobs(llm):
    return _prompt_logprobs(llm)


def _prompt_logprobs(llm) -> tuple[torch.Tensor, list[int]]:
    """Log-probability of each prompt token, and the greedy continuation."""
    params = SamplingParams(temperature=0, max_tokens=16, prompt_logprobs=0, ignore_eos=True)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    ids = out.prompt_token_ids
    lps = torch.tensor([out.prompt_logprobs[j][ids[j]].logprob for j in range(1, len(ids))])
    return lps, out.outputs[0].token_ids


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_engine_with_quantized_weights_stays_close_to_full_precision(
    heron_runner, kind, reference_logprobs
):
    llm = heron_runner(quantization=kind)
    linears = [m for m in llm.engine.runner.model.modules() if isinstance(m, nn.Linear)]
    assert not linears, "every linear is quantized"
    lps, tokens = _prompt_logprobs(llm)
    ref_lps, ref_tokens = reference_logprobs
    assert not torch.equal(lps, ref_lps)  # the weights really changed
    # Measured: int4 0.03, int8 0.10 (the default model's layers are Q4_1, whose groups of 32
    # int4 reproduces up to bf16 scales; per-channel int8 does not); garbage weights give > 1.
    assert (lps - ref_lps).abs().mean().item() < 0.2
    assert tokens[:8] == ref_tokens[:8]


def test_bad_quantization_is_a_clear_error(heron_runner):
    with pytest.raises(InvalidRequestError, match="quantization"):
        heron_runner(quantization="fp4")
