"""Model settings beyond the plain network, on Hugging Face folders written by transformers
with random weights: RoPE scaling (Llama 3.x's ``llama3``, linear, dynamic NTK, YaRN on Llama,
Qwen2 and Gemma 3's global layers) with prompts longer than the training length it stretches,
and sliding windows (Mistral's, and Qwen2's on the layers from ``max_window_layers`` on)
shorter than the prompts. heron must give transformers' prompt logprobs and greedy tokens in
float32, alone, batched, from the prefix cache, in small prefill chunks and through the C++
decode loop. RoPE tables (longrope's too) are compared with transformers' bit for bit, GGUF
scaling metadata is read, a setting heron does not implement is refused naming the field, and
safetensors are read in the model's dtype, sharded ones through their index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from heron import LLM, SamplingParams, kernels
from heron.errors import ModelLoadError
from heron.layers.rope_scaling import RopeScaling
from heron.layers.rotary import RotaryEmbedding
from heron.models.loader import Checkpoint, build_model
from heron.models.rope_config import hf_rope_parameters, rope_from_hf
from tests.support.parity import (
    LOGPROB_ATOL,
    assert_decode_loop_matches_the_layers,
    assert_matches,
    greedy_reference,
)

VOCAB = 256
MAX_POSITIONS = 128
TRAINED = 32  # original_max_position_embeddings: most prompts are longer
WINDOW = 16
_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=MAX_POSITIONS,
    rope_theta=10000.0,
    initializer_range=0.3,  # peaked logits, so greedy steps are rarely near-ties
    tie_word_embeddings=False,
    eos_token_id=1,
    bos_token_id=None,
)
_LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": TRAINED,
}
_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": TRAINED}

# name -> (transformers model class, config class, config settings)
CONFIGS = {
    "llama-llama3": ("LlamaForCausalLM", "LlamaConfig", {"rope_scaling": _LLAMA3}),
    "llama-linear": (
        "LlamaForCausalLM",
        "LlamaConfig",
        {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    ),
    "llama-dynamic": (
        "LlamaForCausalLM",
        "LlamaConfig",
        {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}},
    ),
    "llama-yarn": ("LlamaForCausalLM", "LlamaConfig", {"rope_scaling": _YARN}),
    # Qwen2.5's long-context recipe: max_position_embeddings stays the training length.
    "qwen2-yarn": (
        "Qwen2ForCausalLM",
        "Qwen2Config",
        {"rope_scaling": _YARN, "max_position_embeddings": TRAINED},
    ),
    "mistral-window": ("MistralForCausalLM", "MistralConfig", {"sliding_window": WINDOW}),
    "qwen2-window": (
        "Qwen2ForCausalLM",
        "Qwen2Config",
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    ),
    "gemma3-yarn": (
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        {
            "head_dim": 16,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"],
            "query_pre_attn_scalar": 16,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {**_YARN, "rope_theta": 1e6},
            },
            "pad_token_id": 0,
        },
    ),
}
# name -> the sliding window, which layers slide, the (global layers') RoPE scaling type
EXPECTED = {
    "llama-llama3": (None, [False, False], "llama3"),
    "llama-linear": (None, [False, False], "linear"),
    "llama-dynamic": (None, [False, False], "dynamic"),
    "llama-yarn": (None, [False, False], "yarn"),
    "qwen2-yarn": (None, [False, False], "yarn"),
    "mistral-window": (WINDOW, [True, True], "default"),
    "qwen2-window": (WINDOW, [False, True], "default"),
    "gemma3-yarn": (WINDOW, [True, False], "yarn"),
}


def write_random_folder(folder: Path, model_class: str, config_class: str, settings: dict) -> None:
    """A Hugging Face folder (config.json, safetensors, a word-level tokenizer.json) of a
    random-weight model that transformers writes."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1", unk_token="w0").save_pretrained(
        folder
    )
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**_SHAPE, **settings})
    model = getattr(transformers, model_class)(config)
    with torch.no_grad():  # norms start at constants; make them matter
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.normal_(0.0, 0.3)
    model.save_pretrained(folder)


@pytest.fixture(scope="module", params=list(CONFIGS))
def named_folder(request, tmp_path_factory) -> tuple[str, Path]:
    path = tmp_path_factory.mktemp(request.param)
    write_random_folder(path, *CONFIGS[request.param])
    return request.param, path


PROMPT_LENGTHS = (3, 17, 40, 100)  # all but the first two longer than TRAINED and WINDOW
MAX_NEW = 24


