// Weight-only int8 and int4 products for a decode step's few rows (Int8Linear / Int4Linear up
// to their max_gemv_rows, and the int8 LM head that int4 models keep).
//
// At batch 1 these products are most of a step and their weights are not in cache (a step
// reads ~80 MB of int4 layers and int8 head), so they should run at the memory's speed.
// PyTorch's kernels stream them well below it: int8 waits on memory (no prefetch); int4 is
// compute-bound turning nibbles into floats. Here:
// - int8: each weight converted to fp32 once for up to four activation rows, the weight
//   prefetched two row blocks ahead (into L2, heron_simd::prefetch_l2, as the int4 kernel
//   does). GCC kept the 4 x 4 accumulators on the stack until every loop over them was
//   unrolled (HERON_UNROLL), which made the many-row calls much slower.
// - int4 (PyTorch's packed layout, unchanged): no float conversion of weights at all. The
//   nibbles of four inputs of 16 rows are gathered into one 32-bit lane (vpermi2b) and
//   multiplied by integer activations with VNNI (vpdpbusd, 64 products per instruction).
//   The activations become integers per weight group without losing bf16 precision: a group
//   is scaled to +-16256 and split into hi * 128 + lo (two int8s, two vpdpbusd), so the
//   integer products are exact and the only rounding is that scale (~2^-14 of the group's
//   largest input, below bf16's 2^-9). Rows go two at a time (16 accumulators), and a weight
//   group is unpacked once for all of them (kept in L1 past the first pair), so a few-row
//   call costs little more than one row: unpacking, not vpdpbusd, is the work per row.
// Both accumulate in fp32 (int4: exact int32 per group, then fp32 across groups) and round the
// output to bf16 once, as PyTorch's kernels do; results agree with them within bf16 rounding.
//
// Without AVX-512 (AVX2 + FMA, e.g. AMD Zen 3) the same two designs in 8-lane form. There
// PyTorch's int4 kernel converts every nibble to a float and its int8 kernel streams at half
// the memory's speed, so both stay well above the time their weights take to read.
// - int8: weights widened to fp32 once for up to two activation rows.
// - int4: no VNNI, so the integer products are vpmaddubsw (unsigned nibble x signed int8,
//   pairs summed into int16; 2 * 15 * 127 < 2^15, so eight of them add up exactly) and a
//   vpmaddwd that joins hi * 128 + lo into int32 every 32 inputs. PyTorch's AVX2 layout holds
//   blocks of 32 rows: byte [b, k, j] is row j (low nibble) and row 16 + j (high) of input k;
//   interleaving the bytes of inputs k and k + 2 (k + 1 and k + 3 in the upper lane) gives
//   each row's pair of nibbles side by side for vpmaddubsw.
#include "heron_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define HERON_INT8_GEMV 1
#include "simd.h"
#else
#define HERON_INT8_GEMV 0
#endif
#if HERON_INT8_GEMV && defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define HERON_INT4_GEMV 1
#else
#define HERON_INT4_GEMV 0
#endif
#if !HERON_INT8_GEMV && defined(__AVX2__) && defined(__FMA__)
#define HERON_GEMV_AVX2 1
#include "simd.h"
#else
#define HERON_GEMV_AVX2 0
#endif

bool int8_gemv_supported() { return HERON_INT8_GEMV || HERON_GEMV_AVX2; }
bool int4_gemv_supported() { return HERON_INT4_GEMV || HERON_GEMV_AVX2; }
// The row block of PyTorch's int4 pack that int4_gemv reads (0: no int4_gemv here).
int64_t int4_gemv_block() { return HERON_INT4_GEMV ? 64 : HERON_GEMV_AVX2 ? 32 : 0; }

namespace {

void check_rows(const torch::Tensor& x, int64_t in_features, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.size(1) == in_features,
              op, ": x must be bf16 [rows, in_features]");
}

#if HERON_INT8_GEMV
constexpr int64_t kRows = 4;     // int8 weight rows per step: each converted once per 4 x rows
constexpr int64_t kXRows = 4;    // activation rows per pass over a weight row block
constexpr int64_t kAhead = 8;    // int8 prefetch distance, in weight rows

using heron_simd::load16;

