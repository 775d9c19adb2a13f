"""How checkpoint tensors become a model's parameters (heron.models.weights). What building
the real model costs at start-up: tests/integration/test_process_start.py."""

from __future__ import annotations

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
