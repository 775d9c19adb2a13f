"""Greedy parity with transformers on the same GGUF (dequantized, float32).

transformers is the reference: for every parity prompt heron must produce the same 64 greedy
tokens, alone, batched, with tiny prefill chunks and with prefix-cache hits. A divergence is
accepted only where the reference's top-2 logit gap at that step is below NEAR_TIE (the two
implementations sum in different orders, so float32 round-off can flip an exact tie), and the
outputs are not compared after it. Prompt logprobs must agree within LOGPROB_ATOL."""

from __future__ import annotations

import pytest
import torch

from heron import SamplingParams
from tests.conftest import make_llm
from tests.parity_prompts import PARITY_PROMPTS

pytestmark = pytest.mark.slow

MAX_NEW = 64
NEAR_TIE = 1e-2  # logits; float32 round-off differences are ~1e-4
LOGPROB_ATOL = 2e-3


def encode_prompts(tok, prompts) -> list[list[int]]:
    """Plain prompts through the tokenizer, chat prompts through the chat template."""
    out = []
    for p in prompts:
        if isinstance(p, tuple):
            out.append(tok.encode_chat(list(p))[1])
        else:
            out.append(tok.encode(p))
    return out


def transformers_reference(
    model_path, prompt_ids: list[list[int]], max_new: int, eos_token_ids: list[int]
) -> list[dict]:
    """transformers' greedy tokens (stopping on heron's EOS set), per-step top-2 gaps, and
    prompt logprobs, from the same GGUF dequantized to float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    ).eval()
    refs = []
    with torch.inference_mode():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            gen = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=eos_token_ids,
                output_logits=True,
                return_dict_in_generate=True,
            )
            tokens = gen.sequences[0, len(ids) :].tolist()
            top2 = [step[0].float().topk(2).values for step in gen.logits]
            gaps = [(t[0] - t[1]).item() for t in top2]
            lsm = torch.log_softmax(model(x).logits[0].float(), dim=-1)
            prompt_lp = lsm[:-1].gather(1, x[0, 1:, None])[:, 0]
            refs.append({"tokens": tokens, "gaps": gaps, "prompt_logprobs": prompt_lp})
    del model
    return refs


@pytest.fixture(scope="module")
def prompt_ids(llm) -> list[list[int]]:
    out = encode_prompts(llm.get_tokenizer(), PARITY_PROMPTS)
    lengths = [len(ids) for ids in out]
    assert min(lengths) <= 8 and max(lengths) >= 450, lengths
    return out


@pytest.fixture(scope="module")
def reference(model_path, prompt_ids, llm):
    return transformers_reference(model_path, prompt_ids, MAX_NEW, llm.engine.eos_token_ids)


def assert_matches(heron_tokens: list[int], ref: dict, label: str) -> None:
    ref_tokens = ref["tokens"]
    for i, (a, b) in enumerate(zip(heron_tokens, ref_tokens, strict=False)):
        if a != b:
            gap = ref["gaps"][i]
            assert gap < NEAR_TIE, (
                f"{label}: token {i} differs ({a} vs {b}) and the reference's top-2 gap "
                f"{gap:.4g} is not a near-tie"
            )
            return
    assert len(heron_tokens) == len(ref_tokens), f"{label}: lengths differ"


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW)


def test_each_prompt_alone(llm, prompt_ids, reference):
    for i, ids in enumerate(prompt_ids):
        out = llm.generate([ids], GREEDY, use_tqdm=False)[0]
        assert_matches(out.outputs[0].token_ids, reference[i], f"prompt {i} alone")


def test_all_prompts_in_one_batch_then_from_prefix_cache(llm, prompt_ids, reference):
    for run in ("batched", "prefix-cached"):
        before = llm.engine.stats()["prefix_cache_hits"]
        outs = llm.generate(prompt_ids, GREEDY, use_tqdm=False)
        for i, out in enumerate(outs):
            assert_matches(out.outputs[0].token_ids, reference[i], f"prompt {i} {run}")
        if run == "prefix-cached":
            assert llm.engine.stats()["prefix_cache_hits"] > before
            assert outs[-1].num_cached_tokens >= 400  # the long prompt came from the cache


def test_small_prefill_chunks(prompt_ids, reference):
    llm = make_llm(max_num_batched_tokens=24, enable_prefix_caching=False)
    outs = llm.generate(prompt_ids, GREEDY, use_tqdm=False)
    for i, out in enumerate(outs):
        assert_matches(out.outputs[0].token_ids, reference[i], f"prompt {i} chunked")


def test_prompt_logprobs_close(llm, prompt_ids, reference):
    assert_prompt_logprobs_close(llm, prompt_ids, reference)


def assert_prompt_logprobs_close(llm, prompt_ids, reference) -> None:
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate(prompt_ids, params, use_tqdm=False)
    for i, (out, ids) in enumerate(zip(outs, prompt_ids, strict=True)):
        lps = out.prompt_logprobs
        assert lps is not None and len(lps) == len(ids) and lps[0] is None
        ours = torch.tensor([lps[j][ids[j]].logprob for j in range(1, len(ids))])
        ref = reference[i]["prompt_logprobs"]
        err = (ours - ref).abs().max().item()
        assert err < LOGPROB_ATOL, f"prompt {i}: prompt logprobs differ by {err}"