// Output rows [n, n + Rows) of y = x w^T * scale for activation rows [m0, m0 + XRows) (both
// constants; every loop over the accumulators unrolled, so they stay in registers): each
// weight vector widened to fp32 once for all XRows rows. `prefetch`: the first pass over
// these weight rows, which fetches the ones after them.
template <int64_t Rows, int64_t XRows>
void int8_pass(const float* x, const int8_t* w, const float* scale, at::BFloat16* y,
               int64_t m0, int64_t K, int64_t N, int64_t n, bool prefetch) {
  const int8_t* w0 = w + n * K;
  const int8_t* ahead = w0 + kAhead * K;
  const int8_t* end = w + N * K;
  __m512 acc[XRows][Rows];
  HERON_UNROLL for (int64_t i = 0; i < XRows; ++i) {
    HERON_UNROLL for (int64_t r = 0; r < Rows; ++r) acc[i][r] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = heron_simd::tail_mask(K - k);
    if (prefetch && k % 64 == 0)
      for (int64_t r = 0; r < Rows; ++r)
        if (ahead + r * K + k < end) heron_simd::prefetch_l2(ahead + r * K + k);
    __m512 wv[Rows];
    HERON_UNROLL for (int64_t r = 0; r < Rows; ++r) wv[r] = load16(w0 + r * K + k, mask);
    HERON_UNROLL for (int64_t i = 0; i < XRows; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + (m0 + i) * K + k);
      HERON_UNROLL for (int64_t r = 0; r < Rows; ++r) {
        acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
      }
    }
  }
  HERON_UNROLL for (int64_t i = 0; i < XRows; ++i) {
    HERON_UNROLL for (int64_t r = 0; r < Rows; ++r) {
      y[(m0 + i) * N + n + r] = at::BFloat16(_mm512_reduce_add_ps(acc[i][r]) * scale[n + r]);
    }
  }
}

#endif

#if HERON_INT4_GEMV || HERON_GEMV_AVX2
// Activations as integers per weight group: x ~= scale_g * (hi * 128 + lo), and each group's
// fp32 sum (for the zeros). Each ISA's to_int_rows fills it.
struct IntRows {
  std::vector<int8_t> hi, lo;
  std::vector<float> scale, sum;

  void resize(int64_t M, int64_t K, int64_t G) {
    hi.resize(M * K);
    lo.resize(M * K);
    scale.resize(M * G);
    sum.resize(M * G);
  }
};
#endif

#if HERON_INT4_GEMV
constexpr int64_t kBlockN = 64;     // PyTorch's AVX-512 int4 pack: blocks of 64 rows
constexpr int64_t kInt4Ahead = 4096;  // prefetch distance, bytes
constexpr float kLevels = 16256.f;  // 127 * 128: hi in [-127, 127], lo in [-64, 63]
constexpr int64_t kInt4ChunkRows = 16;  // rows a block keeps outputs for at once
constexpr int64_t kInt4Span = 16;   // the inputs a group's size must be a multiple of
constexpr int64_t kInt4MaxGroup = 128;  // the largest group size int4_gemv takes

// Byte i of gather order h: the nibble of row 16 * h + i / 4 at input k + i % 4, from the
// 128 bytes of inputs k .. k + 3 (32 bytes each) that two loads hold.
struct GatherOrder {
  alignas(64) uint8_t bytes[2][64];
  GatherOrder() {
    for (int h = 0; h < 2; ++h)
      for (int i = 0; i < 64; ++i)
        bytes[h][i] = static_cast<uint8_t>(32 * (i % 4) + 16 * h + i / 4);
  }
};

void to_int_rows(const at::BFloat16* x, int64_t M, int64_t K, int64_t group, IntRows& out) {
  const int64_t G = K / group;
  out.resize(M, K, G);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = m * K + g * group;
      __m512 amax = _mm512_setzero_ps(), sum = _mm512_setzero_ps();
      for (int64_t k = 0; k < group; k += 16) {
        const __m512 v = load16(x + k0 + k);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
        sum = _mm512_add_ps(sum, v);
      }
      const float largest = _mm512_reduce_max_ps(amax);
      out.scale[m * G + g] = largest / kLevels;
      out.sum[m * G + g] = _mm512_reduce_add_ps(sum);
      const __m512 inv = _mm512_set1_ps(largest > 0.f ? kLevels / largest : 0.f);
      for (int64_t k = 0; k < group; k += 16) {
        const __m512i level = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x + k0 + k), inv));
        const __m512i lo = _mm512_sub_epi32(
            _mm512_and_si512(_mm512_add_epi32(level, _mm512_set1_epi32(64)),
                             _mm512_set1_epi32(127)),
            _mm512_set1_epi32(64));
        const __m512i hi = _mm512_srai_epi32(_mm512_sub_epi32(level, lo), 7);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out.lo.data() + k0 + k),
                         _mm512_cvtepi32_epi8(lo));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out.hi.data() + k0 + k),
                         _mm512_cvtepi32_epi8(hi));
      }
    }
  }
}

