"""KIVI 4/2-bit KV caches (``kv_cache_dtype="int4"``/``"int2"``): packing, per-channel keys and
per-token values, the open block kept in full precision and quantized once complete, a
rewritten block unpacked first, and the engine: more tokens in the same memory, a stated
log-likelihood cost when later chunks read packed K/V, copy-on-write for ``n > 1``, and KV
policies compacting a quantized cache."""

from __future__ import annotations

import math

import pytest
import torch

from heron import SamplingParams
from heron.layers.kivi import KiviCache, pack, quantize, unpack
from tests.support.prompts import TEXT

BS, H, D, LAYERS = 32, 2, 64, 2
# 48-token prefill chunks: every chunk after the first reads packed K/V.
ENGINE_KW = {"kv_cache_memory": 64 * 2**20, "max_num_batched_tokens": 48, "max_model_len": 1024}


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


@pytest.fixture(scope="module")
def engines(heron_runner):
    return {dt: heron_runner(kv_cache_dtype=dt, **ENGINE_KW) for dt in ("auto", "int4", "int2")}


def test_kivi_holds_more_tokens_in_the_same_memory(engines):
    tokens = {
        dt: llm.engine.block_manager.num_blocks * llm.engine.block_manager.block_size
        for dt, llm in engines.items()
    }
    assert engines["int4"].engine.block_manager.block_size == 32
    assert 6.0 < tokens["int4"] / tokens["auto"] < 6.6  # fp32 K/V: 512 bytes/head -> 80
    assert 10.0 < tokens["int2"] / tokens["auto"] < 11.0  # -> 48


def test_kivi_log_likelihood_cost_is_small_at_4_bits(engines):
    """Mean log-likelihood of a ~250-token text: int4 within 0.03 nats of the float cache
    (measured 0.018), int2 within 0.7 (measured 0.49: 2 bits hurt a 135M model)."""
    params = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=0)
    mean = {}
    for dt, llm in engines.items():
        out = llm.generate(TEXT, params, use_tqdm=False)[0]
        ids = out.prompt_token_ids
        lps = [pos[t].logprob for pos, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
        mean[dt] = sum(lps) / len(lps)
        assert not llm.engine.runner.kivi or not llm.engine.runner.kivi.rows  # all released
    assert 0 < mean["auto"] - mean["int4"] < 0.03, mean
    assert 0.03 < mean["auto"] - mean["int2"] < 0.7, mean


def test_kivi_n_samples_share_the_prompt_and_copy_its_open_block(engines):
    llm = engines["int4"]
    one = llm.generate(TEXT, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    two = llm.generate(TEXT, SamplingParams(n=2, temperature=0, max_tokens=12), use_tqdm=False)
    assert [c.token_ids for c in two[0].outputs] == [one[0].outputs[0].token_ids] * 2


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, **kw)


@pytest.mark.parametrize("dtype", ["int4", "int8"])
def test_kv_policies_compress_a_quantized_cache(heron_runner, engines, dtype):
    """Compaction reads and writes through the quantized storage: a budget above the prompt
    changes nothing, a small one frees blocks and answers as the float cache compressed
    alike does."""
    llm = engines.get(dtype) or heron_runner(kv_cache_dtype=dtype, **ENGINE_KW)
    eng = llm.engine
    filler = "The grass is green. The sky is blue. " * 30
    ids = eng.tokenizer.encode(
        filler + "The pass key is 68142. Remember it. " + filler + "What is the pass key? "
        "The pass key is"
    )
    full = llm.generate([ids], _greedy(), use_tqdm=False)[0].outputs[0]
    assert "68142" in full.text
    for policy in ("snapkv", "pyramidkv"):
        same = _greedy(kv_policy=policy, kv_budget=len(ids) + 8)
        assert llm.generate([ids], same, use_tqdm=False)[0].outputs[0].token_ids == full.token_ids
    params = _greedy(kv_policy="snapkv", kv_budget=0.3)
    float_answer = engines["auto"].generate([ids], params, use_tqdm=False)[0].outputs[0].text
    req = eng.add_request(ids, params)
    seq = req.seqs[0]
    st = eng.plugins.get("kv_compression").states[seq.seq_id]
    held = []
    while not req.finished:
        eng.step()
        if st.prefilled and not seq.is_finished:
            held.append(len(seq.block_table))
    bs = eng.block_manager.block_size
    assert seq.num_evicted > 0 and max(held) <= -(-(math.ceil(0.3 * len(ids)) + 6) // bs)
    assert seq.text == float_answer  # measured: " 6814." for both (snapkv's own miss)


def test_streaming_llm_runs_past_the_window_on_a_kivi_cache(engines):
    """Decode-time eviction rewrites packed blocks every block_size tokens."""
    llm = engines["int2"]
    prompt = llm.engine.tokenizer.encode("Count from one to one thousand: one, two, three,")
    out = llm.generate(
        [prompt],
        SamplingParams(
            temperature=0, max_tokens=200, ignore_eos=True, kv_policy="streaming_llm", kv_budget=64
        ),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(out.token_ids) == 200
    assert llm.engine.stats()["kv_tokens_evicted"] > 100
    assert not llm.engine.runner.kivi.rows  # every staging row went back
