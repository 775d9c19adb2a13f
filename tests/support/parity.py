"""heron held to a reference: transformers' greedy tokens and prompt logprobs on the same
weights, and the C++ decode loop against the model's Python layers.

A greedy divergence from transformers is accepted only where the reference's top-2 logit gap
at that step is below NEAR_TIE (the two implementations sum in different orders, so float32
round-off can flip an exact tie), and the outputs are not compared after it. Prompt logprobs
must agree within LOGPROB_ATOL."""

from __future__ import annotations

import torch

from heron import LLM, SamplingParams

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
    """transformers' greedy reference (stopping on heron's EOS set) from the same GGUF
    dequantized to float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    ).eval()
    refs = greedy_reference(model, prompt_ids, max_new, eos_token_ids=eos_token_ids)
    del model
    return refs


def greedy_reference(
    model, prompt_ids: list[list[int]], max_new: int, eos_token_ids: list[int] | None = None
) -> list[dict]:
    """A transformers model's greedy tokens, one prompt at a time: ``tokens``, the per-step
    top-2 logit ``gaps``, the prompt's ``logits`` and ``prompt_logprobs`` (on the CPU).
    Without ``eos_token_ids`` every prompt generates exactly ``max_new`` tokens."""
    device = next(model.parameters()).device
    stop = {"eos_token_id": eos_token_ids} if eos_token_ids else {"min_new_tokens": max_new}
    refs = []
    with torch.inference_mode():
        for ids in prompt_ids:
            x = torch.tensor([ids], device=device)
            gen = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                **stop,
            )
            top2 = [step[0].float().topk(2).values for step in gen.logits]
            logits = model(x).logits[0].float().cpu()
            lsm = torch.log_softmax(logits, dim=-1)
            refs.append(
                {
                    "tokens": gen.sequences[0, len(ids) :].tolist(),
                    "gaps": [(t[0] - t[1]).item() for t in top2],
                    "logits": logits,
                    "prompt_logprobs": lsm[:-1].gather(1, x[0, 1:, None].cpu())[:, 0],
                }
            )
    return refs


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


def assert_decode_loop_matches_the_layers(llm: LLM, prompts: list) -> None:
    """Every decode step the C++ loop (``heron.models.decode_loop``) runs is run again
    through the model's Python layers on the same input: the hidden states must be equal bit
    for bit (the same ops in the same order), and the loop must have run."""
    model = llm.engine.runner.model
    loop = model.decode_loop
    steps = []
    run = loop.run

    def checked(x, rotary, kv_caches, meta, which):
        got = run(x, rotary, kv_caches, meta, which)
        want = x
        for i in which:  # rewrites the same K/V at the same slots
            layer = model.layers[i]
            local = len(rotary) == 4 and layer.self_attn.sliding  # Gemma3's local layers
            want = layer(want, tuple(rotary[2:] if local else rotary[:2]), kv_caches[i], meta)
        steps.append(torch.equal(got, want))
        return got

    loop.run = checked
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    assert steps and all(steps), f"{steps.count(False)} of {len(steps)} steps differ"
