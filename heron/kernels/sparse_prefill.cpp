// Block-sparse causal attention for a prefill chunk (CPU, bf16), and XAttention's block
// estimate. heron also runs dense prefill chunks after cached tokens through the first, with
// every causal block kept.
//
// Each (query head, query block) row attends only to the key blocks its pattern kept, given
// as a CSR list. The context's key and value blocks that some row keeps are packed once per
// call into the VNNI layout AMX multiplies ([D/2, B, 2] for K^T, [B/2, D, 2] for V), shared
// by every row; then each row runs a flash-attention loop over its kept blocks: S = Q K^T and
// O += P V through oneDNN's brgemm micro-kernel (at::native::cpublas::brgemm, the one
// PyTorch's own CPU flash attention uses) where it runs (AMX), else heron's AVX512_BF16 tile
// product (vdpbf16ps on the same VNNI layout: AMD Zen 4, Intel Cooper Lake), an online
// softmax in between. No gathered copy of the kept blocks, no per-count batching, no separate
// causal call for the diagonal block and no log-sum-exp merge: the PyTorch path
// (heron/sparse/attention.py) needed all four. Without AMX the tile loop is faster than
// SDPA's flash kernel on dense causal attention too, which is why dense chunks run here.
//
// Keys and values are read in place: rows of a [rows, Hkv, D] tensor, either position = row
// (a chunk's own K/V) or through the sequence's block table (a layer's paged cache), so no
// gathered copy of the context is made before packing.
#include "heron_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// The kernel needs AVX-512 with bf16 dot products (AVX512_BF16) at build time; elsewhere heron
// keeps the PyTorch path.
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define HERON_SPARSE_PREFILL 1
#else
#define HERON_SPARSE_PREFILL 0
#endif

#if HERON_SPARSE_PREFILL
#include <immintrin.h>

#include "simd.h"

namespace {

using bf16 = c10::BFloat16;

// The running maximum before any score: finite, as the build assumes finite math.
constexpr float kNoScore = -1e30f;

// A row's work is tiled: kRows queries at a time against kChunk kept blocks at a time (their
// Q K^T products side by side, one softmax pass over them, then their P V products), so the
// tile's scores, probabilities and output stay in L1. Other tile shapes barely move the
// time: the softmax's exps bound it.
constexpr int64_t kChunk = 2;
constexpr int64_t kRows = 64;

using heron_simd::exp2_neg;
using heron_simd::tail_mask;

// One query's online-softmax step over ``width`` new scores ``s`` (keys past ``valid`` are
// hidden): the probabilities, in bf16, into ``p`` for the P V product, and the running
// maximum (log2 units), sum and accumulated output ``acc`` rescaled to the new maximum.
inline void softmax_row(const float* s, bf16* p, int64_t width, int64_t valid, float sc2,
                        float& row_max, float& row_sum, float* acc, int64_t dim) {
  __m512 vmax = _mm512_set1_ps(kNoScore);
  int64_t j = 0;
  for (; j + 16 <= valid; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + j));
  if (j < valid) {
    const __mmask16 live = tail_mask(valid - j);
    vmax = _mm512_mask_max_ps(vmax, live, vmax, _mm512_maskz_loadu_ps(live, s + j));
  }
  // Scores in log2 units: exp(scale * s - max) = 2^(scale * log2(e) * s - max2).
  const float new_max = std::max(row_max, _mm512_reduce_max_ps(vmax) * sc2);
  const float alpha = exp2f(row_max - new_max);
  const __m512 vsc = _mm512_set1_ps(sc2), vneg = _mm512_set1_ps(-new_max);
  __m512 vsum = _mm512_setzero_ps();
  for (j = 0; j < width; j += 16) {
    __m512 e = exp2_neg(_mm512_fmadd_ps(_mm512_loadu_ps(s + j), vsc, vneg));
    if (j + 16 > valid) e = _mm512_maskz_mov_ps(j < valid ? tail_mask(valid - j) : 0, e);
    vsum = _mm512_add_ps(vsum, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), (__m256i)_mm512_cvtneps_pbh(e));
  }
  row_sum = row_sum * alpha + _mm512_reduce_add_ps(vsum);
  row_max = new_max;
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) acc[d] *= alpha;
}

