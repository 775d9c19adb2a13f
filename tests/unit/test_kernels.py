"""heron's compiled CPU kernels (heron.kernels) against the PyTorch path they replace, on
stand-in tensors: the decode attention read in place from the paged cache, alone and inside
paged_attention; the fused layer ops (RMSNorm with its residual add, rotary in place,
SiLU-and-multiply); dequantization and the few-row int8 / int4 / bf16 products. Through the
engine: tests/integration/test_kernels_engine.py. Skipped where the kernels cannot be built
(no C++ compiler)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from heron import kernels
from heron.layers.attention import AttentionMetadata, paged_attention
from heron.layers.norm import RMSNorm
from heron.layers.quantized_linear import Int4Linear, Int8Linear
from heron.layers.rotary import RotaryEmbedding
from tests.support.skips import needs_kernels

pytestmark = needs_kernels

BS, HKV, GROUP, D = 16, 3, 3, 64


def _paged_case(dtype: torch.dtype, seed: int = 0, bs: int = BS):
    """6 sequences with scattered block tables and lengths that end mid-block, on a block
    boundary, at one token and at the table's full width (80 slots), in a cache with spare
    blocks (16-token blocks; others end mid-way through the kernel's 16-key steps)."""
    g = torch.Generator().manual_seed(seed)
    width = 80 // bs
    blocks = 6 * width + 10
    k_cache = torch.randn(blocks * bs, HKV, D, generator=g).to(dtype)
    v_cache = torch.randn(blocks * bs, HKV, D, generator=g).to(dtype)
    tables = torch.randperm(blocks, generator=g)[: 6 * width].view(6, width)
    lens = torch.tensor([1, 17, 32, 50, 79, 80])
    return k_cache, v_cache, tables, lens


def _scattered_case(lens, hkv, group, d, dtype, seed, spare):
    """Queries [B, hkv, group, d] and a cache of ``spare`` blocks more than the B sequences of
    ``lens`` fill, their tables (as wide as the longest) a random permutation of the blocks."""
    g = torch.Generator().manual_seed(seed)
    batch, width = len(lens), max(lens) // BS + 1
    blocks = batch * width + spare
    k_cache = torch.randn(blocks * BS, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(blocks * BS, hkv, d, generator=g).to(dtype)
    tables = torch.randperm(blocks, generator=g)[: batch * width].view(batch, width)
    q = torch.randn(batch, hkv, group, d, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lens)


def _reference(q, k_cache, v_cache, tables, lens, scale, valid=None, bs=BS):
    """Gather every sequence's blocks and run SDPA over the valid slots (``valid`` [B, slots],
    default: those below each length), per query head."""
    (b, width), (hkv, group, d) = tables.shape, q.shape[1:]
    kd = k_cache.view(-1, bs, hkv, d)[tables.reshape(-1)].view(b, width * bs, hkv, d)
    vd = v_cache.view(-1, bs, hkv, d)[tables.reshape(-1)].view(b, width * bs, hkv, d)
    kd = kd.repeat_interleave(group, 2).permute(0, 2, 1, 3).float()
    vd = vd.repeat_interleave(group, 2).permute(0, 2, 1, 3).float()
    if valid is None:
        valid = torch.arange(width * bs)[None, :] < lens[:, None]
    out = F.scaled_dot_product_attention(
        q.reshape(b, hkv * group, 1, d).float(), kd, vd, attn_mask=valid[:, None, None], scale=scale
    )
    return out.view(b, hkv, group, d)


@pytest.mark.parametrize("bs", [16, 8, 40])
@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]
)
def test_paged_decode_equals_gathered_attention(dtype, tol, bs):
    k_cache, v_cache, tables, lens = _paged_case(dtype, bs=bs)
    q = torch.randn(6, HKV, GROUP, D).to(dtype)
    out = kernels.paged_decode(q, k_cache, v_cache, tables, lens, bs, D**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    want = _reference(q, k_cache, v_cache, tables, lens, D**-0.5, bs=bs)
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_paged_decode_long_contexts_in_parts(dtype, tol):
    """Contexts longer than one part (256 tokens) are attended in parts merged by their softmax
    statistics, the parts fixed by each sequence's length: the result matches attention over
    the whole context, and a sequence's output is the same alone as beside others."""
    # 5 parts, the last of 76 tokens; 2 parts of 256 + 1
    q, k_cache, v_cache, tables, lens = _scattered_case([1100, 257], HKV, GROUP, D, dtype, 5, 7)
    out = kernels.paged_decode(q, k_cache, v_cache, tables, lens, BS, D**-0.5)
    want = _reference(q, k_cache, v_cache, tables, lens, D**-0.5)
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)
    for i in range(2):
        one = slice(i, i + 1)
        alone = kernels.paged_decode(q[one], k_cache, v_cache, tables[one], lens[one], BS, D**-0.5)
        assert torch.equal(out[one], alone), i