// The weights of inputs k .. k + 3 for the block's 64 output columns as four vectors of nibbles
// (vector r: columns 16 r .. 16 r + 15, four inputs each), from the 128 packed bytes at p.
// Packed byte [b, k, j] holds column j (low nibble) and column 32 + j (high) of input k.
struct Unpacker {
  __m512i gather0, gather1, nibble;

  Unpacker() {
    static const GatherOrder order;
    gather0 = _mm512_load_si512(order.bytes[0]);
    gather1 = _mm512_load_si512(order.bytes[1]);
    nibble = _mm512_set1_epi8(15);
  }

  void operator()(const uint8_t* p, __m512i w[4]) const {
    const __m512i a = _mm512_loadu_si512(p), c = _mm512_loadu_si512(p + 64);
    const __m512i a_lo = _mm512_and_si512(a, nibble), c_lo = _mm512_and_si512(c, nibble);
    const __m512i a_hi = _mm512_and_si512(_mm512_srli_epi16(a, 4), nibble);
    const __m512i c_hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), nibble);
    w[0] = _mm512_permutex2var_epi8(a_lo, gather0, c_lo);
    w[1] = _mm512_permutex2var_epi8(a_lo, gather1, c_lo);
    w[2] = _mm512_permutex2var_epi8(a_hi, gather0, c_hi);
    w[3] = _mm512_permutex2var_epi8(a_hi, gather1, c_hi);
  }
};

// Where a pass over one weight group gets its unpacked weights: from the packed bytes, from
// the packed bytes keeping them for the passes after it, or from what the first pass kept.
enum class Weights { kUnpack, kUnpackAndKeep, kKept };

// One weight group's contribution to the block's outputs for R activation rows (R a constant:
// the 8 R integer accumulators stay in registers): the exact int32 dot products of the
// group's `steps` 4-input steps, then out[i] += scale * x_scale * dot + zero * x_sum in fp32
// (each row alone, so a row's result does not depend on the rows computed with it). `p` and
// `prefetch` are read only by the passes that unpack.
template <int R, Weights From>
inline void int4_group_pass(const Unpacker& unpack, const uint8_t* p, bool prefetch,
                            __m512i (*kept)[4], int64_t steps, const int8_t* const* x_hi,
                            const int8_t* const* x_lo, const float* x_scale, const float* x_sum,
                            const __m512* scale, const __m512* zero, float* const* out) {
  __m512i hi[R][4], lo[R][4];
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < 4; ++r) hi[i][r] = lo[i][r] = _mm512_setzero_si512();
  for (int64_t s = 0; s < steps; ++s) {
    __m512i w[4];
    if constexpr (From == Weights::kKept) {
      for (int r = 0; r < 4; ++r) w[r] = _mm512_load_si512(&kept[s][r]);
    } else {
      const uint8_t* ps = p + s * 2 * kBlockN;  // 4 inputs x 64 columns, 2 per byte
      if (prefetch) {
        heron_simd::prefetch_l2(ps + kInt4Ahead);
        heron_simd::prefetch_l2(ps + kInt4Ahead + 64);
      }
      unpack(ps, w);
      if constexpr (From == Weights::kUnpackAndKeep)
        for (int r = 0; r < 4; ++r) _mm512_store_si512(&kept[s][r], w[r]);
    }
    for (int i = 0; i < R; ++i) {
      int32_t xh, xl;
      std::memcpy(&xh, x_hi[i] + 4 * s, 4);
      std::memcpy(&xl, x_lo[i] + 4 * s, 4);
      const __m512i vh = _mm512_set1_epi32(xh), vl = _mm512_set1_epi32(xl);
      for (int r = 0; r < 4; ++r) {
        hi[i][r] = _mm512_dpbusd_epi32(hi[i][r], w[r], vh);
        lo[i][r] = _mm512_dpbusd_epi32(lo[i][r], w[r], vl);
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    const __m512 xs = _mm512_set1_ps(x_scale[i]), xsum = _mm512_set1_ps(x_sum[i]);
    for (int r = 0; r < 4; ++r) {
      float* o = out[i] + 16 * r;
      const __m512 dot =
          _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(hi[i][r], 7), lo[i][r]));
      _mm512_store_ps(o, _mm512_fmadd_ps(dot, _mm512_mul_ps(scale[r], xs),
                                         _mm512_fmadd_ps(xsum, zero[r], _mm512_load_ps(o))));
    }
  }
}