// C (+)= A B for bf16 A [M, K] (row stride lda) and B in VNNI layout [K / 2, ldb, 2] (N <= ldb
// columns; K even), C fp32 [M, ldc]: 4 rows x 64 columns at a time, 16 accumulators, each B
// vector used by 4 rows (vdpbf16ps: a pair of products per lane). ``cols``: the lanes of the
// last vector (a tail of N).
template <int64_t Rows, int64_t Vecs>
inline void vnni_tile(int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add_c,
                      __mmask16 cols, const bf16* a, const bf16* b, float* c) {
  __m512 acc[Rows][Vecs];
  HERON_UNROLL for (int64_t r = 0; r < Rows; ++r) {
    HERON_UNROLL for (int64_t v = 0; v < Vecs; ++v) {
      acc[r][v] = add_c ? _mm512_maskz_loadu_ps(v + 1 < Vecs ? 0xFFFF : cols, c + r * ldc + 16 * v)
                        : _mm512_setzero_ps();
    }
  }
  for (int64_t kp = 0; kp < K / 2; ++kp) {
    __m512bh bv[Vecs];
    HERON_UNROLL for (int64_t v = 0; v < Vecs; ++v) {
      const __mmask16 live = v + 1 < Vecs ? 0xFFFF : cols;
      bv[v] = (__m512bh)_mm512_maskz_loadu_epi32(live, b + (kp * ldb + 16 * v) * 2);
    }
    HERON_UNROLL for (int64_t r = 0; r < Rows; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * kp, sizeof pair);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      HERON_UNROLL for (int64_t v = 0; v < Vecs; ++v) {
        acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
      }
    }
  }
  HERON_UNROLL for (int64_t r = 0; r < Rows; ++r) {
    HERON_UNROLL for (int64_t v = 0; v < Vecs; ++v) {
      _mm512_mask_storeu_ps(c + r * ldc + 16 * v, v + 1 < Vecs ? 0xFFFF : cols, acc[r][v]);
    }
  }
}

template <int64_t Rows>
inline void vnni_rows(int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add_c,
                      const bf16* a, const bf16* b, float* c) {
  int64_t j = 0;
  for (; j + 64 <= N; j += 64)
    vnni_tile<Rows, 4>(K, lda, ldb, ldc, add_c, 0xFFFF, a, b + 2 * j, c + j);
  for (; j < N; j += 16)
    vnni_tile<Rows, 1>(K, lda, ldb, ldc, add_c, tail_mask(N - j), a, b + 2 * j, c + j);
}

// The tile products of both kernels, with brgemm's arguments: oneDNN's brgemm where it packs
// bf16 (AMX), else vnni_rows. ``release`` after a thread's last product.
struct TileGemm {
  bool amx = at::native::cpublas::could_pack(at::kBFloat16);

  void operator()(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc,
                  bool add_c, const bf16* a, const bf16* b, float* c) const {
    if (amx) {
      at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add_c, a, b, c, true);
      return;
    }
    int64_t i = 0;
    for (; i + 4 <= M; i += 4)
      vnni_rows<4>(N, K, lda, ldb, ldc, add_c, a + i * lda, b, c + i * ldc);
    for (; i < M; ++i) vnni_rows<1>(N, K, lda, ldb, ldc, add_c, a + i * lda, b, c + i * ldc);
  }
  void release() const {
    if (amx) at::native::cpublas::brgemm_release(true);
  }
};

