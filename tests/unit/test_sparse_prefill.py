"""Sparse prefill attention (heron.sparse): the block-sparse kernel against dense SDPA, each
pattern on synthetic queries/keys with planted important blocks, chunked against unchunked
prefill, and the settings refused before a model loads. The engine with sparse prefill
against the dense engine: tests/integration/test_sparse_prefill_engine.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from heron import LLM
from heron.errors import InvalidRequestError
from heron.layers.chunk_attention import causal_chunk_attention
from heron.layers.kv_cache import ContextKV
from heron.sparse import (
    SPARSE_PATTERNS,
    SparsePrefill,
    block_sparse_attention,
    causal_block_mask,
    enforce_always_kept,
)
from heron.sparse.attention import flex_block_sparse_attention

H, HKV, D, B = 9, 3, 64, 128
SCALE = D**-0.5


def _pattern(name, **options):
    return SPARSE_PATTERNS.make(name, options)


def _options(name, **options):
    """EngineConfig settings of sparse prefill pattern ``name``."""
    return {"sparse_prefill": name, "sparse_prefill_options": options}


def _ctx(k, v=None):
    """A context of head-major keys (and values) [Hkv, L, D], position = row."""
    v = k if v is None else v
    return ContextKV(k.transpose(0, 1), v.transpose(0, 1), k.shape[1])


def _block_sparse(q, k, v, *args):
    return block_sparse_attention(q, _ctx(k, v), *args)


def _dense(q, k, v, q_start=0):
    """Causal attention of q [H, Lq, D] at positions q_start.. over k/v [Hkv, Lk, D]."""
    lq, lk = q.shape[1], k.shape[1]
    mask = torch.arange(lk)[None, :] <= torch.arange(q_start, q_start + lq)[:, None]
    kk, vv = k.repeat_interleave(H // HKV, 0), v.repeat_interleave(H // HKV, 0)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=SCALE)


def _random(length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, length, D, generator=g) for n in (H, HKV, HKV))


def _planted_column(length=2048, column=3, seed=0):
    """Every query points along u; key block ``column`` is u * 8: all query blocks at or after
    it put most of their mass there."""
    q, k, v = _random(length, seed)
    q, k = q * 0.1, k * 0.1
    u = torch.zeros(D)
    u[0] = 1.0
    q += 8 * u
    k[:, column * B : (column + 1) * B] += 8 * u
    return q, k, v


def _planted_rows(length=2048, seed=0):
    """Query block i (i >= 2) points along e_i; key block i // 2 is e_{2j} + e_{2j+1} (j = i//2):
    each query block's important key block is its own, off the diagonal."""
    q, k, v = _random(length, seed)
    q, k = q * 0.1, k * 0.1
    nb = length // B
    for i in range(2, nb):
        q[:, i * B : (i + 1) * B, i] += 8.0
        k[:, (i // 2) * B : (i // 2 + 1) * B, i] += 8.0
    return q, k, v


def _planted_diagonal(length=2048, offset=600, seed=0):
    """Query i and key j carry the same 32 frequencies at phases i and j + offset, so their
    dot product (a Dirichlet kernel) peaks sharply where i - j = offset: one slash."""
    q, k, v = _random(length, seed)
    freq = 2 * torch.pi * torch.arange(1, D // 2 + 1) / (4 * length)

    def waves(pos):
        angle = pos[:, None].float() * freq[None, :]
        return torch.cat([angle.cos(), angle.sin()], -1)

    q = q * 0.01 + 2 * waves(torch.arange(length))
    k = k * 0.01 + 2 * waves(torch.arange(length) + offset)
    return q, k, v


def _density(mask, q_start, q_len, k_len):
    causal = causal_block_mask(q_start, q_len, k_len, B)
    return mask.sum().item() / (causal.sum().item() * mask.shape[0])


# ---------------------------------------------------------------------------- kernel
# float32 runs the PyTorch path; bfloat16 heron's compiled kernel where it is usable
# (AVX512_BF16).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", SPARSE_PATTERNS.names())
@pytest.mark.parametrize("q_start", [0, 300])
def test_threshold_one_is_dense(name, q_start, dtype):
    q, k, v = (x.to(dtype) for x in _random(1000, seed=1))
    q = q[:, q_start:]
    mask = _pattern(name, threshold=1.0).mask(q, _ctx(k, v), q_start, SCALE)
    assert _density(mask, q_start, q.shape[1], k.shape[1]) == 1.0
    out = _block_sparse(q, k, v, mask, q_start, B, SCALE)
    ref = _dense(q.float(), k.float(), v.float(), q_start)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    ("attention", "dtype"),
    [
        (_block_sparse, torch.float32),
        (_block_sparse, torch.bfloat16),
        # FlexAttention is the CUDA path; eager on CPU it checks the block mask it is given
        (flex_block_sparse_attention, torch.float32),
    ],
    ids=["float32", "bfloat16", "flex"],
)
@pytest.mark.parametrize("q_start", [0, 200])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_kernel_computes_only_kept_blocks(attention, dtype, q_start):
    """With a sparse mask the kernel equals dense attention restricted to the kept blocks (a
    chunk starting at ``q_start``, mid-block, over all keys before it)."""
    q, k, v = (x.to(dtype) for x in _random(700, seed=2))
    q = q[:, q_start:]
    g = torch.Generator().manual_seed(3)
    nqb, nkb = 6 - q_start // B, -(-700 // B)
    mask = enforce_always_kept(torch.rand(H, nqb, nkb, generator=g) < 0.4, q_start, B)
    assert _density(mask, q_start, 700 - q_start, 700) < 0.8
    out = attention(q, k, v, mask, q_start, B, SCALE).float()
    qb = torch.arange(q_start, 700) // B - q_start // B
    token_mask = mask[:, qb].repeat_interleave(B, 2)[:, :, :700]
    token_mask &= torch.arange(700)[None, :] <= torch.arange(q_start, 700)[:, None]
    kk, vv = (x.float().repeat_interleave(H // HKV, 0) for x in (k, v))
    ref = F.scaled_dot_product_attention(q.float(), kk, vv, attn_mask=token_mask, scale=SCALE)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    dense = _dense(q.float(), k.float(), v.float(), q_start)
    assert (out - dense).abs().max() > 0.1  # dropping blocks changed the output


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("q_start", "q_len"), [(0, 300), (200, 37), (384, 300)])
def test_causal_chunk_attention_is_dense(q_start, q_len, dtype):
    """A dense prefill chunk after cached tokens (the compiled kernel where it runs, else the
    earlier context and the chunk's own keys merged by their log-sum-exps) equals causal SDPA
    over the whole context."""
    q, k, v = (x.to(dtype) for x in _random(q_start + q_len, seed=4))
    q = q[:, q_start:]
    out = causal_chunk_attention(q.transpose(0, 1), _ctx(k, v), q_start, SCALE).transpose(0, 1)
    ref = _dense(q.float(), k.float(), v.float(), q_start)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_bf16_takes_the_compiled_kernel(monkeypatch):
    """Where the compiled kernel is usable, bf16 attention goes through it (the tests above
    would pass on the PyTorch path too)."""
    from heron import kernels

    q, k, v = (x.to(torch.bfloat16) for x in _random(300))
    if not kernels.sparse_prefill_usable(q):
        pytest.skip("no AVX512_BF16 kernels here: the PyTorch path is used")
    calls = []
    real = kernels.sparse_prefill
    monkeypatch.setattr(kernels, "sparse_prefill", lambda *a: calls.append(1) or real(*a))
    mask = causal_block_mask(0, 300, 300, B).expand(H, -1, -1)
    _block_sparse(q, k, v, mask, 0, B, SCALE)
    assert calls == [1]


@pytest.mark.parametrize("m,k,n", [(64, 64, 128), (7, 128, 64), (5, 256, 80), (1, 2, 16)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_vnni_tile_loop_matches_matmul(m, k, n, accumulate):
    """The kernels' AVX512_BF16 tile products (what they multiply with where the CPU has no
    AMX), run here whatever the CPU has: row and column tails, and adding into C as the P V
    product does."""
    from heron import kernels

    g = torch.Generator().manual_seed(m * 1000 + n)
    a = torch.randn(m, k, generator=g).to(torch.bfloat16)
    b = torch.randn(k, n, generator=g).to(torch.bfloat16)
    if not kernels.sparse_prefill_usable(a):
        pytest.skip("no AVX512_BF16 kernels here")
    c = torch.randn(m, n, generator=g) if accumulate else None
    ref = a.double() @ b.double() + (0 if c is None else c.double())
    out = kernels.vnni_matmul(a, b, c)
    torch.testing.assert_close(out.double(), ref, atol=1e-4 * k**0.5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["xattention", "vertical_slash"])
def test_context_read_through_a_block_table(name, dtype):
    """A chunk attending to a paged cache through a shuffled block table (in place in the
    compiled kernels, gathered elsewhere) computes exactly what it computes from the same
    keys and values in order."""
    bs, length, q_start = 16, 1300, 900
    q, k, v = (x.to(dtype) for x in _planted_column(length=length, column=2))
    blocks = -(-length // bs)
    table = torch.randperm(blocks + 7, generator=torch.Generator().manual_seed(0))[:blocks]
    slots = (table[:, None] * bs + torch.arange(bs)).reshape(-1)[:length]
    k_cache = torch.zeros((blocks + 7) * bs, HKV, D, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    k_cache[slots], v_cache[slots] = k.transpose(0, 1), v.transpose(0, 1)
    paged = ContextKV(k_cache, v_cache, length, table, bs)
    sp = SparsePrefill(_pattern(name, threshold=0.9, min_tokens=1))
    chunk = q[:, q_start:].transpose(0, 1)
    ref = sp.attend(chunk, _ctx(k, v), q_start, SCALE)
    assert sp.density < 0.9
    torch.testing.assert_close(sp.attend(chunk, paged, q_start, SCALE), ref, atol=0, rtol=0)


# ---------------------------------------------------------------------------- patterns
def _check_always_kept(mask, q_start=0):
    nqb = mask.shape[1]
    qb = torch.arange(q_start // B, q_start // B + nqb)
    assert mask[:, :, 0].all(), "first block dropped"
    assert mask[:, torch.arange(nqb), qb].all(), "diagonal dropped"
    assert not (mask & ~causal_block_mask(q_start, 1 + (nqb - 1) * B, mask.shape[2] * B, B)).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", SPARSE_PATTERNS.names())
def test_planted_column_kept(name, dtype):
    q, k, _ = (x.to(dtype) for x in _planted_column(column=3))
    mask = _pattern(name).mask(q, _ctx(k), 0, SCALE)
    _check_always_kept(mask)
    assert mask[:, 3:, 3].all(), "planted key block dropped"
    assert _density(mask, 0, 2048, 2048) < 0.5  # and the rest really is sparse


@pytest.mark.parametrize("name", ["xattention", "flexprefill"])
def test_planted_per_query_block_kept(name):
    q, k, _ = _planted_rows()
    mask = _pattern(name).mask(q, _ctx(k), 0, SCALE)
    _check_always_kept(mask)
    nb = 2048 // B
    for i in range(2, nb):
        assert mask[:, i, i // 2].all(), f"query block {i}: planted key block dropped"
    assert _density(mask, 0, 2048, 2048) < 0.5


def test_planted_diagonal_kept():
    """vertical_slash: the block diagonals that the slash i - j = 600 crosses are kept for
    every query block far enough in, and few others."""
    offset = 600
    q, k, _ = _planted_diagonal(offset=offset)
    mask = _pattern("vertical_slash").mask(q, _ctx(k), 0, SCALE)
    _check_always_kept(mask)
    for qb in range(offset // B + 1, 2048 // B):
        for kb in {(qb * B - offset) // B, ((qb + 1) * B - 1 - offset) // B}:
            assert mask[:, qb, kb].all(), f"query block {qb}: slash block {kb} dropped"
    assert _density(mask, 0, 2048, 2048) < 0.5


@pytest.mark.parametrize("q_start", [0, 300])
def test_xattention_compiled_scores_match(q_start):
    """heron's fused XAttention estimate equals the PyTorch ops' block scores (up to their
    bf16 rounding), for a whole prompt and a chunk starting mid-block."""
    from heron import kernels

    q, k, _ = (x.to(torch.bfloat16) for x in _planted_column(length=1300, column=2))
    q = q[:, q_start:]
    if not kernels.sparse_prefill_usable(q):
        pytest.skip("no AVX512_BF16 kernels here: the PyTorch path is used")
    ref = _pattern("xattention", threshold=0.9).scores(q, k, q_start, SCALE)
    got = kernels.xattention_scores(q.transpose(0, 1), k.transpose(0, 1), q_start, B, 8, SCALE)
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=2e-2)
    assert ref[:, -1, 2].min() > 0.5 * ref[:, -1].sum(-1).max()  # the planted block dominates


@pytest.mark.parametrize("threshold", [0.3, 0.9, 0.99])
def test_compiled_block_selection_matches(threshold):
    """heron's one-pass block selection equals select_cumulative + enforce_always_kept (random
    scores, so no ties; rows of a chunk starting at query block 3)."""
    from heron import kernels
    from heron.sparse.patterns import select_cumulative

    if not kernels.available():
        pytest.skip("no compiled kernels here")
    qb0, nqb, nkb = 3, 5, 8
    scores = torch.rand(H, nqb, nkb, generator=torch.Generator().manual_seed(0)) ** 4
    causal = causal_block_mask(qb0 * B, (nqb - 1) * B + 1, nkb * B, B)
    ref = enforce_always_kept(select_cumulative(scores, threshold, causal), qb0 * B, B)
    got = kernels.select_blocks(scores, threshold, qb0)
    assert torch.equal(got, ref)
    assert 0 < ref.sum() < causal.sum() * H


def test_diagonal_sums_match_scatter():
    """The skewed-reshape diagonal sums equal summing each (query, key) by query - key."""
    from heron.sparse.vertical_slash import diagonal_sums

    n, length, pad = 5, 13, 3
    attn = torch.rand(2, n, length)
    pos = torch.arange(length - n, length)
    attn = attn.masked_fill(torch.arange(length)[None, :] > pos[:, None], 0)
    offset = (pos[:, None] - torch.arange(length)[None, :]).clamp_min(0)
    ref = torch.zeros(2, length + pad)
    ref.scatter_add_(1, offset.reshape(1, -1).expand(2, -1), attn.reshape(2, -1))
    torch.testing.assert_close(diagonal_sums(attn, pad), ref)


def test_flexprefill_chooses_per_head():
    """Block-structured heads (pooled scores predict them) take query-aware selection; heads
    attending to their own token (a slash, invisible to pooled means) take vertical-slash."""
    flexprefill = _pattern("flexprefill", threshold=0.9)
    q, k, _ = _planted_rows()
    mask, query_aware = flexprefill.heads(q, _ctx(k), 0, SCALE)
    assert query_aware.all()
    _, k2, _ = _random(2048, seed=5)
    k2 = 10 * k2 / k2.norm(dim=-1, keepdim=True)
    q2 = k2.repeat_interleave(H // HKV, 0)  # each query matches its own key only
    mask2, qa2 = flexprefill.heads(q2, _ctx(k2), 0, SCALE)
    assert not qa2.any()
    _check_always_kept(mask2)
    assert _density(mask2, 0, 2048, 2048) < 0.5


@pytest.mark.parametrize("name", SPARSE_PATTERNS.names())
def test_lower_threshold_drops_more(name):
    q, k, _ = _planted_column()
    dens = [
        _density(_pattern(name, threshold=t).mask(q, _ctx(k), 0, SCALE), 0, 2048, 2048)
        for t in (0.5, 0.99, 1.0)
    ]
    assert dens[0] <= dens[1] < dens[2] == 1.0


# ---------------------------------------------------------------------------- chunked
# xattention's estimate of a query block uses only that block's queries, so chunks aligned on
# blocks give the same mask and the same output up to float error (1e-5). vertical_slash and
# flexprefill estimate from the last queries of each chunk, so a chunk may keep a few other
# blocks: there the stated tolerance is on the mean absolute difference (1e-2).
@pytest.mark.parametrize(("name", "tol"), [("xattention", 1e-5), ("vertical_slash", None)])
@pytest.mark.parametrize("chunk", [512, 700])
def test_chunked_equals_unchunked(name, tol, chunk):
    if name == "xattention" and chunk % B:
        tol = None  # a query block split across chunks is estimated from part of its queries
    q, k, v = _planted_column(length=2048, seed=7)
    sp = SparsePrefill(_pattern(name, threshold=0.9, min_tokens=1))
    t = lambda x: x.transpose(0, 1)  # noqa: E731 - [H, L, D] <-> [L, H, D]
    whole = sp.attend(t(q), _ctx(k, v), 0, SCALE).clone()
    assert sp.density < 0.6
    parts = []
    for s in range(0, 2048, chunk):
        e = min(s + chunk, 2048)
        parts.append(sp.attend(t(q[:, s:e]), _ctx(k[:, :e], v[:, :e]), s, SCALE).clone())
    chunked = torch.cat(parts)
    if tol is not None:
        torch.testing.assert_close(chunked, whole, atol=tol, rtol=tol)
    else:
        assert (chunked - whole).abs().mean() < 1e-2


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kwargs", "param", "message"),
    [
        ({"sparse_prefill": "nope"}, "sparse_prefill", "unknown sparse prefill 'nope'"),
        ({"sparse_prefill_options": {"threshold": 0.9}}, "sparse_prefill_options", "no method"),
        (_options("xattention", threshold=0.0), "sparse_prefill_options", ".threshold"),
        (_options("xattention", threshold=1.5), "sparse_prefill_options", ".threshold"),
        (_options("xattention", min_tokens=0), "sparse_prefill_options", ".min_tokens"),
        (_options("xattention", stride=5), "sparse_prefill_options", ".stride"),
        (_options("vertical_slash", last_q=0), "sparse_prefill_options", ".last_q"),
        (_options("flexprefill", js_threshold=-1), "sparse_prefill_options", ".js_threshold"),
        (_options("vertical_slash", stride=8), "sparse_prefill_options", "stride not an option"),
    ],
)
def test_config_errors(kwargs, param, message):
    """Bad names and options fail before the model loads."""
    with pytest.raises(InvalidRequestError, match=message) as e:
        LLM(**kwargs)
    assert e.value.param == param