// Output columns [b * 64, b * 64 + 64) of the int4 product for activation rows
// [m_begin, m_begin + M), M <= kInt4ChunkRows; scale_zero [groups, N] holds (scale, zero) bf16
// pairs: w = (q - 8) * scale + zero. Each group's weights are unpacked once: one or two rows
// use them straight from registers; more rows go two at a time, the first pair keeping the
// unpacked group in L1 (8 KB at most) for the others.
void int4_block(const IntRows& xs, const uint8_t* packed, const uint32_t* scale_zero,
                at::BFloat16* y, int64_t m_begin, int64_t M, int64_t K, int64_t N,
                int64_t group, int64_t b) {
  const int64_t G = K / group, steps = group / 4;
  const Unpacker unpack;
  const __m512i high_half = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  alignas(64) float out[kInt4ChunkRows][kBlockN] = {};
  alignas(64) __m512i kept[kInt4MaxGroup / 4][4];
  const uint8_t* base = packed + b * K * (kBlockN / 2);
  const bool prefetch = m_begin == 0;  // later chunks of rows find the block in cache
  for (int64_t g = 0; g < G; ++g) {
    __m512 scale[4], zero[4];  // zero - 8 * scale: the level offset folded in
    for (int64_t r = 0; r < 4; ++r) {
      const __m512i sz = _mm512_loadu_si512(scale_zero + g * N + b * kBlockN + 16 * r);
      scale[r] = _mm512_castsi512_ps(_mm512_slli_epi32(sz, 16));
      zero[r] = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), scale[r],
                                 _mm512_castsi512_ps(_mm512_and_si512(sz, high_half)));
    }
    const uint8_t* p = base + g * group * (kBlockN / 2);
    for (int64_t m0 = 0; m0 < M; m0 += 2) {
      // The pass's rows m0 and m1 (a last odd row pairs with itself; one-row passes read only
      // the first of each pair below).
      const int64_t m1 = std::min(m0 + 1, M - 1);
      const int64_t r0 = (m_begin + m0) * K + g * group, r1 = (m_begin + m1) * K + g * group;
      const int8_t* x_hi[2] = {xs.hi.data() + r0, xs.hi.data() + r1};
      const int8_t* x_lo[2] = {xs.lo.data() + r0, xs.lo.data() + r1};
      const int64_t a0 = (m_begin + m0) * G + g, a1 = (m_begin + m1) * G + g;
      const float x_scale[2] = {xs.scale[a0], xs.scale[a1]};
      const float x_sum[2] = {xs.sum[a0], xs.sum[a1]};
      float* o[2] = {out[m0], out[m1]};
      if (M == 1) {
        int4_group_pass<1, Weights::kUnpack>(unpack, p, prefetch, kept, steps, x_hi, x_lo,
                                             x_scale, x_sum, scale, zero, o);
      } else if (M == 2) {
        int4_group_pass<2, Weights::kUnpack>(unpack, p, prefetch, kept, steps, x_hi, x_lo,
                                             x_scale, x_sum, scale, zero, o);
      } else if (m0 == 0) {
        int4_group_pass<2, Weights::kUnpackAndKeep>(unpack, p, prefetch, kept, steps, x_hi,
                                                    x_lo, x_scale, x_sum, scale, zero, o);
      } else if (m1 > m0) {
        int4_group_pass<2, Weights::kKept>(unpack, p, prefetch, kept, steps, x_hi, x_lo,
                                           x_scale, x_sum, scale, zero, o);
      } else {
        int4_group_pass<1, Weights::kKept>(unpack, p, prefetch, kept, steps, x_hi, x_lo,
                                           x_scale, x_sum, scale, zero, o);
      }
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < 4; ++r)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + (m_begin + m) * N + b * kBlockN + 16 * r),
                          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(
                              _mm512_load_ps(&out[m][16 * r]))));
}
#endif

