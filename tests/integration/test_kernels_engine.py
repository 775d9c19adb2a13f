"""heron's compiled CPU kernels (heron.kernels) through the engine on the real model: the
decode attention kernel, the fused layer ops, the block kernel for prefill chunks and the C++
decode loop give the tokens (or the bits) of the PyTorch path, and really run. Skipped where
the kernels cannot be built (no C++ compiler)."""

from __future__ import annotations

import pytest
import torch

from heron import SamplingParams, kernels
from tests.support.parity import assert_decode_loop_matches_the_layers
from tests.support.skips import needs_kernels

pytestmark = needs_kernels


def test_engine_decodes_through_the_kernel_with_the_same_tokens(heron_runner, monkeypatch):
    """Greedy outputs of a batch are the same with the kernel and with the PyTorch path, and
    the kernel really ran (it would be easy to build and never call)."""
    llm = heron_runner()
    calls = []
    original = kernels.paged_decode
    monkeypatch.setattr(kernels, "paged_decode", lambda *a: calls.append(1) or original(*a))
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm.engine.runner.model.decode_loop.enabled = False  # its C++ calls bypass the wrapper
    with_kernel = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.engine.runner.decode_kernel and calls
    llm.engine.runner.decode_kernel = False
    calls.clear()
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert not calls
    assert with_kernel == plain


def test_engine_runs_the_layer_ops_with_the_same_tokens(heron_runner, monkeypatch):
    """bf16, where the fused ops are bit-exact: greedy tokens with them equal those of the
    PyTorch ops, and each op really ran."""
    llm = heron_runner(dtype="bfloat16")
    calls: dict[str, int] = {}
    for name in ("rms_norm", "rotary_", "silu_mul"):
        original = getattr(kernels, name)

        def counted(*a, _name=name, _original=original, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*a, **kw)

        monkeypatch.setattr(kernels, name, counted)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    fused = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert set(calls) == {"rms_norm", "rotary_", "silu_mul"}
    monkeypatch.setattr(kernels, "usable", lambda x: False)
    calls.clear()
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert not calls
    assert fused == plain


def test_engine_chunked_prefill_through_the_block_kernel(heron_runner, monkeypatch):
    """bf16 with AVX512_BF16: a prompt prefilled in chunks of 96 (each after the first
    attending to the cached context through the block-sparse kernel with every causal block
    kept) predicts what the whole prompt in one chunk (SDPA, causal) predicts, and the kernel
    really ran."""
    whole = heron_runner(dtype="bfloat16")
    if not kernels.sparse_prefill_usable(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip("no AVX512_BF16 kernel here: chunks keep the SDPA path")
    chunked = heron_runner(dtype="bfloat16", max_num_batched_tokens=96, enable_prefix_caching=False)
    calls = []
    original = kernels.sparse_prefill
    monkeypatch.setattr(kernels, "sparse_prefill", lambda *a: calls.append(1) or original(*a))
    prompt = " ".join(["The heron stands in the river and waits for a fish."] * 30)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    a, b = (
        llm.generate([prompt], params, use_tqdm=False)[0].outputs[0] for llm in (whole, chunked)
    )
    assert calls
    assert a.token_ids == b.token_ids
    first = a.token_ids[0]
    assert abs(a.logprobs[0][first].logprob - b.logprobs[0][first].logprob) < 0.05


def test_engine_long_first_chunk_through_the_block_kernel(heron_runner, monkeypatch):
    """bf16 with AVX512_BF16: a prompt's first chunk of >= 256 tokens attends through the block
    kernel and predicts what SDPA's causal flash attention predicts for it."""
    from heron.engine import runner

    llm = heron_runner(dtype="bfloat16", enable_prefix_caching=False)
    if not kernels.sparse_prefill_usable(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip("no AVX512_BF16 kernel here: first chunks keep SDPA")
    calls = []
    original = kernels.sparse_prefill
    monkeypatch.setattr(kernels, "sparse_prefill", lambda *a: calls.append(1) or original(*a))
    prompt = " ".join(["The heron stands in the river and waits for a fish."] * 60)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    a = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert calls
    calls.clear()
    monkeypatch.setattr(runner, "_KERNEL_MIN_FIRST_CHUNK", 10**9)
    b = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert not calls
    assert a.token_ids == b.token_ids
    first = a.token_ids[0]
    assert abs(a.logprobs[0][first].logprob - b.logprobs[0][first].logprob) < 0.05


@pytest.mark.parametrize(
    "quantization, dtype",
    [("none", "float32"), ("none", "bfloat16"), ("int8", "bfloat16"), ("int4", "float32")],
)
def test_decode_loop_equals_the_python_layers(heron_runner, quantization, dtype):
    """Each weight kind the loop replays (F.linear, oneDNN-packed bf16, int8, int4 with the
    fp32 <-> bf16 conversions around it), alone and batched."""
    llm = heron_runner(quantization=quantization, dtype=dtype, max_num_seqs=4)
    assert_decode_loop_matches_the_layers(llm, ["The capital of France is", "def f(x):", "Hi"])
    assert type(llm.engine.runner.model.decode_loop._built[0]).__name__ == "DecodeLayers"


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_decode_loop_takes_decode_steps_only(heron_runner, quantization):
    """Prefill chunks run the Python layers, and so do decode steps of more rows than a
    quantized linear's few-row kernel takes (the loop replays those kernels only)."""
    llm = heron_runner(quantization=quantization, max_num_seqs=40)
    model = llm.engine.runner.model
    limit = getattr(model.layers[0].self_attn.qkv_proj, "max_gemv_rows", None)
    batch = 20 if limit is None else limit + 4
    loop = model.decode_loop
    sizes = []
    applies = loop.applies

    def spy(x, kv_caches, meta):
        found = applies(x, kv_caches, meta)
        if found:
            sizes.append(x.shape[0])
        return found

    loop.applies = spy
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm.generate([f"Tell me about {i}" for i in range(batch)], params, use_tqdm=False)
    assert sizes == ([batch, batch] if limit is None else [])  # the two decode steps
    sizes.clear()
    llm.generate(["Tell me about a cat"], params, use_tqdm=False)
    assert sizes == [1, 1]
