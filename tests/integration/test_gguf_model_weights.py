"""heron.models.gguf_dequant on the real default GGUF against gguf.quants, the reference it
replaces for speed. Each format on random blocks: tests/unit/test_gguf_dequant.py."""

from __future__ import annotations

import numpy as np
from gguf import quants

from heron.models.gguf_dequant import dequantize
from heron.models.gguf_file import GGUFFile


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