#if HERON_GEMV_AVX2
constexpr int64_t kRows2 = 4;       // int8 weight rows per step
constexpr int64_t kXRows2 = 2;      // activation rows per pass (8 accumulators + 4 weights)
constexpr int64_t kAhead2 = 8;      // int8 prefetch distance, in weight rows
constexpr int64_t kInt4Ahead2 = 4096;  // int4 prefetch distance, bytes
constexpr int64_t kBlockN2 = 32;    // PyTorch's AVX2 int4 pack: blocks of 32 rows
constexpr int64_t kSpan2 = 32;      // inputs summed in int16 before widening (8 x 4)
constexpr int64_t kInt4Span = kSpan2;  // the inputs a group's size must be a multiple of
constexpr float kLevels2 = 16256.f;  // as the AVX-512 kernel: hi in [-127, 127], lo in [-64, 63]

using heron_simd::hmax8;
using heron_simd::hsum8;
using heron_simd::load8;

// 8 int8s as fp32 (exact).
inline __m256 load8(const int8_t* p) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}

// Output rows [n, n + Rows) of y = x w^T * scale for activation rows [m0, m0 + mm).
template <int64_t Rows>
void int8_rows_avx2(const float* x, const int8_t* w, const float* scale, at::BFloat16* y,
                    int64_t m0, int64_t mm, int64_t K, int64_t N, int64_t n) {
  const int8_t* w0 = w + n * K;
  const int8_t* ahead = w0 + kAhead2 * K;
  const int8_t* end = w + N * K;
  __m256 acc[kXRows2][Rows];
  for (auto& a : acc)
    for (auto& r : a) r = _mm256_setzero_ps();
  const int64_t body = K / 8 * 8;
  for (int64_t k = 0; k < body; k += 8) {
    if (m0 == 0 && k % 64 == 0)
      for (int64_t r = 0; r < Rows; ++r)
        if (ahead + r * K + k < end) heron_simd::prefetch_l2(ahead + r * K + k);
    __m256 wv[Rows];
    for (int64_t r = 0; r < Rows; ++r) wv[r] = load8(w0 + r * K + k);
    for (int64_t i = 0; i < kXRows2; ++i) {
      if (i == mm) break;
      const __m256 xv = _mm256_loadu_ps(x + (m0 + i) * K + k);
      for (int64_t r = 0; r < Rows; ++r) acc[i][r] = _mm256_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  for (int64_t i = 0; i < mm; ++i) {
    for (int64_t r = 0; r < Rows; ++r) {
      float total = hsum8(acc[i][r]);
      for (int64_t k = body; k < K; ++k) total += x[(m0 + i) * K + k] * w0[r * K + k];
      y[(m0 + i) * N + n + r] = at::BFloat16(total * scale[n + r]);
    }
  }
}

// The 8 int32 lanes of v (each within int8) as 8 bytes at p.
inline void store8_int8(int8_t* p, __m256i v) {
  const __m128i words =
      _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(words, words));
}

// The AVX-512 kernel's to_int_rows with 8 lanes.
void to_int_rows(const at::BFloat16* x, int64_t M, int64_t K, int64_t group, IntRows& out) {
  const int64_t G = K / group;
  out.resize(M, K, G);
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i c64 = _mm256_set1_epi32(64), c127 = _mm256_set1_epi32(127);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = m * K + g * group;
      __m256 amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
      for (int64_t k = 0; k < group; k += 8) {
        const __m256 v = load8(x + k0 + k);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
        sum = _mm256_add_ps(sum, v);
      }
      const float largest = hmax8(amax);
      out.scale[m * G + g] = largest / kLevels2;
      out.sum[m * G + g] = hsum8(sum);
      const __m256 inv = _mm256_set1_ps(largest > 0.f ? kLevels2 / largest : 0.f);
      for (int64_t k = 0; k < group; k += 8) {
        const __m256i level = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x + k0 + k), inv));
        const __m256i lo =
            _mm256_sub_epi32(_mm256_and_si256(_mm256_add_epi32(level, c64), c127), c64);
        store8_int8(out.lo.data() + k0 + k, lo);
        store8_int8(out.hi.data() + k0 + k, _mm256_srai_epi32(_mm256_sub_epi32(level, lo), 7));
      }
    }
  }
}

