"""The sampler in the engine on the real model: a seeded request draws the same text alone
and in a batch. The sampler on stand-in logits: tests/unit/test_sampler.py."""

from __future__ import annotations

from heron import SamplingParams


def test_engine_seed_same_text_alone_and_in_batch(llm):
    prompt = "Write a short poem about the sea:"
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=8, ignore_eos=True)
    alone = llm.generate(prompt, seeded, use_tqdm=False)[0].outputs[0]
    batch = llm.generate(
        ["The history of Rome", prompt, prompt],
        [
            SamplingParams(temperature=1.0, max_tokens=8),
            seeded,
            SamplingParams(temperature=1.0, seed=4321, max_tokens=8, ignore_eos=True),
        ],
        use_tqdm=False,
    )
    assert batch[1].outputs[0].token_ids == alone.token_ids
    assert batch[1].outputs[0].text == alone.text
    assert batch[2].outputs[0].token_ids != alone.token_ids  # another seed, another sample
