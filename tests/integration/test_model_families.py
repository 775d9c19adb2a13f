"""Qwen2 (Qwen2.5-Coder-0.5B-Instruct) and Gemma3 (gemma-3-270m) against transformers on the
same GGUF dequantized to float32, with test_parity's rules (tests.support.parity): greedy tokens
equal (a divergence only after a near-tie), alone, batched, from the prefix cache, and the long
prompt in small prefill chunks; prompt logprobs close; chat templates as transformers renders
them.

The prompt set is test_parity's plus a ~700-token prompt, longer than Gemma3's 512-token
sliding window, so local layers must really drop keys. Each model is loaded once per module
(heron and transformers); fewer new tokens than test_parity keep the time modest. Tests of a
model that is not installed skip, naming the command that installs it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from heron import LLM, SamplingParams
from heron.models.catalog import KNOWN_MODELS
from tests.support.parity import assert_matches, assert_prompt_logprobs_close, encode_prompts
from tests.support.prompts import LONG_PROMPT, PARITY_PROMPTS

pytestmark = pytest.mark.slow

# New tokens per prompt: fewer for the larger model.
MAX_NEW = {"qwen2.5-coder-0.5b-instruct": 12, "gemma-3-270m": 16}
PROMPTS = [*PARITY_PROMPTS, LONG_PROMPT]
KV_CACHE = 512 * 2**20


@dataclass
class Family:
    name: str
    path: Path
    llm: LLM
    prompt_ids: list[list[int]]
    reference: list[dict]

    @property
    def greedy(self) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=MAX_NEW[self.name])


@pytest.fixture(scope="module", params=list(MAX_NEW))
def family(request, transformers_runner) -> Family:
    known = KNOWN_MODELS[request.param]
    if known.locate() is None and not known.parts_installed():
        pytest.skip(f"{known.name} is not installed; run `make models` or `{known.install_hint}`")
    path = known.path_for_loading()
    llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=KV_CACHE)
    ids = encode_prompts(llm.get_tokenizer(), PROMPTS)
    window = llm.engine.runner.sliding_window
    if window is not None:
        assert len(ids[-1]) > window + 128, "the long prompt must outgrow the window"
    ref = transformers_runner(path, ids, MAX_NEW[known.name], llm.engine.eos_token_ids)
    return Family(known.name, path, llm, ids, ref)


def test_each_prompt_alone(family):
    for i, ids in enumerate(family.prompt_ids):
        out = family.llm.generate([ids], family.greedy, use_tqdm=False)[0]
        assert_matches(out.outputs[0].token_ids, family.reference[i], f"prompt {i} alone")


def test_all_prompts_in_one_batch_then_from_prefix_cache(family):
    llm = family.llm
    for run in ("batched", "prefix-cached"):
        before = llm.engine.stats()["prefix_cache_hits"]
        outs = llm.generate(family.prompt_ids, family.greedy, use_tqdm=False)
        for i, out in enumerate(outs):
            assert_matches(out.outputs[0].token_ids, family.reference[i], f"prompt {i} {run}")
    assert llm.engine.stats()["prefix_cache_hits"] > before
    # The long prompt's cached part reaches past Gemma's window: the chunk after it attends
    # through the cache with the window mask.
    assert outs[-1].num_cached_tokens > 512


def test_long_prompt_in_small_prefill_chunks(family):
    """Chunks after the first attend through the paged cache; past the window, with the
    window mask."""
    llm = LLM(
        str(family.path),
        dtype="float32",
        device="cpu",
        kv_cache_memory=KV_CACHE,
        max_num_batched_tokens=96,
        enable_prefix_caching=False,
    )
    out = llm.generate(family.prompt_ids[-1:], family.greedy, use_tqdm=False)[0]
    assert_matches(out.outputs[0].token_ids, family.reference[-1], "long prompt chunked")


def test_prompt_logprobs_close(family):
    assert_prompt_logprobs_close(family.llm, family.prompt_ids, family.reference)


CONVERSATION = [
    {"role": "system", "content": "You answer in German."},
    {"role": "user", "content": "Erkläre kurz, was ein Regenbogen ist."},
    {"role": "assistant", "content": "Licht, das in Tropfen gebrochen wird."},
    {"role": "user", "content": "Danke!"},
]


@pytest.mark.parametrize("family", ["qwen2.5-coder-0.5b-instruct"], indirect=True)
def test_qwen_chat_template_matches_transformers(family):
    """heron's tokenizer (converted once, cached) renders and encodes chats exactly as
    transformers' own conversion of the GGUF does."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(family.path.parent), gguf_file=family.path.name)
    tok = family.llm.get_tokenizer()
    chats = [list(p) for p in PARITY_PROMPTS if isinstance(p, tuple)] + [CONVERSATION]
    for messages in chats:
        for gen_prompt in (True, False):
            want = hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen_prompt
            )
            text, ids = tok.encode_chat(messages, gen_prompt)
            assert text == want
            assert ids == hf.encode(want, add_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou answer in German.<|im_end|>\n")
    assert tok.backend.token_to_id("<|im_end|>") in family.llm.engine.eos_token_ids


@pytest.mark.parametrize("family", ["gemma-3-270m"], indirect=True)
def test_gemma_chat_format(family):
    """The gemma-3-270m GGUF (a base model) carries no chat template, so transformers has none
    to render; heron applies Gemma 3's format, checked here against its literal form."""
    tok = family.llm.get_tokenizer()
    text, ids = tok.encode_chat(CONVERSATION)
    assert text == (
        "<bos><start_of_turn>user\nYou answer in German.\n\n"
        "Erkläre kurz, was ein Regenbogen ist.<end_of_turn>\n"
        "<start_of_turn>model\nLicht, das in Tropfen gebrochen wird.<end_of_turn>\n"
        "<start_of_turn>user\nDanke!<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    start, end = (tok.backend.token_to_id(t) for t in ("<start_of_turn>", "<end_of_turn>"))
    assert ids[:2] == [tok.bos_token_id, start]
    assert ids.count(start) == 4 and ids.count(end) == 3  # special tokens, not text
    assert end in family.llm.engine.eos_token_ids  # a reply stops at the end of its turn
