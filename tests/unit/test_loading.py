"""How checkpoint tensors become a model's parameters (heron.models.weights), and what that
costs at start-up."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from heron.errors import ModelLoadError
from heron.models.weights import empty_embedding, load_state_dict_strict


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = empty_embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_tensors_become_the_parameters_and_ties_stay():
    model = _Tied()
    w = torch.randn(10, 4)
    load_state_dict_strict(model, {"embed.weight": w})
    assert model.embed.weight.data_ptr() == w.data_ptr()  # no copy
    assert model.head.weight is model.embed.weight
    assert not model.embed.weight.requires_grad


def test_missing_or_misshapen_tensors_are_load_errors():
    with pytest.raises(ModelLoadError, match="missing"):
        load_state_dict_strict(_Tied(), {})
    with pytest.raises(ModelLoadError, match="shape"):
        load_state_dict_strict(_Tied(), {"embed.weight": torch.zeros(4, 10)})


def test_building_a_model_does_not_import_dynamo(model_path):
    """The random init that ``empty_embedding`` skips imported torch._dynamo (~2 s of every
    process's start-up) when run on the meta device, where models are built."""
    code = (
        "import sys; from heron import LLM; "
        f"LLM({str(model_path)!r}, kv_cache_memory=2**27, device='cpu'); "
        "print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"
