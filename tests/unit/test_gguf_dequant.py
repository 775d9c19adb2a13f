"""heron.models.gguf_dequant against gguf.quants, the reference it replaces for speed."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from heron.models.gguf_dequant import _FORMATS, dequantize
from heron.models.gguf_file import GGUFFile


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


def test_default_model_weights_are_bit_identical(model_path):
    """Every tensor of the default GGUF (Q4_1, Q8_0, F32) as gguf dequantizes it, bit for bit:
    the weights heron loads are the ones transformers loads in the parity tests."""
    gguf = GGUFFile(model_path)
    for t in gguf.tensors:
        raw = gguf.raw(t)
        ref = np.asarray(quants.dequantize(raw, t.qtype), dtype=np.float32).reshape(-1)
        got = dequantize(raw, t.qtype)
        assert got.numpy().view(np.uint32).tobytes() == ref.view(np.uint32).tobytes(), t.name
        got.add_(0)  # its own, writable memory (not the read-only file map)
