"""A Hugging Face folder (config.json + safetensors + tokenizer.json) with random weights, one
per model family, built here with transformers, run through heron and through transformers on
the same device.

This covers the safetensors loader and, where a GPU is present, the CUDA path (the real GGUFs
are too large to carry to the GPU machine, so CUDA parity is checked on these weights). The
tiny Gemma3 has a sliding window of 8 tokens, linear RoPE scaling on its global layer and
final logit soft-capping, so those paths are checked on prompts many windows long, whole and
in prefill chunks of a few tokens."""

from __future__ import annotations

import pytest
import torch

from heron import LLM, SamplingParams
from tests.support.parity import (
    assert_decode_loop_matches_the_layers,
    assert_matches,
    greedy_reference,
)
from tests.support.skips import needs_kernels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_SHAPE = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.3,  # peaked logits, so greedy steps are rarely near-ties
    eos_token_id=1,
    bos_token_id=None,
)


def _config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**_SHAPE, rope_theta=10000.0, tie_word_embeddings=False)
    if family == "qwen2":
        return tf.Qwen2Config(**_SHAPE, rope_theta=10000.0, tie_word_embeddings=False)
    return tf.Gemma3TextConfig(
        **_SHAPE,
        head_dim=32,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24,
        final_logit_softcapping=30.0,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
        },
        pad_token_id=0,
    )


_MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}


@pytest.fixture(scope="module", params=list(_MODEL_CLASSES))
def random_model(request, tmp_path_factory):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    family = request.param
    folder = tmp_path_factory.mktemp(f"random-{family}")
    vocab = {f"w{i}": i for i in range(512)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1", unk_token="w0").save_pretrained(
        folder
    )
    torch.manual_seed(0)
    model = getattr(transformers, _MODEL_CLASSES[family])(_config(family))
    with torch.no_grad():  # norms and biases start at constants; make them matter
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("device", DEVICES)
def test_random_model_matches_transformers(random_model, device):
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    ref = AutoModelForCausalLM.from_pretrained(random_model, dtype=torch.float32).to(device)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 512, (n,), generator=g).tolist() for n in (3, 17, 40, 100)]
    refs = greedy_reference(ref, prompts, 24)
    del ref

    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=0)
    engines = {
        "whole prompts": {},
        "chunks of 5, blocks of 4": {"max_num_batched_tokens": 5, "block_size": 4},
    }
    for label, kwargs in engines.items():
        llm = LLM(
            str(random_model), dtype="float32", device=device, kv_cache_memory=64 * 2**20, **kwargs
        )
        outs = llm.generate(prompts, params, use_tqdm=False)
        for i, (out, ids) in enumerate(zip(outs, prompts, strict=True)):
            assert_matches(out.outputs[0].token_ids, refs[i], f"{device} {label} prompt {i}")
            lsm = torch.log_softmax(refs[i]["logits"], dim=-1)
            want = lsm[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            got = torch.tensor([out.prompt_logprobs[j][ids[j]].logprob for j in range(1, len(ids))])
            assert (got - want).abs().max().item() < 1e-3, f"{device} {label} prompt {i}"


@needs_kernels
@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_random_model_decode_loop_equals_its_layers(random_model, quantization):
    """The C++ decode loop on each family: Qwen2's Q/K/V biases (added by the op, or after the
    int4 kernel); Gemma3's q/k norms, sandwich norms, GeGLU, local rotary and the 8-token
    window of its local layers (which hides keys from the second prompt's fourth step)."""
    llm = LLM(str(random_model), quantization=quantization, dtype="float32", kv_cache_memory=2**24)
    assert_decode_loop_matches_the_layers(llm, [[5, 9, 22], [7, 8]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_random_model_half_precision_on_cuda(random_model, dtype):
    """Half precision cannot be token-exact; the greedy tokens must match float32's at least
    until the first near-tie."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 512, (n,), generator=g).tolist() for n in (5, 50)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    full = LLM(str(random_model), dtype="float32", device="cuda", kv_cache_memory=64 * 2**20)
    want = full.generate(prompts, params, use_tqdm=False)
    half = LLM(str(random_model), dtype=dtype, device="cuda", kv_cache_memory=64 * 2**20)
    got = half.generate(prompts, params, use_tqdm=False)
    for w, h in zip(want, got, strict=True):
        a, b = w.outputs[0].token_ids, h.outputs[0].token_ids
        assert a[:4] == b[:4], (a, b)