@pytest.mark.parametrize("hkv, group, d", [(1, 4, 256), (2, 2, 128), (2, 3, 80)])
@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]
)
def test_paged_decode_other_head_shapes(hkv, group, d, dtype, tol):
    """Gemma 3's single KV head of 256 dims, heads of 128, and a head dim that the vectorized
    kernels do not specialise (80: the generic loop), at lengths within and across parts."""
    lens = [1, 37, 300, 530]
    q, k_cache, v_cache, tables, lens = _scattered_case(lens, hkv, group, d, dtype, 7, 3)
    out = kernels.paged_decode(q, k_cache, v_cache, tables, lens, BS, d**-0.5)
    want = _reference(q, k_cache, v_cache, tables, lens, d**-0.5)
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("hkv, group, d", [(3, 3, 64), (1, 4, 256), (2, 3, 80)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("window", [1, 37, 300])
def test_paged_decode_sliding_window(hkv, group, d, dtype, tol, window):
    """``window``: a row of length n sees only slots n - window .. n - 1 (Gemma 3's local
    layers), its first visible slot anywhere in a block or a part; a row's output is the same
    alone as beside others, and differs from the unwindowed one where the window hides keys."""
    lens = [1, 30, 300, 530, 700]
    q, k_cache, v_cache, tables, lens = _scattered_case(lens, hkv, group, d, dtype, 11, 3)
    out = kernels.paged_decode(q, k_cache, v_cache, tables, lens, BS, d**-0.5, None, window)
    pos = torch.arange(tables.shape[1] * BS)[None, :]
    valid = (pos < lens[:, None]) & (pos >= lens[:, None] - window)
    want = _reference(q, k_cache, v_cache, tables, lens, d**-0.5, valid)
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)
    for i in range(5):
        one = slice(i, i + 1)
        alone = kernels.paged_decode(
            q[one], k_cache, v_cache, tables[one], lens[one], BS, d**-0.5, None, window
        )
        assert torch.equal(out[one], alone), i
    plain = kernels.paged_decode(q, k_cache, v_cache, tables, lens, BS, d**-0.5)
    hides = lens > window
    assert not torch.allclose(out[hides].float(), plain[hides].float(), atol=1e-2)
    assert torch.equal(out[~hides], plain[~hides])


def test_paged_decode_sees_only_the_visible_slots():
    """A draft-tree row laid out as a decode row: from slot ``start`` on, it sees only the
    slots whose bit is set (its ancestors and itself)."""
    k_cache, v_cache, tables, lens = _paged_case(torch.float32, seed=2)
    q = torch.randn(6, HKV, GROUP, D)
    start = (lens - 5).clamp(min=0)
    bits = torch.tensor([0b1, 0b10101, 0b10011, 0b10001, 0b11111, 0b11001])
    out = kernels.paged_decode(
        q, k_cache, v_cache, tables, lens, BS, D**-0.5, torch.stack([start, bits], 1)
    )
    pos = torch.arange(tables.shape[1] * BS)[None, :]
    j = (pos - start[:, None]).clamp(0, 62)
    seen = (pos < start[:, None]) | ((bits[:, None] >> j) & 1).bool()
    want = _reference(q, k_cache, v_cache, tables, lens, D**-0.5, seen & (pos < lens[:, None]))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    plain = kernels.paged_decode(q, k_cache, v_cache, tables, lens, BS, D**-0.5)
    assert not torch.allclose(out[1:], plain[1:], atol=1e-3)  # the hidden slots mattered


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("context", [5, 37, 250, 300])  # 250: rows of 1 and of 2 parts
def test_a_draft_trees_rows_attend_as_each_would_alone(dtype, context):
    """The rows of one draft tree (one block table, one ``from``) share a task that loads each
    key once for all of them; each row's output is still exactly what it gets alone, next to
    plain rows too, and matches attention over its visible slots."""
    g = torch.Generator().manual_seed(3)
    k_cache = torch.randn(60 * BS, HKV, D, generator=g).to(dtype)
    v_cache = torch.randn(60 * BS, HKV, D, generator=g).to(dtype)
    table = torch.randperm(60, generator=g)[: (context + 20) // BS + 1]
    parents = [-1, 0, 0, 1, 2, 3, -1, 6, 4, 8, 9, 3, 11]  # 13 drafts: rows 1..13
    bits = []
    for i in range(len(parents) + 1):  # row i: itself and its ancestors (row 0: the root)
        b, j = 1 | (1 << i), i - 1
        while j >= 0:
            b, j = b | (1 << (j + 1)), parents[j]
        bits.append(b)
    rows = len(bits)
    q = torch.randn(rows + 2, HKV, GROUP, D, generator=g).to(dtype)
    tables = table[None].repeat(rows + 2, 1)
    lens = torch.tensor([context + 1] + [context + i + 1 for i in range(rows)] + [context + 1])
    visible = torch.tensor([[context + 1, 0]] + [[context, b] for b in bits] + [[context + 1, 0]])
    together = kernels.paged_decode(q, k_cache, v_cache, tables, lens, BS, D**-0.5, visible)
    for i in range(rows + 2):
        one = slice(i, i + 1)
        alone = kernels.paged_decode(
            q[one], k_cache, v_cache, tables[one], lens[one], BS, D**-0.5, visible[one]
        )
        assert torch.equal(together[one], alone), i
    pos = torch.arange(tables.shape[1] * BS)[None, :]
    j = (pos - visible[:, :1]).clamp(0, 62)
    seen = (pos < visible[:, :1]) | ((visible[:, 1:] >> j) & 1).bool()
    want = _reference(q, k_cache, v_cache, tables, lens, D**-0.5, seen & (pos < lens[:, None]))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(together.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_draft_chain_under_a_sliding_window(dtype):
    """A draft chain's rows laid out as decode rows of a sliding-window layer: each row's window
    ends at its own slot, so the rows' first visible slots differ (here across a part boundary
    at 256); each row still gets exactly what it gets alone, and attention over its window."""
    g = torch.Generator().manual_seed(4)
    context, drafts, window = 530, 10, 280
    k_cache = torch.randn(60 * BS, HKV, D, generator=g).to(dtype)
    v_cache = torch.randn(60 * BS, HKV, D, generator=g).to(dtype)
    table = torch.randperm(60, generator=g)[: (context + drafts) // BS + 1]
    rows = drafts + 1  # the last real token and its drafts, each seeing all before it
    bits = [(1 << (i + 1)) - 1 for i in range(rows)]
    q = torch.randn(rows, HKV, GROUP, D, generator=g).to(dtype)
    tables = table[None].repeat(rows, 1)
    lens = torch.tensor([context + i + 1 for i in range(rows)])
    visible = torch.tensor([[context, b] for b in bits])
    together = kernels.paged_decode(q, k_cache, v_cache, tables, lens, BS, D**-0.5, visible, window)
    for i in range(rows):
        one = slice(i, i + 1)
        alone = kernels.paged_decode(
            q[one], k_cache, v_cache, tables[one], lens[one], BS, D**-0.5, visible[one], window
        )
        assert torch.equal(together[one], alone), i
    pos = torch.arange(tables.shape[1] * BS)[None, :]
    valid = (pos < lens[:, None]) & (pos >= lens[:, None] - window)
    want = _reference(q, k_cache, v_cache, tables, lens, D**-0.5, valid)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(together.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_rows_equals_index_copy(dtype):
    """The cache write of a step's K (or V): a strided view of the fused projection into
    scattered slots, as index_copy_ writes it; a slot outside the cache is refused."""
    qkv = torch.randn(70, 9 + 2 * HKV, D).to(dtype)
    k = qkv[:, 9 : 9 + HKV]  # strided, like the loop's narrow of the qkv output
    slots = torch.randperm(500)[:70]
    want = torch.zeros(500, HKV, D, dtype=dtype).index_copy_(0, slots, k)
    got = torch.zeros(500, HKV, D, dtype=dtype)
    kernels.write_rows_(got, slots, k)
    assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.write_rows_(got, torch.full((70,), 500), k)


def test_paged_attention_kernel_path_equals_torch_path():
    """The same decode step through paged_attention with and without ``decode_lens`` (the
    kernel's switch): identical outputs, and the step's new K/V are written either way."""
    k_cache, v_cache, tables, lens = _paged_case(torch.float32, seed=1)
    b = tables.shape[0]
    slots = torch.tensor(
        [int(t[(n - 1) // BS]) * BS + (n - 1) % BS for t, n in zip(tables, lens, strict=True)]
    )
    q = torch.randn(b, HKV * GROUP, D)
    k, v = torch.randn(b, HKV, D), torch.randn(b, HKV, D)
    valid = torch.arange(tables.shape[1] * BS)[None, :] < lens[:, None]
    outs = []
    for use_kernel in (True, False):
        meta = AttentionMetadata(slots, BS, num_decodes=b, decode_blocks=tables)
        meta.decode_mask = valid[:, None, None]
        meta.decode_lens = lens if use_kernel else None
        meta.make_masks_additive(torch.float32)
        kc, vc = k_cache.clone(), v_cache.clone()
        outs.append(paged_attention(q, k, v, kc, vc, meta, D**-0.5))
        assert torch.equal(kc[slots], k) and torch.equal(vc[slots], v)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


# bf16 rounds after every op exactly as the PyTorch code does: equal bits. fp32 differs in the
# last bits (reduction order, fused multiply-adds).
EXACT = [(torch.bfloat16, 0.0), (torch.float32, 1e-5)]


@pytest.mark.parametrize("dtype, tol", EXACT)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_and_its_residual_add_equal_the_torch_path(dtype, tol, offset):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(576, 1e-5, offset).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576, generator=g))
    x, residual = (torch.randn(37, 576, generator=g).to(dtype) for _ in range(2))
    torch.testing.assert_close(norm(x), norm._norm(x), atol=tol, rtol=tol)
    total, normed = norm.add_and_norm(x, residual)
    assert torch.equal(total, x + residual)
    torch.testing.assert_close(normed, norm._norm(x + residual), atol=tol, rtol=tol)
    # per-head norms (Gemma's q/k norms) run on a strided [T, H, D] view
    head_norm = RMSNorm(64, 1e-6, offset).to(dtype)
    heads = torch.randn(5, 12, 64, generator=g).to(dtype)[:, 2:9]
    torch.testing.assert_close(head_norm(heads), head_norm._norm(heads), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype, tol", EXACT)
def test_rotary_in_place_equals_the_torch_formula(dtype, tol):
    """On the q/k heads of a fused qkv tensor (a strided view): rotated in place, the V heads
    after them untouched."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(5, 12, 64, generator=g).to(dtype)
    cos, sin = RotaryEmbedding(64, 100, 10000.0)(torch.tensor([0, 3, 4, 50, 99]), dtype)
    qk = qkv[:, :9]
    want = qk * cos + qk.roll(32, dims=-1) * sin
    v = qkv[:, 9:].clone()
    kernels.rotary_(qk, cos, sin)
    torch.testing.assert_close(qkv[:, :9], want, atol=tol, rtol=tol)
    assert torch.equal(qkv[:, 9:], v)


@pytest.mark.parametrize("dtype, tol", EXACT)
def test_silu_mul_equals_the_torch_path(dtype, tol):
    gate_up = torch.randn(7, 2 * 1536, generator=torch.Generator().manual_seed(2)).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_mul(gate_up), F.silu(gate) * up, atol=tol, rtol=tol)


def test_token_bitmask_equals_unpacked_bits():
    """Constrained decoding's masks: -inf exactly where a chosen row's bit is clear, the other
    rows untouched; words all set, all clear and mixed, a vocabulary that ends mid-word."""
    gen = torch.Generator().manual_seed(3)
    rows, vocab = 5, 1005
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (rows, words), generator=gen, dtype=torch.int32)
    bitmask[:, ::3] = -1  # every token of the word allowed
    bitmask[:, 1::5] = 0  # none
    logits = torch.randn(rows, vocab + 3, generator=gen)  # wider than the vocabulary
    chosen = torch.tensor([0, 2, 3])
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    allowed = bits.view(rows, words * 32)[:, :vocab].bool()
    expected = logits.clone()
    expected[chosen, :vocab] = expected[chosen, :vocab].masked_fill(~allowed[chosen], -math.inf)
    kernels.apply_token_bitmask_(logits, bitmask, chosen, vocab)
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "kind, out_f, in_f, group",
    [
        ("int4", 960, 576, 32),
        ("int4", 576, 1536, 64),
        ("int4", 256, 128, 128),
        ("int8", 960, 576, 0),
        ("int8", 99, 77, 0),  # inputs that end mid-way through 16
    ],
)
def test_dequantize_equals_the_torch_path(kind, out_f, in_f, group, dtype, monkeypatch):
    """The one-pass dequantization gives the PyTorch ops' bits (int4: rounded after the scale
    and after the zero), into a given buffer too, and it is what the module runs: in bf16
    with AVX-512, in float32 wherever the kernels build."""
    if dtype == torch.bfloat16 and not kernels.dequantize_runs():
        pytest.skip("needs AVX-512 bf16")
    if not kernels.available():
        pytest.skip("no compiled kernels")
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    packed = Int4Linear(linear, group) if kind == "int4" else Int8Linear(linear)
    name = f"dequantize_{kind}" + ("_float" if dtype == torch.float32 else "")
    calls = []
    original = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a: calls.append(1) or original(*a))
    fused = packed.dequantize(dtype)
    into = torch.empty(out_f, in_f, dtype=dtype)
    written = packed.dequantize(dtype, into)
    assert len(calls) == 2 and written.data_ptr() == into.data_ptr()
    assert torch.equal(written, fused)
    monkeypatch.setattr(kernels, "usable", lambda x: False)
    assert torch.equal(fused, packed.dequantize(dtype))


def _linear_case(kind: str, out_f: int, in_f: int, group: int, rows: int):
    """A packed linear, bf16 activations with a group of zeros and a group holding an outlier,
    the fp32 product with the dequantized weight, and how far from it each output may be: half
    a bf16 ulp (<= 2^-8 of it), fp32-level accumulation, and for int4 the rounding of the
    activations to integers (each group scaled to +-16256 by its largest value: at most half
    a step per input)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    packed = Int8Linear(linear) if kind == "int8" else Int4Linear(linear, group)
    x = torch.randn(rows, in_f)
    x[0, :group] = 0
    x[-1, group + 3] = 200.0
    x = x.bfloat16().float()
    if kind == "int8":  # the kernels take the bf16 copy of the scales
        weight = packed.qweight.float() * packed.kernel_scale.float()[:, None]
        steps = torch.zeros(rows, out_f)
    else:
        weight = packed.dequantize(torch.float32)
        half_step = x.view(rows, -1, group).abs().amax(-1) / 16256 / 2  # [rows, groups]
        steps = half_step @ weight.abs().view(out_f, -1, group).sum(-1).t()
    ref = x @ weight.t()
    bound = ref.abs() * 2**-8 + ref.abs().max() * 1e-5 + steps * 1.01
    return packed, x.bfloat16(), ref, bound


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 16, 40])  # 40: int4 takes rows 16 at a time
@pytest.mark.parametrize("out_f, in_f, group", [(960, 576, 32), (576, 1536, 64), (128, 256, 128)])
def test_quantized_gemv_matches_the_torch_kernels(kind, rows, out_f, in_f, group, monkeypatch):
    """heron's int8 / int4 few-row products agree with PyTorch's packed kernels within bf16
    rounding of the output, and they are what the modules run here."""
    runs = kernels.int8_gemv_runs() if kind == "int8" else kernels.int4_gemv_runs()
    if not runs:
        pytest.skip("needs AVX-512 (int4: VNNI and VBMI) or AVX2")
    packed, x, ref, bound = _linear_case(kind, out_f, in_f, group, rows)
    if kind == "int8":
        ours = kernels.int8_gemv(x, packed.qweight, packed.kernel_scale)
        theirs = torch._weight_int8pack_mm(x, packed.qweight, packed.kernel_scale)
    else:
        ours = kernels.int4_gemv(x, packed.packed, packed.scale_zero, group, out_f)
        theirs = torch._weight_int4pack_mm_for_cpu(x, packed.packed, group, packed.scale_zero)
    assert ours.shape == theirs.shape == (rows, out_f) and ours.dtype == torch.bfloat16
    assert ((ours.float() - ref).abs() <= bound).all()
    assert ((theirs.float() - ref).abs() <= ref.abs() * 2**-8 + ref.abs().max() * 1e-5).all()
    name = f"{kind}_gemv"
    calls = []
    original = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a: calls.append(1) or original(*a))
    y = packed(x)
    assert packed.heron_gemv
    if rows <= packed.max_gemv_rows:
        assert calls and torch.equal(y, ours)
    else:  # beyond: dequantize + GEMM
        assert not calls


def test_int8_gemv_takes_any_shape():
    """Output rows that do not fill a 4-row step, inputs that end mid-way through 16."""
    if not kernels.int8_gemv_runs():
        pytest.skip("needs AVX-512 or AVX2")
    packed, x, ref, bound = _linear_case("int8", 99, 77, 16, 5)
    y = kernels.int8_gemv(x, packed.qweight, packed.kernel_scale)
    assert ((y.float() - ref).abs() <= bound).all()


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_gemv_rows_do_not_depend_on_each_other(kind):
    """Each row of a many-row product is exactly that row's product alone (the int4 kernel
    shares a group's unpacked weights between rows, two at a time): a verify pass's rows then
    match plain one-row steps, so speculation with quantized weights stays token-exact."""
    runs = kernels.int8_gemv_runs() if kind == "int8" else kernels.int4_gemv_runs()
    if not runs:
        pytest.skip("needs AVX-512 (int4: VNNI and VBMI) or AVX2")
    for rows, group in ((2, 32), (3, 64), (5, 128), (16, 32), (21, 64)):
        packed, x, _, _ = _linear_case(kind, 192, 256, group, rows)
        many = _quantized_product(kind, packed, x)
        for i in range(rows):
            alone = _quantized_product(kind, packed, x[i : i + 1])
            assert torch.equal(many[i], alone[0]), (rows, group, i)


def _bf16_case(out_f: int, in_f: int, rows: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g).bfloat16()
    x = torch.randn(rows, in_f, generator=g).bfloat16()
    b = torch.randn(out_f, generator=g).bfloat16() if bias else None
    return x, w, b


@pytest.mark.parametrize("rows", [1, 3, 5, 16, 21])
@pytest.mark.parametrize("out_f, in_f", [(960, 576), (576, 1536), (99, 77)])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_gemv_matches_a_float64_product(rows, out_f, in_f, bias):
    """fp32 sums of exact bf16 products, rounded once: within half a bf16 step of the float64
    product plus fp32 summation error, for output counts that do not fill a 4-row step and
    inputs that end mid-way through 32."""
    if not kernels.bf16_gemv_runs():
        pytest.skip("needs AVX512_BF16")
    x, w, b = _bf16_case(out_f, in_f, rows, bias)
    ref = x.double() @ w.double().T + (0 if b is None else b.double())
    magnitude = x.double().abs() @ w.double().abs().T
    y = kernels.bf16_gemv(x, w, b)
    assert y.shape == (rows, out_f) and y.dtype == torch.bfloat16
    assert ((y.double() - ref).abs() <= ref.abs() * 2**-8 + magnitude * 2**-20).all()


def test_bf16_gemv_rows_do_not_depend_on_each_other():
    """As the quantized products: a verify pass's rows give plain one-row steps' bits."""
    if not kernels.bf16_gemv_runs():
        pytest.skip("needs AVX512_BF16")
    for rows in (2, 3, 5, 16):
        x, w, b = _bf16_case(99, 100, rows, True, seed=rows)
        many = kernels.bf16_gemv(x, w, b)
        for i in range(rows):
            assert torch.equal(many[i], kernels.bf16_gemv(x[i : i + 1], w, b)[0]), (rows, i)


def _quantized_product(kind: str, packed, x: torch.Tensor) -> torch.Tensor:
    if kind == "int8":
        return kernels.int8_gemv(x, packed.qweight, packed.kernel_scale)
    return kernels.int4_gemv(
        x, packed.packed, packed.scale_zero, packed.group_size, packed.out_features
    )
