"""bf16 linears pre-packed for oneDNN (heron.layers.packed_linear): the same bits as
F.linear at every row count, every linear of a bf16 CPU model packed at load (none in
float32), and the engine's greedy tokens unchanged by it."""

from __future__ import annotations

import pytest
import torch
from conftest import make_llm
from torch import nn

from heron import SamplingParams
from heron.layers import packed_linear
from heron.layers.packed_linear import PackedLinear, pack_linears
from heron.models import loader

pytestmark = pytest.mark.skipif(
    not packed_linear._packs_exactly(), reason="no oneDNN weight packing in this PyTorch"
)


@pytest.mark.parametrize("rows", [1, 3, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_gives_f_linear_bits(rows, bias):
    g = torch.Generator().manual_seed(rows)
    linear = nn.Linear(576, 960, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(960, 576, generator=g))
    x = torch.randn(rows, 576, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(PackedLinear(linear)(x), linear(x))


def test_bf16_models_pack_every_linear_and_float32_none():
    bf16 = make_llm(dtype="bfloat16").engine.runner.model
    assert not any(isinstance(m, nn.Linear) for m in bf16.modules())
    packed = [m for m in bf16.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 4 * bf16.config.num_layers + 1  # + the LM head
    fp32 = nn.Sequential(nn.Linear(8, 8))
    pack_linears(fp32)
    assert isinstance(fp32[0], nn.Linear)


def test_engine_tokens_are_the_same_packed_and_unpacked(monkeypatch):
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    runs = []
    for pack in (True, False):
        if not pack:
            monkeypatch.setattr(loader, "pack_linears", lambda model: None)
        llm = make_llm(dtype="bfloat16")
        model = llm.engine.runner.model
        assert any(isinstance(m, PackedLinear) for m in model.modules()) == pack
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    assert runs[0] == runs[1]
