"""Linears pre-packed for oneDNN (heron.layers.packed_linear) in models loaded from the real
GGUF: every linear of a bf16 CPU model packed at load, the bf16 GEMV's plain weights kept only
where memory allows, the engine's greedy tokens unchanged by packing. The packed linears on
stand-in weights: tests/unit/test_packed_linear.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from heron import SamplingParams, kernels
from heron.layers import packed_linear
from heron.layers.packed_linear import PackedLinear
from heron.models import loader
from tests.support.skips import needs_packing


@needs_packing(torch.bfloat16)
def test_bf16_models_pack_every_linear(heron_runner):
    bf16 = heron_runner(dtype="bfloat16").engine.runner.model
    assert not any(isinstance(m, nn.Linear) for m in bf16.modules())
    packed = [m for m in bf16.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 4 * bf16.config.num_layers + 1  # + the LM head
    if kernels.bf16_gemv_runs():  # the tied head's GEMV reads the embedding itself
        head, embedding = bf16.lm_head.few_rows_weight, bf16.embed_tokens.weight
        assert head.data_ptr() == embedding.data_ptr()


@needs_packing(torch.bfloat16)
@pytest.mark.parametrize("free_mib", [100, 10_000])
def test_bf16_gemv_weights_kept_only_where_memory_allows(heron_runner, monkeypatch, free_mib):
    """SmolLM2's untied linears hold 202 MiB: kept next to the packed weights with 10 GB
    available, not with 100 MB (oneDNN serves every row count then)."""
    if not kernels.bf16_gemv_runs():
        pytest.skip("needs AVX512_BF16")
    monkeypatch.setattr(packed_linear, "free_memory_bytes", lambda device: free_mib * 2**20)
    model = heron_runner(dtype="bfloat16").engine.runner.model
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    kept = [m.few_rows_weight is not None for m in packed]
    assert all(kept) if free_mib > 1000 else not any(kept)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_engine_tokens_are_the_same_packed_and_unpacked(heron_runner, monkeypatch, dtype):
    if not (
        packed_linear.packs(getattr(torch, dtype))
        and packed_linear._packs_correctly(getattr(torch, dtype))
    ):
        pytest.skip(f"{dtype} linears are not packed on this CPU")
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    runs = []
    for pack in (True, False):
        if not pack:
            monkeypatch.setattr(loader, "pack_linears", lambda model: None)
        llm = heron_runner(dtype=dtype)
        model = llm.engine.runner.model
        assert any(isinstance(m, PackedLinear) for m in model.modules()) == pack
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    assert runs[0] == runs[1]