def _reference(folder: Path, prompts: list[list[int]]) -> list[dict]:
    """transformers' greedy tokens, top-2 gaps and prompt logprobs, one prompt at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return greedy_reference(model, prompts, MAX_NEW)


def _assert_outputs(outs, prompts, refs, label: str) -> None:
    """Greedy tokens, and prompt logprobs where they were asked for."""
    for i, (out, ids, ref) in enumerate(zip(outs, prompts, refs, strict=True)):
        assert_matches(out.outputs[0].token_ids, ref, f"{label} prompt {i}")
        if out.prompt_logprobs is None:
            continue
        got = torch.tensor([out.prompt_logprobs[j][ids[j]].logprob for j in range(1, len(ids))])
        err = (got - ref["prompt_logprobs"]).abs().max().item()
        assert err < LOGPROB_ATOL, f"{label} prompt {i}: prompt logprobs differ by {err}"


def test_matches_transformers(named_folder):
    _, folder = named_folder
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    refs = _reference(folder, prompts)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, prompt_logprobs=0)
    llm = LLM(str(folder), dtype="float32", kv_cache_memory=2**24)
    for i, ids in enumerate(prompts):
        _assert_outputs(
            llm.generate([ids], params, use_tqdm=False), [ids], refs[i : i + 1], "alone"
        )
    _assert_outputs(llm.generate(prompts, params, use_tqdm=False), prompts, refs, "batched")
    # Prompt logprobs need every prompt row computed; greedy tokens may come from the cache.
    greedy = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    for run in ("caching", "cached"):
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        _assert_outputs(outs, prompts, refs, run)
    assert outs[-1].num_cached_tokens >= 96  # the long prompt's blocks came from the cache
    chunked = LLM(
        str(folder),
        dtype="float32",
        kv_cache_memory=2**24,
        max_num_batched_tokens=5,
        block_size=4,
        enable_prefix_caching=False,
    )
    _assert_outputs(chunked.generate(prompts, params, use_tqdm=False), prompts, refs, "chunks")


@pytest.mark.skipif(not kernels.available(), reason="no C++ compiler for the kernels")
def test_decode_loop_equals_its_layers(named_folder):
    """The C++ decode loop replays the scaled rotary table and the sliding layers' window
    (hidden from the second prompt's third step on) bit for bit."""
    _, folder = named_folder
    llm = LLM(str(folder), dtype="float32", kv_cache_memory=2**24)
    assert_decode_loop_matches_the_layers(llm, [[5, 9, 22], list(range(2, 16))])


def test_model_reads_the_settings(named_folder):
    """What the parity test relies on, stated: the windows and scaling were read."""
    name, folder = named_folder
    ckpt = Checkpoint(folder)
    model = build_model(ckpt, torch.device("cpu"), torch.float32)
    sliding = [layer.self_attn.sliding for layer in model.layers]
    assert (model.sliding_window, sliding, ckpt.config.rope_scaling.rope_type) == EXPECTED[name]
    # qwen2-yarn's config says TRAINED: YaRN stretches that by its factor.
    assert ckpt.config.max_position_embeddings == MAX_POSITIONS
    rotary = getattr(model, "rotary", None) or model.rotary_global
    assert rotary.scaling == ckpt.config.rope_scaling
    if name.startswith("gemma3"):
        return  # older Gemma 3 configs are test_hf_folder's
    # The same settings spelled as older configs spell them (``rope_scaling`` with "type",
    # Qwen2 without ``layer_types``) read the same.
    hf = json.loads((folder / "config.json").read_text())
    params = hf.pop("rope_parameters")
    hf["rope_theta"] = params.pop("rope_theta")
    if params["rope_type"] != "default":
        hf["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    hf.pop("layer_types", None)
    assert type(model).sliding_layers(hf, 2) == (model.sliding_window, sliding)
    old, new = rope_from_hf(hf_rope_parameters(hf), hf), ckpt.config.rope_scaling
    assert (old.rope_type, old.factor, old.original_max_positions) == (
        new.rope_type,
        new.factor,
        new.original_max_positions,
    )
    assert torch.equal(old.frequencies(1e4, 16)[0], new.frequencies(1e4, 16)[0])


def test_mistral_window_defaults_as_in_transformers():
    """transformers' MistralConfig slides over 4096 tokens where config.json says nothing;
    ``"sliding_window": null`` (Mistral 7B v0.2 on) slides over none."""
    from heron.models.llama import LlamaForCausalLM

    assert LlamaForCausalLM.sliding_layers({"model_type": "mistral"}, 2) == (4096, [True] * 2)
    window, _ = LlamaForCausalLM.sliding_layers(
        {"model_type": "mistral", "sliding_window": None}, 2
    )
    assert window is None


# ---------------------------------------------------------------- RoPE tables


def _transformers_rotary(scaling: dict, max_positions: int = MAX_POSITIONS, **extra):
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = transformers.LlamaConfig(
        **{**_SHAPE, "max_position_embeddings": max_positions}, rope_scaling=dict(scaling), **extra
    )
    hf = config.to_dict()
    return LlamaRotaryEmbedding(config), rope_from_hf(hf_rope_parameters(hf), hf)


def _signed(sin: torch.Tensor) -> torch.Tensor:
    """rotate_half's sign, which heron's table folds into sin."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0 + 0.1 * i for i in range(8)],
    "long_factor": [2.0 + 0.3 * i for i in range(8)],
    "original_max_position_embeddings": MAX_POSITIONS,
    "factor": 4.0,
}


@pytest.mark.parametrize(
    "scaling",
    [
        _LLAMA3,
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 4.0},
        _YARN,
        {**_YARN, "beta_fast": 16, "beta_slow": 2, "truncate": False, "attention_factor": 1.3},
        {**_YARN, "mscale": 2.0, "mscale_all_dim": 1.0},
        LONGROPE,
    ],
    ids=lambda s: s["rope_type"],
)
def test_rope_tables_are_transformers_bit_for_bit(scaling):
    """Every position of the table, and past the training length of the types that depend on
    the length (dynamic, longrope) each position as transformers rotates a token generated
    there: for a sequence that ends at it."""
    ref, heron_scaling = _transformers_rotary(scaling)
    rotary = RotaryEmbedding(16, 2 * MAX_POSITIONS, 10000.0, heron_scaling)
    x = torch.zeros(1)
    cos, sin = ref(x, torch.arange(MAX_POSITIONS)[None])
    assert torch.equal(rotary.cos[:MAX_POSITIONS], cos[0])
    assert torch.equal(rotary.sin[:MAX_POSITIONS], _signed(sin[0]))
    for p in (MAX_POSITIONS, MAX_POSITIONS + 37, 2 * MAX_POSITIONS - 1):
        cos, sin = ref(x, torch.tensor([[p]]))
        assert torch.equal(rotary.cos[p], cos[0, 0]), p
        assert torch.equal(rotary.sin[p], _signed(sin[0, 0])), p


def test_gguf_rope_freqs_is_llama3():
    """llama.cpp's converter writes Llama 3.x scaling as a divisor per frequency
    (``rope_freqs.weight``); the table from it is the ``llama3`` one within float32
    rounding."""
    _, llama3 = _transformers_rotary(_LLAMA3)
    inv = llama3.frequencies(10000.0, 16)[0]
    base = RopeScaling().frequencies(10000.0, 16)[0]
    factors = RopeScaling("freq_factors", options={"factors": (base / inv).tolist()})
    a = RotaryEmbedding(16, MAX_POSITIONS, 10000.0, llama3)
    b = RotaryEmbedding(16, MAX_POSITIONS, 10000.0, factors)
    assert torch.allclose(a.cos, b.cos, atol=1e-5) and torch.allclose(a.sin, b.sin, atol=1e-5)


# ---------------------------------------------------------------- GGUF


def _write_gguf(path: Path, metadata: dict, extra_tensors: dict[str, np.ndarray]) -> None:
    """A tiny random Llama GGUF (no tokenizer: enough for the loader)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    h, layers = 64, 1
    writer.add_uint32("llama.embedding_length", h)
    writer.add_uint32("llama.block_count", layers)
    writer.add_uint32("llama.feed_forward_length", 128)
    writer.add_uint32("llama.attention.head_count", 4)
    writer.add_uint32("llama.attention.head_count_kv", 2)
    writer.add_uint32("llama.context_length", MAX_POSITIONS)
    writer.add_uint32("llama.vocab_size", VOCAB)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    for key, value in metadata.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (VOCAB, h),
        "output_norm.weight": (h,),
        "output.weight": (VOCAB, h),
        "blk.0.attn_norm.weight": (h,),
        "blk.0.attn_q.weight": (h, h),
        "blk.0.attn_k.weight": (32, h),
        "blk.0.attn_v.weight": (32, h),
        "blk.0.attn_output.weight": (h, h),
        "blk.0.ffn_norm.weight": (h,),
        "blk.0.ffn_gate.weight": (128, h),
        "blk.0.ffn_up.weight": (128, h),
        "blk.0.ffn_down.weight": (h, 128),
    }
    tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    for name, value in {**tensors, **extra_tensors}.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_rope_scaling_is_read(tmp_path):
    factors = np.linspace(1.0, 8.0, 8, dtype=np.float32)
    _write_gguf(tmp_path / "a.gguf", {}, {"rope_freqs.weight": factors})
    scaling = Checkpoint(tmp_path / "a.gguf").config.rope_scaling
    assert scaling.rope_type == "freq_factors"
    assert scaling.options["factors"] == factors.tolist()
    meta = {
        "llama.rope.scaling.type": "yarn",
        "llama.rope.scaling.factor": 4.0,
        "llama.rope.scaling.original_context_length": TRAINED,
    }
    _write_gguf(tmp_path / "b.gguf", meta, {})
    scaling = Checkpoint(tmp_path / "b.gguf").config.rope_scaling
    assert (scaling.rope_type, scaling.factor, scaling.original_max_positions) == (
        "yarn",
        4.0,
        TRAINED,
    )


@pytest.mark.parametrize(
    "metadata, tensors, field",
    [
        ({"llama.rope.scaling.type": "longrope"}, {}, "rope.scaling.type"),
        ({"llama.rope.scaling.yarn_log_multiplier": 0.1}, {}, "yarn_log_multiplier"),
        ({"llama.rope.dimension_count": 8}, {}, "rope.dimension_count"),
        ({"llama.expert_count": 8}, {}, "expert_count"),
        ({"llama.attention.sliding_window": 8}, {}, "sliding_window"),
        ({}, {"blk.0.ffn_gate_inp.weight": np.zeros((8, 64), np.float32)}, "ffn_gate_inp"),
    ],
)
def test_gguf_settings_heron_does_not_implement_are_refused(tmp_path, metadata, tensors, field):
    _write_gguf(tmp_path / "m.gguf", metadata, tensors)
    with pytest.raises(ModelLoadError, match=field):
        Checkpoint(tmp_path / "m.gguf")


# ---------------------------------------------------------------- refused configs


def _llama_config(**changes) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **{k: v for k, v in _SHAPE.items() if v is not None},
    }
    return {**config, **changes}


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"rope_scaling": {"rope_type": "su", "factor": 2.0}}, "rope_type"),
        ({"rope_parameters": {"rope_type": "mrope", "rope_theta": 1e4}}, "rope_type"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        (
            {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}},
            "partial_rotary_factor",
        ),
        ({"rope_scaling": {**LONGROPE, "original_max_position_embeddings": TRAINED}}, "longrope"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"num_local_experts": 8, "num_experts_per_tok": 2}, "num_local_experts"),
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        (
            {"rope_parameters": {"full_attention": {}, "sliding_attention": {}}},
            "rope_parameters",
        ),
    ],
)
def test_settings_heron_does_not_implement_are_refused(tmp_path, changes, field):
    """Refused from config.json alone, before any weight is read."""
    (tmp_path / "config.json").write_text(json.dumps(_llama_config(**changes)))
    with pytest.raises(ModelLoadError, match=field):
        Checkpoint(tmp_path)


