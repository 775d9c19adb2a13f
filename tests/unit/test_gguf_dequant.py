"""heron.models.gguf_dequant against gguf.quants, the reference it replaces for speed, on
random blocks of each format. On the real default GGUF:
tests/integration/test_gguf_model_weights.py."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from heron.models.gguf_dequant import _FORMATS, dequantize


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the NaN scales
@pytest.mark.parametrize("qtype", list(_FORMATS), ids=lambda q: q.name)
def test_each_format_equals_gguf_on_random_blocks(qtype, monkeypatch):
    """Random bytes reach every bit field (and inf/NaN scales, which must agree as well); the
    listed formats are heron's own (gguf's numpy path is not called for them)."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(int(qtype)).integers(0, 256, (5, 3 * type_size), dtype=np.uint8)
    ref = np.asarray(quants.dequantize(raw, qtype), dtype=np.float32).reshape(-1)

    def not_gguf(*args):
        raise AssertionError("fell back to gguf.quants")

    monkeypatch.setattr(quants, "dequantize", not_gguf)
    got = dequantize(raw, qtype).numpy()
    assert got.shape == (5 * 3 * block,)
    np.testing.assert_array_equal(got, ref)


def test_unlisted_formats_fall_back_to_gguf():
    qtype = GGMLQuantizationType.Q2_K
    assert qtype not in _FORMATS
    type_size = GGML_QUANT_SIZES[qtype][1]
    raw = np.random.default_rng(0).integers(0, 256, (2, type_size), dtype=np.uint8)
    ref = np.asarray(quants.dequantize(raw, qtype), dtype=np.float32).reshape(-1)
    np.testing.assert_array_equal(dequantize(raw, qtype).numpy(), ref)