// Adds rows 0-7 of an (hi, lo) int16 accumulator pair, each 128-bit lane holding a partial
// sum over half the inputs, to the 8 int32 totals `acc`: hi * 128 + lo, both lanes summed.
inline __m256i widen_rows(__m256i hi, __m256i lo, __m256i acc) {
  const __m256i weights = _mm256_set1_epi32(0x00010080);  // int16 pairs (128, 1)
  const __m256i a = _mm256_madd_epi16(_mm256_unpacklo_epi16(hi, lo), weights);  // rows 0-3
  const __m256i b = _mm256_madd_epi16(_mm256_unpackhi_epi16(hi, lo), weights);  // rows 4-7
  const __m256i rows = _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20),
                                        _mm256_permute2x128_si256(a, b, 0x31));
  return _mm256_add_epi32(acc, rows);
}

// Output columns [b * 32, b * 32 + 32) of the int4 product for activation rows [0, M), into
// the fp32 `out` [M, 32]. Packed byte [b, k, j] holds row j (low nibble) and row 16 + j (high
// nibble) of input k; scale_zero [groups, N] holds (scale, zero) bf16 pairs.
void int4_block_avx2(const IntRows& xs, const uint8_t* packed, const uint32_t* scale_zero,
                     float* out, int64_t M, int64_t K, int64_t N, int64_t group, int64_t b) {
  const int64_t G = K / group;
  const __m256i nibble = _mm256_set1_epi8(15);
  const __m256i high_half = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  // Lane 0 takes activation bytes 0 and 2 (inputs k, k + 2), lane 1 bytes 1 and 3.
  const __m256i pairs = _mm256_setr_epi8(0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2,
                                         1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3);
  const uint8_t* base = packed + b * K * (kBlockN2 / 2);
  std::fill(out, out + M * kBlockN2, 0.f);
  for (int64_t g = 0; g < G; ++g) {
    __m256 scale[4], zero[4];  // zero - 8 * scale: the level offset folded in
    for (int64_t r = 0; r < 4; ++r) {
      const __m256i sz = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(scale_zero + g * N + b * kBlockN2 + 8 * r));
      scale[r] = _mm256_castsi256_ps(_mm256_slli_epi32(sz, 16));
      zero[r] = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), scale[r],
                                 _mm256_castsi256_ps(_mm256_and_si256(sz, high_half)));
    }
    for (int64_t m = 0; m < M; ++m) {
      __m256i total[4] = {};  // rows 0-7, 8-15, 16-23, 24-31
      for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += kSpan2) {
        __m256i hi[4] = {}, lo[4] = {};
        for (int64_t k = k0; k < k0 + kSpan2; k += 4) {
          const uint8_t* p = base + k * (kBlockN2 / 2);
          if (m == 0) heron_simd::prefetch_l2(p + kInt4Ahead2);
          const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
          const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
          const __m256i t0 = _mm256_unpacklo_epi8(v0, v1), t1 = _mm256_unpackhi_epi8(v0, v1);
          const __m256i w[4] = {_mm256_and_si256(t0, nibble), _mm256_and_si256(t1, nibble),
                                _mm256_and_si256(_mm256_srli_epi16(t0, 4), nibble),
                                _mm256_and_si256(_mm256_srli_epi16(t1, 4), nibble)};
          int32_t x_hi, x_lo;
          std::memcpy(&x_hi, xs.hi.data() + m * K + k, 4);
          std::memcpy(&x_lo, xs.lo.data() + m * K + k, 4);
          const __m256i vh = _mm256_shuffle_epi8(_mm256_set1_epi32(x_hi), pairs);
          const __m256i vl = _mm256_shuffle_epi8(_mm256_set1_epi32(x_lo), pairs);
          for (int64_t r = 0; r < 4; ++r) {
            hi[r] = _mm256_add_epi16(hi[r], _mm256_maddubs_epi16(w[r], vh));
            lo[r] = _mm256_add_epi16(lo[r], _mm256_maddubs_epi16(w[r], vl));
          }
        }
        for (int64_t r = 0; r < 4; ++r) total[r] = widen_rows(hi[r], lo[r], total[r]);
      }
      const __m256 x_scale = _mm256_set1_ps(xs.scale[m * G + g]);
      const __m256 x_sum = _mm256_set1_ps(xs.sum[m * G + g]);
      for (int64_t r = 0; r < 4; ++r) {
        float* o = out + m * kBlockN2 + 8 * r;
        const __m256 dot = _mm256_cvtepi32_ps(total[r]);
        _mm256_storeu_ps(o, _mm256_fmadd_ps(dot, _mm256_mul_ps(scale[r], x_scale),
                                            _mm256_fmadd_ps(x_sum, zero[r], _mm256_loadu_ps(o))));
      }
    }
  }
}
#endif

}  // namespace

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor weight, torch::Tensor scale) {
#if HERON_INT8_GEMV || HERON_GEMV_AVX2
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "int8_gemv: weight must be contiguous int8 [out, in]");
  check_rows(x, weight.size(1), "int8_gemv");
  TORCH_CHECK(scale.numel() == weight.size(0), "int8_gemv: one scale per output row");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const torch::Tensor xf = x.to(at::kFloat).contiguous();
  const torch::Tensor sf = scale.to(at::kFloat).contiguous();
  torch::Tensor y = torch::empty({M, N}, x.options());
  const float* xp = xf.data_ptr<float>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  const float* sp = sf.data_ptr<float>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
