"""KIVI 4/2-bit KV caches (``kv_cache_dtype="int4"``/``"int2"``): packing, per-channel keys and
per-token values, the open block kept in full precision and quantized once complete, a
rewritten block unpacked first, copy-on-write of the open row. In the engine:
tests/integration/test_kv_kivi_engine.py."""

from __future__ import annotations

import pytest
import torch

from heron.layers.kivi import KiviCache, pack, quantize, unpack

BS, H, D, LAYERS = 32, 2, 64, 2


@pytest.mark.parametrize("bits", [4, 2])
def test_pack_round_trip_and_quantization_error(bits):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << bits, (5, 3, D), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (5, 3, D * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)
    x = torch.randn(BS, H, D, generator=g)
    q, scale, lo = quantize(x, dim=0, bits=bits)  # per channel over the tokens
    assert scale.shape == (H, D) and scale.dtype == torch.float16
    err = (q.float() * scale.float() + lo.float() - x).abs()
    assert bool((err <= scale.float() / 2 + 1e-3).all())


def _cache(bits: int = 4, blocks: int = 8) -> KiviCache:
    return KiviCache(f"int{bits}", LAYERS, blocks, BS, H, D, torch.float32, torch.device("cpu"))


def _write(cache: KiviCache, slots: list[int], x: torch.Tensor) -> None:
    """One step writing x [T, H, D] at ``slots`` in every layer (layer l gets x + l)."""
    s = torch.tensor(slots)
    cache.prepare(s)
    for layer in range(LAYERS):
        k, v = cache.layer(layer)
        k.write(s, x + layer)
        v.write(s, -(x + layer))
    cache.finish()


def test_open_block_is_exact_and_a_complete_block_is_packed():
    cache = _cache()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BS + 5, H, D, generator=g)
    x[:, :, 3] *= 20  # an outlier channel: per-channel key scales keep the others precise
    block_a, block_b = 2, 5
    slots = [block_a * BS + i for i in range(BS)] + [block_b * BS + i for i in range(5)]
    _write(cache, slots[:20], x[:20])  # two steps: the first leaves block a open
    assert set(cache.rows) == {block_a}
    _write(cache, slots[20:], x[20:])
    assert set(cache.rows) == {block_b}  # a completed: packed, row given back
    for layer in range(LAYERS):
        k, v = cache.layer(layer)
        keys = k.gather(torch.tensor([[block_a, block_b]]))[0]  # [2 * BS, H, D]
        values = v.gather(torch.tensor([[block_a, block_b]]))[0]
        want = x + layer
        assert torch.equal(keys[BS : BS + 5], want[BS:])  # the open block: full precision
        err = (keys[:BS] - want[:BS]).abs()
        assert 0 < err.max() < 0.2 * want[:BS].abs().amax()
        rest = [c for c in range(D) if c != 3]
        assert err[:, :, rest].max() < 0.5  # the outlier channel did not widen their steps
        # values per token in groups of 32 channels: the group without the outlier is fine
        assert (values[:BS] + want[:BS])[:, :, 32:].abs().max() < 0.6
    assert cache.staging_bytes == LAYERS * 2 * BS * H * D * 4  # one open row


def test_rewriting_a_packed_block_unpacks_it_first():
    cache = _cache()
    x = torch.randn(BS, H, D, generator=torch.Generator().manual_seed(2))
    slots = [3 * BS + i for i in range(BS)]
    _write(cache, slots, x)
    assert not cache.rows
    before = cache.layer(0)[0].gather(torch.tensor([[3]]))[0].clone()
    y = x[BS - 4 :] + 1.0  # rewrite the last 4 tokens (rejected drafts, a rewind)
    _write(cache, slots[BS - 4 :], y)
    after = cache.layer(0)[0].gather(torch.tensor([[3]]))[0]
    steps = (before - x).abs().amax(dim=0)  # about half a step per channel
    assert bool(((after[: BS - 4] - before[: BS - 4]).abs() <= 2 * steps + 0.05).all())
    assert (after[BS - 4 :] - y).abs().max() < 0.3  # the new tokens, repacked


def test_copy_on_write_copies_the_open_row_and_release_frees_it():
    cache = _cache()
    x = torch.randn(7, H, D, generator=torch.Generator().manual_seed(3))
    _write(cache, [BS * 1 + i for i in range(7)], x)
    cache.copy(1, 6)
    assert set(cache.rows) == {1, 6}
    assert torch.equal(cache.layer(1)[0].gather(torch.tensor([[6]]))[0][:7], x + 1)
    cache.release(1)
    cache.release(6)
    assert not cache.rows and cache.staging_bytes == 0