// A context position's row in the K/V tensor: through the block table, or the position.
struct Slots {
  const int64_t* table;  // nullptr: row = position
  int64_t block_size;
  int64_t operator()(int64_t pos) const {
    return table == nullptr ? pos : table[pos / block_size] * block_size + pos % block_size;
  }
};

inline bf16 to_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bf16(static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16),
              bf16::from_bits());
}

// The context's keys and values in VNNI layout, one [block x D] tile per (KV head, key block);
// only the blocks some row keeps are packed.
void pack_context(const bf16* k, const bf16* v, int64_t k_stride0, int64_t k_stride1,
                  int64_t v_stride0, int64_t v_stride1, const Slots& slot, int64_t ctx,
                  int64_t kv_heads, int64_t nkb, int64_t block, int64_t dim,
                  const std::vector<char>& used, bf16* kp, bf16* vp) {
  const int64_t tile = block * dim;
  const std::vector<bf16> zeros(dim, bf16(0.f));  // keys and values past the context
  at::parallel_for(0, kv_heads * nkb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (!used[t]) continue;
      const int64_t g = t / nkb, kb = t % nkb;
      bf16* kt = kp + t * tile;  // [D/2, block, 2]
      bf16* vt = vp + t * tile;  // [block/2, D, 2]
      for (int64_t j = 0; j < block; ++j) {
        const int64_t pos = kb * block + j;
        const bool inside = pos < ctx;  // past the context: zeros (the causal mask hides them)
        const int64_t row = inside ? slot(pos) : 0;
        const bf16* kr = inside ? k + row * k_stride0 + g * k_stride1 : zeros.data();
        const bf16* vr = inside ? v + row * v_stride0 + g * v_stride1 : zeros.data();
        for (int64_t d = 0; d < dim; ++d) kt[(d / 2) * block * 2 + j * 2 + d % 2] = kr[d];
        bf16* vrow = vt + (j / 2) * dim * 2 + j % 2;
        for (int64_t d = 0; d < dim; ++d) vrow[d * 2] = vr[d];
      }
    }
  });
}

}  // namespace
#endif

bool sparse_prefill_supported() { return HERON_SPARSE_PREFILL; }

namespace {

// The shape of a chunk's queries ``q`` [Lq, H, D] over the context's keys (or values) ``k``
// [rows, Hkv, D] (positions 0 .. q_start + Lq - 1, at rows given by ``table`` [blocks] of
// ``cache_block`` rows each, or at row = position), in blocks, after checking what both
// kernels need: bf16, head dim contiguous and even, whole GQA groups, every row inside k.
struct Chunk {
  int64_t q_len, heads, dim, kv_heads, group, ctx, qb0, nqb, nkb;
#if HERON_SPARSE_PREFILL
  Slots slot;
#endif
};

Chunk check_chunk(const torch::Tensor& q, const torch::Tensor& k,
                  const std::optional<torch::Tensor>& table, int64_t cache_block,
                  int64_t q_start, int64_t block) {
  TORCH_CHECK(sparse_prefill_supported(), "heron sparse prefill: needs AVX512_BF16");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "heron sparse prefill: q and k/v are 3-D");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16,
              "heron sparse prefill: bf16 only");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1,
              "heron sparse prefill: the head dimension must be contiguous");
  TORCH_CHECK(q.size(2) == k.size(2) && q.size(2) % 2 == 0 && q.size(1) % k.size(1) == 0,
              "heron sparse prefill: matching even head dims, whole GQA groups");
  TORCH_CHECK(block % 16 == 0, "heron sparse prefill: the block must be a multiple of 16");
  Chunk c;
  c.q_len = q.size(0);
  c.heads = q.size(1);
  c.dim = q.size(2);
  c.kv_heads = k.size(1);
  c.group = c.heads / c.kv_heads;
  c.ctx = q_start + c.q_len;
  if (table) {
    TORCH_CHECK(table->scalar_type() == at::kLong && table->dim() == 1 && table->is_contiguous(),
                "heron sparse prefill: the block table is a contiguous int64 vector");
    TORCH_CHECK(cache_block >= 1 && table->numel() * cache_block >= c.ctx,
                "heron sparse prefill: the block table must cover the context");
    const int64_t* t = table->data_ptr<int64_t>();
    for (int64_t i = 0; i * cache_block < c.ctx; ++i) {
      TORCH_CHECK(t[i] >= 0 && (t[i] + 1) * cache_block <= k.size(0),
                  "heron sparse prefill: a block outside the cache");
    }
  } else {
    TORCH_CHECK(k.size(0) >= c.ctx, "heron sparse prefill: k/v end before the chunk");
  }