#if HERON_INT8_GEMV
  heron_simd::parallel_column_blocks<kRows>(N, [&](auto rows, int64_t n) {
    heron_simd::for_row_blocks<kXRows>(M, [&](auto xrows, int64_t m0) {
      int8_pass<rows.value, xrows.value>(xp, wp, sp, yp, m0, K, N, n, m0 == 0);
    });
  });
#else
  heron_simd::parallel_column_blocks<kRows2>(N, [&](auto rows, int64_t n) {
    for (int64_t m0 = 0; m0 < M; m0 += kXRows2) {
      int8_rows_avx2<rows.value>(xp, wp, sp, yp, m0, std::min(kXRows2, M - m0), K, N, n);
    }
  });
#endif
  return y;
#else
  TORCH_CHECK(false, "int8_gemv: built without AVX-512 or AVX2");
#endif
}

torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor packed, torch::Tensor scale_zero,
                        int64_t group_size, int64_t out_features) {
#if HERON_INT4_GEMV || HERON_GEMV_AVX2
  const int64_t K = x.size(1), N = out_features, block_n = int4_gemv_block();
  check_rows(x, K, "int4_gemv");
  check_int4_pack(packed, scale_zero, N, K, group_size, "int4_gemv");
  TORCH_CHECK(N % block_n == 0 && group_size % kInt4Span == 0 && K % group_size == 0,
              "int4_gemv: out must be a multiple of ", block_n, " and groups of ", kInt4Span,
              "k inputs tile in");
  const int64_t M = x.size(0);
  static thread_local IntRows buffers;
  IntRows& xs = buffers;  // the workers below read this thread's buffers, not their own
  to_int_rows(x.contiguous().data_ptr<at::BFloat16>(), M, K, group_size, xs);
  torch::Tensor y = torch::empty({M, N}, x.options());
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const uint32_t* szp = reinterpret_cast<const uint32_t*>(scale_zero.data_ptr<at::BFloat16>());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
#if HERON_INT4_GEMV
  TORCH_CHECK(group_size <= kInt4MaxGroup, "int4_gemv: groups of at most ", kInt4MaxGroup);
  at::parallel_for(0, N / kBlockN, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      // Rows beyond one chunk re-read the block's weights from cache, not memory.
      for (int64_t m0 = 0; m0 < M; m0 += kInt4ChunkRows) {
        int4_block(xs, pp, szp, yp, m0, std::min(kInt4ChunkRows, M - m0), K, N, group_size, b);
      }
    }
  });
#else
  at::parallel_for(0, N / kBlockN2, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> out(M * kBlockN2);
    for (int64_t b = begin; b < end; ++b) {
      int4_block_avx2(xs, pp, szp, out.data(), M, K, N, group_size, b);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < kBlockN2; ++j)
          yp[m * N + b * kBlockN2 + j] = at::BFloat16(out[m * kBlockN2 + j]);
    }
  });
#endif
  return y;
#else
  TORCH_CHECK(false, "int4_gemv: built without AVX-512 (VNNI, VBMI) or AVX2");
#endif
}