def test_harmless_settings_load(tmp_path):
    """Settings that do not change the math, and plain RoPE however it is spelled."""
    changes = {
        "pretraining_tp": 2,
        "attention_dropout": 0.1,
        "rope_scaling": {"type": "default"},
        "sliding_window": 8,  # transformers' Llama has no sliding window
    }
    write_random_folder(tmp_path, "LlamaForCausalLM", "LlamaConfig", {})
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))
    model = build_model(Checkpoint(tmp_path), torch.device("cpu"), torch.float32)
    assert model.sliding_window is None and model.rotary.scaling == RopeScaling()


# ---------------------------------------------------------------- loading


def test_bf16_checkpoint_is_read_in_bf16_without_a_float32_copy(tmp_path):
    """Each tensor is converted to the model's dtype as it is read: a bf16 checkpoint run in
    bf16 is never widened, and its tensors become the parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**_SHAPE)).to(torch.bfloat16).save_pretrained(tmp_path)
    ckpt = Checkpoint(tmp_path, torch.bfloat16)
    assert {w.dtype for w in ckpt.weights.values()} == {torch.bfloat16}
    embed = ckpt.weights["model.embed_tokens.weight"]
    model = build_model(ckpt, torch.device("cpu"), torch.bfloat16)
    assert model.embed_tokens.weight.data_ptr() == embed.data_ptr()
    widened = Checkpoint(tmp_path).weights["model.embed_tokens.weight"]
    assert widened.dtype == torch.float32 and torch.equal(widened, embed.float())


def test_sharded_checkpoint_follows_its_index(tmp_path):
    """``model.safetensors.index.json`` names the shards; other safetensors in the folder
    (Mistral's consolidated.safetensors) are not the model's; a missing shard is an error."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**_SHAPE))
    model.save_pretrained(tmp_path / "whole")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2
    save_file(
        {"tok_embeddings.weight": torch.zeros(2)}, tmp_path / "sharded/consolidated.safetensors"
    )
    whole = Checkpoint(tmp_path / "whole").weights
    sharded = Checkpoint(tmp_path / "sharded").weights
    assert whole.keys() == sharded.keys()
    assert all(torch.equal(whole[name], sharded[name]) for name in whole)
    shards[1].unlink()
    with pytest.raises(ModelLoadError, match="shards"):
        Checkpoint(tmp_path / "sharded")