#if HERON_SPARSE_PREFILL
  c.slot = Slots{table ? table->data_ptr<int64_t>() : nullptr, cache_block};
#endif
  c.qb0 = q_start / block;
  c.nqb = (q_start + c.q_len - 1) / block - c.qb0 + 1;
  c.nkb = (c.ctx + block - 1) / block;
  return c;
}

}  // namespace

torch::Tensor sparse_prefill(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                             std::optional<torch::Tensor> table, int64_t cache_block,
                             torch::Tensor row_ptr, torch::Tensor cols,
                             int64_t q_start, int64_t block, double scale) {
#if HERON_SPARSE_PREFILL
  const Chunk chunk = check_chunk(q, k, table, cache_block, q_start, block);
  check_chunk(q, v, table, cache_block, q_start, block);
  const int64_t q_len = chunk.q_len, heads = chunk.heads, dim = chunk.dim;
  const int64_t kv_heads = chunk.kv_heads, group = chunk.group, ctx = chunk.ctx;
  const int64_t qb0 = chunk.qb0, nqb = chunk.nqb, nkb = chunk.nkb;
  row_ptr = row_ptr.contiguous();
  cols = cols.contiguous();
  TORCH_CHECK(row_ptr.size(0) == heads * nqb + 1, "sparse_prefill: row_ptr has H * nQB + 1");
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int64_t* cp = cols.data_ptr<int64_t>();

  std::vector<char> used(kv_heads * nkb, 0);
  for (int64_t r = 0; r < heads * nqb; ++r) {
    const int64_t g = (r / nqb) / group;
    TORCH_CHECK(rp[r + 1] > rp[r], "sparse_prefill: every row keeps its diagonal block");
    for (int64_t i = rp[r]; i < rp[r + 1]; ++i) {
      TORCH_CHECK(cp[i] >= 0 && cp[i] <= qb0 + r % nqb, "sparse_prefill: a non-causal block");
      TORCH_CHECK(i == rp[r] || cp[i] > cp[i - 1], "sparse_prefill: blocks must ascend");
      used[g * nkb + cp[i]] = 1;
    }
  }
  const int64_t tile = block * dim;
  auto kp = torch::empty({kv_heads * nkb * tile}, q.options());
  auto vp = torch::empty({kv_heads * nkb * tile}, q.options());
  pack_context(k.data_ptr<bf16>(), v.data_ptr<bf16>(), k.stride(0), k.stride(1), v.stride(0),
               v.stride(1), chunk.slot, ctx, kv_heads, nkb, block, dim, used,
               kp.data_ptr<bf16>(), vp.data_ptr<bf16>());

  auto out = torch::empty({q_len, heads, dim}, q.options());
  const bf16* qd = q.data_ptr<bf16>();
  const bf16* kpd = kp.data_ptr<bf16>();
  const bf16* vpd = vp.data_ptr<bf16>();
  bf16* od = out.data_ptr<bf16>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  const float sc2 = static_cast<float>(scale) * 1.44269504f;  // log2(e)
  const TileGemm gemm;
  at::parallel_for(0, heads * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(kRows * kChunk * block), acc(kRows * dim), row_max(kRows),
        row_sum(kRows);
    std::vector<bf16> p(kRows * kChunk * block);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t h = r / nqb, qb = qb0 + r % nqb, g = h / group;
      const int64_t first = std::max(q_start, qb * block);  // positions of this row's queries
      const int64_t last = std::min(ctx, (qb + 1) * block);
      for (int64_t a0 = first; a0 < last; a0 += kRows) {
        const int64_t m = std::min(kRows, last - a0);  // queries a0 .. a0 + m - 1
        const bf16* qr = qd + (a0 - q_start) * qs0 + h * qs1;
        std::fill(row_max.begin(), row_max.begin() + m, kNoScore);
        std::fill(row_sum.begin(), row_sum.begin() + m, 0.f);
        std::fill(acc.begin(), acc.begin() + m * dim, 0.f);
        // Up to kChunk kept blocks at a time: their scores side by side in s ([m, width]).
        for (int64_t i0 = rp[r]; i0 < rp[r + 1]; i0 += kChunk) {
          const int64_t n = std::min(kChunk, rp[r + 1] - i0);
          const int64_t width = n * block;
          for (int64_t b = 0; b < n; ++b) {
            gemm(m, block, dim, qs0, block, width, false, qr, kpd + (g * nkb + cp[i0 + b]) * tile,
                 s.data() + b * block);
          }
          // Blocks ascend, so only the last can be the diagonal, where a query sees the keys
          // up to its own position.
          const int64_t last_kb = cp[i0 + n - 1];
          for (int64_t a = 0; a < m; ++a) {
            const int64_t valid =
                width - block + std::min(block, a0 + a - last_kb * block + 1);
            softmax_row(s.data() + a * width, p.data() + a * width, width, valid, sc2,
                        row_max[a], row_sum[a], acc.data() + a * dim, dim);
          }
          for (int64_t b = 0; b < n; ++b) {
            gemm(m, dim, block, width, dim, dim, true, p.data() + b * block,
                 vpd + (g * nkb + cp[i0 + b]) * tile, acc.data());
          }
        }
        for (int64_t a = 0; a < m; ++a) {
          const float inv = 1.f / row_sum[a];
          const float* oa = acc.data() + a * dim;
          bf16* dst = od + (a0 - q_start + a) * heads * dim + h * dim;
          for (int64_t d = 0; d < dim; ++d) dst[d] = to_bf16(oa[d] * inv);
        }
      }
    }
    gemm.release();
  });
  return out;
