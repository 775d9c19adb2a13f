"""Sparse prefill (heron.sparse) in the engine on the real model against the dense engine:
short prompts untouched, long ones sparse and the same in chunks, in float32 and bf16, and
`heron bench prefill --sparse`'s rows."""

from __future__ import annotations

import pytest
import torch

from heron import SamplingParams

# The engine settings of the sparse runs: XAttention from 1024-token prompts on.
XATTENTION = {
    "sparse_prefill": "xattention",
    "sparse_prefill_options": {"threshold": 0.9, "min_tokens": 1024},
}


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n,), generator=g).tolist()


GREEDY = SamplingParams(temperature=0, max_tokens=4, logprobs=5)


def _run(llm, ids):
    out = llm.generate([ids], GREEDY, use_tqdm=False)[0].outputs[0]
    return out.token_ids, [{t: lp.logprob for t, lp in d.items()} for d in out.logprobs]


@pytest.fixture(scope="module")
def engines(heron_runner):
    dense = heron_runner(max_num_batched_tokens=2048, enable_prefix_caching=False)
    sparse = heron_runner(max_num_batched_tokens=2048, enable_prefix_caching=False, **XATTENTION)
    chunked = heron_runner(max_num_batched_tokens=512, enable_prefix_caching=False, **XATTENTION)
    return dense, sparse, chunked


def test_engine_short_prompt_identical_to_dense(engines):
    dense, sparse, _ = engines
    ids = _ids(300)
    plugin = sparse.engine.plugins.get("sparse_prefill")
    plugin.reset_stats()
    assert _run(sparse, ids) == _run(dense, ids)
    assert plugin.sparse.causal_blocks == 0  # never took the sparse path


def test_engine_long_prompt_sparse_and_chunked(engines):
    dense, sparse, chunked = engines
    ids = _ids(1500, seed=1)
    plugin = sparse.engine.plugins.get("sparse_prefill")
    plugin.reset_stats()
    toks_s, lps_s = _run(sparse, ids)
    assert plugin.density is not None and plugin.density < 1.0  # it dropped blocks
    toks_d, lps_d = _run(dense, ids)
    assert lps_s != lps_d  # sparse attention changed the numbers ...
    first = max(lps_d[0], key=lps_d[0].get)
    assert abs(lps_s[0][first] - lps_d[0][first]) < 0.5  # ... but not the prediction much
    # Chunks of 512 (aligned on the 128-token blocks): same masks, same logprobs up to float
    # error.
    toks_c, lps_c = _run(chunked, ids)
    assert toks_c == toks_s
    for a, b in zip(lps_c, lps_s, strict=True):
        for t in a.keys() & b.keys():
            assert abs(a[t] - b[t]) < 1e-3


def test_engine_bf16_chunked_equals_unchunked(heron_runner):
    """In bf16 (heron's compiled kernel where usable) chunks of 512 and of 2048 keep the same
    blocks and give the same tokens and logprobs up to bf16 rounding of the other layers."""
    kw = dict(dtype="bfloat16", enable_prefix_caching=False, **XATTENTION)
    whole, chunked = (heron_runner(max_num_batched_tokens=n, **kw) for n in (2048, 512))
    ids = _ids(1500, seed=1)
    toks_w, lps_w = _run(whole, ids)
    toks_c, lps_c = _run(chunked, ids)
    assert whole.engine.plugins.get("sparse_prefill").density < 1.0
    assert toks_c == toks_w
    first = toks_w[0]
    assert abs(lps_c[0][first] - lps_w[0][first]) < 0.1


def test_sparse_prefill_bench_rows():
    """`heron bench prefill --sparse` on a short prompt: dense and the pattern each get a
    time, the pattern its density, both their passkey and needle cases, and the pattern its
    speed-up and accuracy change against dense."""
    from heron.bench.prefill import PrefillBenchConfig, format_table, run_prefill_bench

    cfg = PrefillBenchConfig(
        dtype="float32",
        device="cpu",
        lengths=[400],
        patterns=["xattention"],
        min_tokens=128,
        num_passkey=1,
        num_needle=1,
        kv_cache_memory=float(64 * 2**20),
        skip_hf=True,
        skip_llama_cpp=True,
    )
    dense, sparse = run_prefill_bench(cfg)
    assert (dense.method, sparse.method) == ("dense", "xattention")
    assert dense.density is None and 0 < sparse.density <= 1
    for row in (dense, sparse):
        assert row.prefill_s > 0 and row.passkey_total == row.needle_total == 1
    assert sparse.speedup > 0 and sparse.accuracy_delta_points is not None
    assert "needle" in format_table([dense, sparse])