#else
  TORCH_CHECK(false, "sparse_prefill: needs AVX512_BF16");
  return {};
#endif
}

torch::Tensor xattention_scores(torch::Tensor q, torch::Tensor k,
                                std::optional<torch::Tensor> table, int64_t cache_block,
                                int64_t q_start, int64_t block, int64_t stride, double scale) {
#if HERON_SPARSE_PREFILL
  const Chunk chunk = check_chunk(q, k, table, cache_block, q_start, block);
  const Slots& slot = chunk.slot;
  TORCH_CHECK(block % stride == 0, "xattention_scores: the stride must divide the block");
  const int64_t heads = chunk.heads, dim = chunk.dim, kv_heads = chunk.kv_heads;
  const int64_t group = chunk.group, ctx = chunk.ctx, qb0 = chunk.qb0, nqb = chunk.nqb;
  const int64_t nkb = chunk.nkb;
  const int64_t per = block / stride;           // strided rows (columns) per block
  const int64_t width = stride * dim;           // one strided row: `stride` tokens
  const int64_t cols = (nkb * per + 63) / 64 * 64;  // key columns, padded to whole tiles
  const int64_t live_cols = (ctx + stride - 1) / stride;

  // Keys regrouped `stride` tokens per column (in order), as the B of S = Qr Kr^T in VNNI
  // layout [width / 2, cols, 2]; tokens past the context are zeros.
  auto kp = torch::empty({kv_heads, width / 2, cols, 2}, q.options());
  bf16* kpd = kp.data_ptr<bf16>();
  const bf16* kd = k.data_ptr<bf16>();
  constexpr int64_t kTile = 32;  // columns packed together: reads stay in L1, writes in rows
  const int64_t tiles = cols / kTile;
  at::parallel_for(0, kv_heads * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<bf16> rows(kTile * width);  // the tile's columns, token-major
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / tiles, c0 = (t % tiles) * kTile;
      for (int64_t c = 0; c < kTile; ++c) {
        for (int64_t s = 0; s < stride; ++s) {
          const int64_t pos = (c0 + c) * stride + s;
          bf16* dst = rows.data() + c * width + s * dim;
          if (pos < ctx) {
            std::memcpy(dst, kd + slot(pos) * k.stride(0) + g * k.stride(1), dim * sizeof(bf16));
          } else {
            std::fill(dst, dst + dim, bf16(0.f));
          }
        }
      }
      const uint32_t* src = reinterpret_cast<const uint32_t*>(rows.data());  // bf16 pairs
      uint32_t* dst = reinterpret_cast<uint32_t*>(kpd + g * width * cols) + c0;
      for (int64_t e2 = 0; e2 < width / 2; ++e2) {
#pragma omp simd
        for (int64_t c = 0; c < kTile; ++c) dst[e2 * cols + c] = src[c * width / 2 + e2];
      }
    }
  });

  auto out = torch::zeros({heads, nqb, nkb}, q.options().dtype(at::kFloat));
  float* od = out.data_ptr<float>();
  const bf16* qd = q.data_ptr<bf16>();
  const float sc2 = static_cast<float>(scale / stride) * 1.44269504f;  // log2 units
  const TileGemm gemm;
  at::parallel_for(0, heads * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<bf16> a(per * width);
    std::vector<float> sbuf(per * cols), colsum(cols);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t h = r / nqb, qb = qb0 + r % nqb, g = h / group;
      // Query row i of this block: its `stride` tokens in reverse order, so that one dot
      // product with a key column sums an antidiagonal of the stride x stride score tile.
      // Tokens outside the chunk are zeros.
      for (int64_t i = 0; i < per; ++i) {
        for (int64_t s = 0; s < stride; ++s) {
          const int64_t pos = (qb * per + i) * stride + stride - 1 - s;
          bf16* dst = a.data() + i * width + s * dim;
          if (pos >= q_start && pos < ctx) {
            std::memcpy(dst, qd + (pos - q_start) * q.stride(0) + h * q.stride(1),
                        dim * sizeof(bf16));
          } else {
            std::fill(dst, dst + dim, bf16(0.f));
          }
        }
      }
      const int64_t n = std::min(cols, ((qb + 1) * per + 63) / 64 * 64);  // causal columns
      gemm(per, n, width, width, cols, n, false, a.data(), kpd + g * width * cols, sbuf.data());
      std::fill(colsum.begin(), colsum.begin() + n, 0.f);
      for (int64_t i = 0; i < per; ++i) {
        const int64_t row = qb * per + i;
        if (row * stride + stride <= q_start || row * stride >= ctx) continue;  // no query
        // Softmax over the columns this row may see (causal, inside the context), each
        // probability added to its column's total.
        const int64_t valid = std::min(row + 1, live_cols);
        float* si = sbuf.data() + i * n;
        __m512 vmax = _mm512_set1_ps(kNoScore);
        for (int64_t j = 0; j < valid; j += 16) {
          const __mmask16 live = tail_mask(valid - j);
          vmax = _mm512_mask_max_ps(vmax, live, vmax, _mm512_maskz_loadu_ps(live, si + j));
        }
        const __m512 vsc = _mm512_set1_ps(sc2);
        const __m512 vneg = _mm512_set1_ps(-_mm512_reduce_max_ps(vmax) * sc2);
        __m512 vsum = _mm512_setzero_ps();
        for (int64_t j = 0; j < valid; j += 16) {
          const __mmask16 live = tail_mask(valid - j);
          const __m512 e = _mm512_maskz_mov_ps(
              live, exp2_neg(_mm512_fmadd_ps(_mm512_loadu_ps(si + j), vsc, vneg)));
          vsum = _mm512_add_ps(vsum, e);
          _mm512_storeu_ps(si + j, e);
        }
        const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(vsum));
        for (int64_t j = 0; j < valid; j += 16) {
          const __mmask16 live = tail_mask(valid - j);
          const __m512 acc = _mm512_loadu_ps(colsum.data() + j);
          _mm512_storeu_ps(colsum.data() + j,
                           _mm512_mask3_fmadd_ps(_mm512_loadu_ps(si + j), inv, acc, live));
        }
      }
      float* dst = od + r * nkb;
      for (int64_t kb = 0; kb <= qb && kb < nkb; ++kb) {
        float total = 0.f;
        for (int64_t c = kb * per; c < (kb + 1) * per; ++c) total += colsum[c];
        dst[kb] = total;
      }
    }
    gemm.release();
  });
  return out;
#else
  TORCH_CHECK(false, "xattention_scores: needs AVX512_BF16");
  return {};
#endif
}

torch::Tensor vnni_matmul(torch::Tensor a, torch::Tensor b, std::optional<torch::Tensor> c) {
#if HERON_SPARSE_PREFILL
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0) && a.size(1) % 2 == 0 &&
                  a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16,
              "vnni_matmul: bf16 a [M, K] and b [K, N], K even");
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  a = a.contiguous();
  // b in VNNI layout: [K / 2, N, 2]
  const torch::Tensor packed = b.contiguous().view({K / 2, 2, N}).transpose(1, 2).contiguous();
  torch::Tensor out = c ? c->to(at::kFloat).contiguous().clone()
                        : torch::empty({M, N}, a.options().dtype(at::kFloat));
  TORCH_CHECK(out.sizes() == at::IntArrayRef({M, N}), "vnni_matmul: c must be [M, N]");
  TileGemm{false}(M, N, K, K, N, N, c.has_value(), a.data_ptr<bf16>(), packed.data_ptr<bf16>(),
                  out.data_ptr<float>());
  return out;
#else
  TORCH_CHECK(false, "vnni_matmul: needs AVX512_BF16");
  return {};
#endif
}

torch::Tensor select_blocks(torch::Tensor scores, double threshold, int64_t qb0) {
  TORCH_CHECK(scores.dim() == 3 && scores.scalar_type() == at::kFloat,
              "select_blocks: scores are [H, nQB, nKB] float32");
  scores = scores.contiguous();
  const int64_t heads = scores.size(0), nqb = scores.size(1), nkb = scores.size(2);
  auto keep = torch::zeros({heads, nqb, nkb}, scores.options().dtype(at::kBool));
  const float* sd = scores.data_ptr<float>();
  bool* kd = keep.data_ptr<bool>();
  at::parallel_for(0, heads * nqb, 16, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order(nkb);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t qb = qb0 + r % nqb;
      const int64_t n = std::min(qb + 1, nkb);  // the causal key blocks
      const float* s = sd + r * nkb;
      bool* k = kd + r * nkb;
      float total = 0.f;
      for (int64_t j = 0; j < n; ++j) total += s[j];
      for (int64_t j = 0; j < n; ++j) order[j] = j;
      std::sort(order.begin(), order.begin() + n,
                [&](int64_t a, int64_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); });
      // The fewest blocks whose share reaches the threshold: a block is kept while the mass
      // of the strictly better ones is below it.
      const float bound = static_cast<float>(threshold) * total;
      float before = 0.f;
      for (int64_t i = 0; i < n && before < bound; ++i) {
        k[order[i]] = true;
        before += s[order[i]];
      }
      k[0] = true;  // the attention sink
      if (qb < nkb) k[qb] = true;  // the diagonal
    }
  });
  return keep;
}

